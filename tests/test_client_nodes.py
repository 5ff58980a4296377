"""Client-only overlay members (overlay/config.py ``client_only``; a
StorageNode without a store, as every mount runs): between real node
processes on 127.0.0.1, a client routes its own requests and stores
replicated blocks, but no node lists it, routes to it or takes it for a
root, so clients coming and going do not move replica placement. Every
process is stopped by PID and its directory removed."""

from __future__ import annotations

import os
import shutil

import trio

from overlay import control
from overlay.wire.ids import Identity, guid
from overlay.wire.tls import TlsTransport
from overlay.wire.transport import Peer
from p2pfs.cluster import LocalCluster, storage_argv
from storage.blockapi import Kind
from storage.server import StorageNode

KEY = bytes(range(32))


argv_for = storage_argv("--quota", "64M", "--no-fsync", "--log-level", "warning")


async def known_ids(n) -> set[str]:
    """Every NodeID a node lists: table entries and backpointers."""
    t = (await control.call(n.info["control"], "tap.ctl.table", {}, timeout=60))["table"]
    ids = {e["id"] for row in t["rows"] for slot in row["slots"].values() for e in slot}
    return ids | {b["id"] for b in t["backpointers"]}


async def roots_of(n, targets: list[bytes]) -> list[bytes]:
    out = []
    for g in targets:
        r = await control.call(n.info["control"], "tap.ctl.route", {"guid": g}, timeout=60)
        out.append(r["root"]["id"])
    return out


async def test_a_client_is_never_listed_nor_a_root_and_moves_no_placement(tmp_path):
    base = tmp_path / "procs"
    cluster = LocalCluster(base, argv_for, ready_timeout=60)
    targets = [guid(b"target %d" % i) for i in range(48)]
    try:
        cluster.start(4)
        boot = [Peer(bytes.fromhex(n.id_hex), n.addr) for n in cluster.nodes[:2]]
        before = await roots_of(cluster.nodes[1], targets)
        clients = [StorageNode(TlsTransport(Identity.generate()), None) for _ in range(3)]
        async with trio.open_nursery() as nursery:
            with trio.fail_after(120):
                for c in clients:
                    await nursery.start(c.run, boot)
                    assert c.node.config.client_only and len(c.node.table) > 0
                # The clients work: replicated blocks stored and read back.
                rb = clients[0].blocks(KEY)
                data = [os.urandom(3000) for _ in range(20)]
                gs = await rb.put_many([(Kind.DATA, d) for d in data])
                assert await clients[1].blocks(KEY).get_many([(g, Kind.DATA) for g in gs]) == data
                # Two heartbeat rounds later nobody lists a client...
                await trio.sleep(2.5)
                mine = {c.node.id.hex() for c in clients}
                for n in cluster.nodes:
                    assert not (await known_ids(n)) & mine
                # ... nobody routes to one, even toward its own NodeID ...
                ends = await roots_of(cluster.nodes[2], [c.node.id for c in clients])
                assert not {e.hex() for e in ends} & mine
                # ... and every root is where it was before they came.
                assert await roots_of(cluster.nodes[1], targets) == before
                assert {p.id for p in await clients[2].node.roots(targets[0], 3)} <= {
                    bytes.fromhex(n.id_hex) for n in cluster.nodes}
            for c in clients:
                c.stop()
            nursery.cancel_scope.cancel()
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
