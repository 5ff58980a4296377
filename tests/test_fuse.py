"""Real FUSE mounts of a single-node volume (p2pfs/fs.py, p2pfs/mount.py).

Each mount is ``python -m p2pfs.mount`` run as a child process; the tests
wait until the kernel lists the mount, then use ordinary system calls and
the tools people use on a file system (cp, mv, sed -i, vim, git, gcc).
Fixtures always unmount (``fusermount3 -u``, then lazily), stop the server
by its PID and remove their temp directories. Skipped where FUSE is not
usable (no /dev/fuse or fusermount3, or not root: the mount uses
``allow_other``)."""

import errno
import hashlib
import mmap
import os
import shutil
import socket
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from p2pfs.mount import is_live, is_mounted

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    not (os.path.exists("/dev/fuse") and shutil.which("fusermount3") and os.geteuid() == 0),
    reason="needs /dev/fuse, fusermount3 and root")


class Mount:
    """A ``python -m p2pfs.mount`` child serving ``vol`` at ``mnt``."""

    def __init__(self, vol: Path, mnt: Path, log: Path):
        self.vol, self.mnt, self.log = vol, mnt, log
        self.proc: subprocess.Popen | None = None

    def start(self, *extra: str) -> "Mount":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "p2pfs.mount", str(self.vol), str(self.mnt), *extra],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        deadline = time.monotonic() + 60
        while not is_live(self.mnt):  # not just listed: a stale mount is listed too
            if self.proc.poll() is not None:
                pytest.fail(f"mount exited with {self.proc.returncode}: {self.text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"not mounted after 60 s: {self.text()}")
            time.sleep(0.02)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def unmount(self) -> int:
        """Unmount cleanly; the server's exit code."""
        r = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return self.proc.wait(60)

    def cleanup(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True,
                           timeout=60)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        if is_mounted(self.mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True,
                           timeout=60)


@pytest.fixture
def tmp():
    d = Path(tempfile.mkdtemp(prefix="p2pfs-fuse-"))
    (d / "mnt").mkdir()
    yield d
    if not is_mounted(d / "mnt"):  # never delete through a live mount
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mount(tmp):
    """A fresh volume, mounted; unmounted and stopped whatever happens."""
    m = Mount(tmp / "vol", tmp / "mnt", tmp / "mount.log")
    try:
        yield m.start("--create")
    finally:
        m.cleanup()


@pytest.fixture(scope="module")
def shared():
    """One mount for the tests that only need a working file system."""
    d = Path(tempfile.mkdtemp(prefix="p2pfs-fuse-"))
    (d / "mnt").mkdir()
    m = Mount(d / "vol", d / "mnt", d / "mount.log")
    try:
        yield m.start("--create")
    finally:
        m.cleanup()
        if not is_mounted(d / "mnt"):
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def work(shared, request):
    """A directory of its own for each test in the shared mount."""
    d = shared.mnt / request.node.name.replace("/", "_")
    d.mkdir()
    return d


def run(cmd, cwd, **kw):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    return r.stdout


def fsync_write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def uncached_read(path: Path) -> bytes:
    """Read through the file system, not the kernel's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# POSIX operations


def test_files_dirs_links_and_attributes(work):
    f = work / "a.txt"
    f.write_bytes(b"hello")
    with open(f, "ab") as fh:
        fh.write(b" world")
    assert f.read_bytes() == b"hello world"
    st = f.stat()
    assert stat.S_ISREG(st.st_mode) and st.st_size == 11 and st.st_nlink == 1

    (work / "d" / "e").mkdir(parents=True)
    assert (work / "d").stat().st_nlink == 3
    os.symlink("a.txt", work / "s")
    assert os.readlink(work / "s") == "a.txt" and (work / "s").read_bytes() == b"hello world"
    assert stat.S_ISLNK(os.lstat(work / "s").st_mode)
    os.link(f, work / "hard")
    assert (work / "hard").stat().st_ino == f.stat().st_ino and f.stat().st_nlink == 2

    os.chmod(f, 0o751)
    assert stat.S_IMODE(f.stat().st_mode) == 0o751
    os.chown(f, 1234, 5678)
    assert (f.stat().st_uid, f.stat().st_gid) == (1234, 5678)
    os.truncate(f, 3)
    assert f.read_bytes() == b"hel"
    os.truncate(f, 6)
    assert f.read_bytes() == b"hel\0\0\0"
    os.utime(f, ns=(1_000_000_123, 2_000_000_456))
    assert (f.stat().st_atime_ns, f.stat().st_mtime_ns) == (1_000_000_123, 2_000_000_456)

    os.rename(work / "hard", work / "d" / "moved")
    assert (work / "d" / "moved").read_bytes() == b"hel\0\0\0"
    os.unlink(work / "d" / "moved")
    assert f.stat().st_nlink == 1
    os.rmdir(work / "d" / "e")
    assert sorted(os.listdir(work)) == ["a.txt", "d", "s"]
    assert os.statvfs(work).f_bavail > 0 and os.statvfs(work).f_namemax == 255


def test_fifos_sockets_and_device_nodes(work):
    """Only the inodes are stored; the kernel makes pipes, sockets and
    devices of them (a FIFO in the mount carries data between processes)."""
    os.mkfifo(work / "pipe", 0o640)
    assert stat.S_ISFIFO(os.lstat(work / "pipe").st_mode)
    assert stat.S_IMODE(os.lstat(work / "pipe").st_mode) == 0o640
    writer = subprocess.Popen(["sh", "-c", f"printf 'through the pipe' > {work / 'pipe'}"])
    try:
        with open(work / "pipe", "rb") as fh:
            assert fh.read() == b"through the pipe"
    finally:
        assert writer.wait(timeout=30) == 0
    os.mknod(work / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))   # like /dev/null
    st = os.lstat(work / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.mknod(work / "disk", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    assert stat.S_ISBLK(os.lstat(work / "disk").st_mode)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(work / "sock"))
        assert stat.S_ISSOCK(os.lstat(work / "sock").st_mode)
    finally:
        sock.close()
    os.link(work / "pipe", work / "pipe2")
    assert os.lstat(work / "pipe").st_nlink == 2
    os.rename(work / "sock", work / "sock2")
    for n in ("pipe", "pipe2", "null", "disk", "sock2"):
        os.unlink(work / n)
    assert os.listdir(work) == []


def test_errors_are_posix(work):
    (work / "d").mkdir()
    (work / "d" / "x").write_bytes(b"x")
    (work / "f").write_bytes(b"f")
    cases = [
        (errno.ENOENT, lambda: os.stat(work / "missing")),
        (errno.EEXIST, lambda: os.mkdir(work / "d")),
        (errno.EEXIST, lambda: os.open(work / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
        (errno.ENOTEMPTY, lambda: os.rmdir(work / "d")),
        (errno.EISDIR, lambda: os.unlink(work / "d")),
        (errno.ENOTDIR, lambda: os.listdir(work / "f")),
        (errno.ENAMETOOLONG, lambda: os.mkdir(work / ("n" * 256))),
        (errno.EINVAL, lambda: os.rename(work / "d", work / "d" / "inside")),
        (errno.ENODATA, lambda: os.getxattr(work / "f", "user.none")),
    ]
    for code, call in cases:
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == code, (code, ei.value)
    assert os.listdir(work / "d") == ["x"]  # nothing changed by the failures


def test_xattrs_and_info_attributes(work):
    f = work / "f"
    f.write_bytes(b"data")
    os.setxattr(f, "user.color", b"blue")
    os.setxattr(f, "user.empty", b"")
    assert os.getxattr(f, "user.color") == b"blue" and os.getxattr(f, "user.empty") == b""
    with pytest.raises(OSError) as ei:
        os.setxattr(f, "user.color", b"red", os.XATTR_CREATE)
    assert ei.value.errno == errno.EEXIST
    os.setxattr(f, "user.color", b"red", os.XATTR_REPLACE)
    assert sorted(os.listxattr(f)) == ["user.color", "user.empty"]
    os.removexattr(f, "user.empty")
    assert os.listxattr(f) == ["user.color"]
    # Read-only facts: readable, never listed, not settable.
    ino = f.stat().st_ino
    assert os.getxattr(f, "user.p2pfs.inode") == b"%#x" % ino
    assert os.getxattr(f, "user.p2pfs.replicas") == b"1"
    assert len(os.getxattr(f, "user.p2pfs.volume")) == 64
    assert len(os.getxattr(f, "user.p2pfs.writer")) == 64
    with pytest.raises(OSError) as ei:
        os.setxattr(f, "user.p2pfs.replicas", b"5")
    assert ei.value.errno == errno.EPERM


def test_o_trunc_truncates_in_the_volume(mount):
    """The kernel leaves O_TRUNC to the file system (atomic_o_trunc): the
    stored file must be cut, not only the kernel's cached size."""
    f = mount.mnt / "f"
    f.write_bytes(os.urandom(300_000))
    f.write_bytes(b"short")                     # open(O_WRONLY | O_TRUNC)
    fd = os.open(f, os.O_RDWR | os.O_TRUNC)
    os.close(fd)
    (mount.mnt / "g").write_bytes(b"x" * 1000)
    with open(mount.mnt / "g", "r+b") as fh:    # O_TRUNC with writes pending elsewhere
        fh.write(b"yyyy")
        fh.flush()
        fd = os.open(mount.mnt / "g", os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"zz")
        os.close(fd)
    assert mount.unmount() == 0
    mount.start()
    assert f.stat().st_size == 0 and f.read_bytes() == b""
    assert (mount.mnt / "g").read_bytes() == b"zz"


def test_rename_over_open_file_keeps_old_contents_for_readers(work):
    (work / "target").write_bytes(b"old contents")
    (work / "new").write_bytes(b"new contents")
    with open(work / "target", "rb") as old:
        os.rename(work / "new", work / "target")
        assert old.read() == b"old contents"
    assert (work / "target").read_bytes() == b"new contents"
    assert os.listdir(work) == ["target"]


def test_unlinked_open_file_stays_usable(work):
    fd = os.open(work / "tmp", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.unlink(work / "tmp")
        os.write(fd, b"still here")
        os.fsync(fd)
        assert os.pread(fd, 100, 0) == b"still here"
    finally:
        os.close(fd)
    assert os.listdir(work) == []


def test_mmap_and_interleaved_handles(work):
    f = work / "m"
    f.write_bytes(b"\0" * 8192)
    with open(f, "r+b") as fh, mmap.mmap(fh.fileno(), 8192) as m:
        m[100:105] = b"mmap!"
        m.flush()
    a = os.open(f, os.O_WRONLY)
    b = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        os.pwrite(a, b"A" * 10, 0)
        os.write(b, b"tail")
        os.pwrite(a, b"B", 5)
    finally:
        os.close(a)
        os.close(b)
    data = uncached_read(f)
    assert data[:10] == b"AAAAABAAAA" and data[100:105] == b"mmap!" and data[-4:] == b"tail"
    assert len(data) == 8196


def test_large_file_byte_identical(work):
    data = os.urandom(20 << 20)
    with open(work / "big", "wb") as fh:
        view = memoryview(data)
        for i in range(0, len(data), 1 << 20):
            fh.write(view[i:i + (1 << 20)])
        fh.flush()
        os.fsync(fh.fileno())
    assert (work / "big").stat().st_size == len(data)
    got = uncached_read(work / "big")
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    # A write in the middle of the file, off block boundaries.
    with open(work / "big", "r+b") as fh:
        fh.seek(3_000_001)
        fh.write(b"X" * 100_000)
    patched = data[:3_000_001] + b"X" * 100_000 + data[3_100_001:]
    assert hashlib.sha256(uncached_read(work / "big")).digest() == \
        hashlib.sha256(patched).digest()


def test_ten_thousand_entries_list(mount):
    work = mount.mnt
    d = work / "many"
    d.mkdir()
    names = [f"entry-{i:05d}" for i in range(10_000)]
    for n in names:
        os.symlink("target", d / n)
    assert sorted(os.listdir(d)) == names
    with os.scandir(d) as it:
        assert sum(1 for e in it if e.is_symlink()) == 10_000
    out = run(["ls", "-l", str(d)], cwd=work)
    assert out.count("-> target") == 10_000


# --------------------------------------------------------------------------
# What editors and tools do


def test_editor_save_patterns(work):
    f = work / "doc.txt"
    f.write_text("line one\n")
    os.chmod(f, 0o640)
    # write a temp file, fsync it, rename it over the original
    tmp = work / ".doc.txt.swp"
    fsync_write(tmp, b"line one\nline two\n")
    os.rename(tmp, f)
    assert f.read_text() == "line one\nline two\n"
    run(["sed", "-i", "s/two/2/", str(f)], cwd=work)
    assert f.read_text() == "line one\nline 2\n"
    run(["vim", "-u", "NONE", "-i", "NONE", "-es", "-c", "%s/one/1/", "-c", "wq", str(f)],
        cwd=work)
    assert f.read_text() == "line 1\nline 2\n"
    assert sorted(os.listdir(work)) == ["doc.txt"]


def test_cp_then_mv(work, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(300_000))
    run(["cp", str(src), "copy.tmp"], cwd=work)
    run(["mv", "copy.tmp", "copy.bin"], cwd=work)
    run(["cp", "-a", "copy.bin", "again.bin"], cwd=work)
    assert (work / "copy.bin").read_bytes() == src.read_bytes()
    assert (work / "again.bin").stat().st_mtime_ns == (work / "copy.bin").stat().st_mtime_ns
    assert sorted(os.listdir(work)) == ["again.bin", "copy.bin"]


def test_git_in_the_mount(work):
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org",
               GIT_CONFIG_NOSYSTEM="1", HOME=str(work))
    run(["git", "init", "-q"], cwd=work, env=env)
    (work / "README").write_text("hello\n")
    (work / "src").mkdir()
    (work / "src" / "run.sh").write_text("#!/bin/sh\necho ok\n")
    os.chmod(work / "src" / "run.sh", 0o755)
    run(["git", "add", "-A"], cwd=work, env=env)
    run(["git", "commit", "-q", "-m", "first"], cwd=work, env=env)
    (work / "README").write_text("hello again\n")
    run(["git", "commit", "-q", "-am", "second"], cwd=work, env=env)
    assert run(["git", "log", "--oneline"], cwd=work, env=env).count("\n") == 2
    assert run(["git", "status", "--porcelain"], cwd=work, env=env) == ""
    run(["git", "fsck", "--strict"], cwd=work, env=env)
    assert "100755" in run(["git", "ls-files", "-s", "src/run.sh"], cwd=work, env=env)


def test_gcc_builds_and_runs(work):
    (work / "hello.c").write_text('#include <stdio.h>\n'
                                  'int main(void) { puts("hello from p2pfs"); return 7; }\n')
    run(["gcc", "-O1", "-o", "hello", "hello.c"], cwd=work)
    assert os.stat(work / "hello").st_mode & 0o111
    r = subprocess.run([str(work / "hello")], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (7, "hello from p2pfs\n")


# --------------------------------------------------------------------------
# Mount lifecycle


def test_unmount_leaves_nothing_behind(mount):
    (mount.mnt / "f").write_bytes(b"x")
    pid = mount.proc.pid
    assert mount.unmount() == 0
    assert not is_mounted(mount.mnt)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert os.listdir(mount.mnt) == []
    assert "unmounted" in mount.text()


def test_sigterm_unmounts_after_a_final_sync(mount):
    (mount.mnt / "closed").write_bytes(b"closed file")
    os.mkdir(mount.mnt / "dir")          # metadata only: published by the final sync
    mount.proc.send_signal(signal.SIGTERM)
    assert mount.proc.wait(60) == 0
    assert not is_mounted(mount.mnt)
    mount.start()
    assert (mount.mnt / "closed").read_bytes() == b"closed file"
    assert (mount.mnt / "dir").is_dir()


def test_kill9_then_remount_clears_stale_mount(mount):
    data = os.urandom(200_000)
    fsync_write(mount.mnt / "synced", data)
    os.kill(mount.proc.pid, signal.SIGKILL)
    mount.proc.wait(30)
    with pytest.raises(OSError) as ei:
        os.stat(mount.mnt)
    assert ei.value.errno == errno.ENOTCONN
    mount.start()
    assert "stale mount" in mount.text()
    assert uncached_read(mount.mnt / "synced") == data
    assert mount.unmount() == 0


def test_bad_mount_points_and_busy_volume(mount, tmp):
    def refused(mp) -> str:
        r = subprocess.run([sys.executable, "-m", "p2pfs.mount", str(mount.vol), str(mp)],
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r.stderr
        return r.stderr

    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("x")
    (tmp / "file").write_text("x")
    assert "not empty" in refused(tmp / "full")
    assert "not a directory" in refused(tmp / "file")
    assert "does not exist" in refused(tmp / "missing")
    assert "already a mount point" in refused(mount.mnt)
    (tmp / "other").mkdir()
    assert "in use by another process" in refused(tmp / "other")
    assert not is_mounted(tmp / "other")


def test_full_store_is_enospc_and_keeps_what_was_stored(tmp):
    from p2pfs.backend import mkfs_local
    mkfs_local(tmp / "vol", quota=6 << 20)
    m = Mount(tmp / "vol", tmp / "mnt", tmp / "mount.log")
    try:
        m.start()
        keep = os.urandom(1 << 20)
        fsync_write(m.mnt / "kept", keep)
        with pytest.raises(OSError) as ei:
            with open(m.mnt / "huge", "wb") as fh:
                for _ in range(16):
                    fh.write(os.urandom(1 << 20))
                fh.flush()
                os.fsync(fh.fileno())
        assert ei.value.errno == errno.ENOSPC
        assert "ENOSPC" in m.text()
        assert uncached_read(m.mnt / "kept") == keep
        (m.mnt / "small").write_bytes(b"still works")
        assert m.unmount() == 0
    finally:
        m.cleanup()


async def test_two_writers_close_to_open(tmp):
    """The mount is one writer, a Namespace in this process another, sharing
    blocks and heads: what one closes, the other sees on its next open,
    through the kernel's caches (short timeouts, no write-back, the page
    cache dropped when the file changed elsewhere)."""
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

    def put(path, data):
        with open(path, "wb") as fh:
            fh.write(data)

    def get(path):
        with open(path, "rb") as fh:
            return fh.read()

    b = await Namespace.mount(view, other, blocks, board)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            mp = await nursery.start(serve, InProcess(), tmp / "mnt")
            try:
                await trio.to_thread.run_sync(put, mp / "from_a", b"A1")
                await b.refresh()
                a_file = await b.lookup(1, b"from_a")
                assert await b.read(a_file.ino, 0, 100) == b"A1"

                f = await b.create(1, b"from_b", 0o644, 0, 0)
                await b.write(f.ino, 0, b"B1")
                await b.sync()
                assert await trio.to_thread.run_sync(get, mp / "from_b") == b"B1"
                await b.write(f.ino, 0, b"B2, longer")
                await b.sync()
                assert await trio.to_thread.run_sync(get, mp / "from_b") == b"B2, longer"
                await b.setattr(f.ino, size=2)
                await b.sync()
                assert await trio.to_thread.run_sync(get, mp / "from_b") == b"B2"
                # Same size, mtime put back: only the inode's change time
                # tells the mount that its cached page is stale.
                before = await b.getattr(f.ino)
                await b.write(f.ino, 0, b"C3")
                await b.setattr(f.ino, mtime=before.mtime_ns)
                await b.sync()
                assert await trio.to_thread.run_sync(get, mp / "from_b") == b"C3"
            finally:
                await trio.to_thread.run_sync(
                    lambda: subprocess.run(["fusermount3", "-u", str(mp)], timeout=60))
    assert not is_mounted(tmp / "mnt")
