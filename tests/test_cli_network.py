"""The multi-writer workflow through the ``p2pfs`` command, as an operator
would run it, with real processes and real FUSE mounts:

    p2pfs init (two users) -> p2pfs ring-member --init (4 members)
    -> p2pfs ring-init -> p2pfs ring-member (4 processes) -> p2pfs mkfs --ring
    -> p2pfs add-writer -> p2pfs join -> p2pfs mount (twice) -> p2pfs status

Storage nodes are ``python -m storage`` processes. Everything started is
stopped by PID; mounts are unmounted at teardown."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from p2pfs.cluster import LocalCluster, NodeProcess, python_module_argv
from p2pfs.mount import is_live, is_mounted
from storage.ring_local import free_ports

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and shutil.which("fusermount3") and os.geteuid() == 0),
    reason="needs /dev/fuse, fusermount3 and root")


def p2pfs(*args: str, home: Path | None = None, check: bool = True, timeout: float = 120):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if home is not None:
        env["P2PFS_HOME"] = str(home)
    r = subprocess.run([sys.executable, "-m", "p2pfs", *args], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=timeout)
    if check:
        assert r.returncode == 0, f"p2pfs {' '.join(args)}: {r.returncode}\n{r.stderr}"
    return r


def argv_for(index, data, bootstrap: list[NodeProcess]):
    args = ["--data", str(data), "--listen", "127.0.0.1:0", "--no-fsync"]
    for b in bootstrap:
        args += ["--bootstrap", b.info["bootstrap"]]
    return python_module_argv("storage", *args)


class Procs:
    """Background processes of one test, stopped by PID."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, argv, log: Path, home: Path | None = None) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        if home is not None:
            env["P2PFS_HOME"] = str(home)
        with open(log, "ab") as out:
            p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=out, env=env, cwd=ROOT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()


def wait_mounted(mnt: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 90
    while not is_live(mnt):
        if proc.poll() is not None:
            pytest.fail(f"mount exited with {proc.returncode}: {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"not mounted after 90 s: {log.read_text()[-3000:]}")
        time.sleep(0.05)


def unmount(mnt: Path, proc: subprocess.Popen) -> int:
    r = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return proc.wait(120)


def test_two_users_share_a_volume_through_the_cli(tmp_path):
    base = tmp_path
    cluster = LocalCluster(base / "nodes", argv_for, ready_timeout=60)
    procs = Procs()
    mounts: list[Path] = []
    try:
        cluster.start(4)
        bootstrap = cluster.nodes[0].info["bootstrap"]
        owner_home, writer_home = base / "owner", base / "writer"
        p2pfs("init", home=owner_home)
        out = p2pfs("init", home=writer_home).stdout
        writer_key = out.split("public key: ")[1].split()[0]

        members = []
        for k, port in enumerate(free_ports(4)):
            d = base / f"member{k}"
            info = json.loads(p2pfs("ring-member", "--data", str(d), "--init").stdout)
            members.append((d, f"{info['key']}@127.0.0.1:{port}"))
        ring_json = base / "ring.json"
        args = ["ring-init", "-o", str(ring_json)]
        for _, m in members:
            args += ["--member", m]
        p2pfs(*args, home=owner_home)
        assert p2pfs(*args, home=owner_home, check=False).returncode == 1   # never overwritten
        for d, _ in members:
            p = procs.start([sys.executable, "-m", "p2pfs", "ring-member", "--data", str(d),
                             "--ring", str(ring_json), "--no-sync"], base / f"{d.name}.log")
            assert json.loads(p.stdout.readline())["ready"]

        va, vb = base / "vol-a", base / "vol-b"
        p2pfs("mkfs", str(va), "--bootstrap", bootstrap, "--ring", str(ring_json),
              "--name", "team", home=owner_home)
        ticket = base / "ticket.json"
        p2pfs("add-writer", str(va), writer_key, "--ticket", str(ticket), home=owner_home)
        r = p2pfs("add-writer", str(va), "00" * 32, "--ticket", str(base / "t2"), check=False)
        assert r.returncode == 1 and "writer" in r.stderr        # not a valid Ed25519 key
        p2pfs("join", str(ticket), str(vb), home=writer_home)

        ma, mb = base / "mnt-a", base / "mnt-b"
        ma.mkdir()
        mb.mkdir()
        pa = procs.start([sys.executable, "-m", "p2pfs", "mount", str(va), str(ma)],
                         base / "mount-a.log", home=owner_home)
        mounts.append(ma)
        pb = procs.start([sys.executable, "-m", "p2pfs", "mount", str(vb), str(mb)],
                         base / "mount-b.log", home=writer_home)
        mounts.append(mb)
        wait_mounted(ma, pa, base / "mount-a.log")
        wait_mounted(mb, pb, base / "mount-b.log")

        (ma / "plan.txt").write_text("owner's plan\n")           # close: certified
        assert (mb / "plan.txt").read_text() == "owner's plan\n"
        (mb / "notes").mkdir()
        payload = os.urandom(300_000)
        (mb / "notes" / "data.bin").write_bytes(payload)
        assert (ma / "notes" / "data.bin").read_bytes() == payload
        with open(ma / "plan.txt", "a") as f:
            f.write("amended by the owner\n")
        assert (mb / "plan.txt").read_text() == "owner's plan\namended by the owner\n"

        st = json.loads(p2pfs("status", str(va), "--json").stdout)
        assert st["ring"]["healthy"] and st["ring"]["members_up"] == 4
        assert [w["certified_heads"] >= 1 for w in st["writers"]] == [True, True]
        human = p2pfs("status", str(vb)).stdout
        assert "4/4 members up" in human and "(owner)" in human

        assert json.loads(p2pfs("conflicts", str(ma), "--json").stdout) == []
        assert p2pfs("conflicts", str(mb)).stdout.strip() == "no conflicts"
        r = p2pfs("conflicts", str(base), check=False)
        assert r.returncode == 1 and "p2pfs mount point" in r.stderr

        writer_id = next(w["id"] for w in st["writers"] if not w["owner"])
        out = p2pfs("remove-writer", str(va), writer_id[:12], home=owner_home).stdout
        assert "removed writer" in out
        deadline = time.monotonic() + 30           # the mounts adopt the new view
        while True:
            try:
                (mb / "late.txt").write_text("after removal\n")
            except OSError as e:
                # ENOENT: written just before the mount adopted the view,
                # then dropped with the records past the writer's last seq.
                assert e.errno in (errno.EROFS, errno.ENOENT), e
                if e.errno == errno.EROFS:
                    break
            assert time.monotonic() < deadline, "the removed writer can still write"
            time.sleep(0.5)
        assert (mb / "plan.txt").read_text().startswith("owner's plan")   # still readable
        # Records after its last counted seq are ignored by every reader once
        # it has the new view (each mount polls for it: within VIEW_POLL s,
        # so A may still show what B wrote before B itself adopted it).
        deadline = time.monotonic() + 30
        while (ma / "late.txt").exists():
            assert time.monotonic() < deadline, "A still shows what the removed writer wrote"
            time.sleep(0.5)
        st = json.loads(p2pfs("status", str(va), "--json").stdout)
        assert [w["active"] for w in st["writers"]] == [True, False]

        assert unmount(ma, pa) == 0
        assert unmount(mb, pb) == 0
        assert not is_mounted(ma) and not is_mounted(mb)
    finally:
        for m in mounts:
            if is_mounted(m):
                subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)
        procs.stop()
        cluster.stop()
