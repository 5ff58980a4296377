"""Block RPCs between nodes on the simulated network (storage/blockservice.py):
batched store and fetch within the frame cap, refusals mapped back to
storage errors once, and forged bytes from a malicious holder caught."""

from __future__ import annotations

import hashlib
import os

import lmdb
import pytest
import trio

from overlay.wire.ids import Identity
from overlay.wire.simnet import PlaneTopology, SimNetwork
from overlay.wire.transport import Dispatcher, Refused
from storage import blockservice as bs
from storage import seal
from storage.blockapi import MAX_BLOCK, Kind
from storage.blockstore import AsyncBlockStore, BlockStore
from storage.errors import (
    BlockCorrupt,
    BlockNotFound,
    BlockTombstoned,
    BlockTooLarge,
    HolderRefused,
    StoreFull,
)

VOLUME = bytes(range(32))


class Cluster:
    """Nodes on one simulated network, each with a block store and the block
    service, served in the test's nursery; stores closed at the end."""

    def __init__(self, nursery, tmp_path):
        self.nursery = nursery
        self.tmp = tmp_path
        # Near-zero latencies: these tests run on real time (the stores work
        # in threads, which virtual time cannot wait for; see test_virtual_time).
        self.net = SimNetwork(seed=1, topology=PlaneTopology(1, size_ms=1.0, access_ms=(0.0, 0.1)))
        self.stores: list[BlockStore] = []
        self.n = 0

    async def node(self, *, quota=64 << 20, store=None, handler=None, inline=False):
        self.n += 1
        t = self.net.add(Identity.from_seed(b"blockservice-%d" % self.n))
        if handler is None:
            if store is None:
                store = BlockStore(self.tmp / f"n{self.n}", quota=quota, sync=False)
            self.stores.append(store)
            handler = Dispatcher()
            bs.BlockService(AsyncBlockStore(store, inline=inline)).register(handler)
        await self.nursery.start(t.serve, handler)
        return t, store

    def close(self):
        for s in self.stores:
            s.close()


@pytest.fixture
async def cluster(nursery, tmp_path):
    c = Cluster(nursery, tmp_path)
    yield c
    nursery.cancel_scope.cancel()
    c.close()


def sealed(n: int, size: int = 1000) -> dict[bytes, bytes]:
    out = {}
    for i in range(n):
        s = seal.seal(VOLUME, Kind.DATA, i.to_bytes(4, "big") + os.urandom(size - 4))
        out[s.bguid] = s.data
    return out


async def test_store_and_fetch_batches_within_the_frame_cap(cluster):
    client, _ = await cluster.node()
    holder, store = await cluster.node()
    blocks = sealed(300, MAX_BLOCK)  # about 19 MiB: several frames each way
    assert await bs.put_to(client, holder.peer, blocks) == 300
    sent = cluster.net.stats.sent
    assert sent[bs.STORE] == 3
    assert store.stats().blocks == 300

    got = await bs.get_from(client, holder.peer, list(blocks))
    assert got == blocks
    assert sent[bs.FETCH] == -(-300 // bs.MAX_FETCH)
    g = next(iter(blocks))
    assert seal.open(VOLUME, Kind.DATA, got[g], g)[:4] in {i.to_bytes(4, "big") for i in range(300)}

    # Storing again is idempotent: nothing new.
    assert await bs.put_to(client, holder.peer, list(blocks.items())[:10]) == 0


async def test_many_small_blocks_in_one_batch(cluster):
    client, _ = await cluster.node()
    holder, _ = await cluster.node()
    blocks = sealed(1000, 100)
    assert await bs.put_to(client, holder.peer, blocks) == 1000
    assert cluster.net.stats.sent[bs.STORE] == 1
    assert await bs.get_from(client, holder.peer, blocks) == blocks


async def test_missing_blocks_left_out_and_not_found_for_one(cluster):
    client, _ = await cluster.node()
    holder, _ = await cluster.node()
    blocks = sealed(3)
    await bs.put_to(client, holder.peer, blocks)
    absent = hashlib.sha256(b"absent").digest()
    got = await bs.get_from(client, holder.peer, [*blocks, absent])
    assert got == blocks
    with pytest.raises(BlockNotFound) as ei:
        await bs.get_one_from(client, holder.peer, absent)
    assert ei.value.bguid == absent and ei.value.peer_id == holder.id


async def test_store_full_reported_to_the_writer(cluster):
    client, _ = await cluster.node()
    holder, store = await cluster.node(quota=1 << 20)
    blocks = sealed(30, 60000)
    with pytest.raises(StoreFull, match="quota") as ei:
        await bs.put_to(client, holder.peer, blocks)
    assert ei.value.peer_id == holder.id
    # The batch was refused whole.
    assert store.stats().blocks == 0
    assert not any((await bs.has_on(client, holder.peer, blocks)).values())


async def test_tombstoned_refusal_names_the_block_and_revive_works(cluster):
    client, _ = await cluster.node()
    holder, store = await cluster.node()
    blocks = sealed(2)
    await bs.put_to(client, holder.peer, blocks)
    g = next(iter(blocks))
    store.delete(g, epoch=1)
    with pytest.raises(BlockTombstoned) as ei:
        await bs.put_to(client, holder.peer, blocks)
    assert ei.value.bguid == g and ei.value.peer_id == holder.id
    assert await bs.put_to(client, holder.peer, blocks, revive=True) == 1


async def test_bytes_not_matching_their_bguid_refused_by_the_holder(cluster):
    client, _ = await cluster.node()
    holder, store = await cluster.node()
    g, d = next(iter(sealed(1).items()))
    with pytest.raises(BlockCorrupt) as ei:
        await bs.put_to(client, holder.peer, [(g, d[:-1] + b"\0")])
    assert ei.value.bguid == g
    assert store.stats().blocks == 0
    with pytest.raises(BlockTooLarge):
        await bs.put_to(client, holder.peer, [(g, bytes(seal.MAX_SEALED + 1))])


async def test_corrupt_copy_at_the_holder_is_not_served(cluster):
    path = cluster.tmp / "damaged"
    blocks = sealed(2)
    bad_g, good_g = list(blocks)
    with BlockStore(path, sync=False) as s:
        s.put_many(blocks.items())
    env = lmdb.open(str(path), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(bad_g, blocks[bad_g][:-1] + b"!", db=env.open_db(b"blocks", txn=txn))
    env.close()
    client, _ = await cluster.node()
    holder, store = await cluster.node(store=BlockStore(path, sync=False))
    assert await bs.get_from(client, holder.peer, blocks) == {good_g: blocks[good_g]}
    assert store.stats().quarantined == 1


def forging_node(blocks: dict[bytes, bytes], forge: set[bytes], extra: dict | None = None):
    """A malicious holder: answers fetches with the right BGUIDs but altered
    bytes for those in ``forge``, plus any ``extra`` blocks not asked for."""

    async def fetch(sender, body):
        out = []
        for g in body["bguids"]:
            d = blocks[g]
            out.append({"g": g, "d": d[:-1] + bytes([d[-1] ^ 1]) if g in forge else d})
        out += [{"g": g, "d": d} for g, d in (extra or {}).items()]
        return {"blocks": out, "missing": []}

    d = Dispatcher()
    d.on(bs.FETCH, fetch)
    return d


@pytest.mark.parametrize("size", [1000, 60000])  # small replies verified inline, large in a thread
async def test_forged_bytes_from_a_malicious_node_are_caught(cluster, size):
    client, _ = await cluster.node()
    blocks = sealed(10, size)
    forged = list(blocks)[6]
    evil, _ = await cluster.node(handler=forging_node(blocks, {forged}))
    with pytest.raises(BlockCorrupt, match="do not hash") as ei:
        await bs.get_from(client, evil.peer, blocks)
    assert ei.value.bguid == forged and ei.value.peer_id == evil.id


async def test_unrequested_block_is_refused(cluster):
    client, _ = await cluster.node()
    blocks = sealed(3)
    asked, other = list(blocks)[:2], list(blocks)[2]
    evil, _ = await cluster.node(handler=forging_node(blocks, set(), {other: blocks[other]}))
    with pytest.raises(BlockCorrupt, match="not asked for"):
        await bs.get_from(client, evil.peer, asked)


async def test_has_list_stat(cluster):
    client, _ = await cluster.node()
    holder, _ = await cluster.node()
    blocks = sealed(5)
    await bs.put_to(client, holder.peer, blocks)
    absent = hashlib.sha256(b"x").digest()
    have = await bs.has_on(client, holder.peer, [*blocks, absent])
    assert have == {**{g: True for g in blocks}, absent: False}
    page, more = await bs.list_on(client, holder.peer, limit=3)
    assert more and page == sorted(blocks)[:3]
    rest, more = await bs.list_on(client, holder.peer, after=page[-1])
    assert not more and page + rest == sorted(blocks)
    st = await bs.stat_of(client, holder.peer)
    assert st["blocks"] == 5 and st["bytes"] == sum(map(len, blocks.values())) and st["free"] > 0


async def test_other_refusals_become_holder_refused(cluster):
    client, _ = await cluster.node()

    async def broken(sender, body):
        raise Refused("overloaded", "try later")

    d = Dispatcher()
    d.on(bs.STORE, broken)
    node, _ = await cluster.node(handler=d)
    with pytest.raises(HolderRefused) as ei:
        await bs.put_to(client, node.peer, sealed(1))
    assert ei.value.code == "overloaded" and ei.value.peer_id == node.id
    with pytest.raises(HolderRefused) as ei:  # a node without the block service
        await bs.get_from(client, node.peer, sealed(1))
    assert ei.value.code == "unsupported"


async def test_virtual_time(tmp_path, autojump_clock):
    # On MockClock the store runs inline and the client verifies inline, so
    # simulated time does not jump past timeouts while a thread works.
    net = SimNetwork(seed=2)
    stores = []
    try:
        async with trio.open_nursery() as n:
            ts = []
            for i in range(2):
                t = net.add(Identity.from_seed(b"virtual-%d" % i))
                stores.append(BlockStore(tmp_path / f"v{i}", sync=False))
                d = Dispatcher()
                bs.BlockService(AsyncBlockStore(stores[-1], inline=True)).register(d)
                await n.start(t.serve, d)
                ts.append(t)
            blocks = sealed(20, 60000)
            assert await bs.put_to(ts[0], ts[1].peer, blocks, timeout=5) == 20
            assert await bs.get_from(ts[0], ts[1].peer, blocks, offload=False) == blocks
            n.cancel_scope.cancel()
    finally:
        for s in stores:
            s.close()
