"""The namespace API (storage/namespace.py): POSIX semantics and errors of
every operation, on one writer over the in-process block store."""

import errno
import os
import stat

import pytest

from overlay.wire.ids import Identity
from storage.blockapi import MAX_BLOCK
from storage.fs_errors import FsError
from storage.localblocks import MemoryBlockAccess
from storage.logs import MemoryHeadBoard
from storage.namespace import (INLINE_MAX, RENAME_EXCHANGE, RENAME_NOREPLACE, XATTR_CREATE,
                               XATTR_REPLACE, Namespace)
from storage.volume import create_volume

ROOT = 1


@pytest.fixture
async def ns():
    ident = Identity.from_seed(b"namespace tests")
    view, key = create_volume(ident, "t")
    return await Namespace.mount(view, ident, MemoryBlockAccess(key), MemoryHeadBoard())


def err(code):
    """pytest.raises for an FsError with this errno."""

    class _Check:
        def __enter__(self):
            self.cm = pytest.raises(FsError)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            r = self.cm.__exit__(*exc)
            assert self.info.value.errno == code, (
                f"expected {errno.errorcode[code]}, got "
                f"{errno.errorcode.get(self.info.value.errno)}: {self.info.value}")
            return r

    return _Check()


async def mkfile(ns, name, data=b"", parent=ROOT):
    a = await ns.create(parent, name, 0o644, 1000, 100)
    if data:
        await ns.write(a.ino, 0, data)
    return a.ino


async def test_lookup_and_getattr(ns):
    with err(errno.ENOENT):
        await ns.lookup(ROOT, b"nope")
    f = await mkfile(ns, b"f")
    with err(errno.ENOTDIR):
        await ns.lookup(f, b"x")
    with err(errno.ENAMETOOLONG):
        await ns.lookup(ROOT, b"x" * 256)
    d = await ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    assert (await ns.lookup(d.ino, b".")).ino == d.ino
    assert (await ns.lookup(d.ino, b"..")).ino == ROOT
    assert (await ns.lookup(ROOT, "f")).ino == f          # str names work
    with err(errno.ENOENT):
        await ns.getattr(123456)
    root = await ns.getattr(ROOT)
    assert stat.S_ISDIR(root.mode) and root.nlink == 3


async def test_create_and_mkdir(ns):
    a = await ns.create(ROOT, b"f", 0o100640, 1000, 100)
    assert a.mode == stat.S_IFREG | 0o640 and (a.uid, a.gid, a.nlink, a.size) == (1000, 100, 1, 0)
    with err(errno.EEXIST):
        await ns.create(ROOT, b"f", 0o644, 0, 0)
    with err(errno.EEXIST):
        await ns.mkdir(ROOT, b"f", 0o755, 0, 0)
    with err(errno.ENOTDIR):
        await ns.create(a.ino, b"g", 0o644, 0, 0)
    with err(errno.ENOENT):
        await ns.create(999999, b"g", 0o644, 0, 0)
    with err(errno.ENAMETOOLONG):
        await ns.create(ROOT, b"n" * 256, 0o644, 0, 0)
    with err(errno.EINVAL):
        await ns.create(ROOT, b"a/b", 0o644, 0, 0)
    with err(errno.EEXIST):
        await ns.mkdir(ROOT, b"..", 0o755, 0, 0)
    await ns.create(ROOT, b"n" * 255, 0o644, 0, 0)
    d = await ns.mkdir(ROOT, b"d", 0o2755, 5, 6)
    assert d.mode == stat.S_IFDIR | 0o2755 and d.nlink == 2
    assert (await ns.getattr(ROOT)).nlink == 3
    before = (await ns.getattr(d.ino)).mtime_ns
    await ns.create(d.ino, b"inner", 0o644, 0, 0)
    assert (await ns.getattr(d.ino)).mtime_ns >= before


async def test_mknod_stores_fifos_sockets_and_devices(ns):
    a = await ns.mknod(ROOT, b"plain", stat.S_IFREG | 0o600, 0, 1, 2)
    assert a.mode == stat.S_IFREG | 0o600 and a.rdev == 0
    made = {}
    for name, mode, rdev in [(b"fifo", stat.S_IFIFO | 0o640, 0),
                             (b"sock", stat.S_IFSOCK | 0o600, 0),
                             (b"chr", stat.S_IFCHR | 0o620, os.makedev(4, 64)),
                             (b"blk", stat.S_IFBLK | 0o660, os.makedev(259, 3))]:
        made[name] = await ns.mknod(ROOT, name, mode, rdev, 5, 6)
        assert (made[name].mode, made[name].rdev, made[name].uid) == (mode, rdev, 5)
    # A FIFO given a device number does not keep it; no type is not a directory.
    assert (await ns.mknod(ROOT, b"fifo2", stat.S_IFIFO | 0o600, 99, 0, 0)).rdev == 0
    for bad in (stat.S_IFDIR, stat.S_IFLNK):
        with err(errno.EINVAL):
            await ns.mknod(ROOT, b"nope", bad | 0o600, 0, 0, 0)
    with err(errno.EEXIST):
        await ns.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o600, 0, 0, 0)
    l = await ns.link(made[b"chr"].ino, ROOT, b"chr-again")
    assert l.nlink == 2 and l.rdev == os.makedev(4, 64)
    await ns.rename(ROOT, b"sock", ROOT, b"sock2")
    await ns.setattr(made[b"blk"].ino, mode=0o600)
    await ns.sync()
    # Replayed from the log by a fresh mount, and kept in a snapshot.
    for snap in (False, True):
        if snap:
            assert await ns.snapshot() is not None
        again = await Namespace.mount(ns.view, ns.identity, ns.blocks, ns.board)
        if snap:
            assert again.snapshot_used is not None
        got = {n: await again.lookup(ROOT, n) for n in (b"fifo", b"sock2", b"chr", b"blk")}
        assert got[b"fifo"].mode == stat.S_IFIFO | 0o640
        assert got[b"sock2"].mode == stat.S_IFSOCK | 0o600
        assert (got[b"chr"].mode, got[b"chr"].rdev, got[b"chr"].nlink) == (
            stat.S_IFCHR | 0o620, os.makedev(4, 64), 2)
        assert (got[b"blk"].mode, got[b"blk"].rdev) == (stat.S_IFBLK | 0o600,
                                                          os.makedev(259, 3))
        assert again.replica.current.canonical()[0] == ns.replica.current.canonical()[0]


async def test_symlinks(ns):
    s = await ns.symlink(ROOT, b"ln", b"../some/where", 7, 8)
    assert stat.S_ISLNK(s.mode) and s.size == len(b"../some/where") and s.uid == 7
    assert await ns.readlink(s.ino) == b"../some/where"
    f = await mkfile(ns, b"f")
    with err(errno.EINVAL):
        await ns.readlink(f)
    with err(errno.ENOENT):
        await ns.symlink(ROOT, b"empty", b"", 0, 0)
    with err(errno.ENAMETOOLONG):
        await ns.symlink(ROOT, b"long", b"x" * 4097, 0, 0)
    with err(errno.EEXIST):
        await ns.symlink(ROOT, b"ln", b"t", 0, 0)


async def test_hard_links(ns):
    f = await mkfile(ns, b"f", b"shared")
    a = await ns.link(f, ROOT, b"g")
    assert a.nlink == 2 and a.ino == f
    d = await ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    with err(errno.EPERM):
        await ns.link(d.ino, ROOT, b"d2")
    with err(errno.EEXIST):
        await ns.link(f, ROOT, b"d")
    await ns.unlink(ROOT, b"f")
    assert (await ns.getattr(f)).nlink == 1
    assert await ns.read((await ns.lookup(ROOT, b"g")).ino, 0, 10) == b"shared"


async def test_unlink_and_rmdir(ns):
    with err(errno.ENOENT):
        await ns.unlink(ROOT, b"nope")
    d = await ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    with err(errno.EISDIR):
        await ns.unlink(ROOT, b"d")
    with err(errno.EISDIR):
        await ns.unlink(d.ino, b".")
    f = await mkfile(ns, b"f", parent=d.ino)
    with err(errno.ENOTDIR):
        await ns.rmdir(d.ino, b"f")
    with err(errno.ENOTEMPTY):
        await ns.rmdir(ROOT, b"d")
    with err(errno.EINVAL):
        await ns.rmdir(d.ino, b".")
    with err(errno.ENOTEMPTY):
        await ns.rmdir(d.ino, b"..")
    with err(errno.ENOENT):
        await ns.rmdir(ROOT, b"nope")
    await ns.unlink(d.ino, b"f")
    with err(errno.ENOENT):
        await ns.getattr(f)
    await ns.rmdir(ROOT, b"d")
    assert await ns.readdir(ROOT) == [] and (await ns.getattr(ROOT)).nlink == 2


async def test_rename(ns):
    a = await mkfile(ns, b"a", b"AAA")
    b = await mkfile(ns, b"b", b"BBB")
    with err(errno.ENOENT):
        await ns.rename(ROOT, b"zz", ROOT, b"y")
    await ns.rename(ROOT, b"a", ROOT, b"b")                 # over an existing file
    assert [n for n, _ in await ns.readdir(ROOT)] == [b"b"]
    assert (await ns.lookup(ROOT, b"b")).ino == a
    with err(errno.ENOENT):
        await ns.getattr(b)
    d1 = await ns.mkdir(ROOT, b"d1", 0o755, 0, 0)
    d2 = await ns.mkdir(ROOT, b"d2", 0o755, 0, 0)
    sub = await ns.mkdir(d1.ino, b"sub", 0o755, 0, 0)
    with err(errno.EINVAL):
        await ns.rename(ROOT, b"d1", sub.ino, b"x")          # into its own subtree
    with err(errno.EINVAL):
        await ns.rename(ROOT, b"d1", d1.ino, b"x")
    with err(errno.EISDIR):
        await ns.rename(ROOT, b"b", ROOT, b"d1")             # file over directory
    with err(errno.ENOTDIR):
        await ns.rename(ROOT, b"d2", ROOT, b"b")             # directory over file
    with err(errno.ENOTEMPTY):
        await ns.rename(ROOT, b"d2", ROOT, b"d1")            # over a non-empty directory
    with err(errno.EINVAL):
        await ns.rename(ROOT, b".", ROOT, b"x")
    await ns.rename(d1.ino, b"sub", ROOT, b"d2")             # over an empty directory
    assert (await ns.lookup(ROOT, b"d2")).ino == sub.ino
    assert (await ns.getattr(d1.ino)).nlink == 2
    assert (await ns.lookup(sub.ino, b"..")).ino == ROOT
    # across directories, and back
    await ns.rename(ROOT, b"b", d1.ino, b"moved")
    assert await ns.read((await ns.lookup(d1.ino, b"moved")).ino, 0, 9) == b"AAA"
    # hard links to one file: nothing happens
    await ns.link(a, d1.ino, b"alias")
    await ns.rename(d1.ino, b"moved", d1.ino, b"alias")
    assert [n for n, _ in await ns.readdir(d1.ino)] == [b"alias", b"moved"]
    # same name: nothing happens
    await ns.rename(d1.ino, b"moved", d1.ino, b"moved")


async def test_rename_flags(ns):
    a = await mkfile(ns, b"a", b"A")
    b = await mkfile(ns, b"b", b"B")
    with err(errno.EEXIST):
        await ns.rename(ROOT, b"a", ROOT, b"b", RENAME_NOREPLACE)
    await ns.rename(ROOT, b"a", ROOT, b"c", RENAME_NOREPLACE)
    await ns.rename(ROOT, b"c", ROOT, b"b", RENAME_EXCHANGE)
    assert (await ns.lookup(ROOT, b"b")).ino == a and (await ns.lookup(ROOT, b"c")).ino == b
    with err(errno.ENOENT):
        await ns.rename(ROOT, b"b", ROOT, b"nope", RENAME_EXCHANGE)
    d = await ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    await ns.rename(ROOT, b"d", ROOT, b"b", RENAME_EXCHANGE)  # dir <-> file
    assert (await ns.lookup(ROOT, b"b")).ino == d.ino
    with err(errno.EINVAL):
        await ns.rename(ROOT, b"b", ROOT, b"c", RENAME_EXCHANGE | RENAME_NOREPLACE)
    with err(errno.EINVAL):
        await ns.rename(ROOT, b"b", ROOT, b"c", 8)


async def test_setattr_and_truncate(ns):
    f = await mkfile(ns, b"f", b"0123456789")
    a = await ns.setattr(f, mode=0o100600, uid=1, gid=2)
    assert a.mode == stat.S_IFREG | 0o600 and (a.uid, a.gid) == (1, 2)
    a = await ns.setattr(f, size=4)
    assert a.size == 4 and await ns.read(f, 0, 100) == b"0123"
    a = await ns.setattr(f, size=8)
    assert await ns.read(f, 0, 100) == b"0123\0\0\0\0"
    a = await ns.setattr(f, atime=5, mtime=6)
    assert (a.atime_ns, a.mtime_ns) == (5, 6)
    d = await ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    with err(errno.EISDIR):
        await ns.setattr(d.ino, size=0)
    with err(errno.EINVAL):
        await ns.setattr(f, size=-1)
    with err(errno.EFBIG):
        await ns.setattr(f, size=2**63)
    s = await ns.symlink(ROOT, b"s", b"t", 0, 0)
    with err(errno.EINVAL):
        await ns.setattr(s.ino, size=0)
    assert (await ns.setattr(f)).size == 8      # nothing to change


async def test_read_write_across_block_boundaries(ns):
    f = await mkfile(ns, b"big")
    ref = bytearray()

    async def w(off, data):
        assert await ns.write(f, off, data) == len(data)
        if len(ref) < off + len(data):
            ref.extend(bytes(off + len(data) - len(ref)))
        ref[off:off + len(data)] = data

    await w(65000, bytes(range(256)) * 800)                 # 204800 bytes, 4+ blocks
    await w(0, b"head")
    await w(MAX_BLOCK - 3, b"straddle")                     # inline across a boundary
    await w(130000, b"Z" * (INLINE_MAX + 1))                # block write inside block data
    await w(400000, b"tail")                                # leaves a hole
    assert (await ns.getattr(f)).size == len(ref) == 400004
    for off, n in [(0, 10), (65530, 20), (MAX_BLOCK - 10, 30), (129990, 9000),
                   (269000, 200000), (0, 10**6), (400003, 5), (500000, 10)]:
        assert await ns.read(f, off, n) == bytes(ref[off:off + n]), (off, n)
    await ns.sync()
    ns._data.clear()                                       # force fetches from blocks
    assert await ns.read(f, 0, 10**6) == bytes(ref)
    await ns.setattr(f, size=66000)
    del ref[66000:]
    assert await ns.read(f, 0, 10**6) == bytes(ref)
    d = await ns.mkdir(ROOT, b"d", 0o755, 0, 0)
    with err(errno.EISDIR):
        await ns.read(d.ino, 0, 1)
    with err(errno.EISDIR):
        await ns.write(d.ino, 0, b"x")
    with err(errno.EINVAL):
        await ns.write(f, -1, b"x")
    with err(errno.EFBIG):
        await ns.write(f, 2**63 - 2, b"xyz")
    assert await ns.write(f, 5, b"") == 0


async def test_open_unlinked_file_stays_readable(ns):
    f = await mkfile(ns, b"f", b"still here")
    await ns.open(f)
    await ns.unlink(ROOT, b"f")
    assert await ns.read(f, 0, 100) == b"still here"
    await ns.write(f, 0, b"STILL")
    assert await ns.read(f, 0, 100) == b"STILL here"
    await ns.release(f)
    with err(errno.ENOENT):
        await ns.getattr(f)


async def test_xattrs(ns):
    f = await mkfile(ns, b"f")
    with err(errno.ENODATA):
        await ns.getxattr(f, b"user.a")
    await ns.setxattr(f, b"user.a", b"1")
    await ns.setxattr(f, "user.b", b"")
    assert await ns.getxattr(f, b"user.a") == b"1" and await ns.getxattr(f, "user.b") == b""
    assert await ns.listxattr(f) == [b"user.a", b"user.b"]
    with err(errno.EEXIST):
        await ns.setxattr(f, b"user.a", b"2", XATTR_CREATE)
    with err(errno.ENODATA):
        await ns.setxattr(f, b"user.c", b"2", XATTR_REPLACE)
    await ns.setxattr(f, b"user.a", b"2", XATTR_REPLACE)
    assert await ns.getxattr(f, b"user.a") == b"2"
    await ns.removexattr(f, b"user.a")
    with err(errno.ENODATA):
        await ns.removexattr(f, b"user.a")
    with err(errno.ERANGE):
        await ns.setxattr(f, b"u" * 256, b"")
    with err(errno.E2BIG):
        await ns.setxattr(f, b"user.big", bytes(16 * 1024 + 1))
    await ns.setxattr(ROOT, b"user.dir", b"ok")
    assert await ns.listxattr(ROOT) == [b"user.dir"]


async def test_statfs_and_readdir(ns):
    for n in (b"c", b"a", b"b"):
        await mkfile(ns, n)
    assert [n for n, _ in await ns.readdir(ROOT)] == [b"a", b"b", b"c"]
    with err(errno.ENOTDIR):
        await ns.readdir((await ns.lookup(ROOT, b"a")).ino)
    s = await ns.statfs()
    assert s.namemax == 255 and s.bsize > 0 and s.bfree <= s.blocks and s.files >= 4


async def test_read_your_writes_then_survive_a_remount(ns):
    f = await mkfile(ns, b"f", b"x" * 20000)
    await ns.mkdir(ROOT, b"d", 0o700, 0, 0)
    assert await ns.read(f, 0, 5) == b"xxxxx"               # before any sync
    await ns.fsync(f)
    again = await Namespace.mount(ns.view, ns.identity, ns.blocks, ns.board)
    assert [n for n, _ in await again.readdir(ROOT)] == [b"d", b"f"]
    assert await again.read(f, 0, 30000) == b"x" * 20000


async def test_group_commit_of_many_records_never_overfills_a_log_block(ns):
    # Regression: a large queue of small records once made the block envelope
    # exceed MAX_BLOCK at commit, wedging the writer's log.
    for i in range(10_000):
        await ns.symlink(ROOT, f"l{i:05d}", "t" * (1 + i % 40), 0, 0)
    await ns.sync()
    names = [n for n, _ in await ns.readdir(ROOT)]
    assert len(names) == 10_000 and names[0] == b"l00000"
    assert await ns.readlink((await ns.lookup(ROOT, "l09999")).ino) == b"t" * (1 + 9999 % 40)
