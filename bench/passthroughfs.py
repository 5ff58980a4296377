"""A minimal pass-through FUSE file system on pyfuse3 and trio: the
"FUSE + Python" baseline of the benchmarks.

    python bench/passthroughfs.py SRC MOUNTPOINT [cache options]

It mirrors the directory SRC at MOUNTPOINT, in the foreground, until SIGTERM
or SIGINT, and then unmounts. Benchmarks compare p2pfs against it to separate
what FUSE and Python cost from what p2pfs itself costs (DESIGN.md
"Performance budget", column "pyfuse3 pass-through").

Inode-based, like libfuse's ``passthrough_ll``: every inode the kernel knows
holds an ``O_PATH`` descriptor of the host inode, and each operation works
relative to it (``openat``, ``mkdirat``, ``renameat``, ...), so names are
resolved one component at a time and no long host path is ever built. A
host inode (device, number) maps to exactly one FUSE inode number; the
descriptor stays open until the kernel forgets the inode, which also keeps
the host from reusing that inode number meanwhile.

Kernel caching: the same settings a p2pfs mount with one active writer
uses (``p2pfs/fs.py`` ``CachePolicy.for_writers(True)``, ``p2pfs/mount.py``),
since a benchmark mounts its volume once; recorded in every benchmark result
via ``cache_settings()``:

- entry and attribute timeouts ``ENTRY_TIMEOUT`` / ``ATTR_TIMEOUT`` seconds;
- negative lookups cached for ``NEGATIVE_TIMEOUT`` seconds (0 = not cached);
- ``keep_cache`` on open: the page cache survives close and reopen;
- the kernel's write-back cache (small writes are merged in the page cache);
- read-ahead of ``READ_AHEAD_KB`` KiB (the kernel's default is 128).

Mounted with ``default_permissions`` (the kernel checks modes),
``allow_other`` (other users reach the mount; fine for root), ``nosuid`` and
``nodev``, as p2pfs is.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import logging
import os
import resource
import signal
import stat
import sys
from dataclasses import dataclass

import pyfuse3
import trio

log = logging.getLogger("passthroughfs")

# The single-writer policy of p2pfs (p2pfs/fs.py CachePolicy.for_writers(True)
# and p2pfs/mount.py), which is what a benchmark's one mount of a volume gets;
# tests/test_bench_andrew.py fails when the two drift apart.
ENTRY_TIMEOUT = 60.0
ATTR_TIMEOUT = 60.0
NEGATIVE_TIMEOUT = 60.0
KEEP_CACHE = True
WRITEBACK_CACHE = True
READ_AHEAD_KB = 4096
MOUNT_OPTIONS = ("default_permissions", "allow_other", "nosuid", "nodev")


def cache_settings(entry=ENTRY_TIMEOUT, attr=ATTR_TIMEOUT, negative=NEGATIVE_TIMEOUT,
                   keep_cache=KEEP_CACHE, writeback=WRITEBACK_CACHE,
                   read_ahead_kb=READ_AHEAD_KB) -> dict:
    return {"entry_timeout": entry, "attr_timeout": attr, "negative_timeout": negative,
            "keep_cache": keep_cache, "writeback_cache": writeback,
            "read_ahead_kb": read_ahead_kb, "mount_options": list(MOUNT_OPTIONS)}


def _errno(fn):
    """The one error boundary: a host OSError becomes the same errno for the
    kernel; anything else is a bug, logged, and EIO for that request only
    (pyfuse3 would otherwise end the main loop)."""
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        except Exception:
            log.exception("%s%r failed", fn.__name__, args[1:])
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def _proc(fd: int) -> str:
    # An O_PATH descriptor names its inode for calls that have no *at form
    # taking an empty path in Python (chmod, chown, utime, truncate, open).
    return f"/proc/self/fd/{fd}"


@dataclass
class _Node:
    fd: int          # O_PATH descriptor of the host inode
    key: tuple       # (st_dev, st_ino) on the host
    nlookup: int


class PassthroughFS(pyfuse3.Operations):
    """Operations over a host directory; see the module docstring."""

    supports_dot_lookup = False  # no NFS export: the kernel never asks for "." or ".."

    def __init__(self, src: str, *, entry_timeout=ENTRY_TIMEOUT, attr_timeout=ATTR_TIMEOUT,
                 negative_timeout=NEGATIVE_TIMEOUT, keep_cache=KEEP_CACHE,
                 writeback=WRITEBACK_CACHE):
        super().__init__()
        self.enable_writeback_cache = writeback
        self.entry_timeout, self.attr_timeout = entry_timeout, attr_timeout
        self.negative_timeout, self.keep_cache = negative_timeout, keep_cache
        fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
        st = os.fstat(fd)
        root = _Node(fd, (st.st_dev, st.st_ino), 1)
        self._nodes: dict[int, _Node] = {pyfuse3.ROOT_INODE: root}
        self._by_key: dict[tuple, int] = {root.key: pyfuse3.ROOT_INODE}
        self._next_ino = pyfuse3.ROOT_INODE + 1
        self._dirs: dict[int, tuple[int, list[bytes]]] = {}  # handle -> (inode, names)
        self._next_dh = 1
        self._euid, self._egid = os.geteuid(), os.getegid()
        self.mounted = False

    # ------------------------------------------------------------ inodes

    def _fd(self, inode: int) -> int:
        try:
            return self._nodes[inode].fd
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None

    def _attr(self, inode: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.generation = 0
        a.entry_timeout, a.attr_timeout = self.entry_timeout, self.attr_timeout
        a.st_mode, a.st_nlink = st.st_mode, st.st_nlink
        a.st_uid, a.st_gid, a.st_rdev = st.st_uid, st.st_gid, st.st_rdev
        a.st_size, a.st_blksize, a.st_blocks = st.st_size, st.st_blksize, st.st_blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return a

    def _remember(self, parent_fd: int, name: bytes) -> pyfuse3.EntryAttributes:
        """Open ``name`` under the parent as O_PATH, register it (one more
        kernel lookup reference) and return its attributes."""
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=parent_fd)
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        inode = self._by_key.get(key)
        if inode is not None:
            os.close(fd)
            self._nodes[inode].nlookup += 1
        else:
            inode, self._next_ino = self._next_ino, self._next_ino + 1
            self._nodes[inode] = _Node(fd, key, 1)
            self._by_key[key] = inode
        return self._attr(inode, st)

    def _own(self, parent_fd: int, name: bytes, ctx) -> None:
        # We run as root: new entries belong to the caller, as on a local disk.
        if (ctx.uid, ctx.gid) != (self._euid, self._egid):
            os.chown(name, ctx.uid, ctx.gid, dir_fd=parent_fd, follow_symlinks=False)

    async def forget(self, inode_list):
        for inode, n in inode_list:
            node = self._nodes.get(inode)
            if node is None or inode == pyfuse3.ROOT_INODE:
                continue
            node.nlookup -= n
            if node.nlookup <= 0:
                del self._nodes[inode]
                del self._by_key[node.key]
                os.close(node.fd)

    def close_all(self) -> None:
        """Close every host descriptor (after unmount, forgets may be missing)."""
        for node in self._nodes.values():
            os.close(node.fd)
        self._nodes.clear()
        self._by_key.clear()

    # ------------------------------------------------------------ names

    @_errno
    async def lookup(self, parent_inode, name, ctx):
        pfd = self._fd(parent_inode)
        if name == b"." or (name == b".." and parent_inode == pyfuse3.ROOT_INODE):
            self._nodes[parent_inode].nlookup += 1
            return self._attr(parent_inode, os.fstat(pfd))
        try:
            return self._remember(pfd, name)
        except FileNotFoundError:
            if self.negative_timeout <= 0:
                raise
            a = pyfuse3.EntryAttributes()
            a.st_ino = 0  # cached as absent for entry_timeout
            a.entry_timeout = self.negative_timeout
            return a

    @_errno
    async def getattr(self, inode, ctx):
        return self._attr(inode, os.fstat(self._fd(inode)))

    @_errno
    async def setattr(self, inode, attr, fields, fh, ctx):
        fd = self._fd(inode)
        st = os.fstat(fd)
        is_link = stat.S_ISLNK(st.st_mode)
        if fields.update_mode:
            if is_link:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            os.chmod(_proc(fd), stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            if is_link:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            os.chown(_proc(fd), attr.st_uid if fields.update_uid else -1,
                     attr.st_gid if fields.update_gid else -1)
        if fields.update_size:
            if fh is not None:
                os.ftruncate(fh, attr.st_size)
            else:
                os.truncate(_proc(fd), attr.st_size)
        if fields.update_atime or fields.update_mtime:
            if is_link:
                raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
            # Python's utime has no UTIME_OMIT: keep the unchanged one as it is.
            os.utime(_proc(fd), ns=(attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                                    attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns))
        return self._attr(inode, os.fstat(fd))

    @_errno
    async def readlink(self, inode, ctx):
        return os.readlink(b"", dir_fd=self._fd(inode))

    @_errno
    async def mkdir(self, parent_inode, name, mode, ctx):
        pfd = self._fd(parent_inode)
        os.mkdir(name, mode, dir_fd=pfd)
        self._own(pfd, name, ctx)
        return self._remember(pfd, name)

    @_errno
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        pfd = self._fd(parent_inode)
        os.mknod(name, mode, rdev, dir_fd=pfd)
        self._own(pfd, name, ctx)
        return self._remember(pfd, name)

    @_errno
    async def symlink(self, parent_inode, name, target, ctx):
        pfd = self._fd(parent_inode)
        os.symlink(target, name, dir_fd=pfd)
        self._own(pfd, name, ctx)
        return self._remember(pfd, name)

    @_errno
    async def link(self, inode, new_parent_inode, new_name, ctx):
        pfd = self._fd(new_parent_inode)
        # linkat(AT_FDCWD, "/proc/self/fd/N", ..., AT_SYMLINK_FOLLOW) links an O_PATH inode.
        os.link(_proc(self._fd(inode)), new_name, dst_dir_fd=pfd, follow_symlinks=True)
        return self._remember(pfd, new_name)

    @_errno
    async def unlink(self, parent_inode, name, ctx):
        os.unlink(name, dir_fd=self._fd(parent_inode))

    @_errno
    async def rmdir(self, parent_inode, name, ctx):
        os.rmdir(name, dir_fd=self._fd(parent_inode))

    @_errno
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:  # RENAME_NOREPLACE / RENAME_EXCHANGE: os.rename cannot pass them on
            raise pyfuse3.FUSEError(errno.EINVAL)
        os.rename(name_old, name_new, src_dir_fd=self._fd(parent_inode_old),
                  dst_dir_fd=self._fd(parent_inode_new))

    # ------------------------------------------------------------ files

    def _open_flags(self, flags: int) -> int:
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY)
        if self.enable_writeback_cache:
            # With write-back caching the kernel reads pages of files opened
            # write-only and handles O_APPEND itself.
            if flags & os.O_ACCMODE == os.O_WRONLY:
                flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
            flags &= ~os.O_APPEND
        return flags | os.O_CLOEXEC

    @_errno
    async def open(self, inode, flags, ctx):
        fh = os.open(_proc(self._fd(inode)), self._open_flags(flags))
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.keep_cache)

    @_errno
    async def create(self, parent_inode, name, mode, flags, ctx):
        pfd = self._fd(parent_inode)
        # O_EXCL stays: the kernel's negative entry may be older than the host's file.
        fh = os.open(name, self._open_flags(flags) | os.O_CREAT | (flags & os.O_EXCL), mode,
                     dir_fd=pfd)
        try:
            self._own(pfd, name, ctx)
            entry = self._remember(pfd, name)
        except BaseException:
            os.close(fh)
            raise
        return pyfuse3.FileInfo(fh=fh, keep_cache=self.keep_cache), entry

    @_errno
    async def read(self, fh, off, size):
        return os.pread(fh, size, off)

    @_errno
    async def write(self, fh, off, buf):
        return os.pwrite(fh, buf, off)

    async def flush(self, fh):
        pass  # the host file system has no close-time work to do

    @_errno
    async def release(self, fh):
        os.close(fh)

    @_errno
    async def fsync(self, fh, datasync):
        (os.fdatasync if datasync else os.fsync)(fh)

    # ------------------------------------------------------------ directories

    @_errno
    async def opendir(self, inode, ctx):
        # Snapshot the names: readdir offsets are indexes into this list, so
        # entries created or removed meanwhile never shift the others.
        dfd = os.open(_proc(self._fd(inode)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            names = sorted(os.listdir(dfd))
        finally:
            os.close(dfd)
        dh, self._next_dh = self._next_dh, self._next_dh + 1
        self._dirs[dh] = (inode, [os.fsencode(n) for n in names])
        return dh

    @_errno
    async def readdir(self, fh, start_id, token):
        inode, names = self._dirs[fh]
        pfd = self._fd(inode)
        for i in range(start_id, len(names)):
            try:
                entry = self._remember(pfd, names[i])
            except FileNotFoundError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, names[i], entry, i + 1):
                # Not sent: undo the lookup reference _remember took.
                await self.forget([(entry.st_ino, 1)])
                break

    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    @_errno
    async def fsyncdir(self, fh, datasync):
        dfd = os.open(_proc(self._fd(self._dirs[fh][0])), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    @_errno
    async def statfs(self, ctx):
        v = os.statvfs(self._fd(pyfuse3.ROOT_INODE))
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize, s.f_blocks = v.f_bsize, v.f_frsize, v.f_blocks
        s.f_bfree, s.f_bavail, s.f_files = v.f_bfree, v.f_bavail, v.f_files
        s.f_ffree, s.f_favail, s.f_namemax = v.f_ffree, v.f_favail, v.f_namemax
        return s


def _bdi_of(mountpoint: str) -> str | None:
    """The backing-device name ("major:minor") of a mount, from mountinfo."""
    real, found = os.path.realpath(mountpoint), None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == real:
                found = fields[2]  # the last mount there is the one on top
    return found


async def _set_read_ahead(mountpoint: str, kb: int) -> None:
    """Raise the mount's read-ahead once the kernel has our INIT reply: the
    reply caps read-ahead at what the kernel proposed at mount time (128 KiB),
    so a value written earlier is cut back. A stat through the mount returns
    only after INIT has been answered."""
    await trio.to_thread.run_sync(os.stat, mountpoint)
    bdi = _bdi_of(mountpoint)
    try:
        with open(f"/sys/class/bdi/{bdi}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as e:  # best effort, as in p2pfs
        log.warning("cannot set read-ahead of %s (bdi %s): %s", mountpoint, bdi, e)


async def _serve(fs: PassthroughFS, mountpoint: str, options: set[str],
                 read_ahead_kb: int) -> None:
    # Listen for signals before mounting, so a SIGTERM at any moment after the
    # mount exists still leads to a clean unmount.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        pyfuse3.init(fs, mountpoint, options)
        fs.mounted = True
        print(json.dumps({"event": "ready", "mountpoint": mountpoint, "pid": os.getpid()}),
              flush=True)
        async with trio.open_nursery() as nursery:
            async def stop_on_signal():
                async for signum in signals:
                    log.info("signal %d: unmounting", signum)
                    pyfuse3.terminate()
                    return
            nursery.start_soon(stop_on_signal)
            if read_ahead_kb > 0:
                nursery.start_soon(_set_read_ahead, mountpoint, read_ahead_kb)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Mirror SRC at MOUNTPOINT through FUSE (benchmark baseline).")
    p.add_argument("src")
    p.add_argument("mountpoint")
    p.add_argument("--entry-timeout", type=float, default=ENTRY_TIMEOUT)
    p.add_argument("--attr-timeout", type=float, default=ATTR_TIMEOUT)
    p.add_argument("--negative-timeout", type=float, default=NEGATIVE_TIMEOUT)
    p.add_argument("--no-keep-cache", dest="keep_cache", action="store_false")
    p.add_argument("--no-writeback", dest="writeback", action="store_false")
    p.add_argument("--read-ahead-kb", type=int, default=READ_AHEAD_KB,
                   help="kernel read-ahead of the mount (0: leave the kernel's)")
    p.add_argument("--debug", action="store_true", help="log every FUSE request (slow)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for path in (args.src, args.mountpoint):
        if not os.path.isdir(path):
            print(f"passthroughfs: {path}: not a directory", file=sys.stderr)
            return 2
    os.umask(0)  # the kernel already applied the caller's umask to every mode
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one O_PATH fd per known inode
    fs = PassthroughFS(args.src, entry_timeout=args.entry_timeout, attr_timeout=args.attr_timeout,
                       negative_timeout=args.negative_timeout, keep_cache=args.keep_cache,
                       writeback=args.writeback)
    options = {*MOUNT_OPTIONS, "fsname=passthroughfs", "subtype=passthrough"}
    if args.debug:
        options.add("debug")
    try:
        trio.run(_serve, fs, args.mountpoint, options, args.read_ahead_kb)
    except RuntimeError as e:  # pyfuse3.init could not mount
        print(f"passthroughfs: cannot mount {args.mountpoint}: {e}", file=sys.stderr)
        return 1
    finally:
        if fs.mounted:  # close() unmounts whether main() returned or raised
            pyfuse3.close(unmount=True)
        fs.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
