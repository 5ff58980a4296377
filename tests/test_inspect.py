"""``p2pfs inspect`` on real volumes: a single-node one, and a network
volume on real node processes (3 storage nodes, a 4-member inner ring) on
loopback. Each view is checked against what was written: the node's
routing table and pointers, the view and the ring's health, each member's
certificate of a writer's head, the records of a log, a block's holders and
its decoded content, a file's path to its blocks. Processes are stopped by
PID and directories removed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from overlay.wire.ids import Identity
from p2pfs.backend import LocalBackend, mkfs_local
from p2pfs.cluster import LocalCluster, python_module_argv
from p2pfs.inspect import InspectError, node_info, object_info, volume_info
from p2pfs.inspect_data import block_info, file_info, log_info
from p2pfs.netbackend import NetworkBackend, mkfs_network
from storage.namespace import Namespace
from storage.ring_local import LocalRing

ROOT = Path(__file__).resolve().parent.parent
RING_ARGS = ["--request-timeout", "2", "--view-change-timeout", "2", "--no-sync"]
BIG = b"0123456789abcdef" * 1500          # 24000 bytes: DATA blocks, not inline


async def fill(s) -> None:
    ns = await Namespace.mount(s.view, s.identity, s.blocks, s.board)
    d = await ns.mkdir(1, "docs", 0o755, 0, 0)
    for name, data in (("small.txt", b"hello\n"), ("big.bin", BIG)):
        a = await ns.create(d.ino, name, 0o644, 0, 0)
        await ns.write(a.ino, 0, data)
        await ns.release(a.ino)
    await ns.sync()
    board = s.board
    with trio.fail_after(60):
        while getattr(board, "pending", False):
            await trio.sleep(0.05)


@pytest.fixture
def local_volume(tmp_path):
    vol = tmp_path / "local"
    mkfs_local(vol)

    async def write():
        async with LocalBackend(vol).attach() as s:
            await fill(s)

    trio.run(write)
    return vol


def argv_for(index, data, bootstrap):
    args = ["--data", str(data), "--listen", "127.0.0.1:0", "--no-fsync", "--r", "2",
            "--log-level", "warning"]
    for b in bootstrap:
        args += ["--bootstrap", b.info["bootstrap"]]
    return python_module_argv("storage", *args)


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """(cluster, ring, volume dir) with the same two files written."""
    base = tmp_path_factory.mktemp("inspect")
    cluster = LocalCluster(base / "nodes", argv_for, ready_timeout=60)
    owner = Identity.generate()
    ring = LocalRing(base / "ring", owner=owner, args=RING_ARGS, name="inspect")
    try:
        cluster.start(3)
        trio.run(ring.start)
        vol = base / "vol"
        mkfs_network(vol, [cluster.nodes[0].info["bootstrap"]], r=2, name="seen",
                     identity=owner, ring=ring.ring)

        async def write():
            async with NetworkBackend(vol).attach() as s:
                await fill(s)

        trio.run(write)
        yield cluster, ring, vol
    finally:
        ring.close()
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


async def check_volume_contents(vol: Path, *, r: int) -> None:
    """What every volume shows, whatever it lives on."""
    v = await volume_info(vol)
    [w] = v["view"]["writers"]
    head = v["heads"][w["id"][:16]]
    assert head["seq"] >= 6 and head["writer"] == w["id"]

    log = await log_info(vol, w["id"][:10])
    ops = [rec["op"] for rec in log["records"]]
    assert ops[0] == "end" and ops.count("mkinode") == 3 and ops.count("link") == 3
    names = {rec.get("name") for rec in log["records"] if rec["op"] == "link"}
    assert names == {"docs", "small.txt", "big.bin"}
    writes = [rec for rec in log["records"] if rec["op"] == "write"]
    assert {"inline_bytes": 6} in [rec["data"] for rec in writes]
    block_write = next(rec for rec in writes if rec["blocks"])
    assert sum(n for _, n in block_write["blocks"]) == len(BIG)

    f = await file_info(vol, "/docs/big.bin")
    assert f["size"] == len(BIG) and f["type"] == "reg"
    assert [e["block"] for e in f["extents"]] == [g for g, _ in block_write["blocks"]]
    assert all(e["verified_copies"] == r and not e["problems"] for e in f["extents"])
    assert (await file_info(vol, "/docs/small.txt"))["extents"] == [
        {"offset": 0, "end": 6, "inline_bytes": 6}]
    assert (await file_info(vol, "/docs"))["entries"] == ["big.bin", "small.txt"]
    with pytest.raises(InspectError):
        await file_info(vol, "/docs/nope")

    b = await block_info(vol, f["extents"][0]["block"])
    assert b["content"]["kind"] == "data" and 0 < b["content"]["bytes"] <= 65536
    assert len(b["holders"]["verified"]) == r and b["holders"]["missing"] == []
    lb = await block_info(vol, head["block"])
    assert lb["content"]["kind"] == "record" and lb["content"]["last"] == head["seq"]
    assert lb["content"]["writer"] == w["id"]


async def test_a_single_node_volume_is_inspected(local_volume):
    await check_volume_contents(local_volume, r=1)
    v = await volume_info(local_volume)
    assert v["kind"] == "single-node" and v["quarantine"] == {}


async def test_a_network_volume_its_ring_and_its_blocks_are_inspected(network):
    cluster, ring, vol = network
    await check_volume_contents(vol, r=2)
    v = await volume_info(vol)
    net = v["network"]["ring"]
    assert net["members_up"] == 4 and net["healthy"]

    [w] = v["view"]["writers"]
    obj = await object_info(vol, w["id"][:12])
    assert obj["what"].startswith("log-head of writer")
    assert len(obj["members"]) == 4
    assert all(m.get("valid") for m in obj["members"])
    newest = obj["newest_valid"]
    assert len(newest["signers"]) >= 3                       # 2f+1
    assert obj["versions"][0]["seq"] == newest["seq"]
    assert obj["versions"][0]["content"]["n"] == v["heads"][w["id"][:16]]["n"]
    view_obj = await object_info(vol, "view")
    assert view_obj["versions"][0]["content"]["name"] == "seen"

    # The head block is a raw ring version: inspect decodes it as a head.
    hb = await block_info(vol, newest["vguid"])
    assert hb["content"]["kind"] == "log-head"
    assert hb["content"]["n"] == obj["versions"][0]["content"]["n"]


async def test_a_nodes_routing_table_and_pointers_are_shown(network):
    cluster, ring, vol = network
    n = cluster.nodes[1]
    info = await node_info(str(n.data_dir))
    assert info["id"] == n.id_hex and info["joined"]
    listed = {e.split("@")[0] for row in info["routing_table"]
              for slot in row["slots"].values() for e in slot}
    others = {m.id_hex[:16] for m in cluster.nodes if m is not n}
    assert others <= listed
    assert info["store"]["blocks"] > 0
    with pytest.raises(InspectError):
        await node_info(str(n.data_dir / "missing.sock"))


def test_the_cli_prints_text_and_json(local_volume):
    tool = [sys.executable, str(ROOT / "tools" / "inspect.py")]
    out = subprocess.run(tool + ["file", str(local_volume), "/docs/big.bin"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "extents:" in out.stdout and "verified_copies: 1" in out.stdout
    out = subprocess.run(tool + ["volume", str(local_volume), "--json"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["view"]["name"] == "p2pfs"
    out = subprocess.run(tool + ["block", str(local_volume), "00" * 31], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "64 hex digits" in out.stderr
