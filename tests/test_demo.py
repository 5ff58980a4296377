"""The front door, end to end: ``p2pfs demo MNT`` starts node processes on
loopback, mounts a network volume (r=3 over 4 nodes), serves ordinary file
I/O, and on SIGINT unmounts and stops every node it started."""

import os
import signal
import subprocess
import sys
import time

import pytest

from p2pfs.mount import is_mounted


def _children(pid: int) -> set[int]:
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.add(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.fixture
def demo(tmp_path):
    mnt = tmp_path / "mnt"
    data = tmp_path / "net"
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pfs", "demo", str(mnt), "--data", str(data)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while not is_mounted(mnt):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "demo did not mount in 90 s"
            time.sleep(0.1)
        yield proc, mnt, data
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_demo_mounts_serves_files_and_stops_cleanly(demo):
    proc, mnt, data = demo
    node_pids = _children(proc.pid)
    assert len(node_pids) >= 4, "expected the demo's node processes"
    payload = os.urandom(3 * 1024 * 1024 + 123)
    (mnt / "dir").mkdir()
    (mnt / "dir" / "blob").write_bytes(payload)
    (mnt / "small.txt").write_text("hello p2pfs\n")
    os.rename(mnt / "small.txt", mnt / "dir" / "renamed.txt")
    os.symlink("renamed.txt", mnt / "dir" / "link")
    assert (mnt / "dir" / "blob").read_bytes() == payload
    assert (mnt / "dir" / "link").read_text() == "hello p2pfs\n"
    assert sorted(os.listdir(mnt / "dir")) == ["blob", "link", "renamed.txt"]

    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "unmounted" in out and "stopped 4 node processes" in out
    assert not is_mounted(mnt)
    alive = [p for p in node_pids if os.path.exists(f"/proc/{p}")
             and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"node processes left running: {alive}"
    # The blocks really went to the nodes: their stores hold data now.
    stores = list(data.glob("nodes/node*/blocks*")) + list(data.glob("nodes/node*/store*"))
    assert stores, "no block store directories in the nodes' data"


def test_demo_refuses_bad_arguments(tmp_path):
    r = subprocess.run([sys.executable, "-m", "p2pfs", "demo", str(tmp_path / "m"), "-r", "9",
                        "-n", "4"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "--replicas must be in 1..4" in r.stderr and "Traceback" not in r.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    r = subprocess.run([sys.executable, "-m", "p2pfs", "demo", str(busy)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (busy / "file").read_text() == "x"


def _running(pids) -> list[int]:
    out = []
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(p)
        except OSError:
            pass
    return out


def test_demo_killed_outright_leaves_no_process(demo):
    """kill -9 of the demo gives its node and ring processes no chance to be
    stopped; they notice their lifeline cut and stop themselves."""
    proc, mnt, data = demo
    children = _children(proc.pid)
    assert len(children) >= 8, "expected 4 node and 4 ring member processes"
    proc.kill()
    proc.wait()
    try:
        deadline = time.monotonic() + 30
        while _running(children) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(children), f"left running after the demo died: {_running(children)}"
    finally:
        for p in _running(children):     # only those we saw started, by PID
            os.kill(p, signal.SIGKILL)
    # The dead mount is a stale mount; the fixture clears it (as the next
    # mount would).


def test_lifeline_in_a_plain_child(tmp_path):
    """overlay.lifeline alone: a child that watches its lifeline gets
    SIGTERM once the parent's end closes, and not before."""
    from overlay.lifeline import Lifeline
    line = Lifeline()
    code = ("import signal, sys, time\n"
            "from overlay.lifeline import watch_parent\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('term', flush=True), sys.exit(3)))\n"
            "assert watch_parent()\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env=line.env(dict(os.environ)), pass_fds=line.pass_fds)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        assert child.poll() is None, "stopped while the lifeline was intact"
        line.close()
        assert child.wait(timeout=10) == 3
        assert child.stdout.read().strip() == "term"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
