"""Checkpoints, stable checkpoints and reconfiguration of a PBFT replica
(TOCS 2002 section 4.3 "garbage collection"), as a mixin of
``pbft.Replica``.

Every K executions a member snapshots its state (the reply table and the
application's state, msgpack, deterministic) right after executing, keeps
the snapshot in LMDB (``ckpts``; a tentative execution takes it back with
the rest, ``ring_execution``), and once that seq is final signs a
CHECKPOINT of its digest. 2f+1 matching CHECKPOINTs
make it stable: the low water mark h moves up to it, the log at and below it
is discarded, and the signed CHECKPOINTs are its proof in view changes and
state transfers. Snapshots cost O(state) each K requests; with K = 128 this
is cheap for the rings this system runs (one volume's objects).

A reconfiguration (a member replaced) is a checkpoint too: the state after
the reconfiguring request is the new epoch's base, agreed by the execution
itself rather than by CHECKPOINTs (which the new epoch's ring could not
sign before it exists).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import msgpack
import trio

from overlay.wire.ids import guid, short

from . import ring_messages as M
from .certificate import RingDescriptor
from .ring_messages import RingContext
from .ring_store import u64

log = logging.getLogger(__name__)


class CheckpointMixin:
    def _snapshot_bytes(self) -> bytes:
        clients = [[c, sorted(t.items())] for c, t in sorted(self.clients.items())]
        return msgpack.packb([self.exec_seq, self.last_time, clients, self.app.snapshot()],
                             use_bin_type=True)

    def _snapshot_checkpoint(self, n: int) -> None:
        """Right after executing n (maybe tentatively: the snapshot is then
        taken back with the execution)."""
        snap = self._snapshot_bytes()
        self.ck_own[n] = guid(snap)
        self.store.put("ckpts", u64(n), snap)

    def _sign_checkpoint(self, n: int) -> None:
        """Once n is final: vouch for the snapshot."""
        d = self.ck_own.get(n)
        if d is None or n <= self.h:
            return                        # a later stable checkpoint replaced it
        ck = M.checkpoint(self.ctx, self.me, self.i, n, d)
        self.ck_msgs.setdefault(n, {})[self.i] = ck
        self._send(ck)
        self._check_stable(n)

    def _on_checkpoint(self, j: int, ck: dict) -> None:
        n = ck["n"]
        if n > self.seen_seq[j]:
            self.seen_seq[j] = n
        if n <= self.h or n > self.h + 4 * self.cfg.window:
            return
        have = self.ck_msgs.setdefault(n, {})
        if j in have:
            return
        self.ctx.check_sig(ck)
        have[j] = ck
        self._check_stable(n)

    def _check_stable(self, n: int) -> None:
        own = self.ck_own.get(n) if n <= self.committed_seq else None
        if own is None or n <= self.h:
            return
        proof = [c for c in self.ck_msgs.get(n, {}).values() if c["d"] == own]
        if len(proof) >= 2 * self.f + 1:
            self._make_stable(n, own, sorted(proof, key=lambda c: c["i"]))

    def _make_stable(self, n: int, d: bytes, proof: list[dict], force: bool = False) -> None:
        if n <= self.h and not force:
            return
        self.h, self.stable_digest, self.stable_proof = n, d, proof
        self.store.put("meta", b"stable", msgpack.packb([n, d, proof], use_bin_type=True))
        for k in [k for k in self.slots if k <= n]:
            del self.slots[k]
            self.store.delete("slots", u64(k))
        for k in [k for k in self.pset if k <= n]:
            del self.pset[k]
        for k in [k for k in self.ck_msgs if k <= n]:
            del self.ck_msgs[k]
        for k in [k for k in self.ck_own if k < n]:
            del self.ck_own[k]
            self.store.delete("ckpts", u64(k))
        self._try_propose()

    # ---- reconfiguration ----------------------------------------------------

    def _reconfigure(self, new: RingDescriptor, n: int) -> None:
        """Switch to ``new`` (the next epoch) right after executing seq n,
        as every correct member does at the same seq: the new epoch starts
        at view 0 (primary: its first member) from the state after n, which
        becomes its base checkpoint, agreed by the execution itself. Work in
        flight beyond n belonged to the old epoch and is dropped; clients
        retry what was not executed."""
        old = self.ring
        self.ring = new
        self.ctx = RingContext(new)
        self.f = new.f
        i = new.index_of(self.me.id)
        self.retired = i is None
        self.i = i if i is not None else -1
        self.view, self.in_vc = 0, False
        self.store.put("meta", b"ring", new.encode())
        self._persist_view()
        self.vcs, self.my_vc, self.last_nv = {}, None, None
        self.vc_wanted = [0] * new.n
        self.vc_deadline_at = self.vc_resend_at = float("inf")
        self.store.delete("meta", b"nv")
        self.seen_seq = [n] * new.n
        self.seen_view = [0] * new.n
        self._bad_from = [0] * new.n
        self._future = []
        for k in [k for k in self.slots if k > n]:
            del self.slots[k]
            self.store.delete("slots", u64(k))
        self.pset = {k: x for k, x in self.pset.items() if k <= n}
        self.ck_msgs = {}
        snap = self._snapshot_bytes()
        d = guid(snap)
        self.base = (n, d)
        self.store.put("meta", b"base", msgpack.packb([n, d]))
        self.ck_own = {n: d}
        self.store.put("ckpts", u64(n), snap)
        self._make_stable(n, d, [], force=True)
        self.next_seq = n + 1
        self.my_inflight.clear()
        self.queue = OrderedDict((k, None) for k in self.pending) if self.is_primary() \
            else OrderedDict()
        now = trio.current_time()
        for p in self.pending.values():
            p.since, p.forwarded = now, False
        log.warning("member %s: ring %s reconfigured at seq %d: epoch %d -> %d, %s", short(
            self.me.id), short(new.ring_id), n, old.epoch, new.epoch,
            "retired" if self.retired else f"now member {self.i}")
        if self._nursery is not None:
            self._start_outboxes()
        self._timer_changed.set()
