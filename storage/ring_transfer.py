"""Catch-up and state transfer of a ring member (TOCS 2002 section 6.2, in
a simpler form), as a mixin of ``pbft.Replica``.

A member falls behind when it was down, stopped, partitioned, or lost
messages. It notices from what others say (``_lagging``): f+1 others
committing or checkpointing past what it executed while it makes no
progress, f+1 others running a later view, or a stable checkpoint (from a
NEW-VIEW) above its state. It then asks every other member ``pbft.fetch``:

* each answers its view, its last stable checkpoint with the 2f+1 signed
  CHECKPOINTs proving it (and, when asked, the snapshot), the decided
  batches after what the asker executed, and the NEW-VIEW of its view;
* a snapshot is installed only if its digest is the one the proof
  certifies: one honest answer is enough, a lying one is detected;
* a decided batch is executed only when f+1 members attest the same digest
  at that seq (at least one of them correct, and correct members agree on
  decisions) and its bytes hash to that digest;
* a later view is entered only through its NEW-VIEW, checked exactly as if
  it had arrived from the new primary (never on anyone's word alone).

Limit: a snapshot travels in one frame, so states beyond the frame cap
(8 MiB, some tens of thousands of objects) need a chunked transfer, not
written yet; members then fall back on the decided batches they can fetch.
"""

from __future__ import annotations

import logging

import msgpack
import trio

from overlay.wire import frames
from overlay.wire.frames import AnyValue, Bytes, Int, ListOf, Nullable
from overlay.wire.ids import guid, short
from overlay.wire.transport import Peer, PeerError, Refused, RemoteError

from . import ring_messages as M
from .ring_messages import BadMessage
from .ring_requests import kth_highest
from .ring_store import u64

log = logging.getLogger(__name__)

U64 = Int(0, 2**63 - 1)
FETCH = frames.message("pbft.fetch", {"from": U64, "state": bool}, {
    "epoch": U64, "view": U64, "active": bool, "exec": U64, "h": U64, "hd": Bytes(max=32),
    "proof": ListOf(AnyValue(), max=64),
    "snap": Nullable(Bytes()), "entries": ListOf(AnyValue(), max=256), "nv": Nullable(AnyValue()),
})
ENTRY_BYTES = 4 * 1024 * 1024


class TransferMixin:
    def _init_transfer(self) -> None:
        self.need_state = False
        self._catching_up = False
        self._last_check_exec = -1
        self._above_window = False        # an agreement message came past h + L
        self._catchup_now = trio.Event()

    def _register_transfer(self, dispatcher) -> None:
        dispatcher.on(FETCH, self._on_fetch)

    # ---- serving ------------------------------------------------------------

    async def _on_fetch(self, sender: bytes, body: dict) -> dict:
        if self.ring.index_of(sender) is None:
            raise Refused("not_member", "only ring members fetch ring state")
        entries, size = [], 0
        n = max(body["from"], self.h + 1)
        # A snapshot answer carries no entries (the asker fetches them next
        # round): both together could pass the frame cap.
        while (not body["state"] and n <= self.committed_seq and len(entries) < 256
               and size < ENTRY_BYTES):
            slot = self.slots.get(n)
            if slot is None or slot.decided is None:
                break
            entries.append([n, slot.decided[0], slot.decided[1]])
            size += len(slot.decided[1])
            n += 1
        snap = None
        if body["state"] and self.h > 0 and not self.need_state:
            snap = self.store.get("ckpts", u64(self.h))
        return {"epoch": self.ring.epoch, "view": self.view, "active": not self.in_vc,
                "exec": self.committed_seq, "h": self.h, "hd": self.stable_digest,
                "proof": self.stable_proof, "snap": snap, "entries": entries,
                "nv": self.last_nv if not self.in_vc else None}

    # ---- deciding to catch up ------------------------------------------------------

    def _lagging(self) -> bool:
        if self.need_state:
            return True
        if self.in_vc and self.vc_deadline_at == float("inf"):
            # In a view change nobody joined (yet): the others may well be
            # running on without us. Keep our state current meanwhile.
            return True
        if self._above_window:
            # Agreement messages for seqs past our high water mark: the
            # others moved on while we missed the CHECKPOINTs to follow.
            self._above_window = False
            return True
        stuck = self.committed_seq == self._last_check_exec
        self._last_check_exec = self.committed_seq
        others = [s for k, s in enumerate(self.seen_seq) if k != self.i]
        if stuck and kth_highest(others, self.f + 1) > self.committed_seq:
            return True
        vt = kth_highest((v for k, v in enumerate(self.seen_view) if k != self.i), self.f + 1)
        return vt > self.view or (vt == self.view and self.in_vc)

    async def _catchup_loop(self) -> None:
        await self.catch_up()
        while True:
            with trio.move_on_after(self.cfg.catchup_interval):
                await self._catchup_now.wait()
            self._catchup_now = trio.Event()
            self._resend_decided(self.cfg.request_timeout / 4)
            if self._lagging():
                await self.catch_up()

    # ---- catching up ------------------------------------------------------------------

    async def _ask(self, m, state: bool, out: dict) -> None:
        try:
            out[m.id] = await self.transport.request(
                Peer(m.id, m.addr), FETCH, {"from": self.committed_seq + 1, "state": state},
                timeout=self.cfg.send_timeout)
        except (PeerError, RemoteError) as e:
            log.debug("member %d: fetch from %s failed: %s", self.i, short(m.id), e)

    async def _ask_all(self, state: bool = False) -> dict[bytes, dict]:
        """Fetch answers of the other members, by NodeID (indices change when
        the ring is reconfigured in the middle of a catch-up)."""
        out: dict[bytes, dict] = {}
        async with trio.open_nursery() as n:
            for m in self.ring.members:
                if m.id != self.me.id:
                    n.start_soon(self._ask, m, state, out)
        return out

    def _attested(self, replies: dict[bytes, dict], who) -> bool:
        """Whether at least f+1 members of our current ring are among ``who``."""
        return sum(1 for x in set(who) if self.ring.member(x) is not None) >= self.f + 1

    async def catch_up(self) -> None:
        """Bring this member up to date with the others (see docstring)."""
        if self._catching_up:
            return
        self._catching_up = True
        self.stats["catchups"] += 1
        try:
            for _ in range(64):          # bounded: each round moves at most 256 seqs
                before = (self.committed_seq, self.view, self.in_vc)
                replies = await self._ask_all()
                self._note_progress(replies)
                self._adopt_view(replies)
                await self._adopt_state(replies)
                more = self._adopt_entries(replies)
                self._kick()
                if not more or (self.committed_seq, self.view, self.in_vc) == before:
                    break
        finally:
            self._catching_up = False

    def _note_progress(self, replies: dict[bytes, dict]) -> None:
        """What the others told us of their progress: with the primary
        relaying every vote, a backup hears little from the other backups,
        and needs this to know whether it is the one behind."""
        for x, r in replies.items():
            k = self.ring.index_of(x)
            if k is None or r["epoch"] != self.ring.epoch:
                continue
            self.seen_seq[k] = max(self.seen_seq[k], r["exec"])
            self.seen_view[k] = max(self.seen_view[k], r["view"])

    def _adopt_view(self, replies: dict[bytes, dict]) -> None:
        nvs = sorted((r["nv"] for r in replies.values()
                      if r["active"] and r["nv"] and r["epoch"] == self.ring.epoch),
                     key=lambda nv: -nv["v"] if type(nv) is dict and type(nv.get("v")) is int
                     else 0)
        for nv in nvs:
            try:
                if M.check_shape(nv) != "nv":
                    continue
                if nv["v"] < self.view or (nv["v"] == self.view and not self.in_vc):
                    return
                self._on_new_view(nv["i"], nv)
                return
            except BadMessage as e:
                log.warning("member %d: bad NEW-VIEW in a fetch answer: %s", self.i, e)

    async def _adopt_state(self, replies: dict[bytes, dict]) -> None:
        """Install the newest stable checkpoint above what we executed that
        is either proven (2f+1 CHECKPOINTs valid in our ring) or claimed
        alike by f+1 members of our ring (an epoch's base checkpoint has no
        CHECKPOINTs; a ring that moved to a new epoch signs with keys of a
        ring we do not know yet)."""
        claims: dict[tuple[int, bytes], set] = {}
        for x, r in replies.items():
            claims.setdefault((r["h"], r["hd"]), set()).add(x)
        for (h, hd), who in sorted(claims.items(), key=lambda c: -c[0][0]):
            if h <= self.committed_seq:
                # We have that state: if we missed the CHECKPOINTs that made
                # it stable, the proof moves our water marks (without it we
                # would drop every message past h + L).
                if h > self.h and self.ck_own.get(h) == hd:
                    proof = self._proof_among(replies, who, h, hd)
                    if proof:
                        self._make_stable(h, hd, proof)
                break
            proof = self._proof_among(replies, who, h, hd)
            if proof is None and self._attested(replies, who):
                proof = []
            if proof is None:
                continue
            for x in who:
                m = self.ring.member(x)
                if m is None:
                    continue
                got: dict[bytes, dict] = {}
                await self._ask(m, True, got)
                snap = got.get(x, {}).get("snap")
                if snap is not None and guid(snap) == hd and got[x]["h"] == h:
                    self._install_snapshot(h, hd, proof, snap)
                    return

    def _proof_among(self, replies: dict[bytes, dict], who, h: int, hd: bytes) -> list | None:
        """A valid proof (2f+1 CHECKPOINTs of our epoch) that the state at h
        with digest hd is stable, from one of ``who``'s answers, or None."""
        for x in who:
            r = replies[x]
            if r["epoch"] == self.ring.epoch and r["proof"]:
                try:
                    if M.check_checkpoint_proof(
                            self.ctx, h, [self._shape_ck(c) for c in r["proof"]],
                            self.base) == hd:
                        return r["proof"]
                except BadMessage as e:
                    log.warning("member %d: %s's checkpoint proof is bad: %s", self.i,
                                short(x), e)
        return None

    @staticmethod
    def _shape_ck(c) -> dict:
        if M.check_shape(c) != "ck":
            raise BadMessage("checkpoint proof holds a message that is not a checkpoint")
        return c

    def _adopt_entries(self, replies: dict[bytes, dict]) -> bool:
        votes: dict[int, dict[bytes, set]] = {}
        batches: dict[bytes, bytes] = {}
        full = False
        for j, r in replies.items():
            if r["epoch"] != self.ring.epoch:
                continue
            full |= len(r["entries"]) >= 256
            for e in r["entries"]:
                if (type(e) is not list or len(e) != 3 or type(e[0]) is not int
                        or type(e[1]) is not bytes or type(e[2]) is not bytes):
                    continue
                n, d, b = e
                if guid(b) != d:
                    continue
                votes.setdefault(n, {}).setdefault(d, set()).add(j)
                batches[d] = b
        progressed = False
        while not self.need_state:
            n = self.committed_seq + 1
            got = [d for d, who in votes.get(n, {}).items() if self._attested(replies, who)]
            if not got:
                break
            slot = self._slot(n)
            if slot.decided is None:
                self._decide(slot, got[0], batches[got[0]])
            else:
                self._try_execute()
            if self.committed_seq < n:
                break
            progressed = True
        return progressed and full

    # ---- installing ---------------------------------------------------------------------

    def _adopt_stable(self, n: int, d: bytes, proof: list) -> None:
        """A stable checkpoint proven by others (in a NEW-VIEW): if we have
        that state, it is our stable checkpoint; if we do not, we must fetch
        it before executing anything more."""
        if self.ck_own.get(n) == d:
            self._make_stable(n, d, proof)
            return
        if self.committed_seq >= n:
            log.error("member %d: our state at seq %d differs from the ring's; refetching",
                      self.i, n)
        self.need_state = True
        self._make_stable(n, d, proof)
        self._catchup_now.set()

    def _install_snapshot(self, n: int, d: bytes, proof: list, snap: bytes) -> None:
        try:
            exec_seq, last_time, clients, app_snap = msgpack.unpackb(snap, raw=False)
            if exec_seq != n:
                raise ValueError(f"snapshot of seq {exec_seq}, not {n}")
            table = {c: dict(items) for c, items in clients}
        except (ValueError, TypeError) as e:
            log.error("member %d: certified snapshot at %d will not load: %s", self.i, n, e)
            return
        self._rollback()
        self.store.clear("undo")
        self._tentative.clear()
        self.store.clear("replies")
        for c, t in table.items():
            for rid, res in t.items():
                self.store.put("replies", c + u64(rid), res)
        self.clients = table
        self.app.restore(app_snap)
        self.exec_seq, self.last_time = n, last_time
        self.committed_seq = n
        self.store.put("meta", b"exec", msgpack.packb([n, last_time]))
        self.store.put("meta", b"committed", msgpack.packb(n))
        self.store.clear("ckpts")
        self.store.put("ckpts", u64(n), snap)
        self.ck_own = {n: d}
        self.need_state = False
        self._make_stable(n, d, proof, force=True)
        self.stats["state_transfers"] += 1
        if self.app.ring.epoch != self.ring.epoch:
            # The state comes from a later epoch: switch to its ring.
            self._reconfigure(self.app.ring, n)
        log.info("member %d (%s): installed the ring's state at seq %d", self.i,
                 short(self.me.id), n)
        for key in [k for k in self.pending if self.result_of(*k) is not None]:
            del self.pending[key]
            self.queue.pop(key, None)
            self._wake.append(key)
        self._try_execute()
        self._try_propose()
