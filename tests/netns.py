"""A multi-host test lab made of Linux network namespaces (issue 10: real
faults for the invariants of DESIGN.md "What must always hold").

Topology: a star. A hub namespace holds a bridge ``br0``; every host is a
namespace of its own with one interface ``eth0``, the far end of a veth pair
whose near end ``v<N>`` is a port of the bridge. Hosts get addresses
``10.A.B.N/24`` in a randomly chosen subnet that exists only inside these
namespaces: the root namespace (where the test runs) gets no interface, no
address and no route, so nothing leaves the lab and nothing outside can
reach into it. The test talks to its node processes through their unix
control sockets (the file system is shared; only the network is not), and
runs client code inside a host with :meth:`Lab.run_in`.

Faults, all real kernel state:

* :meth:`Lab.cut` / :meth:`Lab.heal`: the host's bridge port goes down (its
  ``eth0`` loses carrier): packets to and from it are dropped silently, as
  with a pulled cable, and TCP connections stall rather than reset;
* :meth:`Lab.partition` / :meth:`Lab.heal_partition`: groups of hosts are
  moved to bridges of their own (``br1``, ...): each group still reaches its
  members, nothing crosses between groups.

Processes run inside a host with ``ip netns exec`` (which execs, so the
PID we hold is the node's own): :meth:`Lab.argv` gives the command line, for
``p2pfs.cluster.LocalCluster`` or ``subprocess``.

Cleanup always happens (:meth:`Lab.close`, also from ``__exit__`` and at
interpreter exit): any process still inside one of our namespaces is stopped
by its PID (SIGTERM, then SIGKILL), then our namespaces are deleted, which
removes their veths and bridges with them. Only names this lab created are
touched (``p2pfs-<random>-...``), never another run's.

Where namespaces cannot be made (not root, no ``ip``, a kernel or container
that refuses, or ``P2PFS_NO_NETNS=1`` in the environment), :func:`open_lab`
returns a :class:`LoopbackLab` instead: every
host is the root namespace with its own 127.0.0.x address, nothing can be
cut, and :meth:`LoopbackLab.require_faults` skips a test with the reason
("loopback-only fallback: ...").
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pytest
import trio

log = logging.getLogger("tests.netns")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
PREFIX = "p2pfs"


class LabError(Exception):
    """A lab command failed (``ip`` refused); the message has its stderr."""


@dataclass
class Host:
    """One machine of the lab: a namespace (None in a loopback lab), its
    address, and its bridge port."""

    name: str
    index: int
    ns: str | None
    addr: str
    port: str | None = None            # the hub-side veth
    bridge: str = "br0"
    up: bool = True

    def listen(self, port: int = 7000) -> str:
        """A HOST:PORT to listen on (port 0 in a loopback lab: hosts share it)."""
        return f"{self.addr}:{port if self.ns else 0}"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be used here, or None if they can
    (checked by making and deleting one)."""
    if os.environ.get("P2PFS_NO_NETNS"):
        return "P2PFS_NO_NETNS is set"
    if os.name != "posix" or not os.path.exists("/proc/self/ns/net"):
        return "not Linux"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "not root (namespaces, veths and bridges need CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = f"{PREFIX}-{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", probe)
    except (LabError, OSError, subprocess.SubprocessError) as e:
        return f"cannot create a network namespace: {e}"
    try:
        _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        _ip("-n", probe, "link", "add", "b0", "type", "bridge")
    except LabError as e:
        return f"cannot create veth pairs or bridges: {e}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


class Lab:
    """Hosts in network namespaces around a bridge (module docstring)."""

    faults = True

    def __init__(self, tag: str | None = None):
        self.tag = tag or secrets.token_hex(3)
        # A random 10.A.B.0/24, used only inside these namespaces.
        a, b = secrets.randbelow(200) + 20, secrets.randbelow(250) + 1
        self.subnet = f"10.{a}.{b}"
        self.hub = f"{PREFIX}-{self.tag}-hub"
        self.hosts: list[Host] = []
        self._namespaces: list[str] = []
        self._bridges = ["br0"]
        self._procs: list[subprocess.Popen] = []
        self._closed = False
        self._netns(self.hub)
        self._hub("link", "add", "br0", "type", "bridge")
        self._hub("link", "set", "br0", "up")
        atexit.register(self.close)

    # ------------------------------------------------------------- building

    def _netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def _hub(self, *args: str) -> None:
        _ip("-n", self.hub, *args)

    def add_host(self, name: str | None = None) -> Host:
        """A new host on ``br0`` with the next address of the subnet."""
        i = len(self.hosts) + 1
        if i > 250:
            raise LabError("a lab has at most 250 hosts")
        ns = f"{PREFIX}-{self.tag}-{i}"
        self._netns(ns)
        port = f"v{i}"
        self._hub("link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._hub("link", "set", port, "master", "br0", "up")
        addr = f"{self.subnet}.{i}"
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        h = Host(name or f"h{i}", i, ns, addr, port)
        self.hosts.append(h)
        return h

    # ------------------------------------------------------------- processes

    def argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` inside ``host``."""
        return ["ip", "netns", "exec", host.ns, *argv]

    def netns_argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` with ``host``'s network but
        this process's mount namespace (``nsenter --net``; ``ip netns exec``
        gives the process a mount namespace of its own, so a FUSE mount made
        inside would be invisible here). nsenter execs: the PID is the
        program's own."""
        return ["nsenter", f"--net={os.path.join(NETNS_DIR, host.ns)}", "--", *argv]

    def spawn(self, host: Host, argv: Sequence[str], **popen: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``host``; the lab stops it at close if the
        caller has not."""
        p = subprocess.Popen(self.argv(host, argv), **popen)
        self._procs.append(p)
        return p

    def run_in(self, host: Host, fn: Callable, *args: Any) -> Any:
        """Run ``trio.run(fn, *args)`` with ``host``'s network: in a thread
        of its own that enters the namespace (a network namespace is per
        thread) and then ends, so no other code ever runs in it. Blocking:
        from trio, call it through ``trio.to_thread.run_sync``."""
        out: dict = {}

        def body():
            try:
                _enter(host.ns)
                out["value"] = trio.run(fn, *args)
            except BaseException as e:   # handed to the caller below
                out["error"] = e

        t = threading.Thread(target=body, name=f"netns-{host.name}", daemon=True)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out.get("value")

    # ------------------------------------------------------------- faults

    def require_faults(self) -> None:
        """Namespaces are real: links can be cut (see LoopbackLab)."""

    def cut(self, host: Host) -> None:
        """Pull the host's cable: its bridge port goes down."""
        self._hub("link", "set", host.port, "down")
        host.up = False

    def heal(self, host: Host) -> None:
        self._hub("link", "set", host.port, "up")
        host.up = True

    def partition(self, *groups: Sequence[Host]) -> None:
        """Split the network: each group after the first moves to a bridge
        of its own; hosts not named stay with the first group on br0."""
        for gi, group in enumerate(groups):
            br = f"br{gi}"
            if br not in self._bridges:
                self._hub("link", "add", br, "type", "bridge")
                self._hub("link", "set", br, "up")
                self._bridges.append(br)
            for h in group:
                if h.bridge != br:
                    self._hub("link", "set", h.port, "master", br)
                    h.bridge = br

    def heal_partition(self) -> None:
        """Every host back on br0."""
        for h in self.hosts:
            if h.bridge != "br0":
                self._hub("link", "set", h.port, "master", "br0")
                h.bridge = "br0"

    # ------------------------------------------------------------- cleanup

    def pids(self) -> list[int]:
        """PIDs of every process inside one of our host namespaces."""
        out = []
        for ns in self._namespaces:
            r = _ip("netns", "pids", ns, check=False)
            out += [int(x) for x in r.stdout.split() if x.isdigit()]
        return out

    def close(self, grace: float = 5.0) -> None:
        """Stop what runs inside (by PID) and delete our namespaces. Safe to
        call twice, and after a failure halfway through construction."""
        if self._closed:
            return
        self._closed = True
        for p in self._procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace
        for p in self._procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        # Anything else started in our namespaces (by a LocalCluster, say)
        # and still alive: the namespace is ours, so the process is too.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = self.pids()
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            end = time.monotonic() + grace
            while left and time.monotonic() < end:
                time.sleep(0.05)
                left = self.pids()
            if not left:
                break
        for ns in reversed(self._namespaces):
            r = _ip("netns", "del", ns, check=False)
            if r.returncode != 0:
                log.warning("could not delete namespace %s: %s", ns, r.stderr.strip())
        self._namespaces.clear()
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001 - interpreter shutting down
            pass

    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LoopbackLab(Lab):
    """The fallback without namespaces: every host is this machine, with an
    address of its own in 127.0.0.0/8; nothing can be cut."""

    faults = False

    def __init__(self, reason: str):
        self.reason = reason
        self.tag = "loopback"
        self.subnet = "127.0.0"
        self.hosts = []
        self._namespaces = []
        self._procs = []
        self._closed = False

    def add_host(self, name: str | None = None) -> Host:
        i = len(self.hosts) + 1
        h = Host(name or f"h{i}", i, None, f"127.0.0.{i}")
        self.hosts.append(h)
        return h

    def argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def netns_argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def run_in(self, host: Host, fn: Callable, *args: Any) -> Any:
        out: dict = {}

        def body():
            try:
                out["value"] = trio.run(fn, *args)
            except BaseException as e:
                out["error"] = e

        t = threading.Thread(target=body, daemon=True)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out.get("value")

    def require_faults(self) -> None:
        pytest.skip(f"loopback-only fallback: {self.reason}; links cannot be cut here")

    def cut(self, *hosts: Any) -> None:
        self.require_faults()

    heal = partition = heal_partition = cut

    def pids(self) -> list[int]:
        return []


def open_lab() -> Lab:
    """A namespace lab, or the loopback fallback with the reason why."""
    reason = unavailable_reason()
    if reason is not None:
        log.warning("network namespaces unavailable (%s): loopback-only fallback", reason)
        return LoopbackLab(reason)
    return Lab()


_libc = None


def _enter(ns: str) -> None:
    """Move the calling thread into network namespace ``ns``."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


__all__ = ["Lab", "LoopbackLab", "Host", "LabError", "open_lab", "unavailable_reason"]
