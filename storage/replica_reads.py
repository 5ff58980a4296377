"""Reading replicated blocks: find a holder, verify what it serves, fall back
to the next one (DESIGN.md "storage/blocks": get locates the nearest replica,
verifies, and falls back to the others; "What must always hold": block bytes
are checked against their BGUID).

This module deals in sealed bytes only; ``storage.replication`` opens them.

One block (:meth:`ReplicaReader.fetch`), in this order: the holders named
in ``prefer`` (tests, tools), this node's own store, the holders found
through the DOLR (``locate`` of r holders: nearest first by measured RTT),
the placement candidates nearest first (pointers may not be published yet:
holders publish in the background), any further holders ``locate`` finds,
and last the fallback nodes a writer may have used while salts were
unroutable (``storage.placement``, Fallback).

Many blocks (:meth:`ReplicaReader.fetch_many`) go by placement instead,
because ``locate`` costs a route per block: the candidates are known from
the cached placement, so blocks are grouped by their nearest candidate and
fetched in batches; what is missing there goes to the next candidate, and
what no candidate has goes through ``fetch`` one by one.

Every copy is checked against its BGUID where it arrives
(``blockservice.get_from``, or the local store's verified read). A forged or
corrupt copy is rejected, its holder skipped for the rest of the call, and
the next holder tried. BlockCorrupt only if every copy found was bad,
BlockNotFound if none was found. Candidates closer than ``RTT_BUCKET`` in
RTT count as equally near and keep salt order, which spreads a stream's
reads over the holders instead of piling them on one.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import trio

from overlay.errors import OverlayError
from overlay.node import TapestryNode
from overlay.wire.ids import short
from overlay.wire.transport import Peer, PeerError

from . import blockservice as bs
from . import seal
from .blockstore import AsyncBlockStore
from .errors import BlockCorrupt, BlockNotFound, StorageError
from .placement import Placement

log = logging.getLogger(__name__)

RTT_BUCKET = 0.002       # RTTs closer than this count as equal (spread the load)
FALLBACK_FETCHES = 8     # lookups by ``fetch`` after batched reads missed a block


@dataclass
class Fetched:
    """A verified sealed block, who served it, and who was rejected first."""

    data: bytes
    source: bytes
    rejected: list[bytes] = field(default_factory=list)


class ReplicaReader:
    """Fetches verified sealed blocks through one node (module docstring).
    ``local``: the node's own store, if any; ``offload``: hash large replies
    in worker threads (False on virtual time)."""

    def __init__(self, node: TapestryNode, placement: Placement, *, r: int,
                 local: AsyncBlockStore | None, batch_bytes: int, offload: bool,
                 timeout: float, stats: Counter):
        self.node = node
        self.placement = placement
        self.r = r
        self.local = local
        self.batch_bytes = batch_bytes
        self.offload = offload
        self.timeout = timeout
        self.stats = stats

    @property
    def transport(self):
        return self.node.transport

    def _nearest_first(self, peers: Sequence[Peer]) -> list[Peer]:
        def key(ip):
            i, p = ip
            rtt = self.node.rtt_of(p.id)
            return (1e9 if rtt is None else int(rtt / RTT_BUCKET), i)
        return [p for _, p in sorted(enumerate(peers), key=key)]

    async def fetch(self, bguid: bytes, *, prefer: Sequence[Peer] = ()) -> Fetched:
        """One verified sealed block (module docstring). ``prefer``:
        holders to try first (tests and tools)."""
        tried: set[bytes] = set()
        rejected: list[bytes] = []
        node = self.node

        async def from_local() -> Fetched | None:
            if self.local is None or node.id in tried:
                return None
            tried.add(node.id)
            try:
                return Fetched(await self.local.get(bguid), node.id, rejected)
            except BlockNotFound:
                return None
            except BlockCorrupt:
                rejected.append(node.id)   # quarantined by the store
                return None

        async def attempt(peers: Iterable[Peer]) -> Fetched | None:
            for p in peers:
                if p.id in tried:
                    continue
                tried.add(p.id)
                try:
                    got = await bs.get_from(self.transport, p, [bguid], timeout=self.timeout,
                                            offload=self.offload)
                except BlockCorrupt as e:
                    self.stats["rejected_copies"] += 1
                    log.warning("rejected block %s from %s: %s", short(bguid), short(p.id), e)
                    rejected.append(p.id)
                    continue
                except (StorageError, PeerError) as e:
                    self.placement.note_failure(p.id, e)
                    continue
                if bguid in got:
                    return Fetched(got[bguid], p.id, rejected)
            return None

        async def located(n: int) -> list[Peer]:
            try:
                return await node.locate(bguid, n, exclude=list(tried)[:64])
            except OverlayError:
                return []

        f = await attempt(prefer)
        if f is None:
            f = await from_local()
        if f is None:
            # All r holders, so the nearest by our measured RTT comes first
            # (locate checks each answers, in parallel, measuring RTT).
            f = await attempt(await located(self.r))
        if f is None:
            cands = (await self.placement.candidates([bguid], self.r + 2))[bguid]
            f = await attempt(self._nearest_first(cands))
        if f is None:
            f = await attempt(await located(self.r + 4))
        if f is None:
            # Maybe placed on fallback holders and not published yet
            # (placement docstring, Fallback): ask the nodes that would be.
            f = await attempt(self.placement.fallback(bguid, 8, tried))
        if f is not None:
            self.stats["blocks_got"] += 1
            return f
        if rejected:
            raise BlockCorrupt(f"every copy of block {short(bguid)} found was corrupt or forged "
                               f"(from {', '.join(short(x) for x in rejected)})", bguid)
        raise BlockNotFound(f"no holder of block {short(bguid)} had it "
                            f"({len(tried)} nodes tried)", bguid)


    async def fetch_many(self, bguids: Iterable[bytes]) -> dict[bytes, bytes]:
        """Verified sealed blocks by BGUID (module docstring): batched
        by nearest placement candidate, then ``fetch`` for the rest. Raises
        like ``fetch`` for the first block no holder could give."""
        want = list(dict.fromkeys(bguids))
        found: dict[bytes, bytes] = {}
        if self.local is not None:
            found.update(await self.local.get_many(want))
        rest = [g for g in want if g not in found]
        if rest:
            cands = await self.placement.candidates(rest, self.r)
            order = {g: [p for p in self._nearest_first(cands[g]) if p.id != self.node.id]
                     for g in rest}
            await self._fetch_by_candidates(rest, order, found)
        left = [g for g in want if g not in found]
        if left:
            self.stats["fetch_fallbacks"] += len(left)
            limiter = trio.Semaphore(FALLBACK_FETCHES)

            async def one(g: bytes) -> None:
                async with limiter:
                    try:
                        found[g] = (await self.fetch(g)).data
                    except StorageError as e:
                        errors.append(e)

            errors: list[StorageError] = []
            async with trio.open_nursery() as nursery:
                for g in left:
                    nursery.start_soon(one, g)
            if errors:
                raise errors[0]
        self.stats["blocks_got"] += len(want)
        return found


    async def _fetch_by_candidates(self, rest: list[bytes], order: dict[bytes, list[Peer]],
                                   found: dict[bytes, bytes]) -> None:
        pos = dict.fromkeys(rest, 0)
        bad: set[bytes] = set()
        per_request = max(1, self.batch_bytes // seal.MAX_SEALED)
        while rest:
            groups: dict[bytes, tuple[Peer, list[bytes]]] = {}
            for g in rest:
                cs = order[g]
                while pos[g] < len(cs) and cs[pos[g]].id in bad:
                    pos[g] += 1
                if pos[g] < len(cs):
                    p = cs[pos[g]]
                    groups.setdefault(p.id, (p, []))[1].append(g)
            if not groups:
                return

            async def one(peer: Peer, gs: list[bytes]) -> None:
                try:
                    got = await bs.get_from(self.transport, peer, gs, timeout=self.timeout,
                                            offload=self.offload)
                except BlockCorrupt as e:
                    self.stats["rejected_copies"] += 1
                    log.warning("rejected a batch from %s: %s", short(peer.id), e)
                    bad.add(peer.id)
                    return
                except (StorageError, PeerError) as e:
                    self.placement.note_failure(peer.id, e)
                    bad.add(peer.id)
                    return
                found.update(got)

            async with trio.open_nursery() as nursery:
                for peer, gs in groups.values():
                    for i in range(0, len(gs), per_request):
                        nursery.start_soon(one, peer, gs[i:i + per_request])
            for g in rest:
                if g not in found:
                    pos[g] += 1
            rest = [g for g in rest if g not in found]
