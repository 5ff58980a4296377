"""Checking and restoring the copies of blocks, holder by holder (DESIGN.md
"storage/blocks": r replicas on the roots of salted BGUIDs, verified on
every read; issue 9: "every block of every live version present on >= r
live holders, bytes matching BGUID").

A :class:`Holders` surveys a set of BGUIDs and says, per block, which
holders have a verified copy and what is wrong where (:class:`BlockState`);
it can then restore copies from a good holder. Two implementations:

* :class:`NetHolders`, a network volume: the holders a block should be on
  are the first r *reachable* placement candidates (``storage.placement``,
  the targets ``storage.maintenance`` keeps full); two spare candidates are
  asked too, and a block counts as whole with r verified copies on distinct
  candidates (which ones may lag behind the placement for a while: a client
  node joining the overlay moves some roots, and the holders' repair follows).
  Each is asked ``blk.check``
  (held, absent, or tombstoned by a collector) and, to verify the bytes,
  ``blk.fetch``: the client checks each copy against its BGUID, and the
  holder's own store checks it as it reads (a copy that fails there is
  quarantined by the holder and reported missing: held a moment ago, not
  served now, hence *corrupt*). A block no candidate has is looked for
  further (DOLR locate, fallback nodes) before it is called lost.
* :class:`StoreHolders`, a single-node volume: one LMDB store, r = 1, so
  a missing or corrupt block cannot be restored.

Restoring (``restore``) copies verified bytes from a good holder to each
target that lacks them, with ``revive=True``: fsck restores only blocks it
found reachable from the volume, which a writer would re-put the same way
(``storage.gc``). Stores are idempotent, so a restore cut short (kill -9)
is simply run again.
"""

from __future__ import annotations

import abc
import functools
import logging
from dataclasses import dataclass, field
from typing import Callable

import trio

from overlay.wire.ids import short
from overlay.wire.transport import Peer, PeerError

from . import blockservice as bs
from .blockstore import ABSENT, HELD, TOMBSTONED, BlockStore
from .errors import BlockCorrupt, BlockNotFound, StorageError

log = logging.getLogger(__name__)

PAGE = 1024             # blocks surveyed per round (placement, checks, fetches)
RESTORE_BATCH = 16      # blocks per store request while restoring (progress, crash points)
LOCAL_ID = bytes(32)    # the one holder of a single-node volume
RECHECK_DELAYS = (0.2, 1.0)   # seconds before looking again at blocks short of r copies

Progress = Callable[[str, int, int], None]


@dataclass
class BlockState:
    """What the holders of one block said. ``targets``: the first r live
    placement candidates; ``good``: holders with a verified copy;
    ``corrupt``: holders whose copy failed verification; ``missing`` and
    ``tombstoned``: the candidates that should take a copy so that r are
    held (none when r verified copies exist); ``forged``:
    holders that served bytes not hashing to the BGUID; ``unreachable``:
    candidates that did not answer; ``elsewhere``: a holder outside the
    candidates with a verified copy (found when no candidate had one)."""

    targets: list[bytes] = field(default_factory=list)
    good: set[bytes] = field(default_factory=set)
    missing: set[bytes] = field(default_factory=set)
    corrupt: set[bytes] = field(default_factory=set)
    tombstoned: set[bytes] = field(default_factory=set)
    forged: set[bytes] = field(default_factory=set)
    unreachable: set[bytes] = field(default_factory=set)
    elsewhere: bytes | None = None

    @property
    def lacking(self) -> set[bytes]:
        """Holders a restore should store the block on."""
        return self.missing | self.corrupt | self.tombstoned

    @property
    def healthy(self) -> bool:
        return bool(self.good) and not self.lacking and not self.forged


class Holders(abc.ABC):
    """Per-holder survey and restore of sealed blocks (module docstring)."""

    r: int

    @abc.abstractmethod
    async def survey(self, bguids: list[bytes], *, verify: bool = True,
                     progress: Progress | None = None) -> dict[bytes, BlockState]:
        """The state of each block; ``verify``: fetch and hash every copy
        (else trust each holder's word that it holds one)."""

    @abc.abstractmethod
    async def restore(self, states: dict[bytes, BlockState],
                      progress: Progress | None = None) -> dict[bytes, set[bytes]]:
        """Copy each block to the holders that lack it; returns, per block,
        the holders that took a copy. Blocks without a good copy are skipped."""

    def describe(self, node_id: bytes) -> str:
        return short(node_id)


# --------------------------------------------------------------------------
# A network volume


class NetHolders(Holders):
    """Holders on the overlay, asked through ``transport`` (module docstring).
    ``placement``: the client node's ``Placement``; ``locate(bguid)``: a
    verified fetch from anywhere, returning (bytes, holder id), for blocks
    no candidate holds."""

    def __init__(self, transport, placement, locate, *, r: int, spare: int = 2,
                 timeout: float = 15.0, parallel: int = 8):
        self.transport = transport
        self.placement = placement
        self.locate = locate
        self.r = r
        self.spare = spare
        self.timeout = timeout
        self.parallel = trio.CapacityLimiter(parallel)
        self.peers: dict[bytes, Peer] = {}
        self.addresses: dict[bytes, str] = {}

    def describe(self, node_id: bytes) -> str:
        p = self.peers.get(node_id)
        return f"{short(node_id)}@{p.addr}" if p else short(node_id)

    async def survey(self, bguids, *, verify=True, progress=None):
        out: dict[bytes, BlockState] = {}
        dead: set[bytes] = set()
        for i in range(0, len(bguids), PAGE):
            page = bguids[i:i + PAGE]
            out.update(await self._survey_page(page, verify, dead))
            if progress:
                progress("blocks", min(i + PAGE, len(bguids)), len(bguids))
        # A block short of r copies is looked at again, with fresh root
        # lookups and on the fallback nodes too, before it is reported: while
        # nodes join or leave (fsck's own client node, a mount's) some salts
        # briefly do not route (the placement cache remembers that for a few
        # seconds), and a writer meanwhile puts copies on fallback nodes.
        for delay in RECHECK_DELAYS:
            short_of = [g for g, st in out.items() if len(st.good) < self.r]
            if not short_of:
                break
            await trio.sleep(delay)
            self.placement.clear()
            for i in range(0, len(short_of), PAGE):
                again = await self._survey_page(short_of[i:i + PAGE], verify, dead,
                                                wider=True)
                for g, st in again.items():
                    out[g] = self._merge(out[g], st)
        return out

    async def _survey_page(self, page: list[bytes], verify: bool, dead: set[bytes], *,
                           wider: bool = False) -> dict[bytes, BlockState]:
        cands = await self.placement.candidates(page, self.r + self.spare)
        placed = {g: len(cands[g]) for g in page}
        if wider:
            # Also the nodes a writer falls back to while salts do not route
            # (``storage.placement``, Fallback): copies there count too.
            for g in page:
                have = {p.id for p in cands[g]}
                cands[g] = cands[g] + self.placement.fallback(g, self.r + self.spare, have)
        asks: dict[bytes, list[bytes]] = {}
        for g in page:
            for p in cands[g]:
                self.peers[p.id] = p
                asks.setdefault(p.id, []).append(g)
        states: dict[tuple[bytes, bytes], int] = {}
        verified: dict[bytes, set[bytes]] = {}
        forged: dict[bytes, set[bytes]] = {}

        async def ask(nid: bytes, gs: list[bytes]) -> None:
            peer = self.peers[nid]
            async with self.parallel:
                try:
                    got = await bs.check_on(self.transport, peer, gs, timeout=self.timeout)
                except (StorageError, PeerError) as e:
                    log.info("fsck: holder %s did not answer: %s", short(nid), e)
                    dead.add(nid)
                    self.placement.note_failure(nid, e)
                    return
                for g, (s, _, _) in got.items():
                    states[(nid, g)] = s
                if verify:
                    held = [g for g in gs if got[g][0] == HELD]
                    verified[nid], forged[nid] = await self._fetch_verified(peer, held, dead)

        async with trio.open_nursery() as n:
            for nid, gs in asks.items():
                n.start_soon(ask, nid, gs)

        out = {}
        for g in page:
            st = BlockState()
            live = [p.id for p in cands[g] if p.id not in dead]
            st.unreachable = {p.id for p in cands[g][:placed[g]] if p.id in dead}
            st.targets = [p.id for p in cands[g][:placed[g]] if p.id not in dead][:self.r]
            absent: list[bytes] = []
            for nid in live:
                s = states.get((nid, g), ABSENT)
                if g in forged.get(nid, ()):
                    st.forged.add(nid)
                elif s == HELD and (not verify or g in verified.get(nid, ())):
                    st.good.add(nid)
                elif s == HELD:
                    st.corrupt.add(nid)          # held, but its copy did not verify
                else:
                    absent.append(nid)
            # r verified copies on distinct live candidates is the rule. Which
            # candidates hold them may lag behind the placement a moment
            # (client nodes joining move roots; the holders' repair moves
            # copies): short of r, the first candidates without one take it.
            for nid in absent[:max(0, self.r - len(st.good) - len(st.corrupt))]:
                if states.get((nid, g)) == TOMBSTONED:
                    st.tombstoned.add(nid)
                else:
                    st.missing.add(nid)
            if not st.good:
                try:
                    _data, src = await self.locate(g)
                    st.elsewhere = src
                except (StorageError, PeerError):
                    pass
            out[g] = st
        return out

    def _merge(self, old: BlockState, new: BlockState) -> BlockState:
        """What two looks at a block found: a copy verified, or found
        corrupt (the holder has dropped it since: it reads as absent now),
        by either look counts."""
        new.good |= old.good
        new.corrupt |= old.corrupt - new.good
        new.forged |= old.forged
        settled = new.good | new.corrupt | new.forged
        new.missing -= settled
        new.tombstoned -= settled
        if len(new.good) + len(new.corrupt) >= self.r:
            new.missing.clear()
            new.tombstoned.clear()
        if new.good:
            new.elsewhere = None
        return new

    async def _fetch_verified(self, peer: Peer, gs: list[bytes],
                              dead: set[bytes]) -> tuple[set[bytes], set[bytes]]:
        """The blocks ``peer`` serves with bytes matching their BGUIDs, and
        those it served forged (isolated one by one)."""
        ok: set[bytes] = set()
        bad: set[bytes] = set()
        try:
            ok = set(await bs.get_from(self.transport, peer, gs, timeout=self.timeout))
        except BlockCorrupt:
            for g in gs:
                try:
                    if await bs.get_from(self.transport, peer, [g], timeout=self.timeout):
                        ok.add(g)
                except BlockCorrupt:
                    bad.add(g)
                except (StorageError, PeerError):
                    pass
        except (StorageError, PeerError) as e:
            log.info("fsck: holder %s failed while serving: %s", short(peer.id), e)
            dead.add(peer.id)
        return ok, bad

    async def restore(self, states, progress=None):
        work = {g: st for g, st in states.items() if st.lacking and (st.good or st.elsewhere)}
        total = sum(len(st.lacking) for st in work.values())
        done = 0
        stored: dict[bytes, set[bytes]] = {}
        items = sorted(work)
        for i in range(0, len(items), RESTORE_BATCH * 4):
            chunk = items[i:i + RESTORE_BATCH * 4]
            data = await self._sources(chunk, work)
            by_target: dict[bytes, list[bytes]] = {}
            for g in chunk:
                if g in data:
                    for nid in work[g].lacking:
                        by_target.setdefault(nid, []).append(g)
            for nid, gs in sorted(by_target.items()):
                peer = self.peers.get(nid)
                for j in range(0, len(gs), RESTORE_BATCH):
                    batch = gs[j:j + RESTORE_BATCH]
                    try:
                        await bs.put_to(self.transport, peer, [(g, data[g]) for g in batch],
                                        revive=True, timeout=self.timeout * 2)
                    except (StorageError, PeerError) as e:
                        log.warning("fsck: restoring %d blocks on %s failed: %s",
                                    len(batch), short(nid), e)
                        continue
                    for g in batch:
                        stored.setdefault(g, set()).add(nid)
                    done += len(batch)
                    if progress:
                        progress("restore", done, total)
        return stored

    async def _sources(self, gs: list[bytes], work: dict[bytes, BlockState]) -> dict[bytes, bytes]:
        """Verified bytes of each block, from a holder that had a good copy."""
        by_src: dict[bytes, list[bytes]] = {}
        for g in gs:
            st = work[g]
            src = min(st.good) if st.good else st.elsewhere
            by_src.setdefault(src, []).append(g)
        data: dict[bytes, bytes] = {}
        for src, batch in by_src.items():
            peer = self.peers.get(src)
            try:
                if peer is None:
                    raise BlockNotFound("source not among the candidates")
                data.update(await bs.get_from(self.transport, peer, batch,
                                              timeout=self.timeout))
            except (StorageError, PeerError):
                pass
            for g in batch:
                if g not in data:
                    try:
                        data[g], _ = await self.locate(g)
                    except (StorageError, PeerError) as e:
                        log.warning("fsck: no good copy of %s to restore from: %s", short(g), e)
        return data


# --------------------------------------------------------------------------
# A single-node volume


class StoreHolders(Holders):
    """The one LMDB store of a single-node volume (r = 1)."""

    r = 1

    def __init__(self, store: BlockStore):
        self.store = store

    def describe(self, node_id: bytes) -> str:
        return "this machine's block store"

    async def _run(self, fn, *args):
        return await trio.to_thread.run_sync(functools.partial(fn, *args))

    async def survey(self, bguids, *, verify=True, progress=None):
        out: dict[bytes, BlockState] = {}
        for i in range(0, len(bguids), PAGE):
            page = bguids[i:i + PAGE]
            states = await self._run(self.store.states, page)
            held = [g for g, (s, _, _) in zip(page, states) if s == HELD]
            # get_many verifies each copy and quarantines a bad one (I1).
            good = set(await self._run(self.store.get_many, held)) if verify else set(held)
            for g, (s, _, _) in zip(page, states):
                st = BlockState(targets=[LOCAL_ID])
                if g in good:
                    st.good.add(LOCAL_ID)
                elif s == HELD:
                    st.corrupt.add(LOCAL_ID)
                elif s == TOMBSTONED:
                    st.tombstoned.add(LOCAL_ID)
                else:
                    st.missing.add(LOCAL_ID)
                out[g] = st
            if progress:
                progress("blocks", min(i + PAGE, len(bguids)), len(bguids))
        return out

    async def restore(self, states, progress=None):
        return {}     # the only copy was this one: nothing to restore from
