"""Replicated blocks: :class:`~storage.blockapi.BlockAccess` over the Tapestry
overlay (DESIGN.md "storage/blocks", "What must always hold"; Pond's data
blocks, PAST's replica placement).

Put. Blocks are sealed with the volume key (``storage.seal``, off the trio
thread), placed by the rule of ``storage.placement`` (roots of salted BGUIDs,
r distinct nodes) and sent to their holders as ``blk.store`` batches grouped
by holder. ``put``/``put_many`` return once every block is stored on r
distinct holders (what a holder's acknowledgement promises: SECURITY.md,
"Durability"): the write quorum is all r by default. With a smaller
``write_quorum`` they return at that many acknowledgements and the remaining
copies are completed in the background (in the node's nursery); whatever
that misses, the holders' repair (``storage.maintenance``) restores. Each
holder publishes the BGUID in the DOLR when it stores the block.

A candidate that refuses (StoreFull, any other refusal) or fails (a transport
error) is passed over for that block and the next candidate takes its place,
so a put still reaches r distinct holders while enough nodes can take it. A
full node is also skipped for ``FULL_BACKOFF`` seconds by later puts. When
fewer than the write quorum can be found, the writer gets StoreFull if a full
holder was among those passed over (the network is out of space where this
block must go), else TooFewHolders; copies already made stay (idempotent).

Writers store with ``revive=True``: a writer that puts a block references it,
so a tombstone left by an earlier collection of the same content must not
refuse it. Only the repair copies with ``revive=False``, which is what stops
a stale replica from resurrecting a collected block (``storage.gc``).

Get. Finding a holder, verifying what it serves and falling back is
``storage.replica_reads``: ``get`` locates the nearest holder through the
DOLR, ``get_many`` fetches in batches by placement; this module opens the
verified sealed bytes (AEAD, kind checked).

Pipelining. ``put_many`` and ``get_many`` work in chunks of ``CHUNK``
blocks. Up to ``max_inflight`` bytes (sealed bytes times r for puts) are in
flight at once, so sealing, placement lookups, transfers and the holders'
commits of successive chunks overlap while memory stays bounded; batches to
one holder are at most ``batch_bytes`` each and run concurrently.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from typing import Callable, Iterable, Sequence

import trio

from overlay.node import TapestryNode
from overlay.wire.ids import short
from overlay.wire.transport import Peer, PeerError

from . import blockservice as bs
from . import seal
from .blockapi import BlockAccess, Kind
from .blockstore import AsyncBlockStore
from .errors import StorageError, StoreFull, TooFewHolders
from .placement import Placement
from .replica_reads import Fetched, ReplicaReader

log = logging.getLogger(__name__)

CHUNK = 32                       # blocks sealed, placed and sent as one unit
DEFAULT_INFLIGHT = 48 << 20      # bytes in flight per ReplicatedBlocks
DEFAULT_BATCH = 2 << 20          # bytes per blk.store / blk.fetch request
FULL_BACKOFF = 10.0              # seconds a full holder is skipped by later puts
OFFLOAD_BYTES = 256 << 10       # work on fewer bytes than this stays on the trio thread

__all__ = ["ReplicatedBlocks", "Fetched"]


class _Budget:
    """Bytes in flight: ``acquire`` waits while the limit would be passed
    (one request larger than the whole limit runs alone); ``release`` is
    synchronous so it can sit in a ``finally``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._freed = trio.Event()

    async def acquire(self, n: int) -> None:
        while self.used and self.used + n > self.limit:
            await self._freed.wait()
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._freed.set()
        self._freed = trio.Event()


class _Progress:
    """Acknowledgements of one put, for a write quorum below r."""

    def __init__(self, bguids: Iterable[bytes], need: int):
        self.acks: dict[bytes, list[bytes]] = {g: [] for g in bguids}
        self.need = need
        self.waiting = len(self.acks)
        self.reached = trio.Event()
        self.error: BaseException | None = None

    def ack(self, g: bytes, node_id: bytes) -> None:
        self.acks[g].append(node_id)
        if len(self.acks[g]) == self.need:
            self.waiting -= 1
            if not self.waiting:
                self.reached.set()


class ReplicatedBlocks(BlockAccess):
    """Blocks of one volume, replicated r times across the overlay.

    ``placement``: the node's shared :class:`Placement`; ``local``: this
    node's own store, if it stores blocks (a placement that picks this node
    writes there directly), and ``on_stored(bguids)`` is then called after
    such a local write (the repair keeper publishes them); ``offload=False``
    keeps sealing and hashing on the trio thread (simulations on virtual
    time, see ``AsyncBlockStore``)."""

    def __init__(self, node: TapestryNode, volume_key: bytes, placement: Placement, *,
                 r: int = 3, write_quorum: int | None = None,
                 local: AsyncBlockStore | None = None,
                 on_stored: Callable[[list[bytes]], None] | None = None,
                 max_inflight: int = DEFAULT_INFLIGHT, batch_bytes: int = DEFAULT_BATCH,
                 offload: bool = True, timeout: float = 30.0):
        if not 1 <= r <= 16:
            raise ValueError("r must be in 1..16")
        quorum = r if write_quorum is None else write_quorum
        if not 1 <= quorum <= r:
            raise ValueError("write_quorum must be in 1..r")
        self.node = node
        self.placement = placement
        self.r = r
        self.quorum = quorum
        self.local = local
        self.on_stored = on_stored
        self.batch_bytes = max(batch_bytes, seal.MAX_SEALED)
        self.offload = offload
        self.timeout = timeout
        self._sealer = seal.sealer(volume_key)
        self._budget = _Budget(max_inflight)
        self._full: dict[bytes, float] = {}
        self.stats: Counter = Counter()
        self.reader = ReplicaReader(node, placement, r=r, local=local,
                                    batch_bytes=self.batch_bytes, offload=offload,
                                    timeout=timeout, stats=self.stats)

    @property
    def transport(self):
        return self.node.transport

    async def _run(self, fn, *args, size: int = OFFLOAD_BYTES):
        """``fn(*args)`` in a worker thread when it works on ``size`` bytes
        or more, else here: a thread hand-off costs more than sealing one
        small block. Only work that releases the GIL gains from a thread:
        SHA-256 (``hashlib``) does, AES-GCM (``cryptography``) does not."""
        if self.offload and size >= OFFLOAD_BYTES:
            return await trio.to_thread.run_sync(functools.partial(fn, *args))
        await trio.lowlevel.checkpoint()
        return fn(*args)

    # ------------------------------------------------------------------ put

    def name_of(self, kind: Kind, plaintext: bytes) -> bytes | None:
        return self._sealer.seal(kind, bytes(plaintext)).bguid

    async def put(self, kind: Kind, plaintext: bytes) -> bytes:
        return (await self.put_many([(kind, plaintext)]))[0]

    async def put_many(self, items: Sequence[tuple[Kind, bytes]]) -> list[bytes]:
        items = list(items)
        out: list[bytes] = [b""] * len(items)
        failure: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            for start in range(0, len(items), CHUNK):
                chunk = items[start:start + CHUNK]
                cost = self.r * sum(len(p) + seal.OVERHEAD for _, p in chunk)
                await self._budget.acquire(cost)
                nursery.start_soon(self._put_chunk, chunk, start, out, cost, failure,
                                   nursery.cancel_scope)
        if failure:
            raise failure[0]
        return out

    async def _put_chunk(self, chunk, start, out, cost, failure, scope) -> None:
        try:
            sealed = await self._run(self._seal_all, chunk, size=sum(len(p) for _, p in chunk))
            for i, s in enumerate(sealed):
                out[start + i] = s.bguid
            await self.store_sealed([(s.bguid, s.data) for s in sealed])
        except (StorageError, ValueError) as e:
            failure.append(e)
            scope.cancel()
        finally:
            self._budget.release(cost)

    def _seal_all(self, chunk) -> list[seal.Sealed]:
        return [self._sealer.seal(k, bytes(p)) for k, p in chunk]

    async def store_sealed(self, blocks: Iterable[tuple[bytes, bytes]], *,
                           revive: bool = True) -> dict[bytes, list[bytes]]:
        """Store sealed blocks (BGUID, bytes) on their holders; returns the
        NodeIDs that acknowledged each block. Durable on return (module
        docstring: write quorum)."""
        data = dict(blocks)
        if not data:
            return {}
        if self.quorum >= self.r:
            return await self._place(data, revive, None)
        progress = _Progress(data, self.quorum)

        async def background() -> None:
            try:
                await self._place(data, revive, progress)
            except StorageError as e:
                progress.error = e
                log.warning("background completion of %d blocks: %s", len(data), e)
            finally:
                progress.reached.set()

        if not self.node.spawn(background):
            await background()   # the node is not running: no background to leave it to
        await progress.reached.wait()
        if progress.waiting:
            raise progress.error or TooFewHolders("write quorum not reached")
        return {g: list(ids) for g, ids in progress.acks.items()}   # so far

    async def _place(self, data: dict[bytes, bytes], revive: bool,
                     progress: _Progress | None) -> dict[bytes, list[bytes]]:
        acked: dict[bytes, list[bytes]] = {g: [] for g in data}
        passed: dict[bytes, dict[bytes, BaseException]] = {g: {} for g in data}
        skipped_full: dict[bytes, set[bytes]] = {g: set() for g in data}
        pending = list(data)
        while pending:
            now = trio.current_time()

            def skip(g: bytes, nid: bytes) -> bool:
                if nid in acked[g]:
                    return False
                if self._full.get(nid, 0.0) > now:
                    skipped_full[g].add(nid)   # refused another block lately: full
                    return True
                return nid in passed[g]

            cands = await self.placement.candidates(pending, self.r, skip=skip)
            for g in pending:
                if len(cands[g]) < self.r:
                    # Salts unroutable for now (placement docstring, Fallback).
                    have = {p.id for p in cands[g]} | passed[g].keys()
                    extra = [p for p in self.placement.fallback(g, self.r, have)
                             if not skip(g, p.id)][:self.r - len(cands[g])]
                    cands[g] += extra
                    self.stats["fallback_candidates"] += len(extra)
            sends: dict[bytes, tuple[Peer, list[bytes]]] = {}
            for g in pending:
                for p in cands[g]:
                    if p.id not in acked[g]:
                        sends.setdefault(p.id, (p, []))[1].append(g)
            results = await self._send_all(sends, data, revive)
            for nid, batch, err in results:
                for g in batch:
                    if err is None:
                        acked[g].append(nid)
                        if progress is not None:
                            progress.ack(g, nid)
                    else:
                        passed[g][nid] = err
            stuck = [g for g in pending if len(acked[g]) < self.r
                     and all(p.id in acked[g] for p in cands[g])]
            for g in stuck:
                self._short_of_holders(g, acked[g], passed[g], skipped_full[g])
            pending = [g for g in pending if len(acked[g]) < self.r and g not in stuck]
        self.stats["blocks_put"] += len(data)
        return acked

    def _short_of_holders(self, g: bytes, acked: list[bytes],
                          passed: dict[bytes, BaseException], full_skipped: set[bytes]) -> None:
        """No candidate is left for ``g``: fine above the quorum (the repair
        adds copies when nodes come back), else the writer is told why."""
        if len(acked) >= self.quorum:
            self.stats["under_replicated"] += 1
            log.warning("block %s stored on only %d of %d holders", short(g), len(acked), self.r)
            return
        full = [nid for nid, e in passed.items() if isinstance(e, StoreFull)]
        full += sorted(full_skipped)
        why = "; ".join(f"{short(nid)}: {e}" for nid, e in list(passed.items())[:6])
        msg = (f"block {short(g)} reached only {len(acked)} of the {self.quorum} holders "
               f"it needs" + (f" (passed over: {why})" if why else ""))
        if full:
            raise StoreFull(msg, full[0])
        raise TooFewHolders(msg, g)

    async def _send_all(self, sends: dict[bytes, tuple[Peer, list[bytes]]],
                        data: dict[bytes, bytes], revive: bool
                        ) -> list[tuple[bytes, list[bytes], BaseException | None]]:
        results: list[tuple[bytes, list[bytes], BaseException | None]] = []

        async def one(peer: Peer, batch: list[bytes]) -> None:
            items = [(g, data[g]) for g in batch]
            try:
                if peer.id == self.node.id and self.local is not None:
                    await self.local.put_many(items, revive=revive)
                    if self.on_stored is not None:
                        self.on_stored(batch)
                else:
                    await bs.put_to(self.transport, peer, items, revive=revive,
                                    timeout=self.timeout)
            except (StorageError, PeerError) as e:
                self._note_failure(peer.id, e)
                results.append((peer.id, batch, e))
                return
            self.stats["copies_stored"] += len(batch)
            results.append((peer.id, batch, None))

        async with trio.open_nursery() as nursery:
            for peer, gs in sends.values():
                for batch in self._batches(gs, data):
                    nursery.start_soon(one, peer, batch)
        return results

    def _batches(self, gs: list[bytes], data: dict[bytes, bytes]) -> Iterable[list[bytes]]:
        batch: list[bytes] = []
        size = 0
        for g in gs:
            n = len(data[g])
            if batch and size + n > self.batch_bytes:
                yield batch
                batch, size = [], 0
            batch.append(g)
            size += n
        if batch:
            yield batch

    def _note_failure(self, nid: bytes, e: BaseException) -> None:
        self.stats[f"refused_{type(e).__name__}"] += 1
        if isinstance(e, StoreFull):
            self._full[nid] = trio.current_time() + FULL_BACKOFF
        self.placement.note_failure(nid, e)
        log.info("holder %s: %s", short(nid), e)

    # ------------------------------------------------------------------ get

    async def get(self, bguid: bytes, kind: Kind) -> bytes:
        f = await self.reader.fetch(bguid)
        return self._sealer.open(kind, f.data)   # AES-GCM: see _get_chunk

    async def fetch(self, bguid: bytes, *, prefer: Sequence[Peer] = ()) -> Fetched:
        """One verified sealed block, with who served it (``storage.replica_reads``)."""
        return await self.reader.fetch(bguid, prefer=prefer)

    async def fetch_many(self, bguids: Iterable[bytes]) -> dict[bytes, bytes]:
        return await self.reader.fetch_many(bguids)

    async def get_many(self, items: Sequence[tuple[bytes, Kind]]) -> list[bytes]:
        items = list(items)
        out: list[bytes] = [b""] * len(items)
        failure: list[BaseException] = []
        async with trio.open_nursery() as nursery:
            for start in range(0, len(items), CHUNK):
                chunk = items[start:start + CHUNK]
                cost = len(chunk) * seal.MAX_SEALED
                await self._budget.acquire(cost)
                nursery.start_soon(self._get_chunk, chunk, start, out, cost, failure,
                                   nursery.cancel_scope)
        if failure:
            raise failure[0]
        return out

    async def _get_chunk(self, chunk, start, out, cost, failure, scope) -> None:
        try:
            found = await self.reader.fetch_many([g for g, _ in chunk])
            # Opening is AES-GCM and a small HMAC, both holding the GIL: a
            # worker thread would only add a hand-off (the BGUID checks,
            # SHA-256, ran in one where the blocks arrived).
            await trio.lowlevel.checkpoint()
            out[start:start + len(chunk)] = self._open_all([(k, found[g]) for g, k in chunk])
        except (StorageError, ValueError) as e:
            failure.append(e)
            scope.cancel()
        finally:
            self._budget.release(cost)

    def _open_all(self, items) -> list[bytes]:
        # Already checked against their BGUIDs where they arrived.
        return [self._sealer.open(k, d) for k, d in items]
