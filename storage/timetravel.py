"""Past versions as read-only file systems, and the ``.snapshots``
directory that holds them in one mount (DESIGN.md "p2pfs/": "past versions
are browsable read-only"; the versions themselves: ``storage.history``).

:class:`HistoricalView` is the read half of the namespace API
(``storage.namespace``) over one version, with the volume's own inode
numbers; every mutation raises :class:`~storage.fs_errors.ReadOnly` (EROFS).

:class:`TimeTravel` is what the FUSE layer calls for the ``.snapshots``
directory and everything below it, in *mount* inode numbers:

* ``.snapshots`` (``DIR_NAME``, inode ``SNAPSHOTS_INO``) lists the versions
  of ``History.listed`` by name (``2026-11-25T20:31:07.123Z``, ``...~2``
  for later ones in the same millisecond) and ``latest``, a symlink to the
  newest. Looking up any other version's exact name finds it too (listing
  is coarsened, reaching is not), and a time name that is no version
  (``2026-11-25``, ``2026-11-25T20:31Z``, ``...:07Z``, ``...:07.120Z``) is a
  symlink to the newest version at or before it ("as of").
* A version's root directory has synthetic attributes: the live root's
  owner and its mode without write bits (so the current root permissions
  guard the history too), the version's time, and nlink 1 ("subdirectory
  count unknown" to ``find``), because listing ``.snapshots`` must not
  compute every version's state. Everything below it is as it was.

Inode numbers. Live numbers are the root (1), writers' ranges from
``1 << 40`` up and conflict copies with bit 63 set (``storage.fsstate``),
so ``[2, 1 << 40)`` is never a live number. History uses that range:
``SNAPSHOTS_INO`` is 2 and a translation table hands out numbers from 16
on, one per (version slot, inode of that version) and per alias name, on
first sight. A slot is a version (by its version vector), so hard links in
one version share a number and the same file in two versions has two.
Numbers are not reused; ``forget`` drops a translation once the kernel has
no reference to it (a later lookup gets a new number).
"""

from __future__ import annotations

import stat as _stat
from dataclasses import replace

from .extents import Blk
from .facts import FACT_PREFIX, describe
from .fs_errors import (InvalidArgument, IOFailure, IsADirectory, NameTooLong,
                        NoData, NotADirectory, NotFound, ReadOnly)
from .fsstate import DIR_SIZE, ROOT_INO, FsState, Inode
from .history import History, Point, PointGone
from .namespace import Attr, StatFs, attr_of
from .records import MAX_NAME, FileType
from .vv import VV

DIR_NAME = b".snapshots"
LATEST = b"latest"
SNAPSHOTS_INO = 2
FIRST_INO = 16
INO_LIMIT = 1 << 40          # exclusive: the first live number of writer 0
MUTATIONS = ("create", "mknod", "mkdir", "symlink", "link", "unlink", "rmdir", "rename",
             "setattr", "write", "setxattr", "removexattr")


def _refusal(op: str):
    async def refuse(self, *args, **kw):
        raise ReadOnly(f"{op}: past versions are read-only")
    refuse.__name__ = op
    refuse.__doc__ = f"Refused with EROFS: past versions are read-only ({op})."
    return refuse


class _ReadOnly:
    """Every mutating operation of the namespace API, refused."""

    async def fsync(self, ino: int | None = None) -> None:
        """Nothing to make durable."""

    async def release(self, ino: int) -> None:
        """Nothing to publish."""


for _op in MUTATIONS:
    setattr(_ReadOnly, _op, _refusal(_op))


def _as_name(name: bytes | str) -> bytes:
    if isinstance(name, str):
        name = name.encode()
    if not name or b"/" in name or b"\0" in name:
        raise NotFound(f"no entry {name!r}")
    if len(name) > MAX_NAME:
        raise NameTooLong(f"name of {len(name)} bytes")
    return name


class HistoricalView(_ReadOnly):
    """The namespace API, read-only, over one version (module docstring).
    Inode numbers are the volume's own, as at that version."""

    def __init__(self, history: History, point: Point):
        self.history = history
        self.point = point

    async def state(self) -> FsState:
        """The version's computed state (shared: read only)."""
        return await self.history.state_at(self.point)

    async def _node(self, ino: int) -> Inode:
        n = (await self.state()).inodes.get(ino)
        if n is None:
            raise NotFound(f"no inode {ino} in version {self.point.name}")
        return n

    async def _dir(self, ino: int) -> Inode:
        n = await self._node(ino)
        if not n.is_dir:
            raise NotADirectory(f"inode {ino} is not a directory")
        return n

    async def lookup(self, parent: int, name: bytes | str) -> Attr:
        d = await self._dir(parent)
        st = await self.state()
        if name in (b".", "."):
            return attr_of(d)
        if name in (b"..", ".."):
            return attr_of(st.inodes[d.parent or ROOT_INO])
        name = _as_name(name)
        e = d.entries.get(name)
        if e is None:
            raise NotFound(f"{name!r} not in directory {parent} at {self.point.name}")
        return attr_of(st.inodes[e.ino])

    async def getattr(self, ino: int) -> Attr:
        return attr_of(await self._node(ino))

    async def readdir(self, ino: int) -> list[tuple[bytes, Attr]]:
        """Entries in name order (without '.' and '..')."""
        d = await self._dir(ino)
        st = await self.state()
        return [(name, attr_of(st.inodes[d.entries[name].ino])) for name in sorted(d.entries)]

    async def readlink(self, ino: int) -> bytes:
        n = await self._node(ino)
        if n.ftype != FileType.LNK:
            raise InvalidArgument(f"inode {ino} is not a symlink")
        return n.target

    async def open(self, ino: int, *, write: bool = False) -> Attr:
        """Open for reading; opening for writing is refused (EROFS)."""
        n = await self._node(ino)
        if write:
            raise ReadOnly("past versions are read-only")
        return attr_of(n)

    async def read(self, ino: int, off: int, size: int) -> bytes:
        n = await self._node(ino)
        if n.is_dir:
            raise IsADirectory(f"inode {ino} is a directory")
        if n.ftype != FileType.REG:
            raise InvalidArgument(f"inode {ino} is not a regular file")
        if off < 0 or size < 0:
            raise InvalidArgument("negative offset or size")
        end = min(n.size, off + size)
        if end <= off:
            return b""
        plan = n.data.plan(off, end)
        blocks = await self.history.fetch([e.src.bguid for e in plan if isinstance(e.src, Blk)])
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

    async def getxattr(self, ino: int, name: bytes | str) -> bytes:
        n = await self._node(ino)
        name = name.encode() if isinstance(name, str) else name
        try:
            return n.xattrs[name]
        except KeyError:
            raise NoData(f"no attribute {name!r}") from None

    async def listxattr(self, ino: int) -> list[bytes]:
        return sorted((await self._node(ino)).xattrs)

    async def statfs(self) -> StatFs:
        files = len((await self.state()).inodes)
        return StatFs(4096, 4096, 0, 0, 0, files, 0, 0, MAX_NAME)

    async def facts(self, ino: int) -> dict[str, bytes]:
        """Per-file facts as at this version (``storage.facts``)."""
        st = await self.state()
        n = st.inodes.get(ino)
        if n is None:
            raise NotFound(f"no inode {ino} in version {self.point.name}")
        return describe(self.history.session.view, st, n,
                        self.history.last_touch(ino, self.point), self.point)


class TimeTravel(_ReadOnly):
    """The ``.snapshots`` directory of one mount, in mount inode numbers
    (module docstring). ``session`` is the mounted ``Namespace``."""

    def __init__(self, session, *, history: History | None = None):
        self.session = session
        self.history = history if history is not None else History(session)
        self._slots: list[HistoricalView] = []
        self._slot_of: dict[VV, int] = {}
        self._ino_of: dict[tuple[int, int], int] = {}     # (slot, volume ino) -> mount ino
        self._where: dict[int, tuple[int, int]] = {}      # mount ino -> (slot, volume ino)
        self._alias_ino: dict[bytes, int] = {}            # alias name -> mount ino
        self._alias_of: dict[int, bytes] = {}
        self._next = FIRST_INO

    async def refresh(self) -> bool:
        """Take in what the session accepted since (``History.refresh``)."""
        return await self.history.refresh()

    @staticmethod
    def owns(ino: int) -> bool:
        """Whether a mount inode number belongs to ``.snapshots``."""
        return SNAPSHOTS_INO <= ino < INO_LIMIT

    def forget(self, ino: int) -> None:
        """The kernel holds no reference to ``ino`` any more."""
        where = self._where.pop(ino, None)
        if where is not None:
            self._ino_of.pop(where, None)
        name = self._alias_of.pop(ino, None)
        if name is not None:
            self._alias_ino.pop(name, None)

    # ------------------------------------------------------------------
    # Numbers

    def _alloc(self) -> int:
        if self._next >= INO_LIMIT:
            raise IOFailure("history inode numbers exhausted; remount")
        self._next += 1
        return self._next - 1

    def _slot(self, point: Point) -> int:
        s = self._slot_of.get(point.cover)
        if s is None:
            s = self._slot_of[point.cover] = len(self._slots)
            self._slots.append(HistoricalView(self.history, point))
        else:
            self._slots[s].point = point      # the newest description of it
        return s

    def _ino(self, slot: int, ino: int) -> int:
        m = self._ino_of.get((slot, ino))
        if m is None:
            m = self._ino_of[(slot, ino)] = self._alloc()
            self._where[m] = (slot, ino)
        return m

    def mount_ino(self, point: Point, ino: int = ROOT_INO) -> int:
        """The mount number of volume inode ``ino`` in version ``point``."""
        return self._ino(self._slot(point), ino)

    def _located(self, ino: int) -> tuple[HistoricalView, int, int]:
        where = self._where.get(ino)
        if where is None:
            raise NotFound(f"no history inode {ino}")
        return self._slots[where[0]], where[0], where[1]

    # ------------------------------------------------------------------
    # Attributes

    def _live_root(self) -> Inode:
        return self.session.replica.current.inodes[ROOT_INO]

    def _dir_attr(self, ino: int, t: int, nlink: int) -> Attr:
        r = self._live_root()
        return Attr(ino, _stat.S_IFDIR | (r.mode & 0o555), nlink, r.uid, r.gid, DIR_SIZE,
                    DIR_SIZE // 512, t, t, t)

    def dir_attr(self) -> Attr:
        """Attributes of ``.snapshots`` itself (for the live root's readdir)."""
        latest = self.history.latest()
        t = latest.time_ns if latest is not None else self._live_root().mtime
        return self._dir_attr(SNAPSHOTS_INO, t, 2 + len(self.history.listed()))

    def _root_attr(self, slot: int) -> Attr:
        p = self._slots[slot].point
        return self._dir_attr(self._ino(slot, ROOT_INO), p.time_ns, 1)

    def _mapped(self, slot: int, a: Attr) -> Attr:
        if a.ino == ROOT_INO:
            return self._root_attr(slot)
        return replace(a, ino=self._ino(slot, a.ino))

    def _alias_target(self, name: bytes) -> Point:
        h = self.history
        p = h.latest() if name == LATEST else h.resolve(name.decode("ascii"))
        if p is None:
            raise NotFound(f"no version at or before {name!r}")
        return p

    def _alias_attr(self, ino: int) -> Attr:
        p = self._alias_target(self._alias_of[ino])
        r = self._live_root()
        return Attr(ino, _stat.S_IFLNK | 0o777, 1, r.uid, r.gid, len(p.name), 1,
                    p.time_ns, p.time_ns, p.time_ns)

    # ------------------------------------------------------------------
    # The read half of the namespace API

    async def lookup(self, parent: int, name: bytes | str) -> Attr:
        """``parent`` is the live root (for ``DIR_NAME``), ``SNAPSHOTS_INO``
        or a history inode."""
        name = name.encode() if isinstance(name, str) else name
        if parent == ROOT_INO:
            if name != DIR_NAME:
                raise NotFound(f"{name!r} is not the history directory")
            return self.dir_attr()
        if parent == SNAPSHOTS_INO:
            return self._lookup_top(name)
        if parent in self._alias_of:
            raise NotADirectory(f"{self._alias_of[parent]!r} is a symlink")
        view, slot, ino = self._located(parent)
        if name == b".." and ino == ROOT_INO:
            return self.dir_attr()
        return self._mapped(slot, await view.lookup(ino, name))

    def _lookup_top(self, name: bytes) -> Attr:
        if name == b".":
            return self.dir_attr()
        if name == b"..":
            return attr_of(self._live_root())
        try:
            text = _as_name(name).decode("ascii")
        except UnicodeDecodeError:
            raise NotFound(f"{name!r} names no version") from None
        p = self.history.version(text)
        if p is not None:
            return self._root_attr(self._slot(p))
        self._alias_target(name)          # ENOENT unless it resolves now
        ino = self._alias_ino.get(name)
        if ino is None:
            ino = self._alias_ino[name] = self._alloc()
            self._alias_of[ino] = name
        return self._alias_attr(ino)

    async def getattr(self, ino: int) -> Attr:
        if ino == SNAPSHOTS_INO:
            return self.dir_attr()
        if ino in self._alias_of:
            return self._alias_attr(ino)
        view, slot, vino = self._located(ino)
        if vino == ROOT_INO:
            if not self.history.exists(view.point):
                raise PointGone(f"version {view.point.name} is gone")
            return self._root_attr(slot)     # without computing the version
        return self._mapped(slot, await view.getattr(vino))

    async def readdir(self, ino: int) -> list[tuple[bytes, Attr]]:
        """Entries without '.' and '..': for ``.snapshots``, ``latest`` then
        the listed versions oldest first; in a version, in name order."""
        if ino == SNAPSHOTS_INO:
            out = []
            if self.history.latest() is not None:
                out.append((LATEST, self._lookup_top(LATEST)))
            for p in self.history.listed():
                out.append((p.name.encode(), self._root_attr(self._slot(p))))
            return out
        if ino in self._alias_of:
            raise NotADirectory("a version alias is a symlink")
        view, slot, vino = self._located(ino)
        return [(n, self._mapped(slot, a)) for n, a in await view.readdir(vino)]

    async def readlink(self, ino: int) -> bytes:
        if ino in self._alias_of:
            return self._alias_target(self._alias_of[ino]).name.encode()
        if ino == SNAPSHOTS_INO:
            raise InvalidArgument("not a symlink")
        view, _, vino = self._located(ino)
        return await view.readlink(vino)

    async def open(self, ino: int, *, write: bool = False) -> Attr:
        if write:
            raise ReadOnly("past versions are read-only")
        return await self.getattr(ino)

    async def read(self, ino: int, off: int, size: int) -> bytes:
        if ino == SNAPSHOTS_INO:
            raise IsADirectory("the history directory")
        if ino in self._alias_of:
            raise InvalidArgument("a version alias is a symlink")
        view, _, vino = self._located(ino)
        return await view.read(vino, off, size)

    async def getxattr(self, ino: int, name: bytes | str) -> bytes:
        """The inode's own attributes, and the facts (``user.p2pfs.*``) of
        inodes inside a version."""
        name = name.encode() if isinstance(name, str) else name
        if ino == SNAPSHOTS_INO or ino in self._alias_of:
            raise NoData(f"no attribute {name!r}")
        view, _, vino = self._located(ino)
        if name.startswith(FACT_PREFIX.encode()):
            v = (await view.facts(vino)).get(name.decode("ascii", "replace"))
            if v is None:
                raise NoData(f"no attribute {name!r}")
            return v
        return await view.getxattr(vino, name)

    async def listxattr(self, ino: int) -> list[bytes]:
        """The inode's own attributes (facts are not listed)."""
        if ino == SNAPSHOTS_INO or ino in self._alias_of:
            return []
        view, _, vino = self._located(ino)
        return await view.listxattr(vino)

    async def facts(self, ino: int) -> dict[str, bytes]:
        view, _, vino = self._located(ino)
        return await view.facts(vino)

    async def statfs(self) -> StatFs:
        return await self.session.statfs()
