"""Client requests and request timers of a PBFT replica (TOCS 2002
sections 4.1, 4.4), as a mixin of ``pbft.Replica``.

A client sends its signed request to every member; each member checks the
signature, keeps the request pending until it executes, and answers with the
result once the result is durable. Retries of an executed request are
answered from the replicated reply table without ordering them again.

Timers (one per pending request, oldest first): half-way through
``request_timeout`` a backup forwards the requests the primary may have
missed (a client that skipped it, a lost frame) and restarts their clock;
at the end it votes for a view change. A member that is behind the others
never votes for one; it catches up instead (the primary is not to blame).
"""

from __future__ import annotations

import logging

import trio

from overlay.wire.ids import short
from overlay.wire.transport import Refused

from .ring_messages import BadMessage, Request

log = logging.getLogger(__name__)


class Pending:
    __slots__ = ("req", "since", "forwarded")

    def __init__(self, req: Request, since: float):
        self.req = req
        self.since = since
        self.forwarded = False


def kth_highest(values, k: int) -> int:
    """The k-th highest value (k >= 1), or -1 if there are fewer."""
    v = sorted(values, reverse=True)
    return v[k - 1] if len(v) >= k else -1


class RequestMixin:
    async def _on_request(self, sender: bytes, body: dict) -> dict:
        req = Request(body["c"], body["r"], body["op"], body["s"])
        key = req.key
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
            with trio.move_on_after(min(max(body["wait"], 0.0), self.cfg.max_wait)):
                await ev.wait()
            res = self._released_result(key)
        if res is None:
            if self.is_stale(*key):
                return {"res": self.app.reply(req.c, req.r, self.app.stale_result())}
            raise Refused("pending", f"request not yet ordered (view {self.view}"
                          f"{', view change' if self.in_vc else ''}); retry")
        return {"res": self.app.reply(req.c, req.r, res)}

    def _released_result(self, key: tuple) -> bytes | None:
        """The result of an executed request, once it is durable (S2: never
        answer from a state a crash could still take back)."""
        return None if key in self._unreleased else self.result_of(*key)

    def _add_pending(self, req: Request) -> None:
        self.pending[req.key] = Pending(req, trio.current_time())
        if self.is_primary():
            self.queue[req.key] = None
            self._try_propose()
        self._timer_changed.set()
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
        others = [s for k, s in enumerate(self.seen_seq) if k != self.i]
        if (self.need_state or self._catching_up
                or kth_highest(others, self.f + 1) > self.exec_seq):
            # We are behind, not the primary: catch up, and give the
            # requests a fresh timeout.
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
