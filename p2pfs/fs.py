"""The FUSE file system: pyfuse3 operations over the namespace API (DESIGN.md
"p2pfs/"; Ivy, OSDI 2002, section 4: an NFS-like client over the logs).

Every handler translates inode numbers, attributes and flags, calls
``storage.namespace.Namespace`` and lets ``p2pfs.errmap`` (the one errno
table) answer errors. Names are resolved by the kernel one component at a
time through ``lookup(parent inode, name)``; no path is ever built here, so
path length is unbounded.

Caching through the kernel (``CachePolicy``), as far as close-to-open
consistency allows:

* a volume with one active writer (this mount) has nobody else changing
  it: long entry, attribute and negative-entry timeouts, the write-back
  page cache, and the page cache kept across opens;
* with other writers, ``open`` first fetches their updates (``refresh``),
  timeouts are short, writes go through, and the page cache is kept only if
  the file's (size, mtime, ctime) is what it was when this mount last knew
  the kernel's copy to be right.

Data path. Writes are accepted into a per-inode buffer and handed to the
namespace in the background in MAX_BLOCK-aligned chunks (``STREAM_AT``) by
one flusher task per inode, so sealing and storing overlap with the kernel
sending more; chunks that overlap apply in the order they were written. A
read, setattr, flush or fsync of that inode first drains its buffer;
getattr reports the size including buffered bytes. An error of a
background write is logged when it happens, the kernel's cached pages of
the file are dropped, and every later write, flush and fsync of the file
fails with it until its last close.

Durability, as DESIGN.md asks: ``flush`` (every close) and ``fsync`` return
once the buffered data and this writer's log records are stored and its
log-head published (``Namespace.sync``). Metadata-only changes (mkdir,
rename, ...) are published at the next close, fsync or fsyncdir, and by a
background sync every ``SYNC_INTERVAL`` seconds, like a journal commit.

Reading keeps per-open-file state: a sequential reader gets a read-ahead
window (doubling up to ``RA_MAX``) fetched in the background into the
namespace's block cache, so the next reads find their blocks there.

Past versions and facts (``p2pfs.fs_history``): every handler first
asks whether its inode (or parent) belongs to ``.snapshots``, a hidden but
reachable directory of the root; those are answered by the history, read
only (every mutation there is EROFS). Read-only extended attributes
``user.p2pfs.*`` describe a file (volume, inode, creating writer, last
change, blocks and their holders) and the root lists the volume's conflicts
(``user.p2pfs.conflicts``); they are not listed, so copying tools do not
carry them elsewhere, and setting or removing them is EPERM.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as _stat
from dataclasses import dataclass

import pyfuse3
import trio

from storage.blockapi import MAX_BLOCK
from storage.facts import is_fact
from storage.fs_errors import NotADirectory, NotFound, NotPermitted, ReadOnly
from storage.fsstate import ROOT_INO
from storage.namespace import Attr, Namespace

from .errmap import errno_of, fuse_op
from .fs_history import SNAPSHOTS_INO, HistoryFront

log = logging.getLogger("p2pfs.fs")

STREAM_AT = 4 << 20          # buffered bytes of one inode handed on in the background
QUEUE_DEPTH = 2              # chunks per inode waiting to be stored before writers wait
WRITE_PARALLEL = 4           # chunks per inode being stored at once (merged by group commit)
RA_MIN = 256 << 10           # first read-ahead window of a sequential reader
RA_MAX = 8 << 20             # largest read-ahead window
RA_PIECE = 1 << 20           # read-ahead fetched in pieces of this size
SYNC_INTERVAL = 2.0          # seconds between background publishes of changes


@dataclass(frozen=True)
class CachePolicy:
    """How much the kernel may cache (module docstring)."""

    entry_timeout: float
    attr_timeout: float
    negative_timeout: float     # how long the kernel may remember a missing name
    writeback: bool             # kernel write-back page cache
    refresh_on_open: bool       # fetch other writers' updates on open/opendir
    trust_page_cache: bool      # keep the page cache on every open

    @classmethod
    def for_writers(cls, single_writer: bool) -> "CachePolicy":
        if single_writer:
            return cls(60.0, 60.0, 60.0, writeback=True, refresh_on_open=False,
                       trust_page_cache=True)
        return cls(1.0, 1.0, 1.0, writeback=False, refresh_on_open=True,
                   trust_page_cache=False)


class _Writes:
    """Writes to one inode accepted from the kernel and not yet applied to
    the namespace: a contiguous run being gathered (``off``, ``buf``) and
    chunks queued for the inode's flusher task, applied in order."""

    def __init__(self, ino: int):
        self.ino = ino
        self.off = 0
        self.buf = bytearray()
        self.end = 0            # highest offset written while anything is pending
        self.busy = 0           # chunks queued or being applied
        self.error = 0          # errno of a failed background write, not yet reported
        self.send, self.recv = trio.open_memory_channel(QUEUE_DEPTH)
        self.touched = True     # written since the last background tick
        self.flusher = False    # its flusher task has been started
        self.inflight: dict[object, tuple[int, int]] = {}   # chunks being applied
        self.changed = trio.Event()     # set (and replaced) when one is done

    @property
    def pending(self) -> bool:
        return bool(self.buf) or self.busy > 0


class _File:
    """An open file (one FUSE file handle)."""

    __slots__ = ("fh", "ino", "writable", "last_end", "window", "ra_end", "ra_fetched",
                 "ra_busy", "ra_step")

    def __init__(self, fh: int, ino: int, writable: bool):
        self.fh = fh
        self.ino = ino
        self.writable = writable
        self.last_end = -1          # where the previous read ended
        self.window = 0             # current read-ahead window (0: not sequential)
        self.ra_end = 0             # read-ahead asked up to here
        self.ra_fetched = 0         # ... and in the block cache up to here
        self.ra_busy = False        # a read-ahead task is running
        self.ra_step = trio.Event()  # set (and replaced) as each piece arrives


class _Dir:
    """An open directory: its listing, taken when reading starts at 0
    (for a history directory, also when the history forgot inode numbers
    since: ``forgets`` was its count then)."""

    __slots__ = ("ino", "entries", "forgets")

    def __init__(self, ino: int):
        self.ino = ino
        self.entries: list[tuple[bytes, Attr, bool]] | None = None
        self.forgets = 0


class P2pfsOperations(pyfuse3.Operations):
    """pyfuse3 handlers over one mounted :class:`Namespace` (module docstring).

    ``replicas`` and ``description`` are shown by the ``user.p2pfs.*``
    attributes, ``holders`` (``async (bguid) -> [node id]``) finds a block's
    holders for them (default: through the overlay on a network volume);
    ``space`` is an optional async callable giving (capacity, free) bytes
    for statfs; ``read_ahead`` the largest read-ahead window.
    Start background work with ``await nursery.start(ops.run)`` before
    ``pyfuse3.main`` and call :meth:`shutdown` after it returns."""

    supports_dot_lookup = True
    enable_acl = False

    def __init__(self, ns: Namespace, policy: CachePolicy, *, replicas: int = 1,
                 space=None, description: str = "", read_ahead: int = RA_MAX,
                 holders=None):
        super().__init__()
        self.ns = ns
        self.policy = policy
        self.read_ahead = read_ahead     # largest read-ahead window; 0: none
        self.enable_writeback_cache = policy.writeback
        self.replicas = replicas
        self.space = space
        self.description = description
        self._nursery: trio.Nursery | None = None
        self._files: dict[int, _File] = {}
        self._dirs: dict[int, _Dir] = {}
        self._next_fh = 1
        self._opens: dict[int, int] = {}        # ino -> open file handles
        self._writes: dict[int, _Writes] = {}
        self._lookups: dict[int, int] = {}      # ino -> kernel lookup count
        self._versions: dict[int, tuple] = {}   # ino -> key of the kernel's page cache
        self.history = HistoryFront(ns, replicas=replicas, description=description,
                                    holders=holders)

    # ------------------------------------------------------------------
    # Lifecycle

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Background work (write flushers, read-ahead, periodic sync) until
        cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._sync_loop)
            task_status.started()
            await trio.sleep_forever()

    async def shutdown(self) -> None:
        """After the kernel is gone: store every buffered write and publish."""
        for w in list(self._writes.values()):
            try:
                await self._drain(w)
            except pyfuse3.FUSEError as e:
                log.error("at unmount, buffered writes of inode %#x were lost: %s", w.ino,
                          os.strerror(e.errno))
        await self.ns.close()      # synced, and certified if the ring answers

    async def _sync_loop(self) -> None:
        while True:
            await trio.sleep(SYNC_INTERVAL)
            try:
                for w in list(self._writes.values()):
                    if w.buf and not w.touched and self._writes.get(w.ino) is w:
                        await self._spill(w)
                    w.touched = False
                if self.policy.refresh_on_open:
                    await self.ns.refresh()     # others' updates too, and our promise
                else:
                    await self.ns.sync()
            except Exception as e:  # noqa: BLE001 - logged by the errno table; retried
                errno_of(e, "background sync")

    # ------------------------------------------------------------------
    # Translation helpers

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        size, blocks = a.size, a.blocks
        w = self._writes.get(a.ino)
        if w is not None and w.pending and w.end > size:
            size, blocks = w.end, (w.end + 511) // 512
        e.st_ino = a.ino
        e.generation = 0            # inode numbers are never reused
        if HistoryFront.owns(a.ino):
            e.entry_timeout = e.attr_timeout = self.history.ttl(a.ino)
        else:
            e.entry_timeout = self.policy.entry_timeout
            e.attr_timeout = self.policy.attr_timeout
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = a.rdev
        e.st_size = size
        e.st_blksize = a.blksize
        e.st_blocks = blocks
        e.st_atime_ns = a.atime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.ctime_ns
        return e

    def _negative(self, timeout: float | None = None) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = 0
        e.entry_timeout = self.policy.negative_timeout if timeout is None else timeout
        return e

    def _looked_up(self, ino: int) -> None:
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def _file(self, fh: int) -> _File:
        try:
            return self._files[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def _owner(self, parent: int, mode: int, ctx, is_dir: bool) -> tuple[int, int]:
        """(mode, gid) of a new inode: BSD group semantics under a setgid
        directory, as Linux file systems do (the kernel leaves it to us)."""
        p = await self.ns.getattr(parent)
        gid = ctx.gid
        if p.mode & _stat.S_ISGID:
            gid = p.gid
            if is_dir:
                mode |= _stat.S_ISGID
        if (not is_dir and mode & _stat.S_ISGID and ctx.uid != 0 and gid != ctx.gid
                and gid not in pyfuse3.get_sup_groups(ctx.pid)):
            mode &= ~_stat.S_ISGID
        return mode, gid

    def _version_key(self, a: Attr) -> tuple:
        return (a.size, a.mtime_ns, a.ctime_ns)

    def _note_own_change(self, a: Attr) -> None:
        """This mount changed the inode through the kernel, whose page cache
        therefore is still right."""
        if a.ino in self._versions:
            self._versions[a.ino] = self._version_key(a)

    def _keep_cache(self, a: Attr) -> bool:
        if self.policy.trust_page_cache:
            return True
        key = self._version_key(a)
        known = self._versions.get(a.ino)
        self._versions[a.ino] = key
        if known is not None and known != key:
            # Another writer changed it: the kernel must also re-read its size.
            try:
                pyfuse3.invalidate_inode(a.ino, attr_only=True)
            except OSError as e:
                log.debug("invalidating attributes of %#x: %s", a.ino, e)
        return known == key

    # ------------------------------------------------------------------
    # Names

    async def _history_lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        try:
            if parent == ROOT_INO:
                a = await self.history.top()
            else:
                a = await self.history.lookup(parent, name)
        except NotFound:
            # Names in .snapshots come and go (new versions, `latest`);
            # inside a version nothing changes.
            return self._negative(0.0 if parent == SNAPSHOTS_INO else None)
        self._looked_up(a.ino)
        return self._entry(a)

    @fuse_op
    async def lookup(self, parent_inode, name, ctx):
        if HistoryFront.owns(parent_inode) or HistoryFront.is_reserved(parent_inode, name):
            return await self._history_lookup(parent_inode, name)
        try:
            a = await self.ns.lookup(parent_inode, name)
        except NotFound:
            if not self.policy.refresh_on_open:
                return self._negative()
            # Another writer may have made it since we last looked (the
            # name of a file closed there must resolve here at once).
            await self.ns.refresh()
            try:
                a = await self.ns.lookup(parent_inode, name)
            except NotFound:
                return self._negative()
        self._looked_up(a.ino)
        return self._entry(a)

    async def forget(self, inode_list):
        # Must never raise: it answers no request.
        try:
            for ino, n in inode_list:
                left = self._lookups.get(ino, 0) - n
                if left > 0:
                    self._lookups[ino] = left
                else:
                    self._lookups.pop(ino, None)
                    if HistoryFront.owns(ino):
                        self.history.forget(ino)
                    elif ino not in self._opens:
                        self._versions.pop(ino, None)
        except Exception as e:  # noqa: BLE001
            errno_of(e, "forget")

    @fuse_op
    async def getattr(self, inode, ctx):
        if HistoryFront.owns(inode):
            return self._entry(await self.history.getattr(inode))
        return self._entry(await self.ns.getattr(inode))

    @fuse_op
    async def setattr(self, inode, attr, fields, fh, ctx):
        if HistoryFront.owns(inode):
            raise ReadOnly("setattr: .snapshots and past versions are read-only")
        w = self._writes.get(inode)
        if w is not None:
            await self._drain(w)    # later writes must not undo a truncate or utime
        kw = {}
        if fields.update_mode:
            kw["mode"] = attr.st_mode & 0o7777
        if fields.update_uid:
            kw["uid"] = attr.st_uid
        if fields.update_gid:
            kw["gid"] = attr.st_gid
        if fields.update_size:
            kw["size"] = attr.st_size
        if fields.update_atime:
            kw["atime"] = attr.st_atime_ns
        if fields.update_mtime:
            kw["mtime"] = attr.st_mtime_ns
        a = await (self.ns.setattr(inode, **kw) if kw else self.ns.getattr(inode))
        self._note_own_change(a)
        return self._entry(a)

    @fuse_op
    async def readlink(self, inode, ctx):
        if HistoryFront.owns(inode):
            return await self.history.readlink(inode)
        return await self.ns.readlink(inode)

    @fuse_op
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        """FIFOs, sockets' names, device nodes (and regular files): only the
        inode is stored; the kernel serves their I/O itself."""
        HistoryFront.refuse_in(parent_inode, name, "mknod", creates=True)
        perm, gid = await self._owner(parent_inode, mode & 0o7777, ctx, False)
        a = await self.ns.mknod(parent_inode, name, _stat.S_IFMT(mode) | perm, rdev, ctx.uid,
                                gid)
        self._looked_up(a.ino)
        return self._entry(a)

    @fuse_op
    async def mkdir(self, parent_inode, name, mode, ctx):
        HistoryFront.refuse_in(parent_inode, name, "mkdir", creates=True)
        mode, gid = await self._owner(parent_inode, mode, ctx, True)
        a = await self.ns.mkdir(parent_inode, name, mode, ctx.uid, gid)
        self._looked_up(a.ino)
        return self._entry(a)

    @fuse_op
    async def symlink(self, parent_inode, name, target, ctx):
        HistoryFront.refuse_in(parent_inode, name, "symlink", creates=True)
        _, gid = await self._owner(parent_inode, 0o777, ctx, False)
        a = await self.ns.symlink(parent_inode, name, target, ctx.uid, gid)
        self._looked_up(a.ino)
        return self._entry(a)

    @fuse_op
    async def link(self, inode, new_parent_inode, new_name, ctx):
        if HistoryFront.owns(inode):
            raise ReadOnly("link: files of past versions cannot be linked into the volume")
        HistoryFront.refuse_in(new_parent_inode, new_name, "link", creates=True)
        a = await self.ns.link(inode, new_parent_inode, new_name)
        self._looked_up(a.ino)
        return self._entry(a)

    @fuse_op
    async def unlink(self, parent_inode, name, ctx):
        HistoryFront.refuse_in(parent_inode, name, "unlink")
        await self.ns.unlink(parent_inode, name)

    @fuse_op
    async def rmdir(self, parent_inode, name, ctx):
        HistoryFront.refuse_in(parent_inode, name, "rmdir")
        await self.ns.rmdir(parent_inode, name)

    @fuse_op
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        HistoryFront.refuse_in(parent_inode_old, name_old, "rename")
        HistoryFront.refuse_in(parent_inode_new, name_new, "rename")
        await self.ns.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # ------------------------------------------------------------------
    # Directories

    @fuse_op
    async def opendir(self, inode, ctx):
        history = HistoryFront.owns(inode)
        if self.policy.refresh_on_open and (not history or inode == SNAPSHOTS_INO):
            await self.ns.refresh()     # for .snapshots: others' new versions
        if history:
            a = await self.history.getattr(inode)
        else:
            a = await self.ns.getattr(inode)
        if not a.is_dir:
            raise NotADirectory(f"inode {inode:#x} is not a directory")
        fh = self._new_fh()
        self._dirs[fh] = _Dir(inode)
        return fh

    @fuse_op
    async def readdir(self, fh, start_id, token):
        d = self._dirs.get(fh)
        if d is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        history = HistoryFront.owns(d.ino)
        if start_id == 0 or d.entries is None or (history and
                                                  d.forgets != self.history.forgets):
            # One listing per pass, served in pieces: a 10,000-entry directory
            # costs one namespace call, not one per kernel buffer. (A history
            # listing is taken again if numbers in it may have been dropped.)
            if history:
                d.forgets = self.history.forgets
                d.entries = await self.history.listing(d.ino)
            else:
                here = await self.ns.getattr(d.ino)
                up = await self.ns.lookup(d.ino, b"..")
                d.entries = [(b".", here, False), (b"..", up, False)] + [
                    (name, a, True) for name, a in await self.ns.readdir(d.ino)
                    if not HistoryFront.is_reserved(d.ino, name)]
        entries = d.entries
        for i in range(start_id, len(entries)):
            name, a, counted = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._entry(a), i + 1):
                break
            if counted:  # the kernel does not count '.' and '..' as lookups
                self._looked_up(a.ino)

    @fuse_op
    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    @fuse_op
    async def fsyncdir(self, fh, datasync):
        d = self._dirs.get(fh)
        if d is None or not HistoryFront.owns(d.ino):
            await self.ns.sync()

    # ------------------------------------------------------------------
    # Files

    def _opened(self, ino: int, flags: int) -> _File:
        fh = self._new_fh()
        f = _File(fh, ino, (flags & os.O_ACCMODE) != os.O_RDONLY)
        self._files[fh] = f
        self._opens[ino] = self._opens.get(ino, 0) + 1
        return f

    @fuse_op
    async def open(self, inode, flags, ctx):
        if HistoryFront.owns(inode):
            # A past file never changes under its number: keep the page cache.
            await self.history.open(inode, writing=(flags & os.O_ACCMODE) != os.O_RDONLY
                                    or bool(flags & os.O_TRUNC))
            return pyfuse3.FileInfo(fh=self._opened(inode, flags).fh, keep_cache=True)
        a = await self.ns.open(inode, refresh=self.policy.refresh_on_open)
        keep = self._keep_cache(a)
        if flags & os.O_TRUNC:
            # The kernel leaves O_TRUNC to the file system (atomic_o_trunc,
            # libfuse's default): it only sets its cached size to 0.
            try:
                w = self._writes.get(inode)
                if w is not None:
                    await self._drain(w)    # earlier writes land before the cut
                self._note_own_change(await self.ns.setattr(inode, size=0))
            except BaseException:
                await self.ns.release(inode)
                raise
        f = self._opened(inode, flags)
        return pyfuse3.FileInfo(fh=f.fh, keep_cache=keep)

    @fuse_op
    async def create(self, parent_inode, name, mode, flags, ctx):
        HistoryFront.refuse_in(parent_inode, name, "create", creates=True)
        mode, gid = await self._owner(parent_inode, mode, ctx, False)
        a = await self.ns.create(parent_inode, name, mode, ctx.uid, gid,
                                 exclusive=bool(flags & os.O_EXCL))
        self._looked_up(a.ino)
        await self.ns.open(a.ino, refresh=False)
        if not self.policy.trust_page_cache:
            self._versions[a.ino] = self._version_key(a)
        f = self._opened(a.ino, flags)
        return pyfuse3.FileInfo(fh=f.fh, keep_cache=True), self._entry(a)

    @fuse_op
    async def read(self, fh, off, size):
        f = self._file(fh)
        if HistoryFront.owns(f.ino):
            return await self.history.read(f.ino, off, size)
        w = self._writes.get(f.ino)
        if w is not None and w.pending:
            await self._drain(w)
        while f.ra_busy and f.ra_fetched <= off < f.ra_end:
            await f.ra_step.wait()  # its blocks are on their way into the cache
        data = await self.ns.read(f.ino, off, size)
        self._read_ahead(f, off, size, len(data))
        return data

    def _read_ahead(self, f: _File, off: int, size: int, got: int) -> None:
        end = off + got
        sequential = f.last_end >= 0 and abs(off - f.last_end) <= max(size, 1 << 20)
        f.last_end = end
        if not sequential or got < size or not self.read_ahead:
            f.window = 0
            return
        f.window = min(self.read_ahead, max(RA_MIN, f.window * 2))
        if not f.ra_busy and f.ra_end < end + f.window // 2:
            start = max(end, f.ra_end)
            f.ra_end = end + f.window
            f.ra_fetched = start
            f.ra_busy = True
            f.ra_step = trio.Event()
            self._nursery.start_soon(self._prefetch, f, start, f.ra_end)

    async def _prefetch(self, f: _File, start: int, stop: int) -> None:
        """Fetch [start, stop) into the namespace's block cache, a piece at
        a time so that a reader waits for its own piece only."""
        pos = start
        try:
            while pos < stop and f.fh in self._files:
                n = min(RA_PIECE, stop - pos)
                await self.ns.read(f.ino, pos, n)
                pos += n
                f.ra_fetched = pos
                step, f.ra_step = f.ra_step, trio.Event()
                step.set()
        except Exception as e:  # noqa: BLE001 - the reader's own read reports it
            log.debug("read-ahead of inode %#x [%d, %d) failed: %s", f.ino, pos, stop, e)
        finally:
            f.ra_busy = False
            f.ra_step.set()

    @fuse_op
    async def write(self, fh, off, buf):
        f = self._file(fh)
        if HistoryFront.owns(f.ino):
            raise ReadOnly("write: past versions are read-only")
        w = self._writes.get(f.ino)
        if w is None:
            w = self._writes[f.ino] = _Writes(f.ino)
        self._raise_error(w)
        n = len(buf)
        w.touched = True
        while True:
            if not w.buf:
                w.off, w.buf = off, bytearray(buf)
                break
            if w.off <= off <= w.off + len(w.buf):
                rel = off - w.off
                w.buf[rel:rel + n] = buf    # extends the run or patches it in place
                break
            # Not contiguous: queue the run gathered so far and look again,
            # since other writes may have come in while we waited.
            await self._spill(w)
        w.end = max(w.end, off + n)
        if len(w.buf) >= STREAM_AT:
            await self._spill(w, aligned=True)
        return n

    async def _spill(self, w: _Writes, aligned: bool = False) -> None:
        """Hand the gathered run (up to a MAX_BLOCK boundary of the file if
        ``aligned``, so blocks stay whole) to the inode's flusher."""
        take = len(w.buf)
        if aligned:
            end = w.off + take
            take -= end % MAX_BLOCK
            if take <= 0:
                return
        off, chunk = w.off, bytes(w.buf[:take])
        del w.buf[:take]
        w.off += take
        w.busy += 1
        if not w.flusher:
            w.flusher = True
            self._nursery.start_soon(self._flusher, w)
        await w.send.send((off, chunk))

    async def _flusher(self, w: _Writes) -> None:
        """Apply the inode's queued chunks. Up to ``WRITE_PARALLEL`` run at
        once (one is sealed while another's transaction is being synced),
        never two that overlap, so the result is that of applying them in
        order. A drain marker (an Event) is set once everything before it
        has been applied."""
        async with w.recv, trio.open_nursery() as nursery:
            async for item in w.recv:
                if isinstance(item, trio.Event):
                    while w.inflight:
                        await w.changed.wait()
                    item.set()
                    continue
                off, chunk = item
                end = off + len(chunk)
                while len(w.inflight) >= WRITE_PARALLEL or any(
                        a < end and off < b for a, b in w.inflight.values()):
                    await w.changed.wait()
                token = object()
                w.inflight[token] = (off, end)
                nursery.start_soon(self._apply, w, token, off, chunk)

    async def _apply(self, w: _Writes, token: object, off: int, chunk: bytes) -> None:
        try:
            await self.ns.write(w.ino, off, chunk)
            if w.ino in self._versions:
                self._note_own_change(await self.ns.getattr(w.ino))
        except Exception as e:  # noqa: BLE001 - reported at the next write/flush
            code = errno_of(e, f"write(inode {w.ino:#x}, {off}, <{len(chunk)} bytes>)")
            if not w.error:
                w.error = code
                # The kernel's page cache holds bytes that were not stored:
                # drop it, so readers see what the volume has. From a thread,
                # since the kernel may first write back dirty pages through us.
                self._nursery.start_soon(self._invalidate, w.ino)
        finally:
            del w.inflight[token]
            w.busy -= 1
            if not w.pending:
                w.end = 0
            changed, w.changed = w.changed, trio.Event()
            changed.set()

    async def _drain(self, w: _Writes) -> None:
        """Apply everything buffered for the inode, then report any error."""
        if w.buf and not w.busy:
            # Nothing queued or being applied (a small file's one run):
            # apply it here rather than through the flusher task.
            off, chunk = w.off, bytes(w.buf)
            w.buf.clear()
            w.off += len(chunk)
            w.busy += 1
            token = object()
            w.inflight[token] = (off, off + len(chunk))
            await self._apply(w, token, off, chunk)
        elif w.buf:
            await self._spill(w)
        while w.busy:
            if w.flusher:
                done = trio.Event()
                await w.send.send(done)
                await done.wait()       # set once everything queued before it is applied
                break
            await w.changed.wait()      # another caller's inline apply
        self._raise_error(w)

    @staticmethod
    def _raise_error(w: _Writes) -> None:
        # Sticky until the last close: every later write, flush and fsync of
        # the file fails, so whichever of them a program checks tells it that
        # data was lost (the kernel may hide a failed write-back).
        if w.error:
            raise pyfuse3.FUSEError(w.error)

    async def _invalidate(self, ino: int) -> None:
        try:
            await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino,
                                          abandon_on_cancel=True)
        except OSError as e:
            log.debug("invalidating the cache of inode %#x: %s", ino, e)

    @fuse_op
    async def flush(self, fh):
        f = self._file(fh)
        w = self._writes.get(f.ino)
        if w is not None:
            await self._drain(w)
        if f.writable:
            await self.ns.sync()   # close-to-open: durable and visible on return

    @fuse_op
    async def fsync(self, fh, datasync):
        f = self._file(fh)
        if HistoryFront.owns(f.ino):
            return                  # nothing to make durable
        w = self._writes.get(f.ino)
        if w is not None:
            await self._drain(w)
        await self.ns.fsync(f.ino)

    @fuse_op
    async def release(self, fh):
        f = self._files.pop(fh, None)
        if f is None:
            return
        ino = f.ino
        left = self._opens.get(ino, 0) - 1
        if left > 0:
            self._opens[ino] = left
        else:
            self._opens.pop(ino, None)
            w = self._writes.pop(ino, None)
            if w is not None:
                try:
                    await self._drain(w)
                finally:
                    w.send.close()
                    await self.ns.release(ino)
                return
        if not HistoryFront.owns(ino):      # a past file: nothing to publish
            await self.ns.release(ino)

    # ------------------------------------------------------------------
    # File system, permissions, extended attributes

    @fuse_op
    async def statfs(self, ctx):
        s = await self.ns.statfs()
        d = pyfuse3.StatvfsData()
        d.f_bsize, d.f_frsize = s.bsize, s.frsize
        d.f_blocks, d.f_bfree, d.f_bavail = s.blocks, s.bfree, s.bavail
        if self.space is not None:
            total, free = await self.space()
            d.f_blocks = total // s.frsize
            d.f_bfree = d.f_bavail = free // s.frsize
        d.f_files, d.f_ffree, d.f_favail = s.files, s.ffree, s.favail
        d.f_namemax = s.namemax
        return d

    @fuse_op
    async def access(self, inode, mode, ctx):
        # Only called without default_permissions; the same rules as the kernel's.
        if HistoryFront.owns(inode):
            a = await self.history.getattr(inode)
            if mode & os.W_OK:
                raise ReadOnly("access: past versions are read-only")
        else:
            a = await self.ns.getattr(inode)
        if mode == os.F_OK:
            return True
        if ctx.uid == 0:
            return not (mode & os.X_OK) or a.is_dir or bool(a.mode & 0o111)
        if ctx.uid == a.uid:
            bits = (a.mode >> 6) & 7
        elif ctx.gid == a.gid or a.gid in pyfuse3.get_sup_groups(ctx.pid):
            bits = (a.mode >> 3) & 7
        else:
            bits = a.mode & 7
        return (mode & bits) == mode

    @fuse_op
    async def getxattr(self, inode, name, ctx):
        if HistoryFront.owns(inode):
            return await self.history.getxattr(inode, name)
        if is_fact(name):
            await self.ns.getattr(inode)  # the inode must exist
            return await self.history.live_fact(inode, name)
        return await self.ns.getxattr(inode, name)

    @fuse_op
    async def setxattr(self, inode, name, value, ctx):
        if HistoryFront.owns(inode):
            raise ReadOnly("setxattr: past versions are read-only")
        if is_fact(name):
            raise NotPermitted(f"{name!r} is a read-only p2pfs attribute")
        await self.ns.setxattr(inode, name, value)

    @fuse_op
    async def listxattr(self, inode, ctx):
        if HistoryFront.owns(inode):
            return await self.history.listxattr(inode)
        return await self.ns.listxattr(inode)

    @fuse_op
    async def removexattr(self, inode, name, ctx):
        if HistoryFront.owns(inode):
            raise ReadOnly("removexattr: past versions are read-only")
        if is_fact(name):
            raise NotPermitted(f"{name!r} is a read-only p2pfs attribute")
        await self.ns.removexattr(inode, name)
