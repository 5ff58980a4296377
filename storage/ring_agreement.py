"""PBFT's normal case with the primary as collector (TOCS 2002 section 4.2;
the collector as in SBFT, Gueta et al., DSN 2019), as a mixin of
``pbft.Replica``. Messages and their checks are in ``ring_messages``.

For one batch at seq n in view v, primary P, backups B:

    P -> B   PRE-PREPARE(v, n, d, batch)   signed; each backup checks it and
                                           every client request in it
    B -> P   PREPARE(v, n, d)              signed
    P -> B   PREPARED(v, n, d, 2f PREPAREs)
    B -> P   COMMIT(v, n, d)               signed, in one frame with the
             SHARES(n, d, ...)             certificate shares of the batch's
                                           results (executed tentatively,
                                           ``ring_execution``, ``ring_requests``)
    P -> B   COMMITTED(v, n, d, 2f COMMITs)  held a moment, to ride with the
                                           next PRE-PREPARE or PREPARED

Each arrow is one one-way frame (``ring_outbox``): four per backup and batch.

Predicates, as in PBFT. *Prepared* (v, n, d) at a member: it accepted the
pre-prepare and holds 2f valid PREPAREs for it from distinct backups (the
primary: those it collected; a backup: those the primary relayed, its own
among them or not). That pre-prepare and those PREPAREs are its prepared
certificate, carried into view changes. A member sends COMMIT only once
prepared. *Decided*: 2f+1 COMMITs for (v, n, d) from distinct members: at
the primary, its own (it is prepared) and 2f it collected; at a backup, the
primary's (the COMMITTED message itself, authenticated by the transport),
the 2f relayed ones (its own may be among them or counts besides). Since
every COMMIT is signed by its sender after it was prepared, 2f+1 of them
still mean f+1 correct prepared members, so PBFT's safety argument is
unchanged; the primary can only withhold (then timers and view changes
take over), never forge.

A PREPARED or COMMITTED that arrives before its pre-prepare waits in the
slot (a few per slot at most). Votes for a digest other than the one the
pre-prepare fixed are ignored at the primary and refused at backups. The
primary checks the signature of every vote it relays; a COMMIT that comes
after the COMMITTED went out is relayed to nobody and counted for nothing
but the bookkeeping of re-sends, so it is not checked.
Messages get lost (a frame is dropped, a connection fails): the primary
re-sends a batch's PRE-PREPARE or PREPARED when it stalls
(:meth:`_resend_stalled`), and a backup answers a duplicate with its vote.
Once a batch is decided the primary needs nothing more, but a backup that
lost its PRE-PREPARE or PREPARED would stay behind until new requests came
(perhaps never): so the primary also re-sends a decided batch's PRE-PREPARE
and COMMITTED to the backups whose COMMIT it has not seen
(:meth:`_resend_decided`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import trio

from overlay.wire.ids import short

from . import ring_messages as M
from .ring_messages import BadMessage

log = logging.getLogger(__name__)

EARLY_PER_SLOT = 4


class Slot:
    """What one member knows of one sequence number."""

    __slots__ = ("n", "view", "digest", "batch", "pp", "prepares", "commits", "prepared",
                 "decided", "cc_view", "cc", "acked", "early", "since")

    def __init__(self, n: int):
        self.n = n
        self.view = -1
        self.digest: bytes | None = None
        self.batch: bytes | None = None
        self.pp: dict | None = None
        self.prepares: dict[int, dict] = {}               # member -> PREPARE (this view)
        self.commits: dict[int, dict | None] = {}         # member -> COMMIT (None: ours, implied)
        self.prepared = False
        self.decided: tuple[bytes, bytes] | None = None   # (digest, batch)
        self.cc_view = -1                                 # primary: COMMITTED sent in this view
        self.cc: dict | None = None                       # primary: ... this one
        self.acked: set[int] = set()                      # primary: who COMMITted, late ones too
        self.early: list[dict] = []                       # PREPARED/COMMITTED before the pp
        self.since = 0.0                                  # primary: last progress (trio time)


class AgreementMixin:
    def _init_agreement(self) -> None:
        self._agreement_handlers = {"pp": self._on_pre_prepare, "p": self._on_prepare,
                                    "pc": self._on_prepared, "c": self._on_commit,
                                    "cc": self._on_committed}
        # Relayed votes whose signatures we checked (or made): keyed by the
        # signed fields and the signature, so a known signature cannot be
        # re-used under other fields.
        self._votes_ok: OrderedDict[tuple, None] = OrderedDict()
        self._unacked: set[int] = set()   # primary: decided seqs some backup did not COMMIT
        self._idle_cc = (0, 0)            # primary: (seq, times) its COMMITTED went again, idle

    def _slot(self, n: int) -> Slot:
        s = self.slots.get(n)
        if s is None:
            s = self.slots[n] = Slot(n)
        return s

    def _vote_key(self, m: dict) -> tuple:
        return (m["t"], m["v"], m["n"], m["d"], m["i"], m["s"])

    def _vote_known(self, m: dict) -> bool:
        return self._vote_key(m) in self._votes_ok

    def _votes_checked(self, ms) -> None:
        for m in ms:
            self._votes_ok[self._vote_key(m)] = None
        while len(self._votes_ok) > 8192:
            self._votes_ok.popitem(last=False)

    # ---- pre-prepare ------------------------------------------------------------

    def _on_pre_prepare(self, j: int, pp: dict) -> None:
        if j != self.ctx.primary(pp["v"]):
            raise BadMessage(f"pre-prepare from member {j}, who is not the primary")
        slot = self._slot(pp["n"])
        if slot.view == pp["v"] and slot.pp is not None:
            if slot.digest != pp["d"]:
                log.warning("member %d: primary %d equivocates at seq %d", self.i, j, pp["n"])
            elif self.i in slot.prepares:
                self._send(slot.prepares[self.i], to=j)   # it lost our PREPARE: again
            return
        M.check_pre_prepare(self.ctx, pp)
        time_ms, reqs = M.decode_batch(pp["b"])
        if abs(time_ms - self._now_ms()) > self.cfg.max_skew_ms:
            raise BadMessage(f"batch time {time_ms} is off our clock by more than "
                             f"{self.cfg.max_skew_ms} ms")
        self._check_requests(reqs)
        self._accept_pp(slot, pp)

    def _check_requests(self, reqs) -> None:
        for r in reqs:
            p = self.pending.get(r.key)
            if p is not None and p.req == r:
                continue
            d = r.digest()
            if d in self._verified:
                continue
            r.check_signature(self.ring.ring_id)
            self.app.check_op(r.c, r.op)
            self._verified[d] = None
            if len(self._verified) > 16384:
                self._verified.popitem(last=False)

    def _accept_pp(self, slot: Slot, pp: dict) -> None:
        v, d = pp["v"], pp["d"]
        if slot.decided and slot.decided[0] != d:
            log.error("member %d: seq %d decided %s but view %d proposes %s", self.i, slot.n,
                      short(slot.decided[0]), v, short(d))
            return
        slot.view, slot.digest, slot.batch, slot.pp = v, d, pp["b"], pp
        slot.prepared = False
        slot.prepares = {k: p for k, p in slot.prepares.items() if (p["v"], p["d"]) == (v, d)}
        slot.commits = {}
        slot.cc_view = -1
        slot.cc = None
        slot.acked = set()
        slot.since = trio.current_time()
        self._persist_slot(slot)
        primary = self.ctx.primary(v)
        if self.i != primary:
            p = M.prepare(self.ctx, self.me, self.i, v, slot.n, d)
            slot.prepares[self.i] = p
            self._votes_checked([p])
            self._send(p, to=primary)
            early, slot.early = slot.early, []
            for m in early:
                if m["v"] == v:
                    try:
                        self._agreement_handlers[m["t"]](primary, m)
                    except BadMessage as e:
                        log.warning("member %d: dropping early %s from the primary: %s",
                                    self.i, m["t"], e)
        self._check_prepared(slot)

    def _wait_for_pp(self, slot: Slot, m: dict) -> bool:
        """Keep a PREPARED/COMMITTED that came before its pre-prepare."""
        if slot.pp is not None and slot.view == m["v"]:
            return False
        if len(slot.early) < EARLY_PER_SLOT:
            slot.early.append(m)
        return True

    # ---- prepare (the primary collects) ------------------------------------------------

    def _on_prepare(self, j: int, p: dict) -> None:
        if self.ctx.primary(p["v"]) != self.i:
            return                                # only the primary collects (a replay)
        slot = self.slots.get(p["n"])
        if (slot is None or slot.pp is None or slot.prepared or j in slot.prepares
                or (p["v"], p["d"]) != (slot.view, slot.digest)):
            return                                # late, duplicate, or another digest
        self.ctx.check_sig(p)
        slot.prepares[j] = p
        self._check_prepared(slot)

    def _check_prepared(self, slot: Slot) -> None:
        if slot.prepared or slot.pp is None or self.ctx.primary(slot.view) != self.i:
            return
        ps = [p for k, p in sorted(slot.prepares.items()) if k != self.i]
        if len(ps) < 2 * self.f:
            return
        slot.prepared = True
        slot.since = trio.current_time()
        self.pset[slot.n] = (slot.pp, ps[:2 * self.f])
        self._persist_slot(slot)
        self._send(M.prepared(self.i, slot.view, slot.n, slot.digest, ps))
        slot.commits[self.i] = None               # ours: implied by PREPARED/COMMITTED
        self._check_committed(slot)
        self._try_execute()                       # tentatively (ring_execution)

    def _on_prepared(self, j: int, pc: dict) -> None:
        v, n, d = pc["v"], pc["n"], pc["d"]
        if j != self.ctx.primary(v):
            raise BadMessage(f"PREPARED from member {j}, who is not the primary")
        slot = self._slot(n)
        if self._wait_for_pp(slot, pc):
            return
        if slot.prepared:
            if slot.commits.get(self.i) is not None and slot.digest == d:
                self._send(slot.commits[self.i], to=j)    # it lost our COMMIT: again
            return
        if slot.digest != d:
            raise BadMessage(f"PREPARED for seq {n} names another batch than its pre-prepare")
        # Our own PREPARE counts whether or not the primary relayed it.
        own = slot.prepares.get(self.i)
        mine = [own] if own is not None and all(p["i"] != self.i for p in pc["ps"]) else []
        ps = M.check_votes(self.ctx, pc["ps"], (v, n, d), j, 2 * self.f - len(mine),
                           self._vote_known)
        self._votes_checked(ps)
        ps = sorted(ps + mine, key=lambda p: p["i"])
        slot.prepared = True
        self.pset[n] = (slot.pp, ps)
        self._persist_slot(slot)
        c = M.commit(self.ctx, self.me, self.i, v, n, d)
        slot.commits[self.i] = c
        self._votes_checked([c])
        self._send(c, to=j)
        self._try_execute()                       # tentatively (ring_execution)

    # ---- commit (the primary collects) --------------------------------------------------

    def _on_commit(self, j: int, c: dict) -> None:
        if self.ctx.primary(c["v"]) != self.i:
            return
        slot = self.slots.get(c["n"])
        if (slot is None or not slot.prepared or j in slot.commits
                or (c["v"], c["d"]) != (slot.view, slot.digest)):
            return
        if slot.cc_view == slot.view:
            # Late: the COMMITTED went out already, so this vote is relayed
            # to nobody and needs no check; it only stops re-sending.
            slot.acked.add(j)
            if len(slot.acked) >= self.ring.n - 1:
                self._unacked.discard(slot.n)
            return
        self.ctx.check_sig(c)
        slot.commits[j] = c
        self._check_committed(slot)

    def _check_committed(self, slot: Slot) -> None:
        if not slot.prepared or slot.cc_view == slot.view or self.ctx.primary(slot.view) != self.i:
            return
        cs = [c for k, c in sorted(slot.commits.items()) if k != self.i]
        if len(cs) < 2 * self.f:
            return
        slot.cc_view = slot.view
        slot.cc = M.committed(self.i, slot.view, slot.n, slot.digest, cs)
        slot.acked = {k for k in slot.commits if k != self.i}
        slot.since = trio.current_time()
        if len(slot.acked) < self.ring.n - 1:
            self._unacked.add(slot.n)
        self._send_committed(slot.cc)
        if slot.decided is None:
            self._decide(slot, slot.digest, slot.batch)
        elif slot.n in self.my_inflight:
            # Decided in an earlier view and proposed again by a NEW-VIEW.
            self.my_inflight.discard(slot.n)
            self._try_propose()

    def _resend_stalled(self, older_than: float) -> None:
        """Primary: messages get lost (a frame is dropped, a connection
        fails); PBFT recovers by retransmission. A batch of ours that made
        no progress for ``older_than`` seconds gets its PRE-PREPARE again
        at the backups that did not PREPARE, or its PREPARED at those that
        did not COMMIT; they answer a duplicate with their vote again."""
        if not self.is_primary():
            return
        now = trio.current_time()
        for n in sorted(self.my_inflight):
            slot = self.slots.get(n)
            if (slot is None or slot.pp is None or slot.decided is not None
                    or slot.view != self.view or now - slot.since < older_than):
                continue
            slot.since = now
            for j in range(self.ring.n):
                if j == self.i:
                    continue
                if not slot.prepared:
                    if j not in slot.prepares:
                        self._send(slot.pp, to=j)
                elif j not in slot.commits:
                    ps = [p for k, p in sorted(slot.prepares.items()) if k != self.i]
                    self._send(M.prepared(self.i, slot.view, n, slot.digest, ps), to=j)

    def _resend_decided(self, older_than: float) -> None:
        """Primary: a backup that has neither COMMITted nor executed (its
        SHARES say how far it got) a decided batch of this view for
        ``older_than`` seconds gets the newest such batch's PRE-PREPARE (if
        it never PREPAREd) and COMMITTED again: enough for it to decide that
        batch and, finding the ones before it missing, to catch up on them
        (``ring_transfer``). One batch per backup per call: a backup that is
        down costs two dropped messages a call."""
        if not self.is_primary():
            self._unacked.clear()
            return
        now = trio.current_time()
        self._resend_last_decision(now, older_than)
        if not self._unacked:
            return
        done, newest = set(), {}
        for n in self._unacked:
            slot = self.slots.get(n)
            if slot is None or slot.cc is None or slot.view != self.view:
                done.add(n)                       # gone with a checkpoint or a view change
                continue
            behind = [j for j in range(self.ring.n) if j != self.i and j not in slot.acked
                      and self.seen_seq[j] < n]
            if not behind:
                done.add(n)
            elif now - slot.since >= older_than:
                for j in behind:
                    newest[j] = max(newest.get(j, 0), n)
        self._unacked -= done
        for j, n in newest.items():
            slot = self.slots[n]
            slot.since = now
            if j not in slot.prepares:
                self._send(slot.pp, to=j)
            self._send(slot.cc, to=j)

    def _resend_last_decision(self, now: float, older_than: float, times: int = 3,
                              last: int = 16) -> None:
        """Primary, with nothing in flight: the COMMITTEDs of its ``last``
        decided batches again, to every backup, ``times`` times. A backup
        that COMMITted but lost a COMMITTED would otherwise never make that
        batch final (nothing tells the primary), and a member catching up
        executes a batch only once f+1 others attest it decided."""
        n = self.committed_seq
        if self.my_inflight or self.queue or n == 0:
            return
        seq, count = self._idle_cc
        if seq != n:
            seq, count = n, 0
        if count >= times:
            return
        top = self.slots.get(n)
        if top is None or now - top.since < older_than:
            return
        self._idle_cc = (n, count + 1)
        top.since = now
        for k in range(max(self.h + 1, n - last + 1), n + 1):
            slot = self.slots.get(k)
            if slot is not None and slot.cc is not None and slot.view == self.view:
                self._send(slot.cc)

    def _on_committed(self, j: int, cc: dict) -> None:
        v, n, d = cc["v"], cc["n"], cc["d"]
        if j != self.ctx.primary(v):
            raise BadMessage(f"COMMITTED from member {j}, who is not the primary")
        slot = self._slot(n)
        if slot.decided is not None or self._wait_for_pp(slot, cc):
            return
        if slot.digest != d:
            raise BadMessage(f"COMMITTED for seq {n} names another batch than its pre-prepare")
        # 2f+1 COMMITs: the primary's (this message), ours if we sent one,
        # and enough of the relayed ones.
        own = slot.commits.get(self.i) is not None
        mine = 1 if own and all(c["i"] != self.i for c in cc["cs"]) else 0
        cs = M.check_votes(self.ctx, cc["cs"], (v, n, d), j, 2 * self.f - mine,
                           self._vote_known)
        self._votes_checked(cs)
        for c in cs:
            if n > self.seen_seq[c["i"]]:
                self.seen_seq[c["i"]] = n
        self._decide(slot, d, slot.batch)
