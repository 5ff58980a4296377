"""Time travel and file facts through a real FUSE mount (p2pfs/fs_history.py,
p2pfs/fs.py; storage/timetravel.py and storage/facts.py underneath).

``.snapshots`` in the mount root is hidden from the root's listing but
reachable by name; it lists ``latest`` and every version, each a read-only
tree of the volume as it was. Files carry read-only, unlisted
``user.p2pfs.*`` facts and the root the volume's conflicts as JSON.
Mounts are the child processes and fixtures of tests/test_fuse.py (always
unmounted, stopped by PID); the conflict test serves the mount in this
process next to a second writer, as test_fuse's two-writer test does; the
holders test runs ``p2pfs demo`` (node processes on loopback, r=3) and
stops it with SIGINT, then by PID."""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
from test_fuse import mount, run, tmp, uncached_read  # noqa: F401 - fixtures

from p2pfs.mount import is_mounted
from storage.timenames import parse_time

pytestmark = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and shutil.which("fusermount3") and os.geteuid() == 0),
    reason="needs /dev/fuse, fusermount3 and root")

HEX = set("0123456789abcdef")


def put(path, data: bytes) -> None:
    """Write and close: one close is one published change."""
    with open(path, "wb") as fh:
        fh.write(data)


def refused(call, code=errno.EROFS) -> None:
    with pytest.raises(OSError) as ei:
        call()
    assert ei.value.errno == code, (call, ei.value)


def versions(snap) -> list[str]:
    """The version names listed in .snapshots, oldest first."""
    def order(name):
        ms, rank = parse_time(name)
        return ms, rank or 1    # "...123Z", then "...123Z~2"

    return sorted((n for n in os.listdir(snap) if n != "latest"), key=order)


# --------------------------------------------------------------------------
# Browsing past versions


def test_snapshots_show_every_closed_version(mount):
    mnt = mount.mnt
    snap = mnt / ".snapshots"
    big_old, big_new = os.urandom(3 << 20), os.urandom(3 << 20)
    put(mnt / "f", b"one")
    put(mnt / "big", big_old)
    (mnt / "d").mkdir()
    put(mnt / "d" / "g", b"in a directory")
    put(mnt / "f", b"two, longer")
    put(mnt / "big", big_new)
    os.unlink(mnt / "d" / "g")
    put(mnt / "last", b"")          # a close publishes the unlink too

    # Hidden from the root's listing, reachable by name.
    assert ".snapshots" not in os.listdir(mnt)
    assert stat.S_ISDIR(os.stat(snap).st_mode)
    assert ".snapshots" not in run(["find", str(mnt)], cwd=mnt)
    names = versions(snap)
    assert "latest" in os.listdir(snap) and len(names) >= 5
    assert all(parse_time(n) is not None for n in names)
    assert os.readlink(snap / "latest") == names[-1]
    listing = run(["ls", "-la", str(snap)], cwd=mnt)
    assert "latest -> " + names[-1] in listing and names[0] in listing

    # Every state of f in order, each version a whole tree of its time.
    seen = []
    for n in names:
        p = snap / n / "f"
        state = p.read_bytes() if p.exists() else None
        if not seen or seen[-1] != state:
            seen.append(state)
    assert seen == [None, b"one", b"two, longer"]
    olds = [n for n in names if (snap / n / "d" / "g").exists()]
    old = olds[0]       # g was made after f's first and before its second version
    assert (snap / old / "d" / "g").read_bytes() == b"in a directory"
    assert (snap / old / "f").read_bytes() == b"one"
    assert uncached_read(snap / old / "big") == big_old
    assert uncached_read(snap / "latest" / "big") == big_new
    assert (snap / "latest" / "f").read_bytes() == b"two, longer"
    assert sorted(os.listdir(snap / "latest")) == ["big", "d", "f", "last"]

    # Attributes are those of then, under numbers of their own.
    live, past = os.stat(mnt / "f"), os.stat(snap / old / "f")
    assert stat.S_IMODE(past.st_mode) == stat.S_IMODE(live.st_mode) and past.st_size == 3
    assert past.st_ino != live.st_ino
    assert (snap / old / "d" / "..").resolve() == snap / old

    # Ordinary tools: diff against the live tree (.snapshots is not walked).
    r = subprocess.run(["diff", "-r", str(snap / old), str(mnt)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and "Only in" in r.stdout
    run(["diff", "-r", str(snap / "latest"), str(mnt)], cwd=mnt)
    copy = mount.vol.parent / "restored"
    run(["cp", "-a", str(snap / old), str(copy)], cwd=mnt)
    assert (copy / "f").read_bytes() == b"one" and (copy / "big").read_bytes() == big_old

    # After the kernel forgets every inode, versions are found again.
    subprocess.run(["sync"], timeout=60)
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("2\n")
    assert (snap / old / "f").read_bytes() == b"one"
    assert versions(snap)[:len(names)] == names


def test_time_names_resolve_as_of_an_instant(mount):
    mnt = mount.mnt
    snap = mnt / ".snapshots"
    put(mnt / "f", b"x")
    newest = os.readlink(snap / "latest")
    assert stat.S_ISDIR(os.lstat(snap / newest).st_mode)     # the exact name: the version
    day = datetime.now(timezone.utc).date()
    tomorrow = (day + timedelta(days=1)).isoformat()
    assert os.readlink(snap / tomorrow) == newest      # "as of" an instant: a symlink
    assert (snap / tomorrow / "f").read_bytes() == b"x"
    assert tomorrow not in os.listdir(snap)            # reachable, not listed
    refused(lambda: os.stat(snap / (day - timedelta(days=1)).isoformat()), errno.ENOENT)
    refused(lambda: os.stat(snap / "not-a-time"), errno.ENOENT)
    refused(lambda: os.stat(snap / (newest + "~99")), errno.ENOENT)


def test_snapshots_are_read_only(mount):
    mnt = mount.mnt
    snap = mnt / ".snapshots"
    put(mnt / "f", b"data")
    (mnt / "d").mkdir()
    put(mnt / "d" / "x", b"x")
    v = snap / "latest"
    f = v / "f"
    cases = [
        lambda: put(f, b"new"),
        lambda: os.open(f, os.O_WRONLY),
        lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
        lambda: put(v / "new", b"new"),
        lambda: os.mkdir(v / "newdir"),
        lambda: os.mkdir(snap / "newdir"),
        lambda: os.symlink("f", v / "s"),
        lambda: os.unlink(f),
        lambda: os.unlink(v / "d" / "x"),
        lambda: os.rmdir(v / "d"),
        lambda: os.rename(f, v / "g"),
        lambda: os.rename(mnt / "f", v / "f2"),
        lambda: os.rename(v / "d" / "x", mnt / "stolen"),
        lambda: os.link(f, mnt / "hard"),
        lambda: os.link(mnt / "f", v / "hard"),
        lambda: os.chmod(f, 0o600),
        lambda: os.chown(f, 1, 1),
        lambda: os.truncate(f, 0),
        lambda: os.utime(f, ns=(1, 1)),
        lambda: os.setxattr(f, "user.x", b"1"),
        lambda: os.removexattr(f, "user.x"),
        lambda: os.rmdir(snap),
        lambda: os.rename(snap, mnt / "elsewhere"),
        lambda: os.rename(mnt / "d", snap),
    ]
    for call in cases:
        refused(call)
    refused(lambda: os.mkdir(snap), errno.EEXIST)
    refused(lambda: os.open(snap, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), errno.EEXIST)
    refused(lambda: os.symlink("f", snap), errno.EEXIST)
    # Nothing changed, in the past or now; reading still works.
    assert f.read_bytes() == b"data" and (mnt / "f").read_bytes() == b"data"
    assert sorted(os.listdir(v)) == ["d", "f"] and sorted(os.listdir(mnt)) == ["d", "f"]
    assert os.listxattr(f) == [] and os.listxattr(snap) == []
    assert stat.S_IMODE(os.stat(v).st_mode) & 0o222 == 0
    st = os.statvfs(snap)
    assert st.f_namemax == 255


# --------------------------------------------------------------------------
# Facts


def test_facts_of_files_are_read_only_and_unlisted(mount):
    mnt = mount.mnt
    f = mnt / "f"
    put(f, os.urandom(2 << 20))
    os.setxattr(f, "user.mine", b"1")

    def fact(name, path=f) -> str:
        return os.getxattr(path, "user.p2pfs." + name).decode()

    volume, writer, version = fact("volume"), fact("writer"), fact("version")
    assert len(volume) == 64 and set(volume) <= HEX
    assert len(writer) == 64 and set(writer) <= HEX
    assert fact("inode") == "%#x" % f.stat().st_ino
    w, seq = version.split(":")
    assert w == writer and int(seq) > 0
    assert parse_time(fact("changed")) is not None
    blocks = fact("blocks").split()
    assert blocks and all(len(b) == 64 for b in blocks) and fact("inline") == "0"
    assert fact("replicas") == "1" and fact("backend")
    every = json.loads(fact("facts"))
    assert every["version"] == version and every["volume"] == volume
    assert every["replicas"] == 1
    refused(lambda: os.getxattr(f, "user.p2pfs.holders"), errno.ENODATA)  # one local store
    refused(lambda: os.getxattr(f, "user.p2pfs.nothing"), errno.ENODATA)
    assert os.listxattr(f) == ["user.mine"]
    refused(lambda: os.setxattr(f, "user.p2pfs.version", b"x"), errno.EPERM)
    refused(lambda: os.removexattr(f, "user.p2pfs.version"), errno.EPERM)
    # cp -a copies the file's own attributes only.
    run(["cp", "-a", str(f), str(mnt / "copy")], cwd=mnt)
    copied = os.listxattr(mnt / "copy")
    assert "user.mine" in copied and not any(n.startswith("user.p2pfs.") for n in copied)
    assert fact("inode", mnt / "copy") != fact("inode")

    # A later change: a later version; the past file keeps its facts.
    put(f, b"small now")
    w2, seq2 = fact("version").split(":")
    assert w2 == writer and int(seq2) > int(seq)
    assert fact("inline") == "9" and fact("blocks") == ""
    snap = mnt / ".snapshots"
    olds = [n for n in versions(snap)
            if (snap / n / "f").exists() and (snap / n / "f").stat().st_size == 2 << 20]
    past = snap / olds[-1] / "f"
    pw, pseq = fact("version", past).split(":")
    assert pw == writer and int(seq) <= int(pseq) < int(seq2)
    assert fact("point-vv", past) == fact("point-vv", snap / olds[-1])
    assert int(pseq) <= int(fact("point-vv", past).split(":")[1])
    assert fact("point", past) == olds[-1] and fact("volume", past) == volume
    assert json.loads(fact("facts", past))["point"] == olds[-1]
    assert fact("blocks", past).split() == blocks
    assert os.listxattr(past) == ["user.mine"] and os.getxattr(past, "user.mine") == b"1"

    # The root: facts and the (empty) conflict list.
    assert fact("writer", mnt) == "root"
    assert json.loads(os.getxattr(mnt, "user.p2pfs.conflicts")) == []
    assert fact("conflict-count", mnt) == "0"
    refused(lambda: os.getxattr(f, "user.p2pfs.conflicts"), errno.ENODATA)
    refused(lambda: os.setxattr(mnt, "user.p2pfs.conflicts", b"[]"), errno.EPERM)
    assert os.listxattr(mnt) == []


# --------------------------------------------------------------------------
# Conflicts, with a second writer


async def test_conflicting_creates_are_listed_on_the_root(tmp):  # noqa: F811
    """The mount (writer A) and a Namespace in this process (writer B) both
    create ``same`` without seeing each other: one keeps the name, the other
    gets a conflict name, and the root's ``user.p2pfs.conflicts`` says so."""
    import contextlib

    import trio

    from overlay.wire.ids import Identity
    from p2pfs.backend import Backend, Session
    from p2pfs.mount import serve
    from storage.localblocks import MemoryBlockAccess
    from storage.logs import MemoryHeadBoard
    from storage.namespace import Namespace
    from storage.volume import create_volume

    owner, other = Identity.generate(), Identity.generate()
    view, key = create_volume(owner, "shared")
    view = view.add_writer(owner, key, other.public_key)
    blocks, board = MemoryBlockAccess(key), MemoryHeadBoard()

    class InProcess(Backend):
        @contextlib.asynccontextmanager
        async def attach(self, **kw):
            yield Session(owner, view, blocks, board, replicas=1, description="in-process")

    def conflicts(mp):
        os.listdir(mp)      # opendir: take in the other writer's records
        return json.loads(os.getxattr(mp, "user.p2pfs.conflicts"))

    b = await Namespace.mount(view, other, blocks, board)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            mp = await nursery.start(serve, InProcess(), tmp / "mnt")
            try:
                assert await trio.to_thread.run_sync(conflicts, mp) == []
                await trio.to_thread.run_sync(put, mp / "same", b"from A")
                f = await b.create(1, b"same", 0o644, 0, 0)     # B has not refreshed
                await b.write(f.ino, 0, b"from B")
                await b.sync()
                found = await trio.to_thread.run_sync(conflicts, mp)
                assert len(found) == 1, found
                c = found[0]
                assert c["kind"] == "name" and c["name"] == "same" and c["path"] == "/same"
                assert c["copy_name"] and c["copy_path"] == "/" + c["copy_name"]
                assert {c["winner"]["writer"], c["loser"]["writer"]} == \
                    {owner.id.hex(), other.id.hex()}
                for side in (c["winner"], c["loser"]):
                    assert side["did"] == "link same" and parse_time(side["time"])

                def after():    # in a thread: this process serves the mount
                    names = sorted(os.listdir(mp))
                    return (names, {(mp / n).read_bytes() for n in names},
                            os.getxattr(mp, "user.p2pfs.conflict-count"),
                            sorted(os.listdir(mp / ".snapshots" / "latest")))

                names, both, count, latest = await trio.to_thread.run_sync(after)
                assert names == sorted(["same", c["copy_name"]]) == latest
                assert both == {b"from A", b"from B"} and count == b"1"
            finally:
                await trio.to_thread.run_sync(
                    lambda: subprocess.run(["fusermount3", "-u", str(mp)], timeout=60))
    assert not is_mounted(tmp / "mnt")


# --------------------------------------------------------------------------
# Replica holders, on a network volume


@pytest.fixture
def demo(tmp_path):
    """``p2pfs demo``: 4 node processes, r=3, mounted at tmp_path/mnt."""
    mnt = tmp_path / "mnt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pfs", "demo", str(mnt), "--data", str(tmp_path / "net")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 90
        while not is_mounted(mnt):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "demo did not mount in 90 s"
            time.sleep(0.1)
        yield mnt
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
        if is_mounted(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def test_holders_of_each_block_on_a_network_volume(demo):
    f = demo / "f"
    data = os.urandom(300_000)
    put(f, data)
    blocks = os.getxattr(f, "user.p2pfs.blocks").decode().split()
    assert blocks and os.getxattr(f, "user.p2pfs.replicas") == b"3"
    # Holders publish their pointers in the background: ask until all show.
    deadline = time.monotonic() + 60
    while True:
        lines = os.getxattr(f, "user.p2pfs.holders").decode().splitlines()
        held = {g: ids.split(",") for g, ids in (ln.split(": ") for ln in lines)}
        assert sorted(held) == sorted(blocks)
        if all(len(set(ids)) == 3 and "-" not in ids for ids in held.values()):
            break
        assert time.monotonic() < deadline, lines
        time.sleep(2)
    assert all(len(i) == 64 and set(i) <= HEX for ids in held.values() for i in ids)
    # A past version of a network volume reads back too.
    put(f, b"changed")
    old = [n for n in versions(demo / ".snapshots")
           if (demo / ".snapshots" / n / "f").exists()
           and (demo / ".snapshots" / n / "f").stat().st_size == len(data)]
    assert uncached_read(demo / ".snapshots" / old[-1] / "f") == data
