"""``p2pfs demo MOUNTPOINT``: a whole p2pfs on this machine in one command.

It starts ``--nodes`` storage node processes on loopback (each: Tapestry
routing over TLS, an LMDB block store, replica repair), the first alone and
the rest joining through it; an inner ring of 3f+1 member processes (f=1:
PBFT over TLS, LMDB state) that certifies the volume's view and log-heads;
creates a network volume whose blocks are kept ``--replicas`` times on those
nodes; and mounts it at MOUNTPOINT in this process, in the foreground.
Ctrl-C (or SIGTERM, or ``p2pfs umount``) unmounts after a final sync, then
stops every process by PID and, unless ``--data`` was given, removes their
state.
"""

from __future__ import annotations

import functools
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import trio

from overlay.wire.ids import Identity
from storage.ring_local import LocalRing, MemberFailed

from .backend import BackendError
from .cluster import ClusterError, LocalCluster, python_module_argv
from .mount import MountError, check_mountpoint, serve
from .netbackend import NetworkBackend, mkfs_network

log = logging.getLogger(__name__)


class DemoError(Exception):
    """The demo could not start; the message says why."""


def _say(msg: str) -> None:
    print(f"p2pfs demo: {msg}", file=sys.stderr, flush=True)


def run_demo(mountpoint: str, *, nodes: int = 4, replicas: int = 3, data: str | None = None,
             debug: bool = False, ring_size: int = 4) -> int:
    if not 1 <= nodes <= 64:
        raise DemoError("--nodes must be in 1..64")
    if ring_size != 0 and (ring_size < 4 or (ring_size - 1) % 3):
        raise DemoError("--ring must be 0 (no inner ring: heads kept locally) or 3f+1 members "
                        "(4, 7, 10, ...)")
    if not 1 <= replicas <= min(nodes, 16):
        raise DemoError(f"--replicas must be in 1..{min(nodes, 16)} (at most one copy per node)")
    mp = Path(mountpoint)
    if not mp.exists():
        mp.mkdir(parents=True)
    try:
        check_mountpoint(mp)
    except MountError as e:
        raise DemoError(str(e)) from None
    base = Path(data) if data else Path(tempfile.mkdtemp(prefix="p2pfs-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    volume = base / "volume"
    if volume.exists() and data:
        raise DemoError(f"{volume} exists: give --data an empty directory")

    def argv_for(i, d, bootstrap):
        args = ["--listen", "127.0.0.1:0", "--data", str(d), "--r", str(replicas),
                "--log-level", "info"]
        for b in bootstrap:
            args += ["--bootstrap", b.info["bootstrap"]]
        return python_module_argv("storage", *args)

    cluster = LocalCluster(base / "nodes", argv_for)
    owner = Identity.generate()
    ring = LocalRing(base / "ring", owner=owner, name="demo",
                     f=max(1, (ring_size - 1) // 3)) if ring_size else None
    try:
        try:
            first = cluster.start_node(0)
            _say(f"node 1/{nodes} up at {first.addr} (id {first.id_hex[:8]})")
            for i in range(1, nodes):
                n = cluster.start_node(i, [first])
                _say(f"node {i + 1}/{nodes} joined at {n.addr} (id {n.id_hex[:8]})")
        except ClusterError as e:
            raise DemoError(str(e)) from None
        if ring is not None:
            try:
                trio.run(ring.start)
            except MemberFailed as e:
                raise DemoError(f"the inner ring did not start: {e}") from None
            _say(f"inner ring up: {ring.ring.n} members (f={ring.ring.f}), certifying "
                 f"log-heads and the view by PBFT")
        try:
            mkfs_network(volume, [first.info["bootstrap"]], r=replicas, name="demo",
                         identity=owner, ring=ring.ring if ring else None)
        except BackendError as e:
            raise DemoError(str(e)) from None
        _say(f"volume 'demo' created: blocks kept {replicas}x across {nodes} nodes")

        where = mp.resolve()  # before mounting: no blocking call on our own mount later

        async def main():
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(serve, NetworkBackend(volume), mp,
                                                      debug=debug))
                _say(f"mounted at {where}  (Ctrl-C to unmount and stop)")

        trio.run(main)
        _say("unmounted; stopping nodes")
        return 0
    finally:
        if ring is not None:
            ring.close()
        cluster.stop()
        if not data:
            shutil.rmtree(base, ignore_errors=True)
        _say(f"stopped {len(cluster.nodes)} node processes"
             + (f" and {len(ring.procs)} ring members" if ring else ""))
