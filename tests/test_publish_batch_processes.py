"""Batched publishing between real node processes (``python -m storage`` on
127.0.0.1, TLS transport): after a burst of puts the holders publish their
blocks with ``publish_many`` (storage/maintenance.py), in far fewer routed
messages than blocks, and a reader on another node locates every replica.
Every process is stopped by PID and its directory removed."""

from __future__ import annotations

import os
import shutil

import trio

from overlay import control
from overlay.wire.ids import Identity
from overlay.wire.tls import TlsTransport
from overlay.wire.transport import Peer
from p2pfs.cluster import LocalCluster, storage_argv
from storage import blockservice as bs
from storage.blockapi import Kind
from storage.server import StorageNode

KEY = bytes(range(32))
BLOCKS = 240


argv_for = storage_argv("--quota", "64M", "--no-fsync", "--log-level", "warning")


async def status(n) -> dict:
    return (await control.call(n.info["control"], "blk.ctl.status", {}, timeout=60))["status"]


async def test_holders_publish_a_burst_in_batches_and_every_replica_is_located(tmp_path):
    base = tmp_path / "procs"
    cluster = LocalCluster(base, argv_for, ready_timeout=60)
    try:
        cluster.start(4)
        boot = [Peer(bytes.fromhex(n.id_hex), n.addr) for n in cluster.nodes[:1]]
        client = StorageNode(TlsTransport(Identity.generate()), None)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(120):
                await nursery.start(client.run, boot)
                before = {n.id_hex: await status(n) for n in cluster.nodes}
                rb = client.blocks(KEY)
                bguids = await rb.put_many([(Kind.DATA, os.urandom(2000))
                                            for _ in range(BLOCKS)])
                while True:     # the holders' keepers drain their backlogs
                    sts = [await status(n) for n in cluster.nodes]
                    if not any(s["publish_backlog"] for s in sts):
                        break
                    await trio.sleep(0.25)
                published = sum(s["repair"].get("published", 0) for s in sts)
                assert published >= 3 * BLOCKS          # every holder, every block
                batches = routes = 0
                for n, s in zip(cluster.nodes, sts):
                    sent, was = s["sent"], before[n.id_hex]["sent"]
                    batches += sent.get("tap.publish_batch", 0) - was.get("tap.publish_batch", 0)
                    # Routed publishes only: the client's placement lookups
                    # ("deliver") also pass through the nodes, more of them
                    # when a busy machine makes a node look suspect.
                    now, then = s["events"], before[n.id_hex]["events"]
                    routes += sum(now.get(k, 0) - then.get(k, 0)
                                  for k in ("routed_publish", "routed_unpublish"))
                # One per next hop and batch, not one per block, salt and hop.
                assert 0 < batches < BLOCKS, (batches, published)
                assert routes < BLOCKS, routes
                async with TlsTransport(Identity.generate()) as t:
                    held: dict[bytes, set[bytes]] = {g: set() for g in bguids}
                    for n in cluster.nodes:
                        have = await bs.has_on(t, Peer(bytes.fromhex(n.id_hex), n.addr),
                                               bguids, timeout=30)
                        for g, h in have.items():
                            if h:
                                held[g].add(bytes.fromhex(n.id_hex))
                for g in bguids[:40]:
                    found = await client.node.locate(g, 3)
                    assert {p.id for p in found} == held[g]
            client.stop()
            nursery.cancel_scope.cancel()
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
