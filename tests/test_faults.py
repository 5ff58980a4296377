"""Fault scenarios on real processes, each ending with a full data check
(issue 10; DESIGN.md "What must always hold": nothing acknowledged is lost
to the crash of any f ring members, of any r-1 block holders, or of the
client itself; bad input leaves stored data intact).

One network for the module (``tests/faults_lib.py``): 5 storage node
processes on fixed loopback ports (r = 3), an inner ring of 4 member
processes (f = 1), and ``p2pfs mount`` processes over FUSE. Each scenario
makes a volume of its own, runs a workload through a real mount while it
injects its fault, and ends by reading every acknowledged file (close or
fsync returned 0) back through a fresh mount: byte-identical, or the test
fails. What each scenario covers:

a. kill -9 of the two nodes holding most of the volume's blocks in the
   middle of an Andrew-style copy of a C source tree plus fsync'd files;
   one comes back;
b. kill -9 of the ring's primary in the middle of a two-writer workload
   (every close waits for a certificate); it restarts and catches up, and
   then the ring needs it: another member is killed and writes go on;
c. kill -9 of the mounting client mid-workload: a new mount on the same
   mount point clears the stale one and sees every acknowledged file;
   files caught in flight are absent or torn, never foreign bytes;
d. a node restarted with a wiped block store (same key): repair restores
   3 copies of everything it held;
e. one node's disk fills up mid-workload: writes go to the other holders;
   then three of five nodes are full: writes fail with ENOSPC at close,
   and go on once space is back;
f. clocks skewed by ten minutes (the primary ahead, a storage node and a
   writer's machine behind): nothing breaks; a writer whose clock stepped
   back is certified again, and garbage collection spares a block put after
   its mark on a holder whose clock is behind.

Every process is stopped by PID and every mount unmounted
(``P2PFS_FAULTS_KEEP=1`` keeps the nodes' and members' logs). With
``P2PFS_FAULTS_RESULTS=FILE`` the scenarios' figures (faults injected,
operations, errors surfaced, bytes lost) are written there as JSON, for
``bench/results/faults.md`` (``python bench/soak.py --table``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from itertools import chain
from pathlib import Path

import pytest
import trio

from faults_lib import (
    CheckReport, Ledger, MountProc, Network, Writer, check, fuse_usable, lua_tree, serving,
    small_jobs, tree_jobs, wait_until, write_file,
)
from overlay.node import TapestryNode
from overlay.wire.ids import Identity
from overlay.wire.tls import TlsTransport
from overlay.wire.transport import Peer
from p2pfs.mount import is_mounted
from storage import blockservice as bs
from storage import gc
from storage.blockstore import DEFAULT_MIN_DISK_FREE
from storage.replication import FULL_BACKOFF
from storage.ringboard import head_aguid
from storage.ringclient import RingClient
from storage.volume import View

pytestmark = pytest.mark.skipif(not fuse_usable(), reason="needs /dev/fuse, fusermount3 and root")

SKEW = 600.0                      # ten minutes
RESULTS: list[dict] = []


def source_jobs(dest: str):
    """The Andrew copy phase's input: the Lua 5.4 tree (75 files, 1.3 MB),
    or generated files where the tree cannot be had."""
    src = lua_tree()
    return tree_jobs(src, dest) if src is not None else small_jobs(dest, 75, 99)


# --------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    base = tmp_path_factory.mktemp("faults")
    n = Network(base)
    n.start()
    try:
        yield n
    finally:
        n.close()
        out = os.environ.get("P2PFS_FAULTS_RESULTS")
        if out:
            Path(out).write_text(json.dumps(RESULTS, indent=2) + "\n")
        if not os.environ.get("P2PFS_FAULTS_KEEP"):     # else keep the node and member logs
            shutil.rmtree(base, ignore_errors=True)


class Lab:
    """One scenario's mounts and bookkeeping; the network is restored after."""

    def __init__(self, net: Network, tmp: Path):
        self.net, self.tmp = net, tmp
        self.mounts: list[MountProc] = []
        self.faults_at_start = Counter(net.faults)
        self.extra_faults: Counter = Counter()

    def mount(self, vol: Path, name: str, *, skew: float = 0.0) -> MountProc:
        m = MountProc(vol, self.tmp / name, self.tmp / f"{name}-{len(self.mounts)}.log",
                      skew=skew)
        self.mounts.append(m)
        return m.start()

    def fresh_check(self, vol: Path, *ledgers: Ledger) -> CheckReport:
        """Mount ``vol`` anew (the caller unmounted the others), check
        every ledger through that mount, unmount it."""
        m = self.mount(vol, f"check{len(self.mounts)}")
        merged = Ledger()
        for led in ledgers:
            merged.acked.update(led.acked)
            merged.attempted.update(led.attempted)
        for k in merged.acked:
            merged.attempted.pop(k, None)
        rep = check(m.mnt, merged)
        assert m.unmount() == 0, m.tail()
        return rep

    def record(self, scenario: str, ledgers: list[Ledger], rep: CheckReport) -> None:
        faults = (Counter(self.net.faults) - self.faults_at_start) + self.extra_faults
        errors: Counter = Counter()
        for led in ledgers:
            errors.update(led.errors)
        RESULTS.append({
            "scenario": scenario, "faults": dict(faults),
            "operations": sum(led.ops for led in ledgers),
            "acked_files": rep.checked, "acked_bytes": rep.checked_bytes,
            "errors": dict(errors), "lost_bytes": rep.lost_bytes,
            "unacked_present": rep.unacked_present, "unacked_absent": rep.unacked_missing,
        })

    def close(self) -> None:
        for m in self.mounts:
            m.cleanup()
        self.net.ensure_nodes()
        trio.run(self.net.ensure_members)


@pytest.fixture
def lab(net, tmp_path):
    lb = Lab(net, tmp_path)
    try:
        yield lb
    finally:
        lb.close()


def run_writer(mnt: Path, jobs, ledger: Ledger, timeout: float = 240) -> None:
    """Run ``jobs`` through ``mnt`` to the end, in this thread's time."""
    w = Writer(mnt, jobs, ledger)
    w.start()
    w.join(timeout)
    assert not w.is_alive(), f"the writer hangs: {dict(ledger.errors)}"
    assert w.exc is None, w.exc


def finish(w: Writer, timeout: float = 240) -> None:
    w.join(timeout)
    assert not w.is_alive(), f"the writer hangs after {len(w.ledger.acked)} files"
    assert w.exc is None, w.exc


def wait_visible(mnt: Path, ledger: Ledger, timeout: float) -> CheckReport:
    """The data check of ``ledger`` through ``mnt``, repeated until it
    passes or ``timeout`` seconds went by (another writer's files appear
    once its log-head is certified)."""
    deadline = time.monotonic() + timeout
    while True:
        rep = check(mnt, ledger)
        if rep.ok or time.monotonic() > deadline:
            return rep
        time.sleep(1.0)


def new_blocks_per_node(net: Network, before: dict) -> Counter:
    now = trio.run(net.holdings)
    per = Counter()
    for g, holders in now.items():
        if g not in before:
            per.update(holders)
    return per


# --------------------------------------------------------------------------
# a. block holders


def test_a_kill9_of_two_block_holders_mid_copy_loses_nothing(net, lab):
    vol, = net.new_volume("holders")
    m = lab.mount(vol, "mnt")
    before = trio.run(net.holdings)
    led = Ledger()
    w = Writer(m.mnt, chain(source_jobs("src"), small_jobs("more", 60, 1)), led)
    w.start()
    w.wait_acked(40, 120)
    # The two nodes holding most of what this copy has stored so far.
    per = new_blocks_per_node(net, before)
    ids = [n.id_hex for n in net.current]
    doomed = sorted(range(net.n), key=lambda i: -per[bytes.fromhex(ids[i])])[:2]
    assert all(per[bytes.fromhex(ids[i])] > 0 for i in doomed)
    for i in doomed:
        net.kill_node(i)
    w.wait_acked(len(led.acked) + 40, 120)        # writes go on with 3 of 5 nodes
    net.restart_node(doomed[0])
    finish(w)
    assert not led.errors, f"errors surfaced to the user: {dict(led.errors)}"
    assert m.unmount() == 0, m.tail()
    net.kill_node(doomed[0])      # both down again: the check reads surviving copies
    rep = lab.fresh_check(vol, led)
    lab.record("a. kill -9 of 2 block holders mid-copy, 1 restarted", [led], rep)
    assert rep.ok, rep.summary()
    assert rep.checked == len(led.acked) > 120


# --------------------------------------------------------------------------
# b. ring members


def ring_status(net: Network) -> list[dict | None]:
    async def all_():
        return [await net.member_status(k) for k in range(net.ring.ring.n)]
    return trio.run(all_)


def test_b_kill9_of_the_ring_primary_mid_workload_and_its_catch_up(net, lab):
    a, b = net.new_volume("ring", writers=2)      # two writers: every close is certified
    ma, mb = lab.mount(a, "ma"), lab.mount(b, "mb")
    led = Ledger()
    w = Writer(ma.mnt, chain(source_jobs("src"), small_jobs("more", 10, 2)), led)
    w.start()
    w.wait_acked(20, 120)
    k = trio.run(net.primary)
    net.kill_member(k)                             # f = 1: the primary, so a view change
    w.wait_acked(len(led.acked) + 20, 120)
    trio.run(net.restart_member, k)
    finish(w)
    assert not led.errors, f"errors surfaced to the user: {dict(led.errors)}"

    # It catches up: it executes up to where the others were when the
    # workload ended, and takes part in their view.
    sts = ring_status(net)
    target = max(s["exec"] for j, s in enumerate(sts) if s and j != k)
    seen: list = []

    def caught_up():
        (ma.mnt / "tick").write_bytes(os.urandom(64))   # traffic for it to learn from
        sts = ring_status(net)
        seen[:] = [(s["view"], s["exec"], s["active"]) if s else None for s in sts]
        seen.append(sts[k] and sts[k].get("stats"))
        return sts[k] is not None and sts[k]["active"] and sts[k]["exec"] >= target \
            and sts[k]["view"] == max(s["view"] for s in sts if s)
    try:
        wait_until(caught_up, 90, f"member {k} to catch up", interval=1.0)
    except AssertionError as e:
        raise AssertionError(f"{e}: (view, exec, active) per member {seen}, target {target}")
    led.ack("tick", (ma.mnt / "tick").read_bytes())

    # Now the ring needs it: another member dies, and 3 of 4 must agree.
    j = (k + 1) % net.ring.ring.n
    net.kill_member(j)
    run_writer(ma.mnt, small_jobs("after", 8, 3), led)
    assert not led.errors, f"errors surfaced to the user: {dict(led.errors)}"
    # Writer B sees everything A closed: A's heads were certified (at once,
    # as a rule; a close during a view change is certified right after).
    rep_b = wait_visible(mb.mnt, led, 120)
    assert rep_b.ok, f"{rep_b.summary()}\nA: {ma.tail(1500)}\nB: {mb.tail(1500)}"
    assert ma.unmount() == 0 and mb.unmount() == 0
    rep = lab.fresh_check(a, led)
    lab.record("b. kill -9 of the ring primary mid-workload, restarted; then another member",
               [led], rep)
    assert rep.ok, rep.summary()


# --------------------------------------------------------------------------
# c. the client


def test_c_kill9_of_the_mounting_client_mid_workload(net, lab):
    vol, = net.new_volume("client")
    m = lab.mount(vol, "mnt")
    led = Ledger()
    w = Writer(m.mnt, chain(source_jobs("src"), small_jobs("more", 150, 4)), led)
    w.start()
    w.wait_acked(100, 120)
    m.kill9()
    lab.extra_faults["client mount kill -9"] += 1
    finish(w, 60)                                  # it ends on ENOTCONN
    assert set(led.errors) <= {"ENOTCONN", "ECONNABORTED"}, dict(led.errors)
    assert is_mounted(m.mnt) and not serving(m.mnt)        # a stale mount is left
    # The kernel may still answer stat of the root from its attribute cache
    # (60 s for a single writer): the new mount must not be fooled by it.
    m2 = lab.mount(vol, "mnt")                     # same mount point: cleared, mounted
    assert "stale mount" in m2.tail(), m2.tail()
    rep = check(m2.mnt, led)
    assert rep.ok, rep.summary()
    later = Ledger()
    run_writer(m2.mnt, small_jobs("later", 20, 5), later)      # and writing goes on
    assert not later.errors, dict(later.errors)
    assert m2.unmount() == 0, m2.tail()
    rep = lab.fresh_check(vol, led, later)
    lab.record("c. kill -9 of the mounting client mid-workload, remounted", [led, later], rep)
    assert rep.ok, rep.summary()


# --------------------------------------------------------------------------
# d. a wiped disk


def test_d_a_node_back_with_a_wiped_store_is_repaired_to_r_copies(net, lab):
    vol, = net.new_volume("wiped")
    m = lab.mount(vol, "mnt")
    led = Ledger()
    run_writer(m.mnt, chain(source_jobs("src"), small_jobs("a", 20, 6)), led)
    held = trio.run(net.holdings)
    ids = [bytes.fromhex(n.id_hex) for n in net.current]
    x = max(range(net.n), key=lambda i: sum(ids[i] in hs for hs in held.values()))
    had = {g for g, hs in held.items() if ids[x] in hs and len(hs) >= 3}
    assert had
    net.restart_node(x, wipe_blocks=True)          # kill -9, empty store, same NodeID
    run_writer(m.mnt, small_jobs("b", 20, 7), led)     # writes go on meanwhile
    assert not led.errors, f"errors surfaced to the user: {dict(led.errors)}"
    assert m.unmount() == 0, m.tail()

    def restored():
        trio.run(net.repair_all)
        now = trio.run(net.holdings)
        return all(len(now.get(g, ())) >= 3 for g in had)
    wait_until(restored, 120, f"3 copies of the {len(had)} blocks node {x} held", interval=1)
    now = trio.run(net.holdings)
    assert sum(ids[x] in now.get(g, ()) for g in had) > 0     # it holds copies again
    rep = lab.fresh_check(vol, led)
    lab.record("d. node restarted with a wiped store; repair", [led], rep)
    assert rep.ok, rep.summary()


# --------------------------------------------------------------------------
# e. full disks


def test_e_full_disks_pass_writes_on_or_fail_them_with_enospc(net, lab):
    vol, = net.new_volume("full")
    m = lab.mount(vol, "mnt")
    led = Ledger()
    run_writer(m.mnt, small_jobs("before", 20, 8), led)
    x = 1
    try:       # a small disk of its own: 0.5 MiB usable above the store's reserve
        store = net.store_on_tmpfs(x, DEFAULT_MIN_DISK_FREE + (512 << 10))

        def room() -> int:
            return shutil.disk_usage(store).free - DEFAULT_MIN_DISK_FREE
    except (OSError, subprocess.CalledProcessError):     # no tmpfs here: a quota instead
        used = trio.run(net.node_status, x)["store"]["used"]
        net.restart_node(x, extra=["--quota", str(used + (512 << 10))])
        lab.extra_faults["node over quota"] += 1

        def room() -> int:
            st = trio.run(net.node_status, x)["store"]
            return st["quota"] - st["used"]
    # Write until x is full (writers pass over it for a while after its restart).
    deadline = time.monotonic() + 120
    for n in range(1000):
        if room() < 128 << 10:
            break
        assert time.monotonic() < deadline, f"node {x} never filled up: {room()} bytes left"
        run_writer(m.mnt, small_jobs(f"filling{n}", 20, 100 + n), led)
    assert not led.errors, f"errors surfaced to the user: {dict(led.errors)}"
    run_writer(m.mnt, small_jobs("passed-on", 20, 10), led)
    assert not led.errors, f"errors surfaced to the user: {dict(led.errors)}"

    # Three of five full: no 3 distinct holders for a block, so writes fail,
    # with ENOSPC at close, and nothing acknowledged before is harmed. Node
    # x gets a quota below its use too: "full" above left it up to 128 KiB,
    # in which a small file's blocks may still fit.
    for y in (x, 2, 3):
        net.restart_node(y, extra=["--quota", "64K"])
    lab.extra_faults["node over quota"] += 3
    failing = Ledger()
    jobs = list(small_jobs("refused", 5, 11))
    run_writer(m.mnt, iter(jobs), failing, timeout=300)
    assert not failing.acked, "a write was acknowledged without 3 copies"
    assert set(failing.errors) == {"ENOSPC"}, dict(failing.errors)
    rep = check(m.mnt, led)
    assert rep.ok, rep.summary()

    net.ensure_nodes()                             # space is back; writers skip a
    time.sleep(FULL_BACKOFF + 1)                   # holder that was full for a while
    retry = Ledger()
    run_writer(m.mnt, iter(jobs), retry)
    assert not retry.errors, dict(retry.errors)
    assert m.unmount() == 0, m.tail()
    rep = lab.fresh_check(vol, led, retry)
    lab.record("e. disk full on 1 node, then 3 of 5 full (ENOSPC), then space back",
               [led, failing, retry], rep)
    assert rep.ok, rep.summary()


# --------------------------------------------------------------------------
# f. clocks


def latest_head_cert(net: Network, vol: Path):
    ident = Identity.load(vol / "identity.key")
    volume = View.decode((vol / "view").read_bytes()).volume

    async def ask():
        async with TlsTransport(Identity.generate()) as t:
            return await RingClient(t, net.ring.ring, Identity.generate()).latest(
                head_aguid(ident.public_key, volume))
    return trio.run(ask)


def test_f_clocks_skewed_by_ten_minutes_break_nothing(net, lab):
    a, b = net.new_volume("clocks", writers=2)
    p = trio.run(net.primary)
    trio.run(lambda: net.restart_member(p, skew=SKEW))   # the primary 10 min ahead
    net.restart_node(2, skew=-SKEW)                      # a storage node 10 min behind
    ma = lab.mount(a, "ma")
    mb = lab.mount(b, "mb", skew=-SKEW)                  # writer B's machine 10 min behind
    la, lb = Ledger(), Ledger()
    wa = Writer(ma.mnt, small_jobs("a", 20, 12), la)
    wb = Writer(mb.mnt, small_jobs("b", 20, 13), lb)
    wa.start()
    wb.start()
    finish(wa)
    finish(wb)
    assert not la.errors and not lb.errors, (dict(la.errors), dict(lb.errors))
    # Each writer sees the other's files once their heads are certified: at
    # once as a rule. On a loaded machine the ring may spend more than a
    # client's 10 s deadline in successive view changes (one member refuses
    # every batch, 0.6 s timeouts); a close then returns on the writer's own
    # signed head and certification follows (ringboard), so wait for it.
    for mnt, led in ((ma.mnt, lb), (mb.mnt, la)):
        rep = wait_visible(mnt, led, 120)
        assert rep.ok, f"{rep.summary()}\nA: {ma.tail(1500)}\nB: {mb.tail(1500)}"
    # Certificate times come from a correct primary (within PBFT's 2 min
    # bound of real time), not from the member 10 minutes ahead.
    now = time.time()
    for vol in (a, b):
        cert = latest_head_cert(net, vol)
        assert cert is not None and abs(cert.time / 1000 - now) < 120, cert
    # A writer's clock names its records' times: B's files are 10 min old.
    age = now - os.stat(ma.mnt / "b" / "f0000.bin").st_mtime
    assert SKEW - 120 < age < SKEW + 120, age
    assert abs(now - os.stat(mb.mnt / "a" / "f0000.bin").st_mtime) < 120
    assert ma.unmount() == 0 and mb.unmount() == 0
    rep = lab.fresh_check(a, la, lb)
    lab.extra_faults["writer clock skewed"] += 1
    lab.record("f. clocks skewed 10 min (ring primary +, storage node -, writer -)",
               [la, lb], rep)
    assert rep.ok, rep.summary()


class NotCertified(AssertionError):
    """The writer's closes were not certified: other writers cannot see them."""


def test_f_a_writer_whose_clock_stepped_back_still_gets_its_closes_certified(net, lab):
    """Ring request ids are wall-clock nanoseconds; members refuse ids below
    those they remember for a client as stale, naming their newest, and the
    client resumes above it (``RingClient._resume_after``)."""
    a, b = net.new_volume("stepback", writers=2)
    ma, mb = lab.mount(a, "ma"), lab.mount(b, "mb")
    for i in range(70):              # 70 certified closes: more than the 64 ids remembered
        write_file(mb.mnt / f"b{i:02d}", b"%d\n" % i, fsync=False)
    assert (ma.mnt / "b69").read_bytes() == b"69\n"
    assert mb.unmount() == 0
    mb = lab.mount(b, "mb", skew=-SKEW)       # B's machine's clock stepped back 10 min
    lab.extra_faults["writer clock stepped back"] += 1
    write_file(mb.mnt / "late", b"after the step\n", fsync=True)
    try:
        wait_until(lambda: (ma.mnt / "late").exists(), 10, "A to see B's close")
    except AssertionError:
        raise NotCertified(mb.tail(600)) from None
    assert (ma.mnt / "late").read_bytes() == b"after the step\n"


class LiveBlockCollected(AssertionError):
    """A block put after the collector's mark was deleted by the sweep."""


def test_f_gc_spares_a_block_put_after_the_mark_on_a_holder_whose_clock_is_behind(net, lab):
    """The sweep sends its cutoff as an age (``blk.delete`` ``spare_within``),
    which each holder turns into a time on its own clock."""
    collector = Identity.generate()
    slow, right = 3, 4
    net.restart_node(slow, skew=-SKEW, extra=["--collector", collector.id.hex()])
    net.restart_node(right, extra=["--collector", collector.id.hex()])
    peers = [Peer(bytes.fromhex(net.node(i).id_hex), net.node(i).addr) for i in (slow, right)]
    data = os.urandom(5000)
    g = hashlib.sha256(data).digest()

    async def scenario():
        async with TlsTransport(collector) as t:
            node = TapestryNode(t)
            t0 = time.time()                            # mark: T0, then the live set
            live = set()
            for p in peers:
                after = None
                while True:
                    page, more = await bs.list_on(t, p, after)
                    live.update(page)
                    if not more or not page:
                        break
                    after = page[-1]
            for p in peers:                             # a writer puts a new block after T0
                await bs.put_to(t, p, [(g, data)])
            report = await gc.collect(node, live, t0, peers=peers)
            assert not report.failed, report.failed
            return await bs.has_on(t, peers[0], [g]), await bs.has_on(t, peers[1], [g])
    on_slow, on_right = trio.run(scenario)
    assert on_right[g], "the sweep deleted a block put after the mark"
    if not on_slow[g]:
        raise LiveBlockCollected("deleted on the holder whose clock is 10 minutes behind")
