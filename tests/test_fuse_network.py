"""A network volume through a real FUSE mount (``p2pfs mount`` processes):
5 storage node processes, r=3, a 4-member inner ring. What was fsync'd
survives kill -9 of the mounting process, and files stay readable after two
storage nodes are killed (every block keeps at least one of its 3 holders).
Every process is stopped by PID; mounts are unmounted at teardown."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults_lib import unmount_process
from overlay.wire.ids import Identity
from p2pfs.cluster import LocalCluster, NodeProcess, python_module_argv
from p2pfs.mount import is_live
from p2pfs.netbackend import mkfs_network
from storage.ring_local import LocalRing

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and shutil.which("fusermount3") and os.geteuid() == 0),
    reason="needs /dev/fuse, fusermount3 and root")


def argv_for(index, data, bootstrap: list[NodeProcess]):
    args = ["--data", str(data), "--listen", "127.0.0.1:0", "--no-fsync"]
    for b in bootstrap:
        args += ["--bootstrap", b.info["bootstrap"]]
    return python_module_argv("storage", *args)


class MountProc:
    def __init__(self, vol: Path, mnt: Path, log: Path):
        self.vol, self.mnt, self.log = vol, mnt, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MountProc":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "p2pfs", "mount", str(self.vol), str(self.mnt)],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        deadline = time.monotonic() + 90
        while not is_live(self.mnt):
            if self.proc.poll() is not None:
                pytest.fail(f"mount exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"not mounted in 90 s: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> int | None:
        return unmount_process(self.proc, self.mnt, 60)


@pytest.fixture
def network(tmp_path):
    cluster = LocalCluster(tmp_path / "nodes", argv_for, ready_timeout=60)
    owner = Identity.generate()
    ring = LocalRing(tmp_path / "ring", owner=owner, args=["--no-sync"], name="t")
    try:
        cluster.start(5)
        import trio
        trio.run(ring.start)
        vol = tmp_path / "vol"
        mkfs_network(vol, [cluster.nodes[0].info["bootstrap"]], r=3, name="net",
                     identity=owner, ring=ring.ring)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        yield cluster, vol, mnt
    finally:
        ring.close()
        cluster.stop()


def test_fsynced_data_survives_kill9_of_the_mount_and_two_storage_nodes(network, tmp_path):
    cluster, vol, mnt = network
    m = MountProc(vol, mnt, tmp_path / "mount.log").start()
    try:
        payload = os.urandom(2 * 1024 * 1024 + 4321)          # 33 data blocks
        with open(mnt / "big.bin", "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        (mnt / "docs").mkdir()
        with open(mnt / "docs" / "note.txt", "w") as f:
            f.write("kept\n")
            f.flush()
            os.fsync(f.fileno())
        os.kill(m.proc.pid, signal.SIGKILL)                    # the client dies
        m.proc.wait(30)
        m.stop()                                               # clear the dead mount

        for n in cluster.nodes[1:3]:                           # and two storage nodes
            cluster.kill(n)

        m = MountProc(vol, mnt, tmp_path / "mount2.log").start()
        got = (mnt / "big.bin").read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        assert (mnt / "docs" / "note.txt").read_text() == "kept\n"
        (mnt / "after.txt").write_text("writes go on with 3 of 5 nodes\n")
        assert (mnt / "after.txt").read_text() == "writes go on with 3 of 5 nodes\n"
        assert m.stop() == 0
    finally:
        m.stop()
