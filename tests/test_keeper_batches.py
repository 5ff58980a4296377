"""The holder's keeper publishes in batches (storage/maintenance.py,
``DolrAPI.publish_many``), on the simulated network and virtual time: while
blocks keep arriving it publishes only once something has waited
``MAX_WAIT``, so a node that never stops receiving still publishes every
block within about that bound; once writes pause, the rest goes at once.
Each batch is one routed message per next hop, far fewer than blocks."""

from __future__ import annotations

import random

import trio

from overlay.wire.ids import Identity
from overlay.wire.simnet import PlaneTopology, SimNetwork
from storage.blockapi import Kind
from storage.blockstore import BlockStore
from storage.maintenance import MAX_WAIT
from storage.server import StorageNode

VOLUME = bytes(range(32))


async def test_a_busy_holder_publishes_within_max_wait_and_in_batches(nursery, tmp_path,
                                                                      autojump_clock):
    net = SimNetwork(seed=7, topology=PlaneTopology(seed=7))
    nodes: list[StorageNode] = []
    stores: list[BlockStore] = []
    try:
        for i in range(6):
            store = BlockStore(tmp_path / f"n{i}", quota=64 << 20, sync=False)
            stores.append(store)
            sn = StorageNode(net.add(Identity.from_seed(b"keeper-%d" % i)), store, inline=True,
                             repair_interval=0)
            await nursery.start(sn.run, [n.peer for n in nodes][:1])
            nodes.append(sn)
        await trio.sleep(2)
        writer = nodes[0].blocks(VOLUME)
        rnd = random.Random(7)
        before = net.stats.copy()
        written: list[tuple[float, bytes]] = []
        # A steady trickle of small puts for 4 x MAX_WAIT: every holder stays
        # busy (a store within the last second) the whole time.
        end = trio.current_time() + 4 * MAX_WAIT
        while trio.current_time() < end:
            g = await writer.put(Kind.DATA, rnd.randbytes(1500))
            written.append((trio.current_time(), g))
            await trio.sleep(0.1)
        now = trio.current_time()
        old = [g for t, g in written if t < now - MAX_WAIT - 1.5]
        assert old
        for g in old:
            holders = [n for n, s in zip(nodes, stores) if s.has(g)]
            assert len(holders) == 3
            for n in holders:
                assert g in n.node.published, "published only after the writes stopped"
        # Writes pause: the rest goes out.
        await trio.sleep(3)
        assert all(n.keeper.publish_backlog == 0 for n in nodes[1:])
        published = sum(n.keeper.stats["published"] for n in nodes)
        batches = sum(n.keeper.stats["publish_batches"] for n in nodes)
        assert published >= 3 * len(written)
        assert batches * 5 < published
        sent = net.stats.since(before).sent
        assert sent["tap.publish_batch"] < published and sent.get("tap.route", 0) < published
        reader = nodes[-1].node
        for _t, g in written[::10]:
            found = {p.id for p in await reader.locate(g, 3)}
            assert found == {n.id for n, s in zip(nodes, stores) if s.has(g)}
    finally:
        for n in nodes:
            n.stop()
        for s in stores:
            s.close()
