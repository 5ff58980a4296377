"""A fault-injection harness over real p2pfs processes, shared by
``tests/test_faults.py`` and ``bench/soak.py`` (issue 10; DESIGN.md "What
must always hold": nothing acknowledged is lost to the crash of f ring
members, r-1 block holders or the client itself).

What it starts, all on 127.0.0.1 and stopped by PID:

* :class:`Network`: storage nodes (``python -m storage``) on fixed ports, so
  a node killed and restarted comes back at the address the others and the
  volumes' bootstrap lists know; an inner ring of 3f+1 members
  (``storage.ring_local.LocalRing``); the owner's identity. Nodes and members
  can be killed (SIGKILL), restarted (optionally with a wiped block store or
  a skewed wall clock) and asked for their state.
* :class:`MountProc`: one ``p2pfs mount`` process on a volume directory.
* :class:`Writer`: a thread writing files through a mount, recording in a
  :class:`Ledger` what each close (or fsync) acknowledged.

:func:`check` is the full data check: every acknowledged file read back
through a mount must be byte-identical; a file that was being written when
something crashed may be missing or short, but each byte it has must be the
byte that was written there or zero (a hole), never anything else.

Clock skew: :func:`skewed_argv` runs any ``python -m MODULE`` with its wall
clock (``time.time``, ``time.time_ns``) offset by a number of seconds. The
offset is installed before the module is imported, so the storage node's
stamps, the ring member's batch and certificate times, a mount's record
times and ring request ids all read the skewed clock, as on a machine whose
clock is wrong; monotonic clocks (trio's timers) are untouched, as they are
on such a machine. No option in the node or member is needed for it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import trio

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from overlay.wire.ids import Identity  # noqa: E402
from overlay.wire.tls import TlsTransport  # noqa: E402
from overlay.wire.transport import Peer  # noqa: E402
from p2pfs.cluster import LocalCluster, NodeProcess  # noqa: E402
from p2pfs.mount import is_mounted  # noqa: E402
from p2pfs.netbackend import NetworkBackend, join_network, mkfs_network, write_ticket  # noqa: E402
from storage import blockservice as bs  # noqa: E402
from storage.ring import STATUS  # noqa: E402
from storage.ring_local import LocalRing, free_ports  # noqa: E402

RING_ARGS = ["--request-timeout", "0.6", "--view-change-timeout", "0.6", "--no-sync",
             "--log-level", os.environ.get("P2PFS_FAULTS_RING_LOG", "WARNING")]
NODE_ARGS = ["--no-fsync", "--log-level", "info"]

# Runs ``python -m MODULE ARGS`` with the wall clock offset by SKEW seconds
# (module docstring). argv: -c BOOT SKEW MODULE ARGS...
_SKEW_BOOT = """\
import runpy, sys, time
_off = float(sys.argv[1]); _mod = sys.argv[2]
_t, _tn = time.time, time.time_ns
time.time = lambda: _t() + _off
time.time_ns = lambda: _tn() + int(_off * 1e9)
sys.argv = [_mod] + sys.argv[3:]
runpy.run_module(_mod, run_name="__main__", alter_sys=True)
"""


def skewed_argv(skew: float, module: str, *args: str) -> list[str]:
    """The argv of ``python -m module args`` whose wall clock is ``skew``
    seconds ahead (negative: behind) of this machine's."""
    if not skew:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-c", _SKEW_BOOT, repr(float(skew)), module, *args]


def fuse_usable() -> bool:
    return (os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None
            and os.geteuid() == 0)


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT))


# --------------------------------------------------------------------------
# The network


class Network:
    """Storage nodes on fixed loopback ports and an inner ring (module
    docstring). ``start()`` then use; ``close()`` stops everything."""

    def __init__(self, base: Path, *, nodes: int = 5, f: int = 1,
                 node_args: Iterable[str] = NODE_ARGS, ring_args: Iterable[str] = RING_ARGS):
        self.base = Path(base)
        self.n = nodes
        self.node_args = list(node_args)
        self.ports = free_ports(nodes)
        self.extra: dict[int, list[str]] = {}       # per node, for its next start
        self.skew: dict[int, float] = {}
        self.cluster = LocalCluster(self.base / "nodes", self._argv, ready_timeout=60,
                                    env={"PYTHONPATH": str(ROOT)})
        self.current: list[NodeProcess | None] = [None] * nodes
        self.owner = Identity.generate()
        self.ring = LocalRing(self.base / "ring", owner=self.owner, f=f, args=list(ring_args),
                              name="faults")
        self.member_skew: dict[int, float] = {}
        self.tmpfs: dict[int, Path] = {}             # node -> its store on a tmpfs
        self.volumes = 0
        self.faults: Counter = Counter()             # what was injected, by kind

    # ---- storage nodes ---------------------------------------------------------------

    def _argv(self, index: int, data: Path, bootstrap) -> list[str]:
        args = ["--data", str(data), "--listen", f"127.0.0.1:{self.ports[index]}",
                *self.node_args, *self.extra.get(index, [])]
        for b in bootstrap:
            args += ["--bootstrap", b.info["bootstrap"]]
        return skewed_argv(self.skew.get(index, 0.0), "storage", *args)

    def start(self) -> "Network":
        try:
            for i in range(self.n):
                self._start_node(i)
            trio.run(self.ring.start)
        except BaseException:
            self.close()
            raise
        return self

    def _start_node(self, i: int) -> NodeProcess:
        others = [n for n in self.current if n is not None and n.alive and n.index != i]
        node = self.cluster.start_node(i, others[:1])
        self.current[i] = node
        return node

    def node(self, i: int) -> NodeProcess:
        return self.current[i]

    def live_nodes(self) -> list[NodeProcess]:
        return [n for n in self.current if n is not None and n.alive]

    def bootstrap(self) -> list[str]:
        return [f"127.0.0.1:{self.ports[i]}#{self.current[i].id_hex}" for i in range(self.n)]

    def data_dir(self, i: int) -> Path:
        return self.cluster.base_dir / f"node{i}"

    def kill_node(self, i: int) -> None:
        """kill -9 storage node ``i`` (a fault, counted)."""
        if self._kill(i):
            self.faults["storage node kill -9"] += 1

    def _kill(self, i: int) -> bool:
        node = self.current[i]
        if node is not None and node.alive:
            self.cluster.kill(node)
            return True
        return False

    def restart_node(self, i: int, *, wipe_blocks: bool = False, skew: float = 0.0,
                     extra: Iterable[str] = ()) -> NodeProcess:
        """Start node ``i`` again on its port with its key (killing it first
        if it runs): ``wipe_blocks`` empties its block store (a replaced
        disk), ``skew`` offsets its wall clock, ``extra`` adds options."""
        self._kill(i)
        if wipe_blocks:
            shutil.rmtree(self.data_dir(i) / "blocks", ignore_errors=True)
            self.faults["storage node kill -9, store wiped"] += 1
        self.skew[i] = skew
        if skew:
            self.faults["storage node clock skewed"] += 1
        self.extra[i] = list(extra)
        deadline = time.monotonic() + 30
        while True:              # the port may linger for a moment after SIGKILL
            try:
                return self._start_node(i)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def ensure_nodes(self) -> None:
        """Every node running again, unskewed, with its default options and
        its block store on its own disk."""
        for i in list(self.tmpfs):
            self.store_back_on_disk(i)
        for i in range(self.n):
            node = self.current[i]
            if node is None or not node.alive or self.skew.get(i) or self.extra.get(i):
                self.restart_node(i)

    def store_on_tmpfs(self, i: int, free: int) -> Path:
        """Restart node ``i`` with its block store on a tmpfs of its own
        that leaves ``free`` bytes beyond what the store holds: a small
        disk that fills up. Returns the store directory."""
        self._kill(i)
        blocks = self.data_dir(i) / "blocks"
        saved = self.data_dir(i) / "blocks.disk"
        blocks.rename(saved)
        blocks.mkdir()
        used = sum(f.stat().st_blocks * 512 for f in saved.iterdir() if f.is_file())
        size = (used + free + 4095) // 4096 * 4096
        try:
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                            "p2pfs-faults", str(blocks)], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError):
            blocks.rmdir()                       # no tmpfs here: as it was
            saved.rename(blocks)
            self.restart_node(i)
            raise
        self.tmpfs[i] = blocks
        subprocess.run(["cp", "-a", "--sparse=always", *[str(f) for f in saved.iterdir()],
                        str(blocks)], check=True, capture_output=True)
        self.faults["storage node disk fills up"] += 1
        self.restart_node(i)
        return blocks

    def store_back_on_disk(self, i: int) -> None:
        """Undo :meth:`store_on_tmpfs`: the store's files go back to disk."""
        blocks = self.tmpfs.pop(i)
        self._kill(i)
        saved = self.data_dir(i) / "blocks.disk"
        for f in saved.iterdir():
            f.unlink()
        subprocess.run(["cp", "-a", "--sparse=always", *[str(f) for f in blocks.iterdir()],
                        str(saved)], check=True, capture_output=True)
        _umount(blocks)
        blocks.rmdir()
        saved.rename(blocks)

    async def holdings(self) -> dict[bytes, set[bytes]]:
        """BGUID -> NodeIDs of the live nodes that list it (asked over TLS)."""
        out: dict[bytes, set[bytes]] = {}
        async with TlsTransport(Identity.generate()) as t:
            for n in self.live_nodes():
                p = Peer(bytes.fromhex(n.id_hex), n.addr)
                after = None
                while True:
                    gs, more = await bs.list_on(t, p, after, timeout=30)
                    for g in gs:
                        out.setdefault(g, set()).add(p.id)
                    if not more or not gs:
                        break
                    after = gs[-1]
        return out

    async def repair_all(self) -> None:
        """One repair pass on every live node, now."""
        from overlay import control
        for n in self.live_nodes():
            await control.call(n.info["control"], "blk.ctl.repair", {}, timeout=120)

    async def node_status(self, i: int) -> dict:
        from overlay import control
        r = await control.call(self.current[i].info["control"], "blk.ctl.status", {},
                               timeout=30)
        return r["status"]

    # ---- ring members ----------------------------------------------------------------

    def kill_member(self, k: int) -> None:
        self.ring.kill(k)
        self.faults["ring member kill -9"] += 1

    async def restart_member(self, k: int, *, skew: float = 0.0) -> dict:
        self.ring.stop(k)
        self.member_skew[k] = skew
        if skew:
            self.faults["ring member clock skewed"] += 1
        self._spawn_member(k, skew)
        return await self.ring.wait_ready(k, 30)

    def _spawn_member(self, k: int, skew: float) -> None:
        cmd = self.ring.command(k)              # [python, -m, storage.ringnode, args...]
        argv = skewed_argv(skew, "storage.ringnode", *cmd[3:])
        log = open(self.ring.dir / f"member{k}.log", "ab")
        try:
            self.ring.procs[k] = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log,
                                                  env=child_env(), start_new_session=True)
        finally:
            log.close()
        self.ring.ready[k] = None

    def member_alive(self, k: int) -> bool:
        p = self.ring.procs[k]
        return p is not None and p.poll() is None

    async def member_status(self, k: int, timeout: float = 5.0) -> dict | None:
        m = self.ring.ring.members[k]
        try:
            async with TlsTransport(Identity.generate()) as t:
                return await t.request(Peer(m.id, m.addr), STATUS, {}, timeout=timeout)
        except Exception:  # noqa: BLE001 - a member that does not answer has no status
            return None

    async def ensure_members(self) -> None:
        for k in range(self.ring.ring.n):
            if not self.member_alive(k) or self.member_skew.get(k):
                await self.restart_member(k)

    async def primary(self) -> int:
        """The index of the primary of the view most members are in."""
        views = Counter()
        for k in range(self.ring.ring.n):
            st = await self.member_status(k)
            if st is not None:
                views[st["view"]] += 1
        view = views.most_common(1)[0][0] if views else 0
        return view % self.ring.ring.n

    # ---- volumes ---------------------------------------------------------------------

    def new_volume(self, name: str, writers: int = 1) -> list[Path]:
        """A fresh network volume owned by the owner, r=3, on this ring;
        with ``writers`` > 1, that many volume directories of distinct
        writers (the owner's first)."""
        self.volumes += 1
        base = self.base / f"vol{self.volumes}-{name}"
        dirs = [base / "w0"]
        mkfs_network(dirs[0], self.bootstrap(), r=3, name=name, identity=self.owner,
                     ring=self.ring.ring)
        if writers > 1:
            others = [Identity.generate() for _ in range(writers - 1)]

            async def add():
                async with NetworkBackend(dirs[0]).connect() as conn:
                    await conn.current_view()            # the owner publishes the view
                    view = None
                    for o in others:
                        view = await conn.add_writer(o.public_key)
                    return view

            view = trio.run(add)
            for j, o in enumerate(others, 1):
                d = base / f"w{j}"
                join_network(d, write_ticket(dirs[0], view), o)
                dirs.append(d)
        return dirs

    def close(self) -> None:
        try:
            self.ring.close()
        finally:
            self.cluster.stop()
            for blocks in self.tmpfs.values():
                _umount(blocks)
            self.tmpfs.clear()


def _umount(path: Path) -> None:
    r = subprocess.run(["umount", str(path)], capture_output=True)
    if r.returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --------------------------------------------------------------------------
# Mounts


def serving(mnt: Path) -> bool:
    """Whether a live server answers at ``mnt``: statfs always reaches it
    (``os.stat`` may be answered from the kernel's attribute cache even
    after the server died)."""
    if not is_mounted(mnt):
        return False
    try:
        os.statvfs(mnt)
    except OSError:
        return False
    return True


def py_spy_dump(pid: int) -> str:
    """The Python stacks of process ``pid`` (py-spy, if installed), or why not."""
    exe = Path(sys.executable).with_name("py-spy")
    if not exe.exists():
        return "(py-spy not installed)"
    try:
        r = subprocess.run([str(exe), "dump", "--pid", str(pid)], capture_output=True,
                           text=True, timeout=60)
        return r.stdout + r.stderr
    except (OSError, subprocess.SubprocessError) as e:
        return f"(py-spy failed: {e})"


class MountFailed(Exception):
    """A mount process exited or did not mount in time."""


def unmount_process(p: subprocess.Popen | None, mnt: Path, timeout: float) -> int | None:
    """Unmount ``mnt`` served by mount process ``p`` (which then does its
    final sync and exits) and return its exit code; a process that does not
    exit within ``timeout`` is killed, a mount left behind detached."""
    if p is not None and p.poll() is None:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=60)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    return None if p is None else p.returncode


class MountProc:
    """One ``p2pfs mount VOLDIR MNT`` process (foreground, own session)."""

    def __init__(self, vol: Path, mnt: Path, log: Path, *, skew: float = 0.0,
                 wrap: Callable[[list[str]], list[str]] | None = None):
        # ``wrap``: turns the mount's command line into the one to run, e.g.
        # ``Lab.netns_argv`` to run it with a lab host's network (it must exec,
        # so that the PID held here is the mount's own).
        self.vol, self.mnt, self.log, self.skew = Path(vol), Path(mnt), Path(log), skew
        self.wrap = wrap
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "MountProc":
        if not is_mounted(self.mnt):           # a stale mount is for p2pfs mount to clear
            self.mnt.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            argv = skewed_argv(self.skew, "p2pfs", "mount", str(self.vol), str(self.mnt))
            self.proc = subprocess.Popen(
                self.wrap(argv) if self.wrap else argv,
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, env=child_env())
        deadline = time.monotonic() + timeout
        while not serving(self.mnt):
            if self.proc.poll() is not None:
                raise MountFailed(f"mount exited {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                stacks = py_spy_dump(self.proc.pid)       # where it waits, for the report
                with open(self.log, "a") as f:
                    f.write(f"\n--- not mounted in {timeout} s; py-spy dump:\n{stacks}\n")
                self.cleanup()
                raise MountFailed(f"not mounted in {timeout} s (stacks in {self.log}): "
                                  f"{self.tail(1500)}")
            time.sleep(0.05)
        return self

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def unmount(self, timeout: float = 150) -> int | None:
        """Unmount (the process then does its final sync and exits) and
        return its exit code; a process that does not exit is killed."""
        return unmount_process(self.proc, self.mnt, timeout)

    def cleanup(self) -> None:
        """Whatever state it is in: no process, no mount left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)


# --------------------------------------------------------------------------
# Workloads and what they were told


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass
class Ledger:
    """What the writers were acknowledged (close or fsync returned 0) and
    what they attempted. Paths are relative to the mount."""
    acked: dict[str, tuple[bytes, int]] = field(default_factory=dict)   # path -> (sha256, size)
    attempted: dict[str, bytes] = field(default_factory=dict)          # unacknowledged bytes
    errors: Counter = field(default_factory=Counter)                   # errno name -> count
    ops: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, path: str, data: bytes) -> None:
        with self.lock:
            self.acked[path] = (_digest(data), len(data))
            self.attempted.pop(path, None)
            self.ops += 1

    def attempt(self, path: str, data: bytes) -> None:
        with self.lock:
            if path not in self.acked:
                self.attempted[path] = data

    def error(self, e: OSError) -> None:
        with self.lock:
            self.errors[errno.errorcode.get(e.errno, str(e.errno))] += 1

    @property
    def acked_bytes(self) -> int:
        return sum(size for _, size in self.acked.values())


def write_file(path: Path, data: bytes, *, fsync: bool) -> None:
    """Write ``data`` as a whole new file; returns only once close (and,
    with ``fsync``, fsync) returned, that is once the data is acknowledged."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view[:1 << 20])
            view = view[n:]
        if fsync:
            os.fsync(fd)
    except BaseException:
        try:
            os.close(fd)
        except OSError:
            pass
        raise
    os.close(fd)


def lua_tree() -> Path | None:
    """The Lua 5.4 source tree of the Andrew benchmark (bench/srctree.py),
    or None if it cannot be had here."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import srctree
        return srctree.ensure_tree()
    except Exception:  # noqa: BLE001 - the caller falls back to generated files
        return None
    finally:
        sys.path.remove(str(ROOT / "bench"))


def tree_jobs(src: Path, dest: str) -> Iterator[tuple[str, bytes | None, bool]]:
    """An Andrew-style copy of a source tree: (relative path, bytes or None
    for a directory, fsync?). Directories first, as ``cp -r`` creates them."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    dirs = sorted({p.parent for p in files} | {src}, key=lambda p: len(p.parts))
    for d in dirs:
        yield f"{dest}/{d.relative_to(src)}".rstrip("/.").rstrip("/") or dest, None, False
    for i, p in enumerate(files):
        yield f"{dest}/{p.relative_to(src)}", p.read_bytes(), i % 4 == 0


def small_jobs(dest: str, n: int, seed: int, *, sizes=(100, 70_000)) -> Iterator[
        tuple[str, bytes | None, bool]]:
    """``n`` files of random sizes and bytes, each fsync'd, in ``dest``."""
    rng = random.Random(seed)
    yield dest, None, False
    for i in range(n):
        size = rng.randint(*sizes)
        yield f"{dest}/f{i:04d}.bin", rng.randbytes(size), True


class Writer(threading.Thread):
    """Runs jobs through a mount, recording acknowledgements in a ledger.
    Stops when the jobs run out, on :meth:`stop`, or when the mount is gone
    (ENOTCONN). An error on one file is recorded and the next one tried."""

    def __init__(self, mnt: Path, jobs: Iterable[tuple[str, bytes | None, bool]],
                 ledger: Ledger, *, pause: float = 0.0):
        super().__init__(daemon=True)
        self.mnt, self.jobs, self.ledger, self.pause = Path(mnt), jobs, ledger, pause
        self._halt = threading.Event()
        self.done = 0
        self.exc: BaseException | None = None

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            for rel, data, fsync in self.jobs:
                if self._halt.is_set():
                    return
                path = self.mnt / rel
                try:
                    if data is None:
                        path.mkdir(exist_ok=True)
                    else:
                        self.ledger.attempt(rel, data)
                        write_file(path, data, fsync=fsync)
                        self.ledger.ack(rel, data)
                except OSError as e:
                    self.ledger.error(e)
                    if e.errno in (errno.ENOTCONN, errno.ECONNABORTED):
                        return              # the mount is gone
                self.done += 1
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.exc = e

    def wait_acked(self, n: int, timeout: float) -> None:
        """Block until the ledger holds ``n`` acknowledgements."""
        deadline = time.monotonic() + timeout
        while len(self.ledger.acked) < n:
            if not self.is_alive():
                raise AssertionError(f"the writer stopped after {len(self.ledger.acked)} "
                                     f"acknowledgements: {self.exc or self.ledger.errors}")
            if time.monotonic() > deadline:
                raise AssertionError(f"only {len(self.ledger.acked)} of {n} acknowledgements "
                                     f"in {timeout} s; errors {dict(self.ledger.errors)}")
            time.sleep(0.05)


# --------------------------------------------------------------------------
# The data check


@dataclass
class CheckReport:
    checked: int = 0
    checked_bytes: int = 0
    missing: list[str] = field(default_factory=list)         # acknowledged, not there
    corrupt: list[str] = field(default_factory=list)         # acknowledged, other bytes
    torn_bad: list[str] = field(default_factory=list)        # unacknowledged, foreign bytes
    unacked_present: int = 0
    unacked_missing: int = 0
    lost_bytes: int = 0
    read_errors: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.corrupt or self.torn_bad)

    def summary(self) -> str:
        return (f"{self.checked} acknowledged files ({self.checked_bytes} bytes) checked: "
                f"{len(self.missing)} missing, {len(self.corrupt)} corrupt, "
                f"{self.lost_bytes} bytes lost; unacknowledged: {self.unacked_present} "
                f"present ({len(self.torn_bad)} with foreign bytes), {self.unacked_missing} "
                f"absent; read errors {dict(self.read_errors)}; first: "
                f"{(self.missing + self.corrupt + self.torn_bad)[:5]}")


def check(mnt: Path, ledger: Ledger) -> CheckReport:
    """The full data check (module docstring) of ``ledger`` through ``mnt``."""
    rep = CheckReport()
    for rel, (digest, size) in sorted(ledger.acked.items()):
        rep.checked += 1
        rep.checked_bytes += size
        try:
            got = (mnt / rel).read_bytes()
        except FileNotFoundError:
            rep.missing.append(rel)
            rep.lost_bytes += size
            continue
        except OSError as e:
            rep.read_errors[errno.errorcode.get(e.errno, str(e.errno))] += 1
            rep.missing.append(rel)
            rep.lost_bytes += size
            continue
        if _digest(got) != digest:
            rep.corrupt.append(rel)
            rep.lost_bytes += size
    for rel, data in sorted(ledger.attempted.items()):
        try:
            got = (mnt / rel).read_bytes()
        except FileNotFoundError:
            rep.unacked_missing += 1
            continue
        except OSError as e:
            rep.read_errors[errno.errorcode.get(e.errno, str(e.errno))] += 1
            continue
        rep.unacked_present += 1
        if not torn_ok(got, data):
            rep.torn_bad.append(rel)
    return rep


def torn_ok(got: bytes, data: bytes) -> bool:
    """Whether an unacknowledged file's bytes are a torn version of
    ``data``: no longer, and each byte either written there or zero."""
    if len(got) > len(data):
        return False
    if got == data[:len(got)]:
        return True
    return all(a == b or a == 0 for a, b in zip(got, data))


def wait_until(pred, timeout: float, what: str, interval: float = 0.2):
    """Poll ``pred()`` until it is truthy; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def jsonable(obj):
    return json.loads(json.dumps(obj, default=str))
