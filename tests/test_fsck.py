"""fsck on a real network volume: damage it in each way fsck claims to
detect, check that fsck reports exactly that, that ``--repair`` fixes what
is fixable, and that the files read back identical (issue 9).

Real processes on loopback: 4 storage nodes (``python -m storage``) and a
4-member inner ring (``python -m storage.ringnode``); the volume's owner
writes through the namespace API in this process. The damage is done from
outside, as a disk or a faulty node would: copies deleted from holders'
LMDBs, a byte flipped in a holder's ``data.mdb`` (while it runs, as disk
damage would), a snapshot dropped from every holder, a ring member's stored
certificate rolled back or forged (member stopped, its LMDB edited,
restarted). The holders' own repair would mend lost copies: it runs no
periodic pass here, and the damage is done once no failure-triggered pass
is running (``quiet``). One volume for the module; the tests run in file
order, each one leaving the volume repaired. Every process is stopped by
PID and every directory removed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest
import trio

from overlay import control
from overlay.wire.ids import Identity
from overlay.wire.tls import TlsTransport
from overlay.wire.transport import Peer
from p2pfs.cluster import LocalCluster, python_module_argv
from p2pfs.fsck import fsck as run_fsck
from p2pfs.netbackend import NetworkBackend, mkfs_network
from storage import blockservice as bs
from storage.blockstore import BlockStore
from storage.certificate import Certificate, CertBody
from storage.logs import decode_head
from storage.namespace import Namespace
from storage.ring_local import LocalRing
from storage.ring_store import RingStore
from storage.ringboard import head_aguid

ROOT = Path(__file__).resolve().parent.parent
RING_ARGS = ["--request-timeout", "2", "--view-change-timeout", "2", "--no-sync"]


def argv_for(index, data, bootstrap):
    # No periodic repair: the holders must not mend the damage before fsck sees it.
    args = ["--data", str(data), "--listen", "127.0.0.1:0", "--no-fsync",
            "--repair-interval", "0", "--log-level", "warning"]
    for b in bootstrap:
        args += ["--bootstrap", b.info["bootstrap"]]
    return python_module_argv("storage", *args)


def content(i: int) -> bytes:
    """Small files stay inline in the log; every third one has DATA blocks."""
    if i % 3 == 0:
        return bytes([i % 251]) * 9000 + f"file {i}".encode() * 1000
    return f"file {i}\n".encode() * (i + 1)


async def write_files(vol: Path, files: dict[str, bytes], *, snapshot: bool = False) -> None:
    async with NetworkBackend(vol).attach() as s:
        ns = await Namespace.mount(s.view, s.identity, s.blocks, s.board)
        for path, data in files.items():
            parent = 1
            *dirs, name = path.strip("/").split("/")
            for d in dirs:
                try:
                    parent = (await ns.lookup(parent, d)).ino
                except Exception:
                    parent = (await ns.mkdir(parent, d, 0o755, 0, 0)).ino
            a = await ns.create(parent, name, 0o644, 0, 0)
            await ns.write(a.ino, 0, data)
            await ns.release(a.ino)
        if snapshot:
            assert await ns.snapshot() is not None
        await ns.sync()
        with trio.fail_after(60):
            while s.board.pending:
                await trio.sleep(0.05)


async def read_back(vol: Path, files: dict[str, bytes]) -> None:
    async with NetworkBackend(vol).attach() as s:
        ns = await Namespace.mount(s.view, s.identity, s.blocks, s.board)
        for path, data in files.items():
            ino = 1
            for part in path.strip("/").split("/"):
                ino = (await ns.lookup(ino, part)).ino
            assert await ns.read(ino, 0, len(data) + 10) == data, path


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """(cluster, ring, volume dir, the files written, each holder's passes
    other than failure passes)."""
    base = tmp_path_factory.mktemp("fsck")
    cluster = LocalCluster(base / "nodes", argv_for, ready_timeout=60)
    owner = Identity.generate()
    ring = LocalRing(base / "ring", owner=owner, args=RING_ARGS, name="fsck")
    try:
        cluster.start(4)
        # Passes each holder ran besides failure passes (its first one).
        first = [p - f for p, f in trio.run(repair_counters, cluster)]
        trio.run(ring.start)
        vol = base / "vol"
        mkfs_network(vol, [cluster.nodes[0].info["bootstrap"]], r=3, name="fsck",
                     identity=owner, ring=ring.ring)
        files = {f"/d{i % 3}/f{i}": content(i) for i in range(24)}
        trio.run(lambda: write_files(vol, files, snapshot=True))
        more = {f"/late/g{i}": content(i) for i in range(3, 9)}
        trio.run(lambda: write_files(vol, more))
        files.update(more)
        yield cluster, ring, vol, files, first
    finally:
        ring.close()
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


async def repair_counters(cluster) -> list[tuple[int, int]]:
    out = []
    for n in cluster.nodes:
        if n.alive:
            st = (await control.call(n.info["control"], "blk.ctl.status", {},
                                     timeout=30))["status"]["repair"]
            out.append((st.get("passes", 0), st.get("failure_passes", 0)))
    return out


async def quiet(net) -> None:
    """Wait until no holder runs a repair pass, nor is about to: a client
    node leaving (each fsck, mount and write here runs one) makes every
    holder start a pass within a second (``storage.maintenance``), which
    would mend damage done before fsck sees it. Quiet: each holder has
    finished every pass it started, and nothing changed for two seconds."""
    cluster, base = net[0], net[4]
    last, since = None, trio.current_time()
    with trio.fail_after(60):
        while True:
            now = await repair_counters(cluster)
            idle = all(p - f == b for (p, f), b in zip(now, base))
            if now != last:
                last, since = now, trio.current_time()
            elif trio.current_time() - since >= (2.0 if idle else 5.0):
                return
            await trio.sleep(0.25)


def errors(report) -> list:
    return [p for p in report.problems if p.severity == "error"]


def node_of(cluster, node_id: bytes):
    return next(n for n in cluster.nodes if n.id_hex == node_id.hex())


def peer(n) -> Peer:
    return Peer(bytes.fromhex(n.id_hex), n.addr)


def delete_copies(node, gs: list[bytes]) -> None:
    """Remove copies from a running holder's LMDB (another process may open
    it: LMDB serialises writers across processes), leaving no tombstone."""
    store = BlockStore(node.data_dir / "blocks")
    try:
        store.delete_many(gs, tombstone=False)
    finally:
        store.close()


async def copies(cluster, gs: list[bytes]) -> dict[bytes, set[bytes]]:
    """Which nodes hold each block (asked over TLS, as any node may)."""
    held: dict[bytes, set[bytes]] = {g: set() for g in gs}
    async with TlsTransport(Identity.generate()) as t:
        for n in cluster.nodes:
            for g, h in (await bs.has_on(t, peer(n), gs)).items():
                if h:
                    held[g].add(bytes.fromhex(n.id_hex))
    return held


async def whole(vol: Path, cluster):
    """A clean check, and the blocks (-> what they hold) with exactly r
    copies in the whole network, as placed (-> on which nodes)."""
    report = await run_fsck(vol)
    assert report.exit_code() == 0, [p.line() for p in report.problems]
    held = await copies(cluster, list(report.blocks))
    return report, {g: (report.refs[g][0].what, held[g]) for g, st in report.blocks.items()
                    if set(st.targets) == st.good == held[g]}


async def strip(cluster, gs: list[bytes]) -> None:
    """Delete every copy of each block but the one on its lowest node id.
    (Which nodes a block belongs on can differ a moment between observers:
    client nodes joining the overlay move some salted roots. With one copy
    left, each of these blocks is short of r whatever fsck's view.)"""
    by_node: dict[bytes, list[bytes]] = {}
    for g, holders in (await copies(cluster, gs)).items():
        for nid in sorted(holders)[1:]:
            by_node.setdefault(nid, []).append(g)
    for nid, batch in by_node.items():
        delete_copies(node_of(cluster, nid), batch)


# ---------------------------------------------------------------------------


async def test_a_healthy_volume_is_clean(net):
    cluster, ring, vol, files, _ = net
    report = await run_fsck(vol)
    assert report.problems == [] and report.exit_code() == 0
    st = report.stats
    assert st["files"] == len(files) and st["heads"] == 1 and st["snapshots"] >= 1
    assert st["copies_verified"] >= 3 * st["blocks"]
    assert st["ring_members_up"] == 4


async def test_deleted_replicas_are_reported_with_their_files_and_restored(net):
    cluster, ring, vol, files, _ = net
    _, whole_blocks = await whole(vol, cluster)
    data = sorted(g for g, (what, _) in whole_blocks.items() if what == "data")[:3]
    logs = sorted(g for g, (what, _) in whole_blocks.items() if what == "log")[:2]
    victims = sorted(data + logs)
    await quiet(net)
    await strip(cluster, victims)

    # One run: the check, then the repair (a separate check run's client
    # node leaving would set the holders' own repair going first).
    report = await run_fsck(vol, do_repair=True)
    assert {p.kind for p in errors(report)} == {"replica-missing"}, [
        q.line() for q in report.problems]
    # Each block is short of two copies: two holders named for each.
    named = sorted(g for p in errors(report) for g in p.objects)
    assert named == sorted(victims * 2)
    affects = [a for p in errors(report) for a in p.affects]
    assert any(a.startswith("/d") for a in affects)           # names the files
    assert any("log of writer" in a for a in affects)         # and the log records
    assert {p.status for p in errors(report)} == {"repaired"} and report.exit_code() == 1
    assert all(len(h) >= 3 for h in (await copies(cluster, victims)).values())
    assert (await run_fsck(vol)).exit_code() == 0
    await read_back(vol, files)


async def test_a_byte_flipped_on_a_holders_disk_is_found_and_the_copy_restored(net):
    cluster, ring, vol, files, _ = net
    report0, whole_blocks = await whole(vol, cluster)
    g = max(g for g, (what, _) in whole_blocks.items() if what == "data")
    victim = node_of(cluster, sorted(report0.blocks[g].targets)[-1])
    async with TlsTransport(Identity.generate()) as t:
        sealed = (await bs.get_from(t, peer(victim), [g]))[g]
    await quiet(net)
    # Every copy of the bytes in the file: LMDB's copy-on-write leaves old
    # ones in free pages, and the live one is among them.
    path = victim.data_dir / "blocks" / "data.mdb"
    raw = path.read_bytes()
    at = raw.find(sealed[300:364])
    assert at >= 0
    fd = os.open(path, os.O_RDWR)
    try:
        while at >= 0:
            os.pwrite(fd, bytes([raw[at + 5] ^ 0x5A]), at + 5)
            at = raw.find(sealed[300:364], at + 1)
    finally:
        os.close(fd)

    report = await run_fsck(vol, do_repair=True)
    [p] = errors(report)
    assert (p.kind, p.where, p.objects) == ("replica-corrupt", bytes.fromhex(victim.id_hex), [g])
    assert any(a.startswith("/d") for a in p.affects)
    assert p.status == "repaired" and report.exit_code() == 1
    async with TlsTransport(Identity.generate()) as t:
        assert (await bs.get_from(t, peer(victim), [g]))[g] == sealed
    assert (await run_fsck(vol)).exit_code() == 0


async def test_a_dropped_snapshot_is_rebuilt_from_the_logs_and_quarantined(net):
    cluster, ring, vol, files, _ = net
    async with NetworkBackend(vol).connect() as conn:
        cert = await conn.ring.latest(head_aguid(conn.identity.public_key, conn.view.volume))
        head = decode_head(await conn.get_raw(cert.vguid))
    assert head.snap is not None
    for n in cluster.nodes:
        delete_copies(n, [head.snap])

    report = await run_fsck(vol)
    found = sorted((p.kind, tuple(p.objects)) for p in errors(report))
    assert found == [("block-lost", (head.snap,)), ("snapshot-bad", (head.snap,))]
    bad = next(p for p in errors(report) if p.kind == "snapshot-bad")
    assert any(a.startswith("mounting") for a in bad.affects)

    fixed = await run_fsck(vol, do_repair=True)
    assert {p.status for p in errors(fixed)} == {"quarantined"} and fixed.exit_code() == 1
    assert (vol / "quarantine.json").exists()
    after = await run_fsck(vol)
    assert after.exit_code() == 0 and after.problems == []
    assert after.stats["snapshots_quarantined"] == 1
    async with NetworkBackend(vol).connect() as conn:
        cert = await conn.ring.latest(head_aguid(conn.identity.public_key, conn.view.volume))
        assert decode_head(await conn.get_raw(cert.vguid)).snap not in (None, head.snap)
    await read_back(vol, files)


async def test_a_log_head_rolled_back_at_one_member_is_stale_and_repaired(net):
    cluster, ring, vol, files, _ = net
    async with NetworkBackend(vol).connect() as conn:
        aguid = head_aguid(conn.identity.public_key, conn.view.volume)
        old = await conn.ring.latest(aguid)
    await write_files(vol, {"/late/after-rollback-point": b"newer"})
    files["/late/after-rollback-point"] = b"newer"
    with trio.fail_after(60):
        while True:
            ring.stop(2)
            store = RingStore(ring.dir / "member2" / "ring", threaded=False)
            try:
                # A member executes tentatively and takes back, on restart,
                # what was not decided yet (then runs it again): edit only a
                # state that is all decided, or the member mends itself.
                exec_seq = msgpack.unpackb(store.get("meta", b"exec"))[0]
                committed = store.get("meta", b"committed")
                if committed is None or msgpack.unpackb(committed) >= exec_seq:
                    state = msgpack.unpackb(store.get("objects", aguid), raw=False)
                    assert state[0] > old.seq
                    state[:4] = [old.seq, old.vguid, old.prev, old.time]
                    store.put("objects", aguid, msgpack.packb(state, use_bin_type=True))
                    store.put("certs", aguid, old.encode())
                    store.commit_sync()
                    break
            finally:
                store.close()
                await ring.restart(2)
            await trio.sleep(0.5)

    report = await run_fsck(vol)
    [p] = errors(report)
    assert (p.kind, p.where, p.objects) == ("cert-stale", ring.ids[2].id, [aguid])
    assert f"seq {old.seq}" in p.detail
    again = await run_fsck(vol)             # a check changes nothing
    assert [(q.kind, q.where) for q in errors(again)] == [("cert-stale", ring.ids[2].id)]
    fixed = await run_fsck(vol, do_repair=True)
    assert fixed.exit_code() == 1 and errors(fixed)[0].status == "repaired"
    assert (await run_fsck(vol)).exit_code() == 0


async def test_a_forged_certificate_at_one_member_is_found_and_quarantined(net):
    cluster, ring, vol, files, _ = net
    async with NetworkBackend(vol).connect() as conn:
        aguid = head_aguid(conn.identity.public_key, conn.view.volume)
        cur = await conn.ring.latest(aguid)
    liar = ring.ids[1]
    body = CertBody(cur.ring_id, cur.epoch, aguid, cur.seq + 1, os.urandom(32), cur.vguid,
                    cur.time + 1)
    forged = Certificate(body, {liar.id: body.sign(liar)})     # one signature of 2f+1
    held = set_member_cert(ring, 1, aguid, forged.encode())
    await ring.restart(1)
    try:
        report = await run_fsck(vol)
        [p] = errors(report)
        assert (p.kind, p.where, p.objects) == ("cert-bad", liar.id, [aguid])
        assert "2f+1" in p.detail
        fixed = await run_fsck(vol, do_repair=True)
        assert fixed.exit_code() == 1 and errors(fixed)[0].status == "quarantined"
        again = await run_fsck(vol)        # still forged there, but known and not trusted
        assert again.exit_code() == 0 and [q.status for q in errors(again)] == ["known"]
    finally:
        # The network is shared by the tests after this one: put back what
        # the member held. (Left there, the forged certificate has the seq
        # of the writer's next head, so the member would keep serving it
        # after that head is certified.)
        set_member_cert(ring, 1, aguid, held)
        await ring.restart(1)


def set_member_cert(ring, k: int, aguid: bytes, raw: bytes | None) -> bytes | None:
    """Stop ring member ``k`` and set (None: delete) the certificate it
    keeps for ``aguid`` in its store; returns what it held. Restart it
    with ``await ring.restart(k)``."""
    ring.stop(k)
    store = RingStore(ring.dir / f"member{k}" / "ring", threaded=False)
    try:
        held = store.get("certs", aguid)
        if raw is None:
            store.delete("certs", aguid)
        else:
            store.put("certs", aguid, raw)
        store.commit_sync()
    finally:
        store.close()
    return held


async def test_a_repair_killed_midway_and_run_again_ends_clean(net):
    cluster, ring, vol, files, _ = net
    more = {f"/bulk/b{i}": bytes([i]) * 12000 for i in range(60)}
    await write_files(vol, more)
    files.update(more)
    _, whole_blocks = await whole(vol, cluster)
    victims = sorted(whole_blocks)
    assert len(victims) > 60
    await quiet(net)
    await strip(cluster, victims)

    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "fsck.py"), str(vol),
                             "--repair"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        with trio.fail_after(120):
            while True:
                line = await trio.to_thread.run_sync(proc.stderr.readline)
                assert line, "fsck ended before it began restoring"
                if line.startswith(b"fsck: restore:"):
                    break
        os.kill(proc.pid, signal.SIGKILL)           # kill -9, midway through the copies
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    counts = [len(h) for h in (await copies(cluster, victims)).values()]
    assert max(counts) >= 2 and min(counts) == 1      # cut short: some copies made, not all

    # Run again (the holders' own repair may meanwhile have made some of the
    # copies too: they notice the killed client node leaving).
    again = await run_fsck(vol, do_repair=True)
    assert again.exit_code() in (0, 1)
    assert {(p.kind, p.status) for p in errors(again)} <= {("replica-missing", "repaired")}
    final = await run_fsck(vol)
    assert final.exit_code() == 0 and errors(final) == []
    assert all(len(h) >= 3 for h in (await copies(cluster, victims)).values())
    await read_back(vol, files)
