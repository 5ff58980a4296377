"""Replicated blocks across real node processes on 127.0.0.1 (``python -m
storage``, TLS transport, LMDB stores), driven through their control
sockets: the must-show scenarios of issue 4.

Six nodes with 2 MiB quotas share one module-wide cluster; the tests run in
file order and the last ones are destructive (kill -9, filling every store).
Every process is stopped by PID and the data directories are removed."""

from __future__ import annotations

import os
import random
import shutil
import time

import pytest
import trio

from overlay import control
from overlay.wire.ids import Identity
from overlay.wire.tls import TlsTransport
from overlay.wire.transport import Peer, RemoteError
from p2pfs.cluster import LocalCluster, NodeProcess, python_module_argv
from storage import blockservice as bs
from storage.blockapi import Kind
from storage.server import StorageNode

KEY = bytes(range(32))
NODES = 6
DATA = int(Kind.DATA)
QUOTA = "2M"


def argv_for(index, data, bootstrap: list[NodeProcess]):
    args = ["--data", str(data), "--listen", "127.0.0.1:0", "--quota", QUOTA,
            "--repair-interval", "3", "--log-level", "info"]
    for b in bootstrap:
        args += ["--bootstrap", b.info["bootstrap"]]
    return python_module_argv("storage", *args)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("procs")
    c = LocalCluster(base, argv_for, ready_timeout=60)
    try:
        c.start(NODES)
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


def peer(n: NodeProcess) -> Peer:
    return Peer(bytes.fromhex(n.id_hex), n.addr)


async def ctl(n: NodeProcess, msg_type: str, body: dict | None = None) -> dict:
    return await control.call(n.info["control"], msg_type, body or {}, timeout=60)


def live(cluster) -> list[NodeProcess]:
    return [n for n in cluster.nodes if n.alive]


def by_id(cluster, node_id: bytes) -> NodeProcess:
    return next(n for n in cluster.nodes if n.id_hex == node_id.hex())


async def holders(cluster, g: bytes) -> set[bytes]:
    """Live nodes that say they hold ``g`` (asked over TLS, as any node may)."""
    out = set()
    async with TlsTransport(Identity.generate()) as t:
        for n in live(cluster):
            if (await bs.has_on(t, peer(n), [g], timeout=10))[g]:
                out.add(bytes.fromhex(n.id_hex))
    return out


def block(tag: bytes, size: int = 3000) -> bytes:
    return tag + random.Random(tag).randbytes(size)


# ---------------------------------------------------------------------------


async def test_a_block_flipped_on_disk_is_detected_and_served_from_another(cluster):
    writer, reader = cluster.nodes[0], cluster.nodes[1]
    data = block(b"flip")
    r = await ctl(writer, "blk.ctl.put", {"key": KEY, "kind": DATA, "data": data})
    assert len(set(r["holders"])) == 3
    victim = by_id(cluster, next(h for h in r["holders"] if h.hex() != reader.id_hex))
    # Flip one byte of the sealed block inside the victim's LMDB file.
    g = r["bguid"]
    async with TlsTransport(Identity.generate()) as t:
        sealed = (await bs.get_from(t, peer(victim), [g]))[g]
    path = victim.data_dir / "blocks" / "data.mdb"
    # A small put is staged first and committed to LMDB within a moment
    # (storage.blockstore_stage): wait for it to be there.
    with trio.fail_after(20):
        while (at := (raw := path.read_bytes()).find(sealed[200:264])) < 0:
            await trio.sleep(0.05)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([raw[at + 7] ^ 0xFF]), at + 7)
    finally:
        os.close(fd)

    got = await ctl(reader, "blk.ctl.get", {"key": KEY, "kind": DATA, "bguid": g,
                                            "prefer": [{"id": bytes.fromhex(victim.id_hex),
                                                        "addr": victim.addr}]})
    assert got["data"] == data
    assert got["source"].hex() != victim.id_hex
    st = (await ctl(victim, "blk.ctl.status"))["status"]
    assert st["store"]["corruptions"] == 1 and st["store"]["quarantined"] == 1


async def test_a_forged_block_from_a_malicious_node_is_rejected(cluster):
    writer, reader = cluster.nodes[0], cluster.nodes[2]
    data = block(b"forged")
    r = await ctl(writer, "blk.ctl.put", {"key": KEY, "kind": DATA, "data": data})
    # A node of our own joins the overlay and answers every fetch with bytes
    # that do not hash to the BGUID asked for.
    evil = StorageNode(TlsTransport(Identity.generate()), None)

    async def forge(sender: bytes, body: dict) -> dict:
        return {"blocks": [{"g": g, "d": os.urandom(1000)} for g in body["bguids"]],
                "missing": []}

    evil.node.dispatcher.on(bs.FETCH, forge)
    async with trio.open_nursery() as n:
        me = await n.start(evil.run, [peer(writer)])
        got = await ctl(reader, "blk.ctl.get", {"key": KEY, "kind": DATA, "bguid": r["bguid"],
                                                "prefer": [{"id": me.id, "addr": me.addr}]})
        assert got["data"] == data
        assert got["rejected"] == [me.id]
        assert got["source"] in r["holders"]
        with trio.fail_after(30):
            await evil.leave()
        n.cancel_scope.cancel()


async def test_a_block_survives_kill_9_of_two_holders_and_is_restored_to_three(cluster):
    writer = cluster.nodes[0]
    data = block(b"survivor")
    r = await ctl(writer, "blk.ctl.put", {"key": KEY, "kind": DATA, "data": data})
    g = r["bguid"]
    assert await holders(cluster, g) == set(r["holders"])
    # Kill any two holders other than the writer (we keep reading through it).
    doomed = [by_id(cluster, h) for h in r["holders"] if h.hex() != writer.id_hex][:2]
    for n in doomed:
        cluster.kill(n)
    reader = next(n for n in live(cluster) if n is not writer)
    got = await ctl(reader, "blk.ctl.get", {"key": KEY, "kind": DATA, "bguid": g})
    assert got["data"] == data
    # Repair: passes run every 3 s; ask for more meanwhile.
    deadline = time.monotonic() + 40
    while len(await holders(cluster, g)) < 3:
        assert time.monotonic() < deadline, "replication was not restored"
        for n in live(cluster):
            await ctl(n, "blk.ctl.repair")
        await trio.sleep(1)
    assert len(await holders(cluster, g)) >= 3
    got = await ctl(writer, "blk.ctl.get", {"key": KEY, "kind": DATA, "bguid": g})
    assert got["data"] == data


async def test_full_stores_are_reported_to_the_writer(cluster):
    writer = next(n for n in live(cluster))
    put_holders = []
    with pytest.raises(RemoteError) as e:
        for i in range(400):
            r = await ctl(writer, "blk.ctl.put",
                          {"key": KEY, "kind": DATA, "data": block(b"fill%d" % i, 60000)})
            put_holders.append(r["holders"])
    assert e.value.code == "store_full", (e.value, len(put_holders))
    # Until then every put reached three distinct holders, passing over full ones.
    assert put_holders and all(len(set(h)) == 3 for h in put_holders)
    st = (await ctl(writer, "blk.ctl.status"))["status"]
    assert st["replication"].get("refused_StoreFull", 0) >= 1
    for n in live(cluster):
        s = (await ctl(n, "blk.ctl.status"))["status"]["store"]
        assert s["used"] <= s["quota"]

