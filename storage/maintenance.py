"""Replica maintenance on a holder: publish what it holds in the DOLR and keep
r copies of each block it holds (DESIGN.md "storage/blocks": holders notice
lost replicas and restore r copies; "What must always hold": nothing
acknowledged is lost to the crash of r-1 holders).

Publishing. A holder publishes each block it stores (``TapestryNode.publish``
leaves pointers on the paths to the salted roots; the overlay republishes
them, soft state), when a ``blk.store`` or a local write brings it, and at
start every block already in its store, after a first repair pass (below)
has dropped the stale ones. Blocks it no longer holds (collected,
quarantined as corrupt) are unpublished.

Publishing is batched and yields to the data path. Published one by one,
a block costs a routed message per salt and hop, which on a busy node costs
more CPU than storing the block; ``DolrAPI.publish_many`` carries the
blocks stored meanwhile together, one routed message per next hop, and
leaves the same pointers. So the keeper collects what was stored: while
blocks keep arriving (one stored in the last ``BUSY`` second) it publishes
nothing until the oldest block waiting has waited ``MAX_WAIT`` seconds,
then everything collected, ``BATCH`` blocks every ``1 / TRICKLE`` seconds;
once the stream pauses, batch after batch. A burst shorter than
``MAX_WAIT`` thus runs undisturbed and is published right after it (a
fraction of a second of CPU where one publish per block took seconds), and
a stream that never pauses still has every block published within about
``MAX_WAIT``. Publishes are unconfirmed: a
batch is done once its first hops took it, and the roots send no result
back; a route lost on the way is repaired by the overlay's periodic
republish (batched as well). Unpublishing stays one block at a time (rare:
collection and quarantine). Nothing waits for a pointer meanwhile:
writers are done once the copies are stored, and readers fall back to the
placement roots, which are where the pointers would lead
(``storage.replication``).

When. A pass runs when the overlay notices a failure: the keeper watches
its routing table, and a neighbour newly suspected or dropped (heartbeats,
failed requests) starts a pass within ``WATCH`` seconds, so copies are
restored about one heartbeat after a holder dies. A full pass also runs
every ``interval`` seconds (300 by default) as a backstop for failures no
neighbour of ours saw (in a large network a block's holders need not be our
neighbours) and for copies lost to disk damage. Passes cost CPU per block
held (placement of r + ``spare`` candidates, a ``blk.check`` batch per
candidate), which is why they are not simply run every few seconds.

Who repairs. Every holder checks the blocks it holds, but for each block
only one acts: the first node, in placement order (``storage.placement``
candidates, then holders outside them), that holds the block and answers. Each holder computes this from the states it
collects, so normally one copies, at worst two (views differ for an
instant), which is harmless: stores are idempotent. Chosen over "the root of
salt 0 checks" because that root may be the node that died. Views can also
disagree for longer (stale placement entries, routing tables that have not
converged after a failure), and then each holder may defer to another; so a
holder that found the same block short of copies and deferred in
``PATIENCE`` passes in a row acts itself.

A pass over a page of held blocks:

1. candidates: the first r + ``spare`` (1) per block (the placement rule);
2. ``blk.check`` each candidate for its blocks, batched: held (stored_at),
   tombstoned (with the collector's epoch) or absent. A candidate that does
   not answer is dead for this pass (and forgotten by the placement cache, so
   lookups find its salts' new roots or skip them);
3. per block: collected (rule below)? drop our copy. Else the targets are
   the first r live candidates (completed, while salts are unroutable, by
   the placement's fallback nodes); if we are the responsible holder we copy
   the block to the targets that lack it. A target that refuses (full) or
   fails is passed over for the next spare candidate.

Collected or live. ``storage.gc`` tombstones each block it deletes with
epoch = its cutoff (milliseconds since the Unix epoch): that collection
deleted only copies stored before the cutoff and spared every later one (a
later put may be a new reference). A copy older than some tombstone's cutoff
is therefore a leftover of that collection, and a block counts as collected
when a cutoff reported by a candidate is later than every copy reported;
then the holder deletes its own copy, tombstoned with the same epoch (and
spared if re-put meanwhile). This is what stops a node that rejoins with
stale blocks from resurrecting them: it finds the tombstones and drops its
copies instead of copying them back. Otherwise the block is live, a
candidate's older tombstone is overridden (``revive``), and elsewhere the
repair stores with ``revive=False`` so that a collection running meanwhile
refuses it.

Safety: a holder deletes only its own copy, and only one older than a
cutoff, so the newest copy of a live block (written or re-put after any
cutoff) is never deleted by the repair; at worst a stale copy survives until
the next collection. Clocks are assumed within the collector's ``skew`` of
each other (``storage.gc``).

Not done: extra copies left on nodes that stopped being candidates after
membership changes are kept and not counted; trimming them is future work.
Tombstones are purged after ``tombstone_ttl`` (7 days): a holder away longer
than that may bring back a collected block, which the next collection takes
again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from typing import Callable, Iterable

import trio

from overlay.errors import OverlayError
from overlay.node import TapestryNode
from overlay.wire.ids import short
from overlay.wire.transport import Peer, PeerError

from . import blockservice as bs
from .blockservice import BlockService
from .blockstore import ABSENT, HELD, TOMBSTONED, AsyncBlockStore
from .errors import StorageError
from .placement import Placement

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 300.0
WATCH = 1.0         # seconds between looks at the routing table for failures
TOMBSTONE_TTL = 7 * 86400.0
PATIENCE = 2        # passes a holder defers on a short block before acting itself
BUSY = 1.0          # seconds since the last store during which the node counts as busy
TRICKLE = 2.0       # publish batches per second while busy
BATCH = 1024        # blocks per publish_many (cut into routed batches by the overlay)
MAX_WAIT = 5.0      # seconds a stored block may wait for its publish while the node is busy


class HolderService(BlockService):
    """The block RPCs of a holder, telling its keeper what was stored or
    deleted (to publish or unpublish it)."""

    def __init__(self, store: AsyncBlockStore, keeper: "ReplicaKeeper", **kw):
        super().__init__(store, **kw)
        self.keeper = keeper

    async def on_store(self, sender: bytes, body: dict) -> dict:
        reply = await super().on_store(sender, body)
        self.keeper.note_stored([b["g"] for b in body["blocks"]])
        return reply

    async def on_delete(self, sender: bytes, body: dict) -> dict:
        reply = await super().on_delete(sender, body)
        self.keeper.note_deleted(reply["deleted"])
        return reply


class ReplicaKeeper:
    """Publishing and repair for one holder (module docstring)."""

    def __init__(self, node: TapestryNode, store: AsyncBlockStore, placement: Placement, *,
                 r: int = 3, spare: int = 1, interval: float = DEFAULT_INTERVAL,
                 publish: bool = True, tombstone_ttl: float = TOMBSTONE_TTL,
                 timeout: float = 10.0, page: int = 1024, publishers: int = 16,
                 clock: Callable[[], float] = time.time):
        self.node = node
        self.store = store
        self.placement = placement
        self.r = r
        self.spare = spare
        self.interval = interval
        self.publish = publish
        self.tombstone_ttl = tombstone_ttl
        self.timeout = timeout
        self.page = page
        self.publishers = publishers
        self.clock = clock
        self.published: set[bytes] = set()
        self._inflight = 0
        self._deferred: dict[bytes, int] = {}   # short block -> passes we deferred on it
        self.last_store = -BUSY
        self._pub: set[bytes] = set()
        self._pub_since = 0.0         # when _pub last became non-empty
        self._unpub: set[bytes] = set()
        self._wake = trio.Event()
        self._lock = trio.Lock()
        self.ready = trio.Event()     # the first pass is done and publishing began
        self.stats: Counter = Counter()

    # ------------------------------------------------------------ publishing

    def note_stored(self, bguids: Iterable[bytes]) -> None:
        if not self.publish:
            return
        self.last_store = trio.current_time()
        if not self._pub:
            self._pub_since = self.last_store
        for g in bguids:
            self._unpub.discard(g)
            if g not in self.published:
                self._pub.add(g)
        self._wake.set()

    def note_deleted(self, bguids: Iterable[bytes]) -> None:
        for g in bguids:
            self._pub.discard(g)
            if g in self.published:
                self._unpub.add(g)
        self._wake.set()

    @property
    def publish_backlog(self) -> int:
        return len(self._pub) + len(self._unpub) + self._inflight

    async def _publisher(self) -> None:
        sem = trio.Semaphore(self.publishers)
        async with trio.open_nursery() as nursery:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                while self._pub or self._unpub:
                    if self._busy():
                        await trio.sleep(1 / TRICKLE)   # the data path first
                        if (self._busy() and not self._unpub
                                and trio.current_time() - self._pub_since < MAX_WAIT):
                            continue    # still busy, and nothing has waited too long
                    await sem.acquire()
                    if self._unpub:
                        nursery.start_soon(self._unpublish_one, self._unpub.pop(), sem)
                    elif self._pub:
                        # Whatever was collected, up to one batch. _pub_since
                        # stays until _pub empties: the rest goes next.
                        gs = [self._pub.pop() for _ in range(min(BATCH, len(self._pub)))]
                        self._inflight += len(gs)
                        nursery.start_soon(self._publish_batch, gs, sem)
                    else:
                        sem.release()

    def _busy(self) -> bool:
        return trio.current_time() - self.last_store < BUSY

    async def _publish_batch(self, gs: list[bytes], sem: trio.Semaphore) -> None:
        try:
            self.published.update(gs)
            # Unconfirmed (``DolrAPI.publish_many``): a route lost further on
            # is repaired by the periodic republish.
            await self.node.publish_many(gs)
            self.stats["published"] += len(gs)
            self.stats["publish_batches"] += 1
        except OverlayError as e:
            log.info("publish of %d blocks (%s, ...): %s", len(gs), short(gs[0]), e)
        finally:
            self._inflight -= len(gs)
            sem.release()

    async def _unpublish_one(self, g: bytes, sem: trio.Semaphore) -> None:
        try:
            self.published.discard(g)
            await self.node.unpublish(g)
            self.stats["unpublished"] += 1
        except OverlayError as e:
            log.info("unpublish of block %s: %s", short(g), e)
        finally:
            sem.release()

    # ---------------------------------------------------------------- running

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Publish and repair until cancelled. Start it once the node has
        joined: the first pass needs the overlay to find candidates."""
        async with trio.open_nursery() as nursery:
            if self.publish:
                nursery.start_soon(self._publisher)
            task_status.started()
            try:
                await self.check_all()
            except (StorageError, OverlayError) as e:
                log.warning("first repair pass: %s", e)
            if self.publish:
                after = None
                while page := await self.store.list_bguids(after, self.page):
                    self.note_stored(page)
                    after = page[-1]
            self.ready.set()
            if self.interval > 0:
                nursery.start_soon(self._periodic)
            nursery.start_soon(self._watch_failures)

    async def _periodic(self) -> None:
        rng = self.node.rng
        while True:
            await trio.sleep(self.interval * rng.uniform(0.8, 1.2))
            await self._pass("periodic")

    async def _watch_failures(self) -> None:
        """Run a pass when a neighbour is newly suspected or dropped."""
        table = self.node.table
        known = {nb.id for nb in table.neighbours()}
        suspected = {nb.id for nb in table.suspects()}
        while True:
            await trio.sleep(WATCH)
            now_known = {nb.id for nb in table.neighbours()}
            now_suspected = {nb.id for nb in table.suspects()}
            failed = (now_suspected - suspected) | (known - now_known)
            known, suspected = now_known, now_suspected
            if failed:
                self.stats["failure_passes"] += 1
                log.info("neighbours failed (%s): repair pass",
                         ", ".join(short(x) for x in list(failed)[:4]))
                await self._pass("failure")

    async def _pass(self, why: str) -> None:
        try:
            await self.check_all()
        except (StorageError, OverlayError) as e:
            log.warning("%s repair pass: %s", why, e)

    async def check_all(self) -> Counter:
        """One repair pass over every block held here; returns what it did."""
        async with self._lock:
            report: Counter = Counter()
            after = None
            while page := await self.store.list_bguids(after, self.page):
                await self.check_blocks(page, report)
                after = page[-1]
            if self.published:
                listed = list(self.published)
                held = await self.store.has_many(listed)
                self.note_deleted(g for g, h in zip(listed, held) if not h)
            if self.tombstone_ttl > 0:
                report["tombstones_purged"] += await self.store.purge_tombstones(
                    older_than=self.clock() - self.tombstone_ttl)
            self.stats.update(report)
            self.stats["passes"] += 1
            if report["copies"] or report["stale_dropped"]:
                log.info("repair pass: %s", dict(report))
            return report

    # ----------------------------------------------------------------- a page

    async def check_blocks(self, bguids: list[bytes], report: Counter) -> None:
        node, me = self.node, self.node.id
        cands = await self.placement.candidates(bguids, self.r + self.spare)
        asks: dict[bytes, tuple[Peer, list[bytes]]] = {}
        for g in bguids:
            for p in cands[g]:
                if p.id != me:
                    asks.setdefault(p.id, (p, []))[1].append(g)
        states: dict[tuple[bytes, bytes], tuple[int, float | None, int]] = {}
        dead: set[bytes] = set()

        async def ask(peer: Peer, gs: list[bytes]) -> None:
            try:
                got = await bs.check_on(node.transport, peer, gs, timeout=self.timeout)
            except (StorageError, PeerError) as e:
                dead.add(peer.id)
                self.placement.note_failure(peer.id, e)
                log.info("repair: %s did not answer: %s", short(peer.id), e)
                return
            for g, st in got.items():
                states[(peer.id, g)] = st

        async with trio.open_nursery() as nursery:
            for peer, gs in asks.values():
                nursery.start_soon(ask, peer, gs)
        report["unreachable"] += len(dead)
        mine = dict(zip(bguids, await self.store.states(bguids)))

        copies: dict[bytes, list[Peer]] = {}      # block -> targets lacking it
        spares: dict[bytes, list[Peer]] = {}      # block -> further live candidates
        revive: set[tuple[bytes, bytes]] = set()  # (node, block): override its old tombstone
        stale: dict[int, list[bytes]] = defaultdict(list)
        for g in bguids:
            if mine[g][0] != HELD:
                self._deferred.pop(g, None)
                continue   # deleted or quarantined since listed
            report["checked"] += 1
            live = [p for p in cands[g] if p.id == me or p.id not in dead]
            if len(live) < self.r:
                # Salts unroutable for now (storage.placement, Fallback).
                known = {p.id for p in cands[g]} | dead | {me}
                live += self.placement.fallback(g, self.r - len(live), known)
            seen = {p.id: states.get((p.id, g), (ABSENT, None, 0)) for p in live if p.id != me}
            seen[me] = mine[g]
            newest = max(at for s, at, _ in seen.values() if s == HELD)
            cutoff = max((e for s, _, e in seen.values() if s == TOMBSTONED), default=0)
            if cutoff and cutoff / 1000.0 > newest:
                stale[cutoff].append(g)
                continue
            order = [p.id for p in live]
            if me not in order:
                order.append(me)    # an extra copy: acts only if no candidate holds it
            lacking = [p for p in live[:self.r] if p.id != me and seen[p.id][0] != HELD]
            if not lacking:
                self._deferred.pop(g, None)
                if next(nid for nid in order if seen[nid][0] == HELD) == me:
                    report["complete"] += 1
                continue
            if next(nid for nid in order if seen[nid][0] == HELD) != me:
                n = self._deferred[g] = self._deferred.get(g, 0) + 1
                if n <= PATIENCE:
                    report["deferred"] += 1
                    continue
                report["acted_after_deferring"] += 1
            self._deferred.pop(g, None)
            report["under_replicated"] += 1
            copies[g] = lacking
            spares[g] = [p for p in live[self.r:] if p.id != me and seen[p.id][0] != HELD]
            revive.update((p.id, g) for p in lacking if seen[p.id][0] == TOMBSTONED)
        if copies:
            await self._copy(copies, spares, revive, report)
        for epoch, gs in stale.items():
            gone = await self.store.delete_many(gs, epoch=epoch,
                                                unless_stored_after=epoch / 1000.0)
            self.note_deleted(gone)
            report["stale_dropped"] += len(gone)
            if gone:
                log.info("dropped %d stale blocks (collected at epoch %d)", len(gone), epoch)

    async def _copy(self, copies: dict[bytes, list[Peer]], spares: dict[bytes, list[Peer]],
                    revive: set[tuple[bytes, bytes]], report: Counter) -> None:
        data = await self.store.get_many(list(copies))
        for g in copies.keys() - data.keys():
            report["own_copy_lost"] += 1    # corrupt here (quarantined) or deleted meanwhile
        work = {g: ts for g, ts in copies.items() if g in data}
        while work:
            by_target: dict[tuple[bytes, bool], tuple[Peer, list[bytes]]] = {}
            for g, targets in work.items():
                for p in targets:
                    key = (p.id, (p.id, g) in revive)
                    by_target.setdefault(key, (p, []))[1].append(g)
            failed: dict[bytes, int] = Counter()

            async def send(peer: Peer, rev: bool, gs: list[bytes]) -> None:
                try:
                    await bs.put_to(self.node.transport, peer, [(g, data[g]) for g in gs],
                                    revive=rev, timeout=self.timeout * 3)
                except (StorageError, PeerError) as e:
                    log.info("repair copy to %s refused: %s", short(peer.id), e)
                    self.placement.note_failure(peer.id, e)
                    for g in gs:
                        failed[g] += 1
                    return
                report["copies"] += len(gs)

            async with trio.open_nursery() as nursery:
                for (_, rev), (peer, gs) in by_target.items():
                    nursery.start_soon(send, peer, rev, gs)
            # Each failed copy moves to the next spare candidate, if any.
            work = {}
            for g, n in failed.items():
                take, spares[g] = spares[g][:n], spares[g][n:]
                if take:
                    work[g] = take
                else:
                    report["copies_failed"] += n
