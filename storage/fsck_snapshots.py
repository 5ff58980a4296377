"""Checking snapshots against the logs (Ivy, OSDI 2002, section 4.4: a
snapshot is the file system a prefix of the records computes; DESIGN.md
"storage/logs": reading starts from the newest snapshot, so a wrong one
would show every client a wrong file system).

Every snapshot a head, a SnapshotMark record or another snapshot (``prev``)
names is loaded in full by ``storage.snapshots`` (which checks its
structure), through :class:`RecordingBlocks`, so the blocks it consists of
are exactly those its reader fetched. ``storage.fsck_logs`` replays the
records in the total order and stops at each snapshot's cover; there
:meth:`SnapshotCheck.compare` requires the same inodes, attributes,
entries, extended attributes, conflicts and inode counters, and the same
file bytes: where the snapshot moved small writes into a DATA block of its
own, that block is opened and compared (:meth:`SnapshotCheck.finish`).
Roots in ``skip`` (quarantined) are not read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from overlay.wire.ids import short

from .blockapi import BlockAccess, Kind
from .errors import StorageError
from .extents import Blk
from .fsck_refs import LiveSet, Ref
from .fsstate import FsState
from .logs import LogHead
from .records import Record, SnapshotMark
from .snapshots import SnapshotInfo, load_info, load_state
from .timenames import time_text
from .volume import View


class RecordingBlocks(BlockAccess):
    """A BlockAccess that remembers every block asked for (so the blocks of
    a snapshot are exactly those its reader fetched), over a cache of
    snapshot blocks shared by all snapshots (successive ones share most
    pages)."""

    def __init__(self, inner: BlockAccess, cache: "PageCache"):
        self.inner = inner
        self.cache = cache
        self.asked: list[tuple[bytes, Kind]] = []

    async def put(self, kind, plaintext):
        raise StorageError("fsck only reads")

    async def get(self, bguid, kind):
        return (await self.get_many([(bguid, kind)]))[0]

    async def get_many(self, items):
        items = list(items)
        self.asked.extend(items)
        missing = [it for it in dict.fromkeys(items) if it not in self.cache.pages]
        fetched = dict(zip(missing, await self.inner.get_many(missing))) if missing else {}
        for it, b in fetched.items():
            if it[1] == Kind.SNAPSHOT:
                self.cache.keep(it, b)
        return [self.cache.pages.get(it) or fetched[it] for it in items]


class PageCache:
    """Snapshot blocks already fetched, up to ``limit`` bytes."""

    def __init__(self, limit: int = 256 << 20):
        self.pages: dict[tuple[bytes, Kind], bytes] = {}
        self.bytes = 0
        self.limit = limit

    def keep(self, key: tuple[bytes, Kind], data: bytes) -> None:
        if self.bytes + len(data) <= self.limit:
            self.pages[key] = data
            self.bytes += len(data)


@dataclass
class Snap:
    root: bytes
    writer: bytes | None          # who named it (head or record), before loading
    head_of: set = field(default_factory=set)   # writers whose current head names it
    info: SnapshotInfo | None = None
    state: FsState | None = None
    error: str | None = None
    blocks: list[tuple[bytes, Kind]] = field(default_factory=list)


class SnapshotCheck:
    """The snapshots of one volume (module docstring)."""

    def __init__(self, view: View, blocks: BlockAccess, live: LiveSet, progress, *,
                 skip: set[bytes] = frozenset()):
        self.view = view
        self.blocks = blocks
        self.live = live
        self.progress = progress
        self.skip = set(skip)
        self.snapshots: dict[bytes, Snap] = {}
        self.bad: dict[bytes, Snap] = {}
        self.quarantined = 0
        self.cache = PageCache()
        self._pending: list[tuple[Snap, int, bytes, int, bytes]] = []

    async def load(self, heads: dict[bytes, LogHead], records: dict[bytes, list[Record]]
                   ) -> None:
        """Load every snapshot the heads, the records and other snapshots
        name; the ones that cannot be loaded go to ``bad``."""
        todo: list[Snap] = []
        for w, h in heads.items():
            if h.snap is not None:
                todo.append(Snap(h.snap, w, head_of={w}))
        for w, recs in records.items():
            for r in recs:
                if isinstance(r.body, SnapshotMark):
                    todo.append(Snap(r.body.root, w))
        done = 0
        while todo:
            s = todo.pop()
            known = self.snapshots.get(s.root)
            if known is not None:
                known.head_of |= s.head_of
                continue
            if s.root in self.skip:
                self.quarantined += 1
                continue
            self.snapshots[s.root] = s
            rec = RecordingBlocks(self.blocks, self.cache)
            try:
                s.info = await load_info(rec, s.root, self.view.volume)
                s.state = await load_state(rec, s.info)
            except StorageError as e:     # SnapshotError, or a block that cannot be read
                s.error = f"cannot be loaded: {e}"
            s.blocks = rec.asked
            for g, kind in rec.asked:
                self.live.add(g, kind, Ref("snapshot", writer=s.writer, root=s.root))
            if s.info is not None:
                if s.writer is not None and s.info.writer != s.writer:
                    s.error = s.error or (f"names writer {short(s.info.writer)} but was "
                                          f"published by {short(s.writer)}")
                s.writer = s.info.writer
                if s.info.prev is not None:
                    todo.append(Snap(s.info.prev, s.info.writer))
            if s.state is not None:
                for n in s.state.inodes.values():
                    if n.data is not None:
                        for x in n.data:
                            if isinstance(x.src, Blk):
                                self.live.add(x.src.bguid, Kind.DATA,
                                              Ref("snapshot", writer=s.writer, root=s.root,
                                                  ino=n.ino))
            if s.error:
                self.bad[s.root] = s
            done += 1
            self.progress("snapshots", done, done + len(todo))

    def compare(self, live: FsState, s: Snap) -> str | None:
        """Why the snapshot differs from ``live`` (None: equal so far;
        inline-versus-block data is compared later, once fetched)."""
        snap = s.state
        if set(live.inodes) != set(snap.inodes):
            extra = sorted(set(snap.inodes) ^ set(live.inodes))[:3]
            return f"inodes differ (e.g. {', '.join(map(str, extra))})"
        if live.hwm != snap.hwm:
            return "inode counters differ"
        if list(live.conflicts) != list(snap.conflicts):
            return "conflict lists differ"
        for ino, a in live.inodes.items():
            b = snap.inodes[ino]
            if _meta(a) != _meta(b):
                return f"inode {ino} attributes or entries differ"
            if (a.data is None) != (b.data is None):
                return f"inode {ino} type differs"
            if a.data is None:
                continue
            xa, xb = list(a.data), list(b.data)
            if [(x.off, x.end) for x in xa] != [(x.off, x.end) for x in xb]:
                return f"inode {ino} extents differ"
            for x, y in zip(xa, xb):
                if isinstance(x.src, Blk) or isinstance(y.src, Blk):
                    if isinstance(x.src, Blk) and isinstance(y.src, Blk):
                        if (x.src, x.soff) != (y.src, y.soff):
                            return f"inode {ino} data blocks differ"
                    elif isinstance(y.src, Blk):
                        # Inline bytes the snapshot packed into a DATA block.
                        self._pending.append(
                            (s, ino, y.src.bguid, y.soff, x.src[x.soff:x.soff + x.length]))
                    else:
                        return f"inode {ino} data differs (block in the logs, inline here)"
                elif x.src[x.soff:x.soff + x.length] != y.src[y.soff:y.soff + y.length]:
                    return f"inode {ino} data differs"
        return None

    async def finish(self) -> None:
        """Compare the bytes ``compare`` left for later (small writes a
        snapshot packed into DATA blocks)."""
        want = sorted({g for s, _, g, _, _ in self._pending if s.root not in self.bad})
        got: dict[bytes, bytes] = {}
        for i in range(0, len(want), 64):
            chunk = want[i:i + 64]
            try:
                got.update(zip(chunk, await self.blocks.get_many([(g, Kind.DATA)
                                                                  for g in chunk])))
            except StorageError:
                pass    # the block survey reports what cannot be read
        for s, ino, g, soff, expect in self._pending:
            if s.root in self.bad or g not in got:
                continue
            if got[g][soff:soff + len(expect)] != expect:
                s.error = f"differs from the file system its records compute: inode {ino} data"
                self.bad[s.root] = s
        self._pending = []

    def label(self, s: Snap) -> list[str]:
        who = f" of writer {short(s.writer)}" if s.writer else ""
        cover = f", {s.info.cover.total} records" if s.info is not None else ""
        when = f" taken {time_text(s.info.time)}" if s.info is not None else ""
        return [f"snapshot {short(s.root)}{who}{when}{cover}"]


def _meta(n) -> tuple:
    """An inode as a reader sees it, but its data (compared apart)."""
    return (int(n.ftype), n.mode, n.uid, n.gid, n.st_nlink, n.st_size, n.atime, n.mtime,
            n.ctime, n.target, n.rdev, tuple(sorted(n.xattrs.items())),
            tuple(sorted((k, e.ino) for k, e in n.entries.items()))
            if n.entries is not None else None)
