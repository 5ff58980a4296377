"""Replicated blocks on the simulated network, on virtual time
(storage/replication.py, placement.py, maintenance.py, gc.py).

Every node is a real StorageNode (Tapestry overlay, LMDB block store, block
service, repair keeper) on a SimTransport; stores run inline on the trio
thread so virtual time can advance. Placement is checked against a brute
force computation of the salted roots over the live IDs."""

from __future__ import annotations

import os
import random

import pytest
import trio

from overlay.messages import salted
from overlay.routing_table import global_root
from overlay.wire.ids import Identity
from overlay.wire.simnet import PlaneTopology, SimNetwork
from storage.blockapi import Kind
from storage.blockstore import BlockStore
from storage.errors import BlockNotFound, StoreFull, TooFewHolders
from storage.maintenance import HolderService
from storage.server import StorageNode

VOLUME = bytes(range(32))
EPOCH0 = 1.7e9          # store clocks: wall-clock-like times on the virtual clock
REPAIR = 20.0           # seconds between repair passes


def clock() -> float:
    return EPOCH0 + trio.current_time()


class ForgingService(HolderService):
    """A malicious holder: stores honestly, serves every block with one bit flipped."""

    async def on_fetch(self, sender: bytes, body: dict) -> dict:
        reply = await super().on_fetch(sender, body)
        for b in reply["blocks"]:
            d = bytearray(b["d"])
            d[len(d) // 2] ^= 0x01
            b["d"] = bytes(d)
        return reply


class Cluster:
    def __init__(self, nursery, tmp_path, seed: int):
        self.nursery = nursery
        self.tmp = tmp_path
        self.net = SimNetwork(seed=seed, topology=PlaneTopology(seed=seed))
        self.seed = seed
        self.pool = [Identity.from_seed(b"repl-%d-%d" % (seed, i)) for i in range(40)]
        self.nodes: dict[bytes, StorageNode] = {}    # live ones
        self.stores: dict[bytes, BlockStore] = {}    # open ones (live nodes)
        self.idents: dict[bytes, Identity] = {}

    def _store(self, node_id: bytes, quota: int) -> BlockStore:
        return BlockStore(self.tmp / node_id.hex()[:16], quota=quota, sync=False, clock=clock)

    async def add(self, *, quota: int = 64 << 20, service=HolderService,
                  ident=None) -> StorageNode:
        if ident is None:
            ident = self.pool[len(self.idents)]
            t = self.net.add(ident)
        else:
            self.net.restart(ident.id)
            t = self.net.transport(ident.id)
        store = self._store(ident.id, quota)
        # Every node of the cluster may collect garbage.
        sn = StorageNode(t, store, inline=True, repair_interval=REPAIR, clock=clock,
                         collectors=[i.id for i in self.pool], service_class=service)
        boot = [n.peer for n in self.nodes.values()][:1]
        await self.nursery.start(sn.run, boot)
        self.nodes[sn.id] = sn
        self.stores[sn.id] = store
        self.idents[sn.id] = ident
        return sn

    async def grow(self, n: int, **kw) -> list[StorageNode]:
        return [await self.add(**kw) for _ in range(n)]

    def crash(self, sn: StorageNode) -> None:
        self.net.crash(sn.id)
        sn.stop()
        del self.nodes[sn.id]
        self.stores.pop(sn.id).close()

    async def restart(self, node_id: bytes) -> StorageNode:
        return await self.add(ident=self.idents[node_id])

    def holders(self, g: bytes) -> set[bytes]:
        return {i for i, s in self.stores.items() if s.has(g)}

    def placement(self, g: bytes, r: int = 3) -> list[bytes]:
        """First r distinct roots of g's salts over the live IDs (brute force)."""
        ids = sorted(self.nodes)
        out: list[bytes] = []
        for i in range(32):
            root = global_root(salted(g, i), ids)
            if root not in out:
                out.append(root)
            if len(out) == r:
                break
        return out

    def close(self) -> None:
        for s in self.stores.values():
            s.close()


@pytest.fixture
async def cluster(nursery, tmp_path):
    c = Cluster(nursery, tmp_path, seed=3)
    yield c
    nursery.cancel_scope.cancel()
    c.close()


def payloads(n: int, tag: bytes = b"") -> list[bytes]:
    rnd = random.Random(tag)
    return [tag + i.to_bytes(4, "big") + rnd.randbytes(2000) for i in range(n)]


def flip_on_disk(store: BlockStore, data: bytes) -> None:
    """Damage a stored copy behind LMDB's back: flip one byte in data.mdb."""
    path = store.path / "data.mdb"
    raw = path.read_bytes()
    at = raw.find(data[100:164])
    assert at >= 0, "block bytes not found in data.mdb"
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([raw[at + 10] ^ 0xFF]), at + 10)
    finally:
        os.close(fd)


# --------------------------------------------------------------------- put


async def test_put_stores_r_copies_on_the_distinct_salted_roots_and_holders_publish(cluster, autojump_clock):
    nodes = await cluster.grow(12)
    writer = nodes[5]
    rb = writer.blocks(VOLUME)
    data = payloads(150)
    bguids = await rb.put_many([(Kind.DATA, p) for p in data])
    for g in bguids:
        assert cluster.holders(g) == set(cluster.placement(g))
    # Cached placement: far fewer routed lookups than blocks x salts.
    assert writer.placement.stats["lookups"] < len(bguids)
    await trio.sleep(5)   # holders publish in the background
    reader = nodes[0]
    for g in bguids[:5]:
        found = await reader.node.locate(g, 3)
        assert {p.id for p in found} == cluster.holders(g)
    assert await reader.blocks(VOLUME).get_many([(g, Kind.DATA) for g in bguids]) == data


async def test_get_reads_the_nearest_replica_and_falls_back_on_corruption_and_crash(cluster, autojump_clock):
    nodes = await cluster.grow(12)
    g = await nodes[0].blocks(VOLUME).put(Kind.DATA, b"nearest" * 300)
    await trio.sleep(5)
    holders = cluster.holders(g)
    reader = next(n for n in nodes if n.id not in holders)
    by_distance = sorted(holders, key=lambda h: cluster.net.latency(reader.id, h))
    rb = reader.blocks(VOLUME)

    f = await rb.fetch(g)
    assert f.source == by_distance[0]

    # Flip a byte of the nearest copy on disk: detected, quarantined there,
    # and the block served by the next nearest.
    near = cluster.stores[by_distance[0]]
    flip_on_disk(near, f.data)
    f2 = await rb.fetch(g)
    assert f2.source == by_distance[1] and f2.data == f.data
    assert near.stats().corruptions == 1 and not near.has(g)
    assert await rb.get(g, Kind.DATA) == b"nearest" * 300

    # The repair puts a good copy back on the holder that lost it.
    await trio.sleep(2 * REPAIR)
    assert near.has(g) and near.get(g) == f.data

    # Crash the nearest holder: still served, by another.
    cluster.crash(cluster.nodes[by_distance[0]])
    f3 = await rb.fetch(g)
    assert f3.source != by_distance[0] and f3.data == f.data


async def test_a_forged_copy_from_a_malicious_holder_is_rejected(cluster, autojump_clock):
    nodes = await cluster.grow(10)
    evil = await cluster.add(service=ForgingService)
    rb = nodes[0].blocks(VOLUME)
    data = payloads(60)
    bguids = await rb.put_many([(Kind.DATA, p) for p in data])
    on_evil = [g for g in bguids if evil.id in cluster.holders(g)]
    assert on_evil, "the malicious node holds none of the blocks"
    reader = nodes[1].blocks(VOLUME)
    f = await reader.fetch(on_evil[0], prefer=[evil.peer])
    assert f.rejected == [evil.id] and f.source != evil.id
    # Batched reads route around it too, and every block comes back intact.
    assert await reader.get_many([(g, Kind.DATA) for g in bguids]) == data
    assert reader.stats["rejected_copies"] >= 1


# ------------------------------------------------------------------ repair


async def test_two_of_three_holders_crash_and_the_repair_restores_three(cluster, autojump_clock):
    nodes = await cluster.grow(12)
    rb = nodes[0].blocks(VOLUME)
    data = payloads(30)
    bguids = await rb.put_many([(Kind.DATA, p) for p in data])
    g = bguids[0]
    first, second, third = cluster.placement(g)
    for h in (first, second):
        if nodes[0].id == h:
            pytest.skip("writer is a holder")   # keep the reader alive
        cluster.crash(cluster.nodes[h])
    assert cluster.holders(g) == {third}
    # Still readable right away, from the survivor.
    reader = next(n for n in cluster.nodes.values() if n.id != third).blocks(VOLUME)
    assert await reader.get(g, Kind.DATA) == data[0]
    # Failure detection (the overlay drops the dead after ~30-40 s) and a few
    # repair passes later, every block is back on at least r live nodes,
    # including the placement holders computed over the live IDs.
    await trio.sleep(4 * REPAIR + 60)
    for b in bguids:
        have = cluster.holders(b)
        assert len(have) >= 3
        assert set(cluster.placement(b)) <= have
    assert await reader.get_many([(b, Kind.DATA) for b in bguids]) == data


async def test_roots_behind_a_dead_node_cost_a_lookup_per_prefix_not_per_block(cluster, autojump_clock):
    # While a dead node is still in its neighbours' tables (as a suspect),
    # routes toward its part of the ID space go around it and end at nodes
    # that are not the root by their own table. Placement must count that
    # root unreachable for a while (one negative entry per prefix), not look
    # up every salt of every block there again: after a holder died, that
    # was a storm of thousands of routes that slowed its repair many times.
    nodes = await cluster.grow(8)
    victim, asker = nodes[3], nodes[5]
    cluster.net.refuse_when_down = True   # as a killed process: connections refused at once
    cluster.crash(victim)
    ids = sorted([*cluster.nodes, victim.id])
    rnd = random.Random(7)
    behind = []                           # GUIDs the dead node was the root of
    while len(behind) < 60:
        g = rnd.randbytes(32)
        if global_root(g, ids) == victim.id:
            behind.append(g)
    asker.placement.clear()
    found = await asker.placement.roots(behind)
    st = asker.placement.stats
    assert all(r.peer is None or r.peer.id != victim.id for r in found.values())
    assert st["lookups"] <= 8, dict(st)
    # Once the dead node is dropped, its part of the space has a new root.
    await trio.sleep(90)
    asker.placement.clear()
    found = await asker.placement.roots(behind[:5])
    assert all(r.peer is not None and r.peer.id != victim.id for r in found.values())


async def test_a_full_holder_is_skipped_and_a_full_network_tells_the_writer(cluster, autojump_clock):
    await cluster.grow(6)
    tiny = await cluster.add(quota=40 << 10)      # room for a few 2 KiB blocks
    await cluster.grow(3)
    writer = next(n for n in cluster.nodes.values() if n is not tiny)
    rb = writer.blocks(VOLUME)
    bguids = await rb.put_many([(Kind.DATA, p) for p in payloads(200)])
    assert rb.stats["refused_StoreFull"] >= 1
    tiny_store = cluster.stores[tiny.id]
    assert tiny_store.stats().used <= tiny_store.quota
    for g in bguids:
        assert len(cluster.holders(g)) == 3   # full node skipped, r distinct holders anyway

    # Every node full: the writer gets StoreFull, not a silent success.
    small = Cluster(cluster.nursery, cluster.tmp / "small", seed=4)
    try:
        await small.grow(5, quota=20 << 10)
        rb2 = next(iter(small.nodes.values())).blocks(VOLUME)
        with pytest.raises(StoreFull):
            await rb2.put_many([(Kind.DATA, p) for p in payloads(100)])
    finally:
        for sn in small.nodes.values():
            sn.stop()
        small.close()


async def test_too_few_nodes_for_r_copies_and_a_smaller_write_quorum(cluster, autojump_clock):
    a, b = await cluster.grow(2)
    with pytest.raises(TooFewHolders):
        await a.blocks(VOLUME).put(Kind.DATA, b"three copies wanted")
    # With a write quorum of 2 the put is durable on both nodes; the third
    # copy is left to the repair, once a third node exists.
    rb = a.blocks(VOLUME, write_quorum=2)
    g = await rb.put(Kind.DATA, b"two will do")
    assert cluster.holders(g) == {a.id, b.id}
    await cluster.add()
    await trio.sleep(3 * REPAIR)
    assert len(cluster.holders(g)) == 3


# ---------------------------------------------------------------------- GC


async def test_collection_deletes_garbage_and_spares_blocks_put_during_it(cluster, autojump_clock):
    nodes = await cluster.grow(10)
    collector = nodes[-1]
    rb = nodes[0].blocks(VOLUME)
    live_data, dead_data, racing_data = payloads(10, b"L"), payloads(10, b"D"), payloads(10, b"R")
    live = await rb.put_many([(Kind.DATA, p) for p in live_data])
    dead = await rb.put_many([(Kind.DATA, p) for p in dead_data])
    racing = await rb.put_many([(Kind.DATA, p) for p in racing_data])
    await trio.sleep(30)
    # Mark: the live set is computed from T0 on, without the racing blocks,
    # which a writer references again (re-puts) while the sweep runs.
    had = {g: cluster.holders(g) for g in dead}
    t0 = clock()
    async with trio.open_nursery() as n:
        n.start_soon(rb.put_many, [(Kind.DATA, p) for p in racing_data])
        report = await collector.collect(set(live), t0, skew=1.0)
    assert not report.failed and len(report.swept) == 10
    assert 3 * len(dead) <= report.deleted <= 3 * (len(dead) + len(racing))
    for g in dead:
        assert cluster.holders(g) == set()
        for h in had[g]:
            assert cluster.stores[h].tombstone(g).epoch == report.epoch
    for g in live + racing:
        assert len(cluster.holders(g)) == 3
    reader = nodes[3].blocks(VOLUME)
    assert await reader.get_many([(g, Kind.DATA) for g in live + racing]) == live_data + racing_data
    with pytest.raises(BlockNotFound):
        await reader.get(dead[0], Kind.DATA)
    # A writer that references a collected block again revives it.
    assert await rb.put(Kind.DATA, dead_data[0]) == dead[0]
    assert len(cluster.holders(dead[0])) == 3


async def test_a_node_rejoining_with_collected_blocks_drops_them(cluster, autojump_clock):
    nodes = await cluster.grow(10)
    rb = nodes[0].blocks(VOLUME)
    keep, gone = payloads(5, b"K"), payloads(5, b"G")
    kept = await rb.put_many([(Kind.DATA, p) for p in keep])
    dropped = await rb.put_many([(Kind.DATA, p) for p in gone])
    await trio.sleep(10)
    stale = next(h for h in cluster.placement(dropped[0]) if h != nodes[0].id)
    held_before = {g for g in dropped if stale in cluster.holders(g)}
    assert dropped[0] in held_before
    cluster.crash(cluster.nodes[stale])
    collector = next(n for n in cluster.nodes.values() if n.id != stale)
    report = await collector.collect(set(kept), clock(), skew=1.0, timeout=5.0)
    assert stale in report.failed
    for g in dropped:
        assert cluster.holders(g) == set()
    await trio.sleep(60)   # past the overlay's dead_after, so it may rejoin at once

    back = await cluster.restart(stale)   # its store still has the collected blocks
    store = cluster.stores[back.id]
    for g in dropped:
        assert not store.has(g)
        if g in held_before:
            assert store.tombstone(g) is not None
    await trio.sleep(3 * REPAIR)
    for g in dropped:
        assert cluster.holders(g) == set()   # not re-replicated
    with pytest.raises(BlockNotFound):
        await nodes[0].blocks(VOLUME).get(dropped[0], Kind.DATA)
    for g in kept:
        assert len(cluster.holders(g)) >= 3
