"""Several writers on one network volume, their log-heads and the view
certified by a real inner ring (``storage.ringboard``, ``p2pfs.netbackend``).

Real processes: 4 storage nodes (``python -m storage``) and 4 ring members
(``python -m storage.ringnode``) on loopback, stopped by PID at teardown.
The writers run in the test process, each with its own client node, through
the namespace API (the FUSE mount is tested in test_fuse_writers.py)."""

from __future__ import annotations

import contextlib
import shutil

import pytest
import trio

from overlay.wire.ids import Identity
from p2pfs.cluster import LocalCluster, NodeProcess, python_module_argv
from p2pfs.netbackend import NetworkBackend, join_network, mkfs_network, write_ticket
from storage.logs import LogRolledBack, decode_head
from storage.namespace import Namespace
from storage.ring_local import LocalRing
from storage.ringboard import head_aguid

RING_ARGS = ["--request-timeout", "0.6", "--view-change-timeout", "0.6", "--no-sync"]


def argv_for(index, data, bootstrap: list[NodeProcess]):
    args = ["--data", str(data), "--listen", "127.0.0.1:0", "--no-fsync", "--log-level", "info"]
    for b in bootstrap:
        args += ["--bootstrap", b.info["bootstrap"]]
    return python_module_argv("storage", *args)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("nodes")
    c = LocalCluster(base, argv_for, ready_timeout=60)
    try:
        c.start(4)
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def volume(cluster, tmp_path):
    """(owner's volume dir, a second writer's volume dir, the ring)."""
    owner, other = Identity.generate(), Identity.generate()
    ring = LocalRing(tmp_path / "ring", owner=owner, args=RING_ARGS, name="t")
    try:
        await ring.start()
        a, b = tmp_path / "a", tmp_path / "b"
        mkfs_network(a, [cluster.nodes[0].info["bootstrap"]], r=3, name="shared",
                     identity=owner, ring=ring.ring)
        async with NetworkBackend(a).connect() as conn:
            await conn.current_view()                 # the owner publishes the view
            view = await conn.add_writer(other.public_key)
        assert view.version == 2 and other.id in view.active_ids()
        join_network(b, write_ticket(a, view), other)
        yield a, b, ring
    finally:
        ring.close()


@contextlib.asynccontextmanager
async def mounted(volume_dir):
    async with NetworkBackend(volume_dir).attach() as s:
        ns = await Namespace.mount(s.view, s.identity, s.blocks, s.board)
        yield s, ns


async def write_file(ns: Namespace, name: str, data: bytes) -> None:
    a = await ns.create(1, name, 0o644, 0, 0)
    await ns.open(a.ino)
    await ns.write(a.ino, 0, data)
    await ns.release(a.ino)          # close: publish (and certify: several writers)


async def read_file(ns: Namespace, name: str) -> bytes:
    await ns.refresh()
    a = await ns.lookup(1, name)
    return await ns.read(a.ino, 0, a.size)


async def test_two_writers_see_each_others_closed_files(volume):
    a, b, _ring = volume
    async with mounted(a) as (sa, na), mounted(b) as (sb, nb):
        assert sa.board.wait and sb.board.wait      # several writers: close waits for the ring
        await write_file(na, "from-a.txt", b"written by the owner\n")
        await write_file(nb, "from-b.txt", b"written by the second writer\n" * 1000)
        assert await read_file(na, "from-b.txt") == b"written by the second writer\n" * 1000
        assert await read_file(nb, "from-a.txt") == b"written by the owner\n"
        assert sa.board.certified >= 1 and sb.board.certified >= 1
        assert not sa.board.pending and not sb.board.pending


async def test_a_writer_keeps_working_while_the_ring_is_down_and_certifies_after(volume):
    a, b, ring = volume
    async with mounted(a) as (sa, na), mounted(b) as (sb, nb):
        sa.board.wait_timeout = 3.0
        for k in (0, 1):
            ring.pause(k)                # two of four members: no quorum of 2f+1 = 3
        try:
            await write_file(na, "offline.txt", b"made while the ring was unreachable")
            assert sa.board.pending          # durable here, not certified yet
            a2 = await na.lookup(1, "offline.txt")   # read-your-writes meanwhile
            assert await na.read(a2.ino, 0, 100) == b"made while the ring was unreachable"
        finally:
            for k in (0, 1):
                ring.resume(k)
        with trio.fail_after(60):
            while sa.board.pending:
                await trio.sleep(0.2)
        assert await read_file(nb, "offline.txt") == b"made while the ring was unreachable"


async def test_a_stale_head_from_a_lagging_member_is_detected(volume):
    a, b, ring = volume
    async with mounted(a) as (sa, na), mounted(b) as (sb, nb):
        await write_file(na, "one", b"1")            # every member keeps this head's certificate
        await read_file(nb, "one")
        ring.kill(3)                                  # member 3 misses what follows
        await write_file(na, "two", b"2")
        assert await read_file(nb, "two") == b"2"
        for k in (0, 1, 2):
            ring.pause(k)                             # now only the lagging member answers,
        try:
            await ring.restart(3)                     # with the older certified head
            with trio.fail_after(30):
                await nb.refresh()
            assert isinstance(nb.problems.get(sa.identity.id), LogRolledBack)
            a2 = await nb.lookup(1, "two")            # the newer head is kept
            assert await nb.read(a2.ino, 0, 10) == b"2"
        finally:
            for k in (0, 1, 2):
                ring.resume(k)


async def test_the_same_file_written_on_both_sides_of_a_ring_outage_keeps_both(volume):
    a, b, ring = volume
    async with mounted(a) as (sa, na), mounted(b) as (sb, nb):
        await write_file(na, "report.txt", b"first draft\n")
        await read_file(nb, "report.txt")             # both start from the same version
        for s in (sa, sb):
            s.board.wait_timeout = 2.0
        for k in (0, 1):
            ring.pause(k)                              # no quorum: neither sees the other
        try:
            for ns, text in ((na, b"owner's edit\n"), (nb, b"second writer's edit\n")):
                f = await ns.lookup(1, "report.txt")
                await ns.open(f.ino)
                await ns.setattr(f.ino, size=0)
                await ns.write(f.ino, 0, text)
                await ns.release(f.ino)
            assert await read_file(na, "report.txt") == b"owner's edit\n"
            assert await read_file(nb, "report.txt") == b"second writer's edit\n"
        finally:
            for k in (0, 1):
                ring.resume(k)
        with trio.fail_after(60):
            while sa.board.pending or sb.board.pending:
                await trio.sleep(0.2)
        seen = []
        for ns in (na, nb):
            await ns.refresh()
            names = sorted(n for n, _ in await ns.readdir(1))
            contents = sorted([await read_file(ns, n.decode()) for n in names])
            seen.append((names, contents))
            kinds = {c.kind for c in ns.conflicts()}
            assert "data" in kinds, ns.conflicts()
        assert seen[0] == seen[1]                      # every reader: the same merged tree
        names, contents = seen[0]
        assert len(names) == 2 and b"report.txt" in names
        conflict_copy = next(n for n in names if n != b"report.txt")
        assert conflict_copy.endswith(b".txt")         # the copy keeps the extension
        assert contents == sorted([b"owner's edit\n", b"second writer's edit\n"])


async def test_a_mount_from_a_snapshot_replays_only_newer_records(volume):
    a, b, _ring = volume
    async with mounted(a) as (sa, na), mounted(b) as (sb, nb):
        for i in range(40):
            await write_file(na, f"f{i:02d}", b"%d" % i)
        await nb.refresh()            # B has seen them all: its promise lets them settle
        await na.refresh()
        assert await na.snapshot() is not None
        covered = na.replica.base_cover
        assert covered[sa.identity.id] > 40      # the snapshot covers the forty files
        for i in range(40, 45):
            await write_file(na, f"f{i:02d}", b"%d" % i)
    async with mounted(b) as (sb, nb):            # a fresh mount of B
        assert nb.snapshot_used is not None
        fetched = nb.reader.records_fetched
        # Only what came after the snapshot (the last five files and the
        # heads' bookkeeping), not the forty files before it.
        assert 0 < fetched <= 5 * 6, fetched
        assert len(await nb.readdir(1)) == 45
        for i in (0, 39, 44):
            assert await read_file(nb, f"f{i:02d}") == b"%d" % i


async def test_a_single_writers_burst_of_closes_is_certified_coalesced(cluster, tmp_path):
    """One writer: closes return once the head is durable locally and the
    ring certifies the newest head at most once per interval; unmounting
    waits until the newest head is certified."""
    owner = Identity.generate()
    ring = LocalRing(tmp_path / "ring", owner=owner, args=RING_ARGS, name="solo")
    try:
        await ring.start()
        a = tmp_path / "a"
        mkfs_network(a, [cluster.nodes[0].info["bootstrap"]], r=3, name="solo",
                     identity=owner, ring=ring.ring)
        async with mounted(a) as (s, ns):
            board = s.board
            assert not board.wait
            board.interval = 0.5
            t0 = trio.current_time()
            for i in range(30):
                await write_file(ns, f"f{i:02d}", b"%d" % i)
            elapsed = trio.current_time() - t0
            before = board.certified
            await ns.close()                   # unmount: sync and settle
            assert not board.pending
            # One certification per interval at most (plus the one at close),
            # not one per close.
            assert 1 <= before <= 2 + elapsed / board.interval, (before, elapsed)
            newest = decode_head((await board.local.fetch([s.identity.id]))[s.identity.id])
            cert = await board.client.latest(head_aguid(owner.public_key, s.view.volume))
            certified = decode_head(await board.get_raw(cert.vguid))
            assert certified.n == newest.n and certified.seq == newest.seq
    finally:
        ring.close()
