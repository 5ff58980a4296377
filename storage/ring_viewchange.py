"""PBFT view changes (TOCS 2002 section 4.4), as a mixin of ``pbft.Replica``.

When a member's request timer expires (``pbft._on_timer``) it stops taking
part in view v and broadcasts VIEW-CHANGE(v+1) carrying its stable
checkpoint with its 2f+1 signed CHECKPOINTs and its prepared certificates
(pre-prepare + 2f prepares, all signed) above that checkpoint. The primary
of v+1, with 2f+1 valid VIEW-CHANGEs, computes the pre-prepares of the new
view (``ring_messages.compute_new_view``: for every seq between the highest
stable checkpoint and the highest prepared seq, the batch prepared in the
highest view, else the null batch) and sends NEW-VIEW citing them. Every
member checks a NEW-VIEW against the messages it cites, recomputing the
pre-prepares, before it enters the view: a faulty new primary can stall
(and be voted out in turn) but cannot change what may have been decided.

Liveness rules:

* a member that sees VIEW-CHANGEs for views above its own from f+1 others
  joins the (f+1)-th highest of them: at least one correct member wants it;
* the timer of a view change starts only once 2f+1 members asked for that
  view; if the view change does not complete in time the member moves on
  to the next view, the timeout doubling each time (at most 2**max_backoff
  times) and resetting once a request executes;
* a member that is behind the others (f+1 of them committed past what it
  executed) does not vote for a view change on its request timers: it is
  the one to blame, and catches up instead (``pbft._on_timer``);
* a member in a view change re-sends its VIEW-CHANGE every
  ``view_change_timeout`` (members that were down meanwhile need it), and
  answers a VIEW-CHANGE for the view it is already running with that
  view's NEW-VIEW.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import msgpack
import trio

from . import ring_messages as M

log = logging.getLogger(__name__)

INF = float("inf")


class ViewChangeMixin:
    def _init_viewchange(self) -> None:
        self.vc_attempts = 0
        self.vcs: dict[int, dict[int, dict]] = {}      # view -> member -> VIEW-CHANGE
        self.vc_wanted = [0] * self.ring.n             # highest view each member asked for
        self.my_vc: dict | None = None
        self.vc_deadline_at = INF
        self.vc_resend_at = INF
        self.last_nv: dict | None = None               # NEW-VIEW of our current view

    def _recover_viewchange(self) -> None:
        raw = self.store.get("meta", b"nv")
        if raw is not None:
            self.last_nv = msgpack.unpackb(raw, raw=False)

    def _vc_deadline(self) -> float:
        return min(self.vc_deadline_at, self.vc_resend_at)

    def _vc_timeout(self) -> float:
        cfg = self.cfg
        return cfg.view_change_timeout * 2 ** min(max(self.vc_attempts - 1, 0), cfg.max_backoff)

    # ---- starting one -----------------------------------------------------

    def _make_view_change(self, v: int) -> dict:
        prepared = [(pp, ps) for n, (pp, ps) in sorted(self.pset.items()) if n > self.h]
        return M.view_change(self.ctx, self.me, self.i, v, self.h, self.stable_proof, prepared)

    def _start_view_change(self, v: int) -> None:
        if v <= self.view:
            return
        if self._held_cc:
            self._release_committed()     # decisions of the old view: still useful
        self._rollback()                  # tentative executions (ring_execution)
        self.view = v
        self.in_vc = True
        self._persist_view()
        self.stats["view_changes"] += 1
        self.vc_attempts += 1
        now = trio.current_time()
        self.vc_deadline_at = INF          # armed by _arm_vc_timer, not before 2f+1
        self.vc_resend_at = now + self.cfg.view_change_timeout
        self.queue.clear()
        self.my_inflight.clear()
        self.my_vc = self._make_view_change(v)
        self.vcs = {k: x for k, x in self.vcs.items() if k >= v}
        self.vcs.setdefault(v, {})[self.i] = self.my_vc
        self._send(self.my_vc)
        log.info("member %d: view change to %d (attempt %d)", self.i, v, self.vc_attempts)
        self._arm_vc_timer(v)
        self._check_new_view_ready(v)
        self._timer_changed.set()

    def _resend_view_change(self) -> None:
        now = trio.current_time()
        if self.my_vc is None or self.my_vc["v"] != self.view:
            # After a restart in the middle of a view change.
            self.my_vc = self._make_view_change(self.view)
            self.vcs.setdefault(self.view, {})[self.i] = self.my_vc
            self._arm_vc_timer(self.view)
        self._send(self.my_vc)
        self.vc_resend_at = now + self.cfg.view_change_timeout
        self._check_new_view_ready(self.view)
        self._timer_changed.set()

    def _arm_vc_timer(self, v: int) -> None:
        """Start the timer of the view change to v once 2f+1 members (us
        included) want v, never before (TOCS 4.5.2): a member alone in a view
        change waits there instead of racing through views on its own, so
        the others find it where they arrive."""
        if (self.in_vc and self.view == v and self.vc_deadline_at == INF
                and len(self.vcs.get(v, ())) >= 2 * self.f + 1):
            self.vc_deadline_at = trio.current_time() + self._vc_timeout()
            self._timer_changed.set()

    def _on_view_change_timer(self, now: float) -> None:
        if now >= self.vc_deadline_at:
            log.info("member %d: view change to %d timed out", self.i, self.view)
            self._start_view_change(self.view + 1)
        elif now >= self.vc_resend_at:
            self._resend_view_change()

    # ---- VIEW-CHANGE ------------------------------------------------------------

    def _on_view_change(self, j: int, vc: dict) -> None:
        v = vc["v"]
        if v < self.view or (v == self.view and not self.in_vc):
            if v == self.view and self.last_nv is not None and self.last_nv["v"] == v:
                self._send(self.last_nv, to=j)       # it missed our NEW-VIEW
            return
        have = self.vcs.setdefault(v, {})
        if j in have:
            return
        M.check_view_change(self.ctx, vc, self.cfg.window, self.base)
        have[j] = vc
        if v > self.vc_wanted[j]:
            self.vc_wanted[j] = v
        wants = [w for k, w in enumerate(self.vc_wanted) if k != self.i and w > self.view]
        if len(wants) >= self.f + 1:
            self._start_view_change(sorted(wants, reverse=True)[self.f])
        self._arm_vc_timer(v)
        self._check_new_view_ready(v)

    def _check_new_view_ready(self, v: int) -> None:
        if not (self.in_vc and self.view == v and self.ctx.primary(v) == self.i):
            return
        have = self.vcs.get(v, {})
        if len(have) < 2 * self.f + 1:
            return
        vcs = [have[k] for k in sorted(have)][:2 * self.f + 1]
        if self.i not in {vc["i"] for vc in vcs}:
            vcs[-1] = have[self.i]
        result = M.compute_new_view(vcs)
        pps = [M.pre_prepare(self.ctx, self.me, self.i, v, n, b) for n, _, b in result[2]]
        nv = M.new_view(self.ctx, self.me, self.i, v, vcs, pps)
        self._send_new_view(nv)
        log.info("member %d: new primary of view %d, re-proposing seqs %d..%d", self.i, v,
                 result[0] + 1, result[1])
        self._enter_view(nv, result)

    def _send_new_view(self, nv: dict) -> None:
        self._send(nv)

    # ---- NEW-VIEW -------------------------------------------------------------------

    def _on_new_view(self, j: int, nv: dict) -> None:
        v = nv["v"]
        if v < self.view or (v == self.view and not self.in_vc):
            return
        result = M.check_new_view(self.ctx, nv, self.cfg.window, self.base)
        self._enter_view(nv, result)

    def _enter_view(self, nv: dict, result) -> None:
        v = nv["v"]
        min_s, max_s, chosen, best = result
        self._rollback()
        self.view = v
        self.in_vc = False
        self._persist_view()
        self.last_nv = nv
        self.store.put("meta", b"nv", msgpack.packb(nv, use_bin_type=True))
        self.vc_deadline_at = self.vc_resend_at = INF
        self.vcs = {k: x for k, x in self.vcs.items() if k > v}
        if min_s > self.h:
            d = M.check_checkpoint_proof(self.ctx, min_s, best["C"], self.base)
            self._adopt_stable(min_s, d, best["C"])
        in_o = set()
        for pp in nv["O"]:
            if pp["n"] > self.h:
                self._accept_pp(self._slot(pp["n"]), pp)
            if pp["d"] != M.NULL_DIGEST:
                in_o.update(r.key for r in M.decode_batch(pp["b"])[1])
        now = trio.current_time()
        for p in self.pending.values():
            p.since = now
            p.forwarded = False
        if self.ctx.primary(v) == self.i:
            self.next_seq = max(max_s, self.exec_seq, self.h) + 1
            self.my_inflight = {pp["n"] for pp in nv["O"] if pp["n"] > self.exec_seq}
            self.queue = OrderedDict((k, None) for k in self.pending if k not in in_o)
        else:
            self.queue.clear()
            self.my_inflight.clear()
        log.info("member %d: entered view %d (primary %d)", self.i, v, self.ctx.primary(v))
        self._replay_future()
        self._try_execute()
        self._try_propose()
        self._timer_changed.set()
        self._kick()
