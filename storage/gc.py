"""Garbage collection of blocks: mark-and-sweep from the roots of live
objects, with a cutoff that spares racing puts (DESIGN.md "storage/blocks":
blocks no version or log references any more are collected; issue 4).

Why mark-and-sweep and not reference counts. Counts would have to be kept
for each block on each of its r holders and changed exactly once per
reference by every writer; a lost or repeated change (a crash between put
and count, a retried request, a convergent block shared by many files and
re-put by each) turns into a leak or, worse, a live block deleted. Marking
needs only the set of blocks reachable from live roots, which the object and
log layers can compute, and every mistake it can make is a leak.

The protocol:

1. Mark. The caller notes ``started_at`` (T0, on the storage nodes' clock:
   wall time) *before* it computes the live set L: every BGUID reachable
   from the roots of live objects (versions kept by the retention policy,
   log records, snapshots) as they are at T0 or later.
2. Sweep (:func:`collect`). Each storage node lists what it holds; the
   collector asks it to delete the blocks not in L, sparing every block
   stored at or after the cutoff C = T0 - ``skew`` (``blk.delete`` with
   ``spare_within`` = now - C, an age the holder turns into a time on its
   own clock, so the collector's and holders' clocks need not agree; the
   holder compares and deletes in one LMDB transaction). Deleted blocks are tombstoned with epoch = C in
   milliseconds, which ``storage.maintenance`` reads as the cutoff.

Safety: a block B that is live when the sweep reaches its holder H is not
deleted there. Either B was reachable at T0: then B is in L. Or B became
reachable after T0, which takes a writer referencing it in a new version or
record, and writers put every block they reference when they reference it
(``BlockAccess.put``, idempotent under convergent sealing, even when the
block exists): that put sets B's stored_at on H to a time >= T0 > C. The put
and the delete are each one LMDB transaction on H: if the put is first the
delete spares B; if the delete is first the put (``revive=True``) stores B
again. ``skew`` covers clocks that differ by up to that much.

The contract this puts on the layers above: a new version or record may
reference only blocks it puts now, or blocks referenced by a version or
record that the live set includes. Copying a BGUID out of something the
retention policy has dropped, without putting the block, is not allowed.

A holder that is down during the sweep keeps its copies; when it returns,
its repair finds the tombstones (whose cutoff is later than its copies) and
drops its copies instead of copying them back (``storage.maintenance``).

Which nodes are swept: those given in ``peers``, by default every node this
node knows (routing table, backpointers, itself). That is the whole of a
small network; a larger one needs a membership list from above, and a node
missed by a sweep keeps its garbage until the next one (a leak, never a
loss). Holders obey ``blk.delete`` only from NodeIDs they were configured
with as collectors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import trio

from overlay.node import TapestryNode
from overlay.wire.ids import short
from overlay.wire.transport import Peer, PeerError

from . import blockservice as bs
from .blockstore import AsyncBlockStore
from .errors import StorageError

log = logging.getLogger(__name__)

DEFAULT_SKEW = 60.0
PAGE = 4096


@dataclass
class CollectReport:
    cutoff: float
    epoch: int
    swept: list[bytes] = field(default_factory=list)       # nodes swept completely
    failed: dict[bytes, str] = field(default_factory=dict)  # node -> why not
    listed: int = 0
    deleted: int = 0

    @property
    def spared(self) -> int:
        return self.listed - self.deleted


def known_nodes(node: TapestryNode) -> list[Peer]:
    """This node and every node in its routing table or backpointers."""
    seen: dict[bytes, Peer] = {node.id: node.peer}
    for p in node.table.peers() + node.table.backpointer_peers():
        seen.setdefault(p.id, p)
    return list(seen.values())


async def collect(node: TapestryNode, live: Collection[bytes], started_at: float, *,
                  skew: float = DEFAULT_SKEW, peers: list[Peer] | None = None,
                  local: AsyncBlockStore | None = None,
                  on_deleted: Callable[[list[bytes]], None] | None = None,
                  timeout: float = 30.0, concurrency: int = 4,
                  clock: Callable[[], float] = time.time) -> CollectReport:
    """Sweep: delete every block not in ``live`` and stored before
    ``started_at - skew`` from each node in ``peers`` (module docstring).
    ``local``/``on_deleted``: this node's own store, swept directly, and
    what to tell once blocks are gone from it (the keeper unpublishes)."""
    cutoff = started_at - skew
    if cutoff <= 0:
        raise ValueError("started_at - skew must be a positive time")
    report = CollectReport(cutoff, int(cutoff * 1000))
    live = live if isinstance(live, (set, frozenset)) else set(live)
    targets = known_nodes(node) if peers is None else list(peers)
    sem = trio.Semaphore(concurrency)

    async def sweep(p: Peer) -> None:
        async with sem:
            after = None
            try:
                while True:
                    if p.id == node.id and local is not None:
                        page = await local.list_bguids(after, PAGE)
                        more = len(page) == PAGE
                    else:
                        page, more = await bs.list_on(node.transport, p, after, PAGE,
                                                      timeout=timeout)
                    if not page:
                        break
                    report.listed += len(page)
                    doomed = [g for g in page if g not in live]
                    if doomed:
                        gone = await _delete(p, doomed)
                        report.deleted += len(gone)
                    after = page[-1]
                    if not more:
                        break
            except (StorageError, PeerError) as e:
                report.failed[p.id] = str(e)
                log.warning("collection could not sweep %s: %s", short(p.id), e)
                return
            report.swept.append(p.id)

    async def _delete(p: Peer, doomed: list[bytes]) -> list[bytes]:
        if p.id == node.id and local is not None:
            gone = await local.delete_many(doomed, epoch=report.epoch,
                                           unless_stored_after=cutoff)
            if on_deleted is not None and gone:
                on_deleted(gone)
            return gone
        # As an age: the holder spares what it stored since then by its own
        # clock, so a holder whose clock is behind ours keeps a block put
        # after the mark (its stamp would read as older than the cutoff).
        return await bs.delete_on(node.transport, p, doomed, epoch=report.epoch,
                                  spare_within=max(0.0, clock() - cutoff), timeout=timeout)

    async with trio.open_nursery() as nursery:
        for p in targets:
            nursery.start_soon(sweep, p)
    log.info("collection at cutoff %.3f: %d nodes swept, %d blocks listed, %d deleted, "
             "%d nodes failed", cutoff, len(report.swept), report.listed, report.deleted,
             len(report.failed))
    return report
