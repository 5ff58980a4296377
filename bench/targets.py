"""The file systems a benchmark compares, each brought up before the runs and
always torn down after them.

- ``local``: a fresh directory on the local disk (the 1.00x column of
  DESIGN.md "Performance budget");
- ``passthrough``: ``bench/passthroughfs.py`` mirroring a local directory
  through FUSE, to separate the cost of FUSE and Python from that of p2pfs;
- ``p2pfs``: ``p2pfs demo`` (an embedded local network of node processes);
  when the command does not exist yet the target is reported as "not yet
  mountable" instead of failing the benchmark;
- ``glusterfs`` / ``seaweedfs``: the peers of ``../shared/peers/`` (their
  ``up.sh`` / ``down.sh``), for benchmarks only.

Processes are started in their own session and stopped by PID (SIGTERM, then
SIGKILL to that process group after a grace period); a mount left behind is
detached with ``fusermount3 -u -z``. Mount state is read from
``/proc/self/mountinfo``, because ``os.path.ismount`` says False for a FUSE
mount whose daemon died (stat fails with ENOTCONN).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PASSTHROUGH = BENCH_DIR / "passthroughfs.py"
PEERS_DIR = BENCH_DIR.parent.parent / "shared" / "peers"


class TargetUnavailable(Exception):
    """A file system to compare cannot be brought up here (command missing,
    mount failed or timed out); the benchmark reports it and goes on."""


def _mountinfo() -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mnt = left.split()[4]
            # mountinfo escapes space, tab, newline and backslash as octal
            mnt = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), mnt)
            out.append((mnt, right.split()[0]))
    return out


def is_mounted(path: str | Path) -> bool:
    real = os.path.realpath(path)
    return any(mnt == real for mnt, _ in _mountinfo())


def fs_type(path: str | Path) -> str:
    """Type of the file system holding ``path`` (the longest matching mount)."""
    real = os.path.realpath(path)
    best, kind = "", "unknown"
    for mnt, typ in _mountinfo():
        inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) >= len(best):
            best, kind = mnt, typ
    return kind


def force_unmount(path: str | Path) -> None:
    """Detach a mount that its daemon did not take down."""
    for argv in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        if shutil.which(argv[0]):
            subprocess.run(argv, capture_output=True, timeout=30)


class Target:
    """One file system under test. ``start()`` sets ``path`` or raises
    TargetUnavailable; ``stop()`` never raises and may be called twice."""

    kind = "directory"

    def __init__(self, name: str):
        self.name = name
        self.path: Path | None = None
        self.status = "pending"   # ok | unavailable | failed
        self.reason = ""
        self.details: dict = {}

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        pass

    def label(self) -> str:
        return self.kind

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "label": self.label(),
                "path": str(self.path) if self.path else None,
                "status": self.status, "reason": self.reason, **self.details}


class DirectoryTarget(Target):
    """A directory the user named; it is used, never created or removed."""

    def __init__(self, name: str, path: str | Path):
        super().__init__(name)
        self.given = Path(path)

    def start(self) -> None:
        if not self.given.is_dir():
            raise TargetUnavailable(f"{self.given} is not a directory")
        self.path = self.given
        self.details["fs_type"] = fs_type(self.given)

    def label(self) -> str:
        return f"directory ({self.details.get('fs_type', '?')})"


class LocalTarget(Target):
    """A fresh directory on the local disk, removed afterwards."""

    kind = "local"

    def __init__(self, base: Path):
        super().__init__("local")
        self.base = base

    def start(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="andrew-local-", dir=self.base))
        self.details["fs_type"] = fs_type(self.path)

    def stop(self) -> None:
        if self.path:
            shutil.rmtree(self.path, ignore_errors=True)

    def label(self) -> str:
        return f"local directory ({self.details.get('fs_type', '?')})"


class FuseProcessTarget(Target):
    """A FUSE daemon run in the foreground as our child; mounted when its
    mount point appears in mountinfo."""

    mount_timeout = 30.0
    stop_grace = 15.0

    def __init__(self, name: str, base: Path):
        super().__init__(name)
        self.base = base
        self.proc: subprocess.Popen | None = None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"andrew-{name}-", dir=base))
        self.mnt = self.workdir / "mnt"
        self.mnt.mkdir()
        self.log = self.workdir / "daemon.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def _log_tail(self, n: int = 600) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def start(self) -> None:
        argv = self.argv()
        self.details["argv"] = argv
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        self.details["pid"] = self.proc.pid
        self.details["mountpoint"] = str(self.mnt)
        deadline = time.monotonic() + self.mount_timeout
        while not is_mounted(self.mnt):
            if self.proc.poll() is not None:
                raise TargetUnavailable(f"exited with code {self.proc.returncode} before mounting: "
                                        f"{self._log_tail()}")
            if time.monotonic() > deadline:
                raise TargetUnavailable(f"not mounted after {self.mount_timeout:.0f} s: "
                                        f"{self._log_tail()}")
            time.sleep(0.02)
        self.path = self.mnt

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the daemon unmounts on SIGTERM
            try:
                proc.wait(self.stop_grace)
            except subprocess.TimeoutExpired:
                self.reason = self.reason or "daemon ignored SIGTERM; killed"
        if proc is not None:
            try:  # the daemon's whole session: anything it started and left behind
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        force_unmount(self.mnt)
        if not is_mounted(self.mnt):  # never delete through a live mount
            shutil.rmtree(self.workdir, ignore_errors=True)


class PassthroughTarget(FuseProcessTarget):
    kind = "passthrough"

    def __init__(self, base: Path, extra_args: list[str] | None = None):
        super().__init__("passthrough", base)
        self.src = self.workdir / "src"
        self.src.mkdir()
        self.extra_args = list(extra_args or [])

    def argv(self) -> list[str]:
        return [sys.executable, str(PASSTHROUGH), str(self.src), str(self.mnt), *self.extra_args]

    def label(self) -> str:
        return "pyfuse3 pass-through (FUSE + Python)"


class P2pfsTarget(FuseProcessTarget):
    """``p2pfs demo MOUNTPOINT``: 4 node processes, r=3, a 4-member ring.

    The options are passed only if ``p2pfs demo --help`` lists them (their
    names are not fixed yet); ``details["unset"]`` names those left at the
    command's defaults. ``command`` overrides the whole line, with
    ``{python}``, ``{mountpoint}`` and ``{data}`` substituted."""

    kind = "p2pfs"
    mount_timeout = 120.0
    WANT = (("nodes", ("--nodes", "-n"), "4"),
            ("replicas", ("--replicas", "--replication", "-r"), "3"),
            ("ring", ("--ring", "--ring-size", "--inner-ring"), "4"))

    def __init__(self, base: Path, command: str | None = None):
        super().__init__("p2pfs", base)
        self.command = command
        self.data = self.workdir / "data"

    def _help(self) -> str:
        try:
            r = subprocess.run([sys.executable, "-m", "p2pfs", "demo", "--help"],
                               capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            raise TargetUnavailable(f"not yet mountable (`p2pfs demo --help`: {e})") from None
        if r.returncode != 0:
            raise TargetUnavailable("not yet mountable (`p2pfs demo` does not exist yet)")
        return r.stdout

    def argv(self) -> list[str]:
        self.data.mkdir(exist_ok=True)
        if self.command:
            subst = {"python": sys.executable, "mountpoint": str(self.mnt), "data": str(self.data)}
            return [part.format(**subst) for part in shlex.split(self.command)]
        help_text = self._help()
        argv, unset = [sys.executable, "-m", "p2pfs", "demo"], []
        for what, flags, value in self.WANT:
            flag = next((f for f in flags
                         if re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text)), None)
            if flag:
                argv += [flag, value]
            else:
                unset.append(what)
        self.details["unset"] = unset
        return [*argv, str(self.mnt)]

    def label(self) -> str:
        if self.command:
            return f"p2pfs: `{self.command}`"
        unset = self.details.get("unset")
        if unset:
            return f"p2pfs demo (asked 4 nodes, r=3, ring of 4; its defaults for {', '.join(unset)})"
        return "p2pfs demo (4 nodes, r=3, ring of 4)"


class PeerTarget(Target):
    """GlusterFS or SeaweedFS through ``../shared/peers/<name>/up.sh``."""

    up_timeout = 900.0

    def __init__(self, name: str, base: Path, peers_dir: Path = PEERS_DIR):
        super().__init__(name)
        self.kind = name
        self.scripts = peers_dir / name
        self.mnt = Path(tempfile.mkdtemp(prefix=f"andrew-{name}-", dir=base))
        self.started = False

    def start(self) -> None:
        up = self.scripts / "up.sh"
        if not up.exists():
            raise TargetUnavailable(f"{up} not found")
        self.started = True
        try:
            r = subprocess.run(["bash", str(up), str(self.mnt)], capture_output=True, text=True,
                               timeout=self.up_timeout)
        except subprocess.TimeoutExpired:
            raise TargetUnavailable(f"up.sh took over {self.up_timeout:.0f} s") from None
        if r.returncode != 0 or not is_mounted(self.mnt):
            raise TargetUnavailable(f"up.sh exit {r.returncode}: {(r.stderr or r.stdout)[-600:]}")
        self.path = self.mnt
        self.details["mountpoint"] = str(self.mnt)

    def stop(self) -> None:
        if self.started:
            self.started = False
            subprocess.run(["bash", str(self.scripts / "down.sh"), str(self.mnt), "--purge"],
                           capture_output=True, timeout=300)
        force_unmount(self.mnt)
        if not is_mounted(self.mnt):
            shutil.rmtree(self.mnt, ignore_errors=True)

    def label(self) -> str:
        return {"glusterfs": "GlusterFS replica 3 (loopback)",
                "seaweedfs": "SeaweedFS x3 (loopback)"}.get(self.name, self.name)
