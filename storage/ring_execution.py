"""Executing batches, tentatively first (TOCS 2002 section 5.1.2,
"tentative execution"), as a mixin of ``pbft.Replica``.

A member executes batch n as soon as it is *prepared* at n and has
executed n-1, without waiting for the commit phase; it answers clients and
sends the primary its certificate shares right away (``ring_requests``).
The batch becomes final (``committed_seq``) once it is decided and all
before it are final. Until then every write of its execution carries an
undo record in the same transaction (S4 of ``ring_store``), and the member
takes it back (:meth:`_rollback`) when a view change starts or the ring
decides another batch at that seq; after a restart, recovery does the same.

Why a client may rely on a tentative result. The client accepts a version
only with 2f+1 members' signatures of it (``ringclient``). A member signs a
result of batch n only after executing n, hence only once prepared at n
and at every earlier tentative seq; 2f+1 signers include f+1 correct
members prepared at all of them, which is PBFT's "committed" predicate: no
view change can replace those batches, and every correct member executes
them, in that order, to the same results. Members only release results
after fsyncing their prepared certificates with them (S2), so even a ring
that loses power all at once comes back with what it certified.

Reconfigurations (``App.tentative_ok``) run only decided.

The primary needs no COMMITTED of its own; it relays the COMMITs it
collects (``ring_agreement``) after ``commit_delay``, or earlier in the same
frame as its next PRE-PREPARE or PREPARED: with tentative execution, a
backup needs the decision only to make its state final, never to answer.
"""

from __future__ import annotations

import logging

import msgpack
import trio

from overlay.wire.ids import guid

from . import ring_messages as M
from .ring_agreement import Slot
from .ring_store import u64

log = logging.getLogger(__name__)


class ExecutionMixin:
    def _init_execution(self) -> None:
        self._tentative: dict[int, tuple[bytes, int]] = {}   # seq -> (digest, new executions)
        self._held_cc: list[dict] = []
        self._cc_waiting = trio.Event()

    # ---- deciding -----------------------------------------------------------------

    def _decide(self, slot: Slot, digest: bytes, batch: bytes) -> None:
        slot.decided = (digest, batch)
        self._persist_slot(slot)
        self.my_inflight.discard(slot.n)
        self._advance_committed()
        self._try_execute()
        self._try_propose()

    # ---- executing -----------------------------------------------------------------

    def _try_execute(self) -> None:
        while not self.need_state:
            slot = self.slots.get(self.exec_seq + 1)
            if slot is None:
                break
            final = slot.decided is not None and self.committed_seq == self.exec_seq
            if not final and not self._may_run_tentatively(slot):
                break
            self._execute(slot)
        self._advance_committed()

    def _may_run_tentatively(self, slot: Slot) -> bool:
        """Prepared here in our view (or decided, after a tentative seq),
        and nothing in it that cannot be taken back. Not in a view we are
        mute in (``pbft.recover``): we may have forgotten what we prepared."""
        if not self.cfg.tentative or self.in_vc or self.view <= self.mute_view:
            return False
        if slot.decided is not None:
            batch = slot.decided[1]
        elif slot.prepared and slot.pp is not None and slot.view == self.view:
            batch = slot.batch
        else:
            return False
        return all(self.app.tentative_ok(r.op) for r in M.decode_batch(batch)[1])

    def _execute(self, slot: Slot) -> None:
        n = slot.n
        digest, batch = slot.decided if slot.decided is not None else (slot.digest, slot.batch)
        final = slot.decided is not None and self.committed_seq == self.exec_seq
        if not final:
            self.store.journal(n)
        try:
            results, new = self._run_batch(n, batch)
            if n % self.cfg.checkpoint_interval == 0:
                self._snapshot_checkpoint(n)
        finally:
            self.store.journal(None)
        self._durable = True           # results leave with the next commit: fsync it
        self.vc_attempts = 0
        self._behind = 0
        now = trio.current_time()
        for p in self.pending.values():       # progress: the timers start again
            p.since = now
        # (Deadlines only moved later: the timer task finds out when it
        # wakes, no need to wake it now.)
        self._results(n, digest, M.decode_batch(batch)[1], results)
        if final:
            self._finalize(n, batch, new)
        else:
            self._tentative[n] = (digest, new)

    def _run_batch(self, n: int, batch: bytes) -> tuple[list, int]:
        time_ms, reqs = M.decode_batch(batch)
        t = max(time_ms, self.last_time)
        results: list[bytes | None] = []
        new = 0
        for r in reqs:
            tbl = self.clients.get(r.c)
            res = None if tbl is None else tbl.get(r.r)     # a retry: the first result
            if res is None and not (tbl and len(tbl) >= self.cfg.client_window
                                    and r.r < min(tbl)):   # else stale: not applied
                res = self.app.execute(r.c, r.r, r.op, t, n)
                tbl = self.clients.setdefault(r.c, {})
                tbl[r.r] = res
                self.store.put("replies", r.c + u64(r.r), res)
                if len(tbl) > self.cfg.client_window:
                    old = min(tbl)
                    del tbl[old]
                    self.store.delete("replies", r.c + u64(old))
                new += 1
            results.append(res)
            self._wake.append(r.key)
            self._unreleased.add(r.key)
            self.queue.pop(r.key, None)
        self.exec_seq = n
        self.last_time = t
        self.store.put("meta", b"exec", msgpack.packb([n, t]))
        return results, new

    # ---- making it final --------------------------------------------------------------

    def _advance_committed(self) -> None:
        while self.committed_seq < self.exec_seq:
            n = self.committed_seq + 1
            slot, ent = self.slots.get(n), self._tentative.get(n)
            if slot is None or slot.decided is None or ent is None:
                return
            if slot.decided[0] != ent[0]:
                # The ring decided another batch here than we ran.
                self._rollback()
                self._try_execute()
                return
            del self._tentative[n]
            self.store.forget_undo(n)
            self._finalize(n, slot.decided[1], ent[1])

    def _finalize(self, n: int, batch: bytes, new: int) -> None:
        self.committed_seq = n
        self.store.put("meta", b"committed", msgpack.packb(n))
        self.stats["executed"] += new
        self.stats["batches"] += 1
        for r in M.decode_batch(batch)[1]:
            self.pending.pop(r.key, None)
        if n % self.cfg.checkpoint_interval == 0:
            self._sign_checkpoint(n)
        self._after_execute(n)

    def _after_execute(self, n: int) -> None:
        new = self.app.take_config()
        if new is not None:
            self._reconfigure(new, n)

    def _rollback(self) -> None:
        """Take back every tentative execution (S4 of ``ring_store``)."""
        if self.exec_seq == self.committed_seq:
            return
        log.info("member %d: taking back tentative executions %d..%d", self.i,
                 self.committed_seq + 1, self.exec_seq)
        for db, key in self.store.undo_from(self.committed_seq + 1):
            value = self.store.get(db, key)
            if db == "replies":
                c, rid = key[:32], int.from_bytes(key[32:], "big")
                if value is None:
                    self.clients.get(c, {}).pop(rid, None)
                else:
                    self.clients.setdefault(c, {})[rid] = value
            elif db == "ckpts":
                n = int.from_bytes(key, "big")
                if value is None:
                    self.ck_own.pop(n, None)
                else:
                    self.ck_own[n] = guid(value)
            elif db == "meta":
                if key == b"exec":      # absent: nothing had executed yet
                    self.exec_seq, self.last_time = \
                        (0, 0) if value is None else msgpack.unpackb(value)
            else:
                self.app.reloaded(db, key)
        self._tentative.clear()
        self._gather.clear()
        self._batch_keys.clear()
        self.stats["rollbacks"] += 1

    # ---- relaying decisions (primary) -------------------------------------------------

    def _send_committed(self, cc: dict) -> None:
        if self.cfg.commit_delay <= 0 or not self.cfg.tentative:
            self._send(cc)
            return
        self._held_cc.append(cc)
        self._cc_waiting.set()

    def _release_committed(self) -> None:
        held, self._held_cc = self._held_cc, []
        for cc in held:
            self._out.append((None, cc))
        self._dirty.set()

    async def _commit_relay_loop(self) -> None:
        while True:
            await self._cc_waiting.wait()
            self._cc_waiting = trio.Event()
            await trio.sleep(self.cfg.commit_delay)
            if self._held_cc:
                self._release_committed()
