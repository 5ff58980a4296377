"""The namespace API: a mounted volume as the FUSE frontend sees it (Ivy,
OSDI 2002, section 4; DESIGN.md "storage/logs" and "p2pfs/").

Inode-number based, like FUSE's low-level API: ``lookup(parent, name)``
returns an :class:`Attr`, every other call takes inode numbers; the root is
inode 1. Names are bytes (``str`` is accepted and encoded as UTF-8). Errors
are :class:`~storage.fs_errors.FsError` subclasses carrying their errno,
with POSIX semantics per operation; the FUSE layer maps them in one place.

How an operation works: it is checked against the current computed state
(``storage.replica``), turned into log records, appended to this writer's
log (``storage.logs``) and applied to the state at once, so a writer always
reads its own writes. Records are group-committed: they reach storage and
other writers on ``fsync``/``sync``/``release`` of a written file, or when
enough have queued, never one ring round per operation.

Consistency is close-to-open, as in Ivy and NFS: ``sync`` (fsync, close)
returns once the writer's records and its new signed log-head are stored;
``refresh`` (called by ``open``) fetches every writer's log-head and the
records newer than those it has. Writes of more than ``INLINE_MAX`` bytes go
to ``Kind.DATA`` blocks (cut at ``MAX_BLOCK`` boundaries of the file) whose
BGUIDs the records carry; smaller ones are inline.

Mounting, refreshing, syncing and snapshots are ``storage.session``'s; this
module is the file-system semantics on top.
"""

from __future__ import annotations

import random
import stat as _stat
from dataclasses import dataclass

import trio

from .blockapi import MAX_BLOCK, Kind
from .errors import StorageError
from .extents import Blk
from .fs_errors import (Exists, FileTooBig, InvalidArgument, IOFailure, IsADirectory,
                        NameTooLong, NoData, NotADirectory, NotEmpty, NotFound, NotPermitted,
                        NotSupported, OutOfRange, ReadOnly, TooBig)
from .fsstate import FTYPE_OF_IFMT, ROOT_INO, Inode, ino_for
from .records import (MAX_FILE_SIZE, MAX_NAME, MAX_RDEV, MAX_TARGET, MAX_WRITE_BLOCKS, MAX_XATTR_NAME,
                      MAX_XATTR_VALUE, Cancel, FileType, Link, MkInode, Prepare, Rename,
                      SetAttr, SetXattr, Unlink, Write)
from .session import Session

INLINE_MAX = 8 * 1024            # larger writes go to DATA blocks
BLOCK_SIZE = 4096                # st_blksize reported
PREPARE_TTL_NS = 30 * 10**9      # a Prepare older than this no longer blocks others
RENAME_NOREPLACE = 1             # Linux renameat2 flags
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2


@dataclass(frozen=True, slots=True)
class Attr:
    """Attributes of one inode, as ``stat`` reports them (times in ns)."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blksize: int = BLOCK_SIZE
    rdev: int = 0

    @property
    def is_dir(self) -> bool:
        return _stat.S_ISDIR(self.mode)


@dataclass(frozen=True, slots=True)
class StatFs:
    bsize: int
    frsize: int
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    favail: int
    namemax: int


def attr_of(n: Inode) -> Attr:
    size = n.st_size
    return Attr(n.ino, n.st_mode, n.st_nlink, n.uid, n.gid, size, (size + 511) // 512,
                n.atime, n.mtime, n.ctime, rdev=n.rdev)


def _name(name: bytes | str) -> bytes:
    if isinstance(name, str):
        name = name.encode()
    if not name:
        raise NotFound("empty name")
    if len(name) > MAX_NAME:
        raise NameTooLong(f"name of {len(name)} bytes")
    if b"/" in name or b"\0" in name:
        raise InvalidArgument("a name holds no '/' or NUL")
    return name


class Namespace(Session):
    """A mounted volume (module docstring). Build with ``await Namespace.mount(view,
    identity, blocks, board, **options)`` (``storage.session.Session``)."""

    # ------------------------------------------------------------------
    # Helpers

    def _node(self, ino: int, *, open_ok: bool = True) -> Inode:
        n = self._st.inodes.get(ino)
        if n is None and open_ok and ino in self._open:
            t = self._st.tombs.get(ino)
            n = t.inode if t else None
        if n is None:
            raise NotFound(f"no inode {ino}")
        return n

    def _dir(self, ino: int) -> Inode:
        n = self._st.inodes.get(ino)
        if n is None:
            raise NotFound(f"no directory {ino}")
        if not n.is_dir:
            raise NotADirectory(f"inode {ino} is not a directory")
        return n

    def _file(self, ino: int) -> Inode:
        n = self._node(ino)
        if n.is_dir:
            raise IsADirectory(f"inode {ino} is a directory")
        if n.ftype != FileType.REG:
            raise InvalidArgument(f"inode {ino} is not a regular file")
        return n

    def _writable(self) -> None:
        if self.log is None:
            raise ReadOnly("this identity is not a writer of the volume")

    def _new_ino(self) -> int:
        return ino_for(self.me.index, self._st.next_counter(self.me.index))

    def _free(self, d: Inode, name: bytes) -> None:
        if name in (b".", b"..") or name in d.entries:
            raise Exists(f"{name!r} exists")

    # ------------------------------------------------------------------
    # Reading the namespace

    async def lookup(self, parent: int, name: bytes | str) -> Attr:
        d = self._dir(parent)
        if name in (b".", "."):
            return attr_of(d)
        if name in (b"..", ".."):
            return attr_of(self._st.inodes[d.parent or ROOT_INO])
        name = _name(name)
        e = d.entries.get(name)
        if e is None:
            raise NotFound(f"{name!r} not in directory {parent}")
        return attr_of(self._st.inodes[e.ino])

    async def getattr(self, ino: int) -> Attr:
        return attr_of(self._node(ino))

    async def readdir(self, ino: int) -> list[tuple[bytes, Attr]]:
        """Entries of a directory in name order (without '.' and '..')."""
        d = self._dir(ino)
        st = self._st
        return [(name, attr_of(st.inodes[d.entries[name].ino])) for name in sorted(d.entries)]

    async def readlink(self, ino: int) -> bytes:
        n = self._node(ino)
        if n.ftype != FileType.LNK:
            raise InvalidArgument(f"inode {ino} is not a symlink")
        return n.target

    async def read(self, ino: int, off: int, size: int) -> bytes:
        n = self._file(ino)
        if off < 0 or size < 0:
            raise InvalidArgument("negative offset or size")
        end = min(n.size, off + size)
        if end <= off:
            return b""
        plan = n.data.plan(off, end)
        want = [e.src.bguid for e in plan if isinstance(e.src, Blk)]
        blocks = await self._fetch(want)
        buf = bytearray(end - off)
        for e in plan:
            if isinstance(e.src, Blk):
                piece = blocks[e.src.bguid][e.soff:e.soff + e.length]
                if len(piece) != e.length:
                    raise IOFailure(f"data block {e.src.bguid[:4].hex()} is shorter than "
                                    f"its records say")
            else:
                piece = e.src[e.soff:e.soff + e.length]
            buf[e.off - off:e.end - off] = piece
        return bytes(buf)

    async def statfs(self) -> StatFs:
        files = len(self._st.inodes)
        free = 1 << 40
        return StatFs(BLOCK_SIZE, BLOCK_SIZE, free * 2, free, free, files + (1 << 32),
                      1 << 32, 1 << 32, MAX_NAME)

    async def getxattr(self, ino: int, name: bytes | str) -> bytes:
        n = self._node(ino)
        name = name.encode() if isinstance(name, str) else name
        try:
            return n.xattrs[name]
        except KeyError:
            raise NoData(f"no attribute {name!r}") from None

    async def listxattr(self, ino: int) -> list[bytes]:
        return sorted(self._node(ino).xattrs)

    # ------------------------------------------------------------------
    # Open files (close-to-open)

    async def open(self, ino: int, *, refresh: bool = True) -> Attr:
        """Note an open file (it stays readable if unlinked) and, for
        close-to-open consistency, fetch other writers' updates first."""
        if refresh and self.clock() - self.last_refresh >= self.refresh_interval_ns:
            await self.refresh()
        n = self._node(ino)
        self._open[ino] = self._open.get(ino, 0) + 1
        self.replica.pinned.add(ino)
        return attr_of(n)

    async def release(self, ino: int) -> None:
        """The last close of an open: publish this writer's updates."""
        c = self._open.get(ino, 0) - 1
        if c <= 0:
            self._open.pop(ino, None)
            self.replica.pinned.discard(ino)
        else:
            self._open[ino] = c
        if self.log is not None and self.log.seq != (self._published.seq
                                                     if self._published else 0):
            await self.sync()

    # ------------------------------------------------------------------
    # Changing the namespace

    async def create(self, parent: int, name: bytes | str, mode: int, uid: int, gid: int, *,
                     exclusive: bool = False) -> Attr:
        """A new regular file. With ``exclusive`` (O_EXCL) and other active
        writers, Ivy's Prepare/Cancel protocol makes sure no other writer
        creates the same name concurrently (costs a sync and a refresh)."""
        self._writable()
        name = _name(name)
        if exclusive and len(self.view.active_ids()) > 1:
            return await self._create_exclusive(parent, name, mode, uid, gid)
        return self._make(parent, name, FileType.REG, mode, uid, gid)

    async def mknod(self, parent: int, name: bytes | str, mode: int, rdev: int, uid: int,
                    gid: int) -> Attr:
        """A regular file (``S_IFREG`` or no type: a create), a FIFO, a
        socket's name, or a character or block device numbered ``rdev``.
        Only the inode is stored: the kernel makes pipes, sockets and
        devices of them (FUSE never sees their I/O)."""
        self._writable()
        ft = FTYPE_OF_IFMT.get(_stat.S_IFMT(mode) or _stat.S_IFREG)
        if ft is None or ft in (FileType.DIR, FileType.LNK):
            raise InvalidArgument(f"mknod of file type {_stat.S_IFMT(mode):#o}")
        if ft in (FileType.CHR, FileType.BLK):
            if not 0 <= rdev <= MAX_RDEV:
                raise InvalidArgument("device number out of range")
        else:
            rdev = 0
        return self._make(parent, _name(name), ft, mode, uid, gid, rdev=rdev)

    async def mkdir(self, parent: int, name: bytes | str, mode: int, uid: int,
                    gid: int) -> Attr:
        self._writable()
        return self._make(parent, _name(name), FileType.DIR, mode, uid, gid)

    async def symlink(self, parent: int, name: bytes | str, target: bytes | str, uid: int,
                      gid: int) -> Attr:
        self._writable()
        target = target.encode() if isinstance(target, str) else bytes(target)
        if not target:
            raise NotFound("empty symlink target")
        if len(target) > MAX_TARGET:
            raise NameTooLong("symlink target over 4096 bytes")
        return self._make(parent, _name(name), FileType.LNK, 0o777, uid, gid, target)

    def _make(self, parent: int, name: bytes, ft: FileType, mode: int, uid: int, gid: int,
              target: bytes | None = None, *, rdev: int = 0) -> Attr:
        d = self._dir(parent)
        self._free(d, name)
        ino = self._new_ino()
        self._append(MkInode(ino, ft, mode & 0o7777, uid, gid, target, rdev))
        self._append(Link(parent, name, ino))
        return attr_of(self._st.inodes[ino])

    async def _create_exclusive(self, parent: int, name: bytes, mode: int, uid: int,
                                gid: int) -> Attr:
        for attempt in range(6):
            self._free(self._dir(parent), name)
            self._append(Prepare(parent, name))
            await self.sync()
            await self.refresh()
            d = self._dir(parent)
            now = self.clock()
            clash = any(w != self.identity.id and now - t < PREPARE_TTL_NS
                        for w, (_, t) in self._st.prepares.get((parent, name), {}).items())
            if name in d.entries or clash:
                self._append(Cancel(parent, name))
                await self.sync()
                if name in d.entries:
                    raise Exists(f"{name!r} exists")
                await trio.sleep(random.uniform(0.005, 0.05) * (2 ** attempt))
                continue
            return self._make(parent, name, FileType.REG, mode, uid, gid)
        raise Exists(f"exclusive create of {name!r} kept clashing with another writer")

    async def link(self, ino: int, new_parent: int, new_name: bytes | str) -> Attr:
        self._writable()
        n = self._node(ino, open_ok=False)
        if n.is_dir:
            raise NotPermitted("hard links to directories are not allowed")
        new_name = _name(new_name)
        d = self._dir(new_parent)
        self._free(d, new_name)
        self._append(Link(new_parent, new_name, ino))
        return attr_of(self._st.inodes[ino])

    async def unlink(self, parent: int, name: bytes | str) -> None:
        self._writable()
        d = self._dir(parent)
        if name in (b".", b"..", ".", ".."):
            raise IsADirectory("cannot unlink '.' or '..'")
        name = _name(name)
        e = d.entries.get(name)
        if e is None:
            raise NotFound(f"{name!r} not in directory {parent}")
        if self._st.inodes[e.ino].is_dir:
            raise IsADirectory(f"{name!r} is a directory")
        self._append(Unlink(parent, name, e.ino))

    async def rmdir(self, parent: int, name: bytes | str) -> None:
        self._writable()
        d = self._dir(parent)
        if name in (b".", "."):
            raise InvalidArgument("cannot remove '.'")
        if name in (b"..", ".."):
            raise NotEmpty("cannot remove '..'")
        name = _name(name)
        e = d.entries.get(name)
        if e is None:
            raise NotFound(f"{name!r} not in directory {parent}")
        n = self._st.inodes[e.ino]
        if not n.is_dir:
            raise NotADirectory(f"{name!r} is not a directory")
        if n.entries:
            raise NotEmpty(f"{name!r} is not empty")
        self._append(Unlink(parent, name, e.ino))

    async def rename(self, parent: int, name: bytes | str, new_parent: int,
                     new_name: bytes | str, flags: int = 0) -> None:
        """rename/renameat2: replaces an existing target as POSIX says;
        ``RENAME_NOREPLACE`` fails with EEXIST instead; ``RENAME_EXCHANGE``
        swaps the two entries atomically."""
        self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
                RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise InvalidArgument(f"unsupported rename flags {flags:#x}")
        sd, dd = self._dir(parent), self._dir(new_parent)
        if name in (b".", b"..", ".", "..") or new_name in (b".", b"..", ".", ".."):
            raise InvalidArgument("cannot rename '.' or '..'")
        name, new_name = _name(name), _name(new_name)
        # Checks in the order Linux makes them (do_renameat2, vfs_rename).
        se = sd.entries.get(name)
        if se is None:
            raise NotFound(f"{name!r} not in directory {parent}")
        de = dd.entries.get(new_name)
        exchange = bool(flags & RENAME_EXCHANGE)
        if exchange and de is None:
            raise NotFound(f"{new_name!r} not in directory {new_parent}")
        if flags & RENAME_NOREPLACE and de is not None:
            raise Exists(f"{new_name!r} exists")
        st = self._st
        src = st.inodes[se.ino]
        if src.is_dir and st.is_ancestor(src.ino, new_parent):
            raise InvalidArgument("cannot move a directory into itself")
        dst = st.inodes[de.ino] if de is not None else None
        if dst is not None and dst.is_dir and st.is_ancestor(dst.ino, parent):
            if exchange:
                raise InvalidArgument("cannot move a directory into itself")
            raise NotEmpty(f"{new_name!r} is an ancestor of the source")
        if dst is not None and de.ino == se.ino:
            return  # the same file (or the same entry): POSIX says do nothing
        if not exchange and dst is not None:
            if src.is_dir:
                if not dst.is_dir:
                    raise NotADirectory(f"{new_name!r} is not a directory")
                if dst.entries:
                    raise NotEmpty(f"{new_name!r} is not empty")
            elif dst.is_dir:
                raise IsADirectory(f"{new_name!r} is a directory")
        self._append(Rename(parent, name, se.ino, new_parent, new_name,
                            de.ino if de is not None else None, exchange))

    async def setattr(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                      gid: int | None = None, size: int | None = None,
                      atime: int | None = None, mtime: int | None = None) -> Attr:
        """Change attributes (None: unchanged). ``size`` truncates or
        extends a file; times are ns since the epoch."""
        self._writable()
        n = self._node(ino)
        if size is not None:
            if n.is_dir:
                raise IsADirectory("cannot truncate a directory")
            if n.ftype != FileType.REG:
                raise InvalidArgument("only regular files have a settable size")
            if size < 0:
                raise InvalidArgument("negative size")
            if size > MAX_FILE_SIZE:
                raise FileTooBig("size past the largest file")
        if mode is not None:
            mode &= 0o7777
        for v in (uid, gid):
            if v is not None and not 0 <= v < 2**32:
                raise InvalidArgument("uid or gid out of range")
        if all(v is None for v in (mode, uid, gid, size, atime, mtime)):
            return attr_of(n)
        self._append(SetAttr(ino, mode, uid, gid, size, atime, mtime))
        return attr_of(self._node(ino))

    async def write(self, ino: int, off: int, data: bytes) -> int:
        """Write ``data`` at ``off``; returns the bytes written (all of them)."""
        self._writable()
        self._file(ino)
        data = bytes(data)
        if off < 0:
            raise InvalidArgument("negative offset")
        if off + len(data) > MAX_FILE_SIZE:
            raise FileTooBig("write past the largest file")
        if not data:
            return 0
        if len(data) <= INLINE_MAX:
            bodies = [Write(ino, off, data=data)]
        else:
            chunks, pos, i = [], off, 0
            while i < len(data):
                take = MAX_BLOCK - pos % MAX_BLOCK
                chunks.append(data[i:i + take])
                pos += len(chunks[-1])
                i += len(chunks[-1])
            bguids = self.name_ahead(chunks)     # stored by the next sync, with the records
            if bguids is None:
                try:
                    bguids = await self.blocks.put_many([(Kind.DATA, c) for c in chunks])
                except StorageError as e:
                    raise IOFailure(f"cannot store file data: {e}") from e
                for g, c in zip(bguids, chunks):
                    self._remember(g, c)
            bodies, pos = [], off
            for k in range(0, len(chunks), MAX_WRITE_BLOCKS):
                part = list(zip(bguids[k:k + MAX_WRITE_BLOCKS], chunks[k:k + MAX_WRITE_BLOCKS]))
                bodies.append(Write(ino, pos, blocks=tuple((g, len(c)) for g, c in part)))
                pos += sum(len(c) for _, c in part)
            self._file(ino)  # still there after the awaits?
        for b in bodies:
            self._append(b)
        await self._maybe_commit()
        return len(data)

    async def setxattr(self, ino: int, name: bytes | str, value: bytes, flags: int = 0) -> None:
        self._writable()
        n = self._node(ino)
        name = name.encode() if isinstance(name, str) else name
        if not name or len(name) > MAX_XATTR_NAME:
            raise OutOfRange("attribute name empty or over 255 bytes")
        if len(value) > MAX_XATTR_VALUE:
            raise TooBig(f"attribute value over {MAX_XATTR_VALUE} bytes")
        if flags & XATTR_CREATE and name in n.xattrs:
            raise Exists(f"attribute {name!r} exists")
        if flags & XATTR_REPLACE and name not in n.xattrs:
            raise NoData(f"no attribute {name!r}")
        self._append(SetXattr(ino, name, bytes(value)))

    async def removexattr(self, ino: int, name: bytes | str) -> None:
        self._writable()
        n = self._node(ino)
        name = name.encode() if isinstance(name, str) else name
        if name not in n.xattrs:
            raise NoData(f"no attribute {name!r}")
        self._append(SetXattr(ino, name, None))

