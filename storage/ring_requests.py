"""Client requests, replies and request timers of a PBFT replica (TOCS 2002
sections 4.1, 4.4), as a mixin of ``pbft.Replica``.

A client sends its signed request to the primary (and, if that does not
answer in time, to every member: ``ringclient``). A member that gets it
checks the signature, keeps the request pending until it executes, and
answers with the result once the result is durable, with its view (so the
client finds the primary). Retries of an executed request are answered from
the replicated reply table without ordering them again.

Certificates from the primary alone. The result of an update names a
version; its certificate is 2f+1 members' signatures of that version's body
(``ring``). Each backup, having executed a batch, sends the primary its
shares of every result (SHARES); the primary checks each against its own
result's body and, for a client waiting on it, adds the first 2f valid ones
to its answer: the client then holds a whole certificate after one request
(it verifies it itself; a primary that lies gains nothing, see
``ringclient``). The primary waits for shares at most ``share_wait`` after
its own result is durable, then answers with what it has.

Which shares the primary checks. The client checks every signature of the
certificate it gets, so the primary's own check of a backup's share guards
only against handing out a damaged certificate, which costs that client one
more round trip (it then asks every member, ``ringclient``), never a wrong
answer. So the primary checks a random ``share_check`` fraction of each
backup's shares, and every share of a backup once one of its shares failed:
a backup that signs garbage is caught after about 1/share_check bad shares
and slows no client after that. Checking all of them (``share_check=1``)
cost two signature checks per update on the primary's critical path.

Timers (one per pending request, oldest first): half-way through
``request_timeout`` a backup forwards the requests the primary may have
missed (a client that skipped it, a lost frame) and restarts their clock
(the primary re-sends its stalled batches, ``ring_agreement``); at the end
it first catches up (with the primary relaying all votes, a backup hears
little from the others and may be the one behind), again while f+1 others
report more progress than it has, and then votes for a view change.
"""

from __future__ import annotations

import logging
import random

import trio

from collections import OrderedDict

from overlay.wire.ids import short
from overlay.wire.transport import Refused

from . import ring_messages as M
from .ring_messages import BadMessage, Request

log = logging.getLogger(__name__)


class Pending:
    __slots__ = ("req", "since", "forwarded")

    def __init__(self, req: Request, since: float):
        self.req = req
        self.since = since
        self.forwarded = False


class Gather:
    """The primary collecting shares of one result for a waiting client."""

    __slots__ = ("body", "sigs", "done")

    def __init__(self, body: bytes, me: int, sig: bytes):
        self.body = body
        self.sigs = {me: sig}
        self.done = trio.Event()


def kth_highest(values, k: int) -> int:
    """The k-th highest value (k >= 1), or -1 if there are fewer."""
    v = sorted(values, reverse=True)
    return v[k - 1] if len(v) >= k else -1


class RequestMixin:
    def _init_requests(self) -> None:
        self._behind = 0                 # request timeouts blamed on our lag since progress
        self._gather: OrderedDict[tuple, Gather] = OrderedDict()
        self._batch_keys: OrderedDict[int, tuple[bytes, list]] = OrderedDict()
        self._share_suspects: set[bytes] = set()     # members caught with a bad share
        self._share_rng = random.Random(self.me.id)  # (deterministic in simulations)

    async def _on_request(self, sender: bytes, body: dict) -> dict:
        req = Request(body["c"], body["r"], body["op"], body["s"])
        key = req.key
        until = trio.current_time() + min(max(body["wait"], 0.0), self.cfg.max_wait)
        if self.retired:
            raise Refused("not_member", f"this node left ring {short(self.ring.ring_id)} at "
                          f"epoch {self.ring.epoch}")
        res = self._released_result(key)
        if res is None and not self.is_stale(*key):
            if key not in self.pending and self.result_of(*key) is None:
                try:
                    req.check_signature(self.ring.ring_id)
                    self.app.check_op(req.c, req.op)
                except BadMessage as e:
                    raise Refused("bad_request", str(e)) from None
                if len(self.pending) >= self.cfg.max_pending:
                    raise Refused("busy", "too many requests waiting to be ordered")
                self._add_pending(req)
            ev = self._waiters.get(key)
            if ev is None:
                ev = self._waiters[key] = trio.Event()
            with trio.move_on_at(until):
                await ev.wait()
            res = self._released_result(key)
        if res is None:
            if self.is_stale(*key):
                newest = max(self.clients.get(req.c) or (0,))
                return {"res": self.app.reply(req.c, req.r, self.app.stale_result(newest)),
                        "view": self.view}
            raise Refused("pending", f"request not yet ordered (view {self.view}"
                          f"{', view change' if self.in_vc else ''}); retry")
        out = {"res": self.app.reply(req.c, req.r, res), "view": self.view}
        g = self._gather.get(key)
        if g is not None:
            try:
                if len(g.sigs) < self.ring.quorum:
                    with trio.move_on_at(min(until, trio.current_time() + self.cfg.share_wait)):
                        await g.done.wait()
                if len(g.sigs) >= self.ring.quorum:
                    out["sigs"] = [g.sigs.get(k, b"") if k != self.i else b""
                                   for k in range(self.ring.n)]
            finally:
                self._gather.pop(key, None)
        return out

    # ---- certificate shares ------------------------------------------------

    def _results(self, n: int, d: bytes, reqs, results: list) -> None:
        """After executing batch n: the primary starts gathering shares for
        the clients waiting on it; a backup sends the primary its shares."""
        if self.retired:
            return
        if self.is_primary():
            keys, any_key = [], False
            for r, res in zip(reqs, results):
                share = None
                if res is not None and r.key in self._waiters and r.key not in self._gather:
                    share = self.app.share(res)
                if share is None:
                    keys.append(None)
                    continue
                self._gather[r.key] = Gather(share[0], self.i, share[1])
                keys.append(r.key)
                any_key = True
            while len(self._gather) > 4 * self.cfg.batch_max * self.cfg.pipeline + 256:
                self._gather.popitem(last=False)   # their clients went away
            if any_key:
                self._batch_keys[n] = (d, keys)
                while len(self._batch_keys) > 4 * self.cfg.pipeline + 64:
                    self._batch_keys.popitem(last=False)
            return
        primary = self.ctx.primary(self.view)
        if self.in_vc or primary == self.i:
            return
        sigs = []
        for res in results:
            share = None if res is None else self.app.share(res)
            sigs.append(b"" if share is None else share[1])
        self._send(M.shares(self.i, n, d, sigs), to=primary)

    def _on_shares(self, j: int, m: dict) -> None:
        if m["n"] > self.seen_seq[j]:
            self.seen_seq[j] = m["n"]
        ent = self._batch_keys.get(m["n"])
        if ent is None or ent[0] != m["d"]:
            return                       # not ours to gather, or already done
        keys = ent[1]
        if len(m["s"]) != len(keys):
            raise BadMessage(f"{len(m['s'])} shares for a batch of {len(keys)} requests")
        member_key = self.ring.members[j].key
        quorum = self.ring.quorum
        check = self.cfg.share_check
        for key, sig in zip(keys, m["s"]):
            g = None if key is None else self._gather.get(key)
            if g is None or not sig or j in g.sigs or len(g.sigs) >= quorum:
                continue
            if (member_key not in self._share_suspects and check < 1.0
                    and self._share_rng.random() >= check) \
                    or self.app.share_ok(member_key, g.body, sig):
                g.sigs[j] = sig
                if len(g.sigs) >= quorum:
                    g.done.set()
            else:
                self.stats["bad_msgs"] += 1
                if member_key not in self._share_suspects:
                    self._share_suspects.add(member_key)
                    log.warning("member %d: member %d sent a bad certificate share; checking "
                                "all of its shares from now on", self.i, j)

    def _released_result(self, key: tuple) -> bytes | None:
        """The result of an executed request, once it is durable (S2: never
        answer from a state a crash could still take back)."""
        return None if key in self._unreleased else self.result_of(*key)

    def _add_pending(self, req: Request) -> None:
        self.pending[req.key] = Pending(req, trio.current_time())
        if self.is_primary():
            self.queue[req.key] = None
            self._try_propose()
        if len(self.pending) == 1:
            self._timer_changed.set()     # the first: a deadline where there was none
        self._kick()

    def _on_forwarded(self, j: int, m: dict) -> None:
        req = Request.from_list(m["r"])
        if req.key in self.pending or self.result_of(*req.key) is not None:
            return
        if self.is_stale(*req.key):
            return
        req.check_signature(self.ring.ring_id)
        self.app.check_op(req.c, req.op)
        self._add_pending(req)

    # ---- timers ------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while True:
            self._timer_changed = trio.Event()
            deadline = self._next_deadline()
            with trio.move_on_at(deadline):
                await self._timer_changed.wait()
                continue
            self._on_timer(trio.current_time())
            self._kick()

    def _next_deadline(self) -> float:
        if self.retired:
            return float("inf")
        if self.in_vc:
            return self._vc_deadline()
        if not self.pending:
            return float("inf")
        # Oldest first: ``since`` only grows along the OrderedDict. At half
        # the timeout a request is forwarded (and its clock restarted), at
        # the next half a view change starts.
        p = next(iter(self.pending.values()))
        return p.since + self.cfg.request_timeout / 2

    def _on_timer(self, now: float) -> None:
        if self.in_vc:
            self._on_view_change_timer(now)
            return
        if not self.pending:
            return
        half = self.cfg.request_timeout / 2
        p = next(iter(self.pending.values()))
        if now < p.since + half:
            return
        self._resend_stalled(half / 2)
        others = [s for k, s in enumerate(self.seen_seq) if k != self.i]
        if p.forwarded and (self._behind == 0 or (
                self._behind < 3 and (self.need_state or self._catching_up
                                      or kth_highest(others, self.f + 1) > self.committed_seq))):
            # Before blaming the primary, make sure we are not the one
            # behind (we hear little from the other backups): catch up once,
            # and again while f+1 others are ahead, with a fresh timeout each
            # time. If that does not help (a batch nobody decided holds
            # everything up), the primary is to blame after all.
            self._behind += 1
            for q in self.pending.values():
                q.since = now
            self._catchup_now.set()
            return
        if not p.forwarded:
            # First half of the timeout: maybe the primary never got these
            # (a client that skipped it, a lost frame): forward, then wait.
            primary = self.ctx.primary(self.view)
            for key in list(self.pending):
                q = self.pending[key]
                if q.forwarded:
                    continue
                q.forwarded = True
                q.since = now
                self.pending.move_to_end(key)
                if primary != self.i:
                    self._send({"t": "rq", "r": q.req.as_list()}, to=primary)
            return
        log.info("member %d: request %s not executed in time; view change to %d", self.i,
                 short(p.req.c), self.view + 1)
        self._start_view_change(self.view + 1)
