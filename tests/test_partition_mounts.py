"""A network partition splitting writers and the inner ring, healed later,
through real kernel FUSE mounts (issue 10, "Fault scenarios"; DESIGN.md
"storage/logs": a log-head is signed by its writer, "so it can be read and
written inside a partition, as in Ivy", and certified by the ring when the
ring is reachable; "What must always hold": nothing acknowledged is lost).

The lab (``tests/netns.py``): every machine is a network namespace on a
bridge. Six storage nodes ``n0``..``n5`` (``python -m storage``, r = 3), an
inner ring of four members (f = 1) on ``n0``..``n3``, and two writers, A on
host ``wa`` and B on host ``wb``, each a ``p2pfs mount`` process. A third
writer C, never mounted before, makes the final data check through a fresh
mount with an empty cache, so every byte it checks comes over the network.

1. The cut ``wa n0 n1 n2 | wb n3 n4 n5`` leaves A with three ring members
   (2f+1: certification goes on) and B with one, and three block nodes on
   each side. Six, not five: with two block nodes on B's side every close
   of B fails (EIO, TooFewHolders: the write quorum is all r copies), which
   is the block layer's rule and would hide the ring's part. Both writers
   make directories, create and close files, rename one, and both create
   ``same.txt``. B's closes must succeed on its own signed, uncertified
   log-heads, and nothing of B's may be certified during the cut; A must
   not see B's files. Then the heal: each mount sees the other's files
   (polled through opens, which refresh), the ring certifies B's newest
   head, both mounts (and ``p2pfs conflicts``) list the one conflict on
   ``same.txt`` (the winner keeps the name, the other writer's file is
   reachable as the conflict copy), and C's fresh mount finds every
   acknowledged byte.
2. The cut ``wb + one block node | the rest`` (the node is n4 or n5, which
   host no ring member) leaves B with no ring member at all and one holder
   of some blocks. A's newer files, which B listed but never read, are read
   through B's mount: every one whose block has a copy on B's node reads
   back byte-identical.
3. A mount's client node joins nodes on another host (it once listened on
   127.0.0.1, so routed results never came back to it).

What it shows about time (figures of this 2-core machine, printed by the
tests; there are no timing assertions): the first operations after a cut
take 30-50 s on both sides (a put or read waits the block layer's 30 s
request timeout for each holder on the far side, whose connections stall
rather than reset); in the cut each of B's operations that refreshes
(open, a lookup that misses, the background sync every 2 s) waits the ring
client's 2 s for members that cannot answer, so B's closes take about 4 s;
after the heal B's newest head is certified when its retry backoff (up to
30 s) ends; the first reads cut off from all but one holder take 40-90 s.

Mount processes enter only the network namespace of their host (``nsenter
--net``, ``Lab.netns_argv``), keeping this process's mount namespace: their
FUSE mounts are visible here, so the writer threads of this test do their
file operations directly (``ip netns exec`` would give each mount a mount
namespace of its own, invisible here, and every file operation would have to
run as a helper process inside it). Storage nodes and ring members run with
``ip netns exec``; this process reaches them through their control sockets
(files) or from a thread inside a host (``Lab.run_in``).

Where namespaces cannot be made the module is skipped with the reason (the
whole scenario is about cutting links). Every mount is unmounted and every
process stopped by PID in every outcome; the lab deletes its namespaces.
``P2PFS_PARTITION_KEEP=1`` keeps the logs of nodes, members and mounts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from faults_lib import Ledger, MountProc, check, child_env, fuse_usable, wait_until, write_file
from netns import Host, Lab, open_lab
from overlay.config import OverlayConfig
from overlay.run import parse_bootstrap
from overlay.wire.ids import Identity
from overlay.wire.tls import TlsTransport
from overlay.wire.transport import Peer, PeerError
from p2pfs.cluster import LocalCluster, python_module_argv
from p2pfs.netbackend import NetworkBackend, join_network, mkfs_network, write_ticket
from storage import blockservice as bs
from storage.certificate import RingDescriptor
from storage.errors import StorageError
from storage.logs import decode_head
from storage.ringboard import head_aguid
from storage.ringclient import RingClient

pytestmark = [pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse, fusermount3 and root"),
              pytest.mark.slow]       # about 3.5 min: the delays of the module docstring

ROOT = Path(__file__).resolve().parent.parent
NODES = 6
MEMBERS = 4                   # f = 1, on n0..n3
NODE_PORT, RING_PORT = 7000, 7100
# Test-scale overlay timers for the storage nodes (as tests/test_netns.py):
# a silent neighbour is dropped after 3 s. The mounts' client nodes run with
# the defaults (``p2pfs mount`` has no option for them).
TIMERS = ["--heartbeat", "1", "--dead-after", "3", "--repair", "2", "--hop-timeout", "1"]
RING_ARGS = ["--request-timeout", "0.6", "--view-change-timeout", "0.6", "--no-sync",
             "--log-level", "INFO"]
CONFLICTS = "user.p2pfs.conflicts"


# --------------------------------------------------------------------------
# The lab: nodes, ring, volume, mounts


class LabRing:
    """An inner ring of 3f+1 ``storage.ringnode`` processes, member k on
    host ``hosts[k]`` at RING_PORT, started with ``ip netns exec`` and
    stopped by PID."""

    def __init__(self, lab: Lab, hosts: list[Host], base: Path, owner: Identity):
        self.lab, self.hosts, self.dir = lab, hosts, Path(base)
        ids = [Identity.generate() for _ in hosts]
        for k, ident in enumerate(ids):
            ident.save(self.dir / f"member{k}" / "node.key")
        self.ring = RingDescriptor.create(
            owner, "partition", [(i.public_key, f"{h.addr}:{RING_PORT}")
                                 for i, h in zip(ids, hosts)], f=(len(hosts) - 1) // 3)
        self.file = self.dir / "ring.json"
        self.file.write_text(self.ring.to_json())
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> None:
        for k, h in enumerate(self.hosts):
            argv = [sys.executable, "-m", "storage.ringnode", "--data",
                    str(self.dir / f"member{k}"), "--ring", str(self.file), *RING_ARGS]
            with open(self.dir / f"member{k}.log", "ab") as log:
                self.procs.append(self.lab.spawn(h, argv, stdout=subprocess.PIPE, stderr=log,
                                                 env=child_env()))
        for k, p in enumerate(self.procs):
            if not _readline(p, timeout):
                raise RuntimeError(f"ring member {k} (pid {p.pid}) not ready: "
                                   f"{(self.dir / f'member{k}.log').read_text()[-2000:]}")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()


def _readline(p: subprocess.Popen, timeout: float) -> bytes:
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(p.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0] if out else b""


class World:
    """The lab, its processes, the volume's three writer directories and
    what the mounts were acknowledged."""

    def __init__(self, lab: Lab, base: Path):
        self.lab, self.base = lab, base
        self.nodes = [lab.add_host(f"n{i}") for i in range(NODES)]
        self.wa, self.wb = lab.add_host("wa"), lab.add_host("wb")
        self.cluster = LocalCluster(base / "nodes", self._node_argv, ready_timeout=60,
                                    env={"PYTHONPATH": str(ROOT)})
        self.owner, self.idb, self.idc = Identity.generate(), Identity.generate(), \
            Identity.generate()
        self.ring = LabRing(lab, self.nodes[:MEMBERS], base / "ring", self.owner)
        self.mounts: list[MountProc] = []
        self.ledger_a, self.ledger_b = Ledger(), Ledger()
        self.vol: dict[str, Path] = {}
        self.volume_id = b""
        self.ma: MountProc | None = None          # writer A's mount, on host wa
        self.mb: MountProc | None = None          # writer B's mount, on host wb

    def _node_argv(self, i: int, data: Path, boot) -> list[str]:
        args = ["--data", str(data), "--listen", f"{self.nodes[i].addr}:{NODE_PORT}",
                "--quota", "256M", "--no-fsync", "--repair-interval", "5",
                "--log-level", "info", *TIMERS]
        for b in boot:
            args += ["--bootstrap", b.info["bootstrap"]]
        return self.lab.argv(self.nodes[i], python_module_argv("storage", *args))

    def start(self) -> None:
        self.cluster.start(NODES)
        self.ring.start()
        boot = [n.info["bootstrap"] for n in self.cluster.nodes]
        a, b, c = (self.base / f"vol-{x}" for x in "abc")
        mkfs_network(a, boot, r=3, name="partition", identity=self.owner, ring=self.ring.ring)

        async def add_writers():
            async with NetworkBackend(a).connect() as conn:
                await conn.current_view()            # the owner publishes the view
                await conn.add_writer(self.idb.public_key)
                return await conn.add_writer(self.idc.public_key)

        view = self.lab.run_in(self.wa, add_writers)
        join_network(b, write_ticket(a, view), self.idb)
        join_network(c, write_ticket(a, view), self.idc)
        self.vol = {"a": a, "b": b, "c": c}
        self.volume_id = view.volume

    def mount(self, who: str, host: Host) -> MountProc:
        name = f"m{who}{len(self.mounts)}"
        m = MountProc(self.vol[who], self.base / name, self.base / f"{name}.log",
                      wrap=lambda argv: self.lab.netns_argv(host, argv))
        self.mounts.append(m)
        return m.start(timeout=120)

    def peer(self, i: int) -> Peer:
        n = self.cluster.nodes[i]
        return Peer(bytes.fromhex(n.id_hex), n.addr)

    def close(self) -> None:
        for m in self.mounts:
            with contextlib.suppress(Exception):
                m.unmount(timeout=30)
            m.cleanup()
        self.ring.stop()
        self.cluster.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("partition")
    lab = open_lab()
    w = None
    try:
        lab.require_faults()          # skips, with the reason, in the loopback fallback
        w = World(lab, base)
        w.start()
        w.ma = w.mount("a", w.wa)
        w.mb = w.mount("b", w.wb)
        yield w
    finally:
        if w is not None:
            w.close()
        lab.close()
        if not os.environ.get("P2PFS_PARTITION_KEEP"):
            shutil.rmtree(base, ignore_errors=True)


# --------------------------------------------------------------------------
# Workload


def payload(tag: str, lo: int = 5_000, hi: int = 60_000) -> bytes:
    """Bytes too many to live inline in a record: one DATA block."""
    rnd = random.Random(tag)
    return rnd.randbytes(rnd.randint(lo, hi))


class Worker(threading.Thread):
    """One writer's file operations through its mount during the cut:
    files created and closed (each close acknowledged in the ledger, its
    duration kept), a directory, renames of its own earlier files into it,
    and ``same.txt``. Writes ``least`` files, then more until stopped or
    ``most`` are written."""

    def __init__(self, mnt: Path, who: str, ledger: Ledger, same: bytes, *,
                 least: int = 4, most: int = 6):
        super().__init__(daemon=True, name=f"worker-{who}")
        self.mnt, self.who, self.ledger, self.same = mnt, who, ledger, same
        self.least, self.most = least, most
        self.halt = threading.Event()
        self.closes: list[float] = []
        self.files = 0
        self.renames = 0
        self.first = 0.0
        self.exc: BaseException | None = None

    def close_file(self, rel: str, data: bytes) -> None:
        self.ledger.attempt(rel, data)
        t = time.monotonic()
        write_file(self.mnt / rel, data, fsync=False)
        self.closes.append(time.monotonic() - t)
        self.ledger.ack(rel, data)

    def run(self) -> None:
        d = f"cut-{self.who}"
        try:
            t0 = time.monotonic()
            (self.mnt / d).mkdir()            # the first operations after the cut
            (self.mnt / d / "moved").mkdir()
            self.first = time.monotonic() - t0
            i = 0
            while i < self.least or (i < self.most and not self.halt.is_set()):
                rel = f"{d}/f{i:02d}.bin"
                self.close_file(rel, payload(f"{self.who}-{i}"))
                self.files += 1
                if i == 1:       # both writers: a conflict, checked apart from the ledger
                    t = time.monotonic()
                    write_file(self.mnt / "same.txt", self.same, fsync=False)
                    self.closes.append(time.monotonic() - t)
                if i % 3 == 2:        # rename an earlier file of ours
                    old = f"{d}/f{i - 2:02d}.bin"
                    new = f"{d}/moved/f{i - 2:02d}.bin"
                    os.rename(self.mnt / old, self.mnt / new)
                    with self.ledger.lock:
                        self.ledger.acked[new] = self.ledger.acked.pop(old)
                    self.renames += 1
                i += 1
        except OSError as e:
            self.ledger.error(e)
            self.exc = e
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.exc = e


def visible(mnt: Path, ledger: Ledger) -> bool:
    """Whether ``mnt`` shows every acknowledged file of ``ledger`` with its
    bytes (each open refreshes: other writers' certified updates)."""
    return check(mnt, ledger).ok


def ring_head(w: World, writer_pub: bytes, *, block: bool = True):
    """The ring's newest certificate of a writer's log-head and, with
    ``block``, the head it certifies (asked from host wa)."""

    async def ask():
        async with TlsTransport(Identity.generate(), listen=(w.wa.addr, 0)) as t:
            cert = await RingClient(t, w.ring.ring, Identity.generate()).latest(
                head_aguid(writer_pub, w.volume_id), timeout=10)
            if cert is None or not block:
                return cert
            for i in range(NODES):
                try:
                    got = await bs.get_from(t, w.peer(i), [cert.vguid], timeout=5)
                except (PeerError, StorageError):
                    continue
                if cert.vguid in got:
                    return cert, decode_head(got[cert.vguid])
            raise AssertionError("no node serves the certified head block")

    return w.lab.run_in(w.wa, ask)


def last_seq(mnt: Path, rel: str) -> tuple[str, int]:
    """(writer id hex, seq) of the last record naming a file (a fact)."""
    writer, seq = os.getxattr(mnt / rel, "user.p2pfs.version").decode().split(":")
    return writer, int(seq)


def conflicts(mnt: Path) -> list[dict]:
    return json.loads(os.getxattr(mnt, CONFLICTS))


# --------------------------------------------------------------------------


def test_writers_on_both_sides_of_a_ring_partition_keep_working_and_converge(world):
    w = world
    ma, mb = w.ma, w.mb
    # Before the cut: each sees the other's closes at once (certified).
    for m, led, rel in ((ma, w.ledger_a, "before-a"), (mb, w.ledger_b, "before-b")):
        write_file(m.mnt / rel, payload(rel), fsync=False)
        led.ack(rel, payload(rel))
    wait_until(lambda: visible(ma.mnt, w.ledger_b) and visible(mb.mnt, w.ledger_a), 120,
               "each writer to see the other's file before the cut")

    side_a = [w.wa, *w.nodes[:3]]          # ring members 0, 1, 2: a quorum
    side_b = [w.wb, *w.nodes[3:]]          # ring member 3 alone
    same_a, same_b = b"A's same.txt\n" * 100, b"B's same.txt\n" * 200
    # B's side is slow (module docstring: each refresh waits for the ring
    # members it cannot reach), so B does the least: 3 files, a rename.
    wa_ = Worker(ma.mnt, "a", w.ledger_a, same_a)
    wb_ = Worker(mb.mnt, "b", w.ledger_b, same_b, least=3, most=3)
    w.lab.partition(side_a, side_b)
    t_cut = time.monotonic()
    try:
        wa_.start()
        wb_.start()
        # B's certificate as the ring's majority side has it once B closed a
        # file in the cut (long after anything B sent before the cut ended).
        wait_until(lambda: wb_.files >= 1 or not wb_.is_alive(), 240, "B's first close")
        cert_in_cut = ring_head(w, w.idb.public_key, block=False)
        # Four files on A's side and three on B's at least, with the
        # conflict and a rename; a busy machine may take long: the first
        # operations wait out the holders on the far side.
        wait_until(lambda: (wa_.files >= wa_.least and wb_.files >= wb_.least) or not (
            wa_.is_alive() and wb_.is_alive()), 300, "the closes on each side of the cut")
        wa_.halt.set()
        wb_.halt.set()
        wa_.join(120)
        wb_.join(120)
        assert not wa_.is_alive() and not wb_.is_alive(), "a writer hangs in the partition"
        assert wb_.exc is None, f"B's side failed: {wb_.exc!r}\n{mb.tail(3000)}"
        assert wa_.exc is None, f"A's side failed: {wa_.exc!r}\n{ma.tail(3000)}"
        print(f"cut: first operations took A {wa_.first:.0f} s, B {wb_.first:.0f} s; then "
              f"A closed {len(wa_.closes)} files (median "
              f"{sorted(wa_.closes)[len(wa_.closes) // 2]:.1f} s), B {len(wb_.closes)} "
              f"(median {sorted(wb_.closes)[len(wb_.closes) // 2]:.1f} s); "
              f"{time.monotonic() - t_cut:.0f} s in all")
        # B works on its own signed heads: it sees its files (stat, which
        # does not refresh, and one open: in the cut each refresh waits for
        # ring members that do not answer); A sees none of them (nothing of
        # B's is certified or reachable from A's side).
        for rel, (_, size) in w.ledger_b.acked.items():
            assert (mb.mnt / rel).stat().st_size == size, rel
        last = max(w.ledger_b.acked)
        assert check(mb.mnt, Ledger(acked={last: w.ledger_b.acked[last]})).ok
        assert visible(ma.mnt, w.ledger_a)
        assert not (ma.mnt / "cut-b").exists()
        assert (ma.mnt / "same.txt").read_bytes() == same_a
        assert (mb.mnt / "same.txt").read_bytes() == same_b
        # Nothing of B's was certified while B closed its files in the cut.
        cert = ring_head(w, w.idb.public_key, block=False)
        assert (cert.seq, cert.vguid) == (cert_in_cut.seq, cert_in_cut.vguid)
        # B's newest record among its files: certified after the heal.
        b_writer, b_seq = max(last_seq(mb.mnt, rel) for rel in w.ledger_b.acked
                              if rel.startswith("cut-b/"))
        assert b_writer == w.idb.id.hex()
    finally:
        w.lab.heal_partition()
    t_heal = time.monotonic()

    # Convergence: every acknowledged file of the other writer, through opens.
    def converged():
        return visible(ma.mnt, w.ledger_b) and visible(mb.mnt, w.ledger_a)
    try:
        wait_until(converged, 180, "the mounts to converge after the heal", interval=1)
    except AssertionError:
        raise AssertionError(f"A sees B: {check(ma.mnt, w.ledger_b).summary()}\n"
                             f"B sees A: {check(mb.mnt, w.ledger_a).summary()}\n"
                             f"A: {ma.tail(2000)}\nB: {mb.tail(2000)}") from None
    print(f"heal: both mounts converged {time.monotonic() - t_heal:.0f} s after the heal")
    # B's newest head is certified by the ring now.
    cert, head = wait_until(lambda: (h := ring_head(w, w.idb.public_key))[1].seq >= b_seq and h,
                            120, "B's newest log-head to be certified")
    assert cert.seq > cert_in_cut.seq and head.writer == w.idb.id

    # One conflict, the same on both mounts: a winner keeps same.txt, the
    # other writer's file is reachable under the conflict name.
    found = wait_until(lambda: conflicts(ma.mnt) and conflicts(mb.mnt) == conflicts(ma.mnt)
                       and conflicts(ma.mnt), 120, "both mounts to list the conflict")
    cli = subprocess.run([sys.executable, "-m", "p2pfs", "conflicts", str(mb.mnt), "--json"],
                         capture_output=True, text=True, env=child_env(), timeout=60)
    assert json.loads(cli.stdout) == found, cli.stderr
    assert len(found) == 1, found
    c = found[0]
    assert (c["kind"], c["name"]) == ("name", "same.txt"), c
    contents = {w.owner.id.hex(): same_a, w.idb.id.hex(): same_b}
    assert {c["winner"]["writer"], c["loser"]["writer"]} == set(contents), c
    winner, loser = contents[c["winner"]["writer"]], contents[c["loser"]["writer"]]
    for m in (ma, mb):
        assert (m.mnt / "same.txt").read_bytes() == winner
        assert (m.mnt / c["copy_name"]).read_bytes() == loser

    # The full data check through a fresh mount (writer C, empty cache).
    merged = Ledger()
    for led in (w.ledger_a, w.ledger_b):
        merged.acked.update(led.acked)
    merged.ack("same.txt", winner)
    merged.ack(c["copy_name"], loser)
    mc = w.mount("c", w.wa)
    rep = check(mc.mnt, merged)
    assert rep.ok, rep.summary()
    # At least what the waits above guarantee: the two files from before the
    # cut, each writer's least, same.txt and its conflict copy (A may write
    # more while B finishes, or not, on a slow machine).
    assert rep.checked == len(merged.acked) >= 2 + wa_.least + wb_.least + 2
    assert mc.unmount() == 0, mc.tail()
    print(f"check: {rep.summary()}")


def test_a_writer_cut_off_from_the_ring_and_two_holders_reads_what_it_reaches(world):
    w = world
    ma, mb = w.ma, w.mb
    # New files of A that B lists (metadata) but never reads: their bytes
    # are not in B's cache, so reading them goes to the network. B keeps one
    # block node, one without a ring member (n4 or n5): the one holding a
    # copy of more of these files.
    late = Ledger()
    (ma.mnt / "late").mkdir()
    for i in range(12):
        rel = f"late/{i:02d}.bin"
        write_file(ma.mnt / rel, payload(rel), fsync=False)
        late.ack(rel, payload(rel))
    wait_until(lambda: all((mb.mnt / rel).exists() for rel in late.acked), 120,
               "B to list A's new files")
    blocks = {}
    for rel in late.acked:
        gs = os.getxattr(mb.mnt / rel, "user.p2pfs.blocks").decode().split()
        assert len(gs) == 1, (rel, gs)
        blocks[rel] = bytes.fromhex(gs[0])

    async def held_on(i: int) -> dict[bytes, bool]:
        async with TlsTransport(Identity.generate(), listen=(w.wa.addr, 0)) as t:
            return await bs.has_on(t, w.peer(i), list(blocks.values()), timeout=10)

    def lone_node():
        # Right after the first heal the mounts' overlay may not list the far
        # nodes yet (default timers), so blocks first go to the near ones;
        # the nodes' repair then brings copies to their placement.
        best = max((sum(w.lab.run_in(w.wa, held_on, i).values()), i) for i in (4, 5))
        return best[0] >= 3 and best[1]
    x = wait_until(lone_node, 90, "n4 or n5 to hold copies of three of A's new files",
                   interval=2)
    lone = w.nodes[x]
    on = w.lab.run_in(w.wa, held_on, x)
    reach = [rel for rel in late.acked if on[blocks[rel]]]
    away = [rel for rel in late.acked if rel not in reach]

    w.lab.partition([h for h in w.lab.hosts if h not in (w.wb, lone)], [w.wb, lone])
    t_cut = time.monotonic()
    try:
        # Read at once, each in a thread of its own: the first reads wait
        # out the holders that do not answer (module docstring), together.
        got: dict[str, bytes | OSError] = {}
        took: dict[str, float] = {}

        def read(rel: str) -> None:
            t = time.monotonic()
            try:
                got[rel] = (mb.mnt / rel).read_bytes()
            except OSError as e:
                got[rel] = e
            took[rel] = time.monotonic() - t

        readers = [threading.Thread(target=read, args=(rel,), daemon=True) for rel in reach]
        for t in readers:
            t.start()
        for t in readers:
            t.join(300)
        assert set(got) == set(reach), f"reads still hanging: {set(reach) - set(got)}"
        bad = {rel: v for rel, v in got.items() if v != payload(rel)}
        assert not bad, f"B could not read what it reaches: {bad}\n{mb.tail(3000)}"
        print(f"cut off: B read {len(reach)} files held on its one node {lone.name} "
              f"(slowest {max(took.values()):.1f} s, fastest {min(took.values()):.1f} s); "
              f"{len(away)} others have no copy there")
        assert sorted(os.listdir(mb.mnt / "late")) == sorted(Path(r).name for r in late.acked)
    finally:
        w.lab.heal_partition()
    assert ma.unmount() == 0, ma.tail()
    assert mb.unmount() == 0, mb.tail()
    for led, who in ((w.ledger_a, "A"), (w.ledger_b, "B")):
        assert not led.errors, f"errors surfaced to {who}: {dict(led.errors)}"


def test_a_mount_reaches_nodes_on_other_hosts(world):
    """A mount's client node (``NetworkBackend.connect``, as ``p2pfs mount``
    attaches) on host wb joins the overlay through a node on another host:
    it listens on its own address on the way there, not on 127.0.0.1, or
    routed results could not come back (the bug this test found). One
    gateway and a route timeout of 3 s: a failure costs 3 s."""
    import p2pfs.netbackend as nb
    w = world
    backend = NetworkBackend(w.vol["c"])
    fmt = json.loads((w.vol["c"] / "FORMAT").read_text())
    fmt["bootstrap"] = fmt["bootstrap"][:1]
    fmt["peers"] = [parse_bootstrap(fmt["bootstrap"][0])]

    async def join():
        async with backend.connect(fmt) as conn:
            return await conn.current_view()

    orig = nb.StorageNode
    nb.StorageNode = functools.partial(orig, config=OverlayConfig(route_timeout=3.0))
    try:
        view = w.lab.run_in(w.wb, join)
    except BaseExceptionGroup as eg:      # the nursery inside connect wraps it
        while isinstance(eg, BaseExceptionGroup) and len(eg.exceptions) == 1:
            eg = eg.exceptions[0]
        raise eg from None
    finally:
        nb.StorageNode = orig
    assert view.volume == w.volume_id
