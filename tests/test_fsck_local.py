"""fsck on single-node volumes (one LMDB store, r = 1): the checks of the
log layer without a network. A snapshot that decodes but does not hold the
file system its records compute, a log block damaged on disk, a lost file
block, and the command line (exit codes, --json, the lock, the quarantine
list). Real stores on disk, no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio

from p2pfs.backend import LocalBackend, mkfs_local
from p2pfs.fsck import fsck
from storage.blockapi import Kind
from storage.extents import Blk
from storage.namespace import Namespace
from storage.records import decode_block

ROOT = Path(__file__).resolve().parent.parent
FILES = {f"f{i}": (b"%d " % i) * (20 if i % 4 else 5000) for i in range(12)}


async def build(vol: Path, *, tamper=None) -> None:
    """Write FILES, then a snapshot (``tamper(ns)`` may change the state it
    is taken of, as a buggy writer would), then two more files."""
    mkfs_local(vol)
    async with LocalBackend(vol).attach() as s:
        ns = await Namespace.mount(s.view, s.identity, s.blocks, s.board)
        d = await ns.mkdir(1, "dir", 0o755, 0, 0)
        for name, data in FILES.items():
            a = await ns.create(d.ino, name, 0o644, 0, 0)
            await ns.write(a.ino, 0, data)
            await ns.release(a.ino)
        await ns.sync()
        if tamper is not None:
            tamper(ns)
        assert await ns.snapshot() is not None
        for name in ("late1", "late2"):
            a = await ns.create(1, name, 0o644, 0, 0)
            await ns.write(a.ino, 0, name.encode())
            await ns.release(a.ino)


async def read_all(vol: Path) -> dict[str, bytes]:
    async with LocalBackend(vol).attach() as s:
        ns = await Namespace.mount(s.view, s.identity, s.blocks, s.board)
        d = await ns.lookup(1, "dir")
        return {name: await ns.read((await ns.lookup(d.ino, name)).ino, 0, 1 << 20)
                for name in FILES}


def flip_on_disk(vol: Path, sealed: bytes) -> None:
    """Flip a byte of every copy of these bytes in the store's file (a small
    block lives in a leaf page, which LMDB's copy-on-write has left copies
    of in free pages: the live one is among them)."""
    path = vol / "blocks" / "data.mdb"
    raw = path.read_bytes()
    needle = sealed[60:124]
    at = raw.find(needle)
    assert at >= 0
    fd = os.open(path, os.O_RDWR)
    try:
        while at >= 0:
            os.pwrite(fd, bytes([raw[at + 3] ^ 0xFF]), at + 3)
            at = raw.find(needle, at + 1)
    finally:
        os.close(fd)


async def blocks_of(vol: Path, name: str | None = None) -> tuple[list[bytes], list[bytes]]:
    """Sealed bytes of the DATA blocks of dir/``name``, and of the log's
    blocks, newest first."""
    async with LocalBackend(vol).attach() as s:
        ns = await Namespace.mount(s.view, s.identity, s.blocks, s.board)
        store = s.blocks.store
        data = []
        if name:
            d = await ns.lookup(1, "dir")
            n = ns._st.inodes[(await ns.lookup(d.ino, name)).ino]
            data = [store.get(x.src.bguid) for x in n.data if isinstance(x.src, Blk)]
        chain, g = [], ns.log.block
        while g is not None:
            chain.append(store.get(g))
            g = decode_block(await s.blocks.get(g, Kind.RECORD)).prev
        return data, chain


def fsck_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "fsck.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------------------


async def test_a_snapshot_that_differs_from_its_records_is_rebuilt(tmp_path):
    vol = tmp_path / "v"

    def wrong_mode(ns):                 # the snapshot will say 0600 where the logs say 0644
        st = ns.replica.base
        d = st.inodes[st.lookup(1, b"dir")]
        ino = d.entries[b"f3"].ino
        st.inodes[ino].mode = 0o600
        st.dirty.add(ino)

    await build(vol, tamper=wrong_mode)
    report = await fsck(vol)
    [p] = report.problems
    assert p.kind == "snapshot-bad" and "attributes or entries differ" in p.detail
    assert p.hint["head_of"]                          # the head names it: mounts use it
    assert report.exit_code() == 2
    fixed = await fsck(vol, do_repair=True)
    assert fixed.exit_code() == 1 and fixed.problems[0].status == "quarantined"
    again = await fsck(vol)
    assert again.exit_code() == 0 and again.problems == []
    assert again.stats["snapshots_quarantined"] == 1
    assert await read_all(vol) == FILES


async def test_a_log_block_damaged_on_disk_breaks_that_log_and_names_what_it_held(tmp_path):
    vol = tmp_path / "v"
    await build(vol)
    _, chain = await blocks_of(vol)
    flip_on_disk(vol, chain[-1])                   # the oldest: records 1.. (the End record)
    report = await fsck(vol)
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == ["block-lost", "log-broken"]
    lost = next(p for p in report.problems if p.kind == "block-lost")
    assert any(a.startswith("log of writer") and "cannot be read" in a for a in lost.affects)
    broken = next(p for p in report.problems if p.kind == "log-broken")
    assert "readers ignore its log" in broken.affects[0]
    assert "/dir/f11" in broken.affects            # named from the newer records it could read
    assert not lost.repair and report.exit_code() == 2
    assert (await fsck(vol, do_repair=True)).exit_code() == 2     # nothing to restore from


async def test_a_lost_file_block_names_the_file_and_its_version(tmp_path):
    vol = tmp_path / "v"
    await build(vol)
    [data], _ = await blocks_of(vol, "f4")
    flip_on_disk(vol, data)
    report = await fsck(vol)
    [p] = report.problems
    assert p.kind == "block-lost" and p.affects[0] == "/dir/f4"
    assert any(a.startswith("version of /dir/f4 written") for a in p.affects)
    assert report.exit_code() == 2 and (await fsck(vol, do_repair=True)).exit_code() == 2


async def test_the_command_line(tmp_path):
    vol = tmp_path / "v"
    await build(vol)
    out = await trio.to_thread.run_sync(lambda: fsck_cli(vol, "--json", "--quiet"))
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["clean"] and rep["exit"] == 0 and rep["stats"]["files"] == len(FILES) + 2
    assert out.stderr == ""

    out = await trio.to_thread.run_sync(lambda: fsck_cli(vol))
    assert out.returncode == 0 and "clean" in out.stdout and "fsck: " in out.stderr

    with LocalBackend(vol)._locked():        # as a mount holds it
        out = await trio.to_thread.run_sync(lambda: fsck_cli(vol, "--json"))
    assert out.returncode == 4 and "in use" in json.loads(out.stdout)["error"]

    out = await trio.to_thread.run_sync(lambda: fsck_cli(tmp_path / "nothing"))
    assert out.returncode == 4 and "not a p2pfs volume" in out.stderr

    (vol / "quarantine.json").write_text("{not json")
    out = await trio.to_thread.run_sync(lambda: fsck_cli(vol))
    assert out.returncode == 4 and "quarantine.json" in out.stderr
