"""The past versions of a volume (Ivy, OSDI 2002, section 4: the file
system is a pure function of the log records, so any prefix of the one
total order is a state that can be recomputed; DESIGN.md "storage/logs"
and "p2pfs/": "past versions are browsable read-only").

A :class:`History` keeps every record this client has accepted (it reads
each writer's log from the head the session accepted back to seq 1, with
its own :class:`~storage.logs.LogReader`, so every fork and corruption
check applies) in the total order of ``storage.vv``, and offers:

* **versions** (:class:`Point`): prefixes of that order. A prefix ends
  after the last record of a log block of any writer (a group commit, so
  one ``sync``/close of one writer; a commit of more than ``MAX_BLOCK``
  bytes of records makes several). The first such prefix (the volume as
  created) is a version; later steps that only add records without
  visible effect (End, SnapshotMark, Prepare, Cancel) are not. A version
  whose prefix is exactly what a stored snapshot covers names that
  snapshot. A prefix is a set of records, so its state is the same on
  every client holding those records; it is named by its version vector
  (``cover``: per writer, the last seq in it) and by its time. Each rule
  looks only at the records before the cut, so versions are as final as
  the records in them. Records after the last block end read so far (a
  writer's records still waiting for their causes) are in no version yet.
* **names and listing** (``storage.timenames``): a version is named by
  its time, ``2026-11-25T20:31:07.123Z`` (``~2``, ``~3`` for later ones in
  the same millisecond); a name depends on the prefix only, so it is as
  final as the version (``is_settled``). ``listed`` coarsens long
  histories; ``version`` finds any version by exact name, ``as_of`` and
  ``resolve`` the newest at or before a time.
* **states** (``state_at``): a point's :class:`~storage.fsstate.FsState`,
  computed by replay from the best start: a cached state (LRU of
  ``cache_states``) or a stored snapshot whose records are a prefix of the
  point's and which every later record of the point has seen (the clean-cut
  condition of ``Replica.clean``), else an empty state. ``replayed``
  counts the records applied. The states returned are shared: read them,
  never change them.

What is included: for each writer, the records up to the head the session
accepted and no further than the records the session's replica has
delivered (so the newest version is the live state as far as writers have
published it: this client's own unpublished records are not history yet),
cut back so the set is causally closed. Records a removed writer wrote
after its last counted seq are excluded, as the live state excludes them.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass

import trio

from .blockapi import Kind
from .errors import StorageError
from .fs_errors import IOFailure, NotFound
from .fsapply import apply
from .fsstate import FsState
from .logs import LogReader
from .records import (Cancel, End, Link, MkInode, Prepare, Record, Rename, SetAttr, SetXattr,
                      SnapshotMark, Unlink, Write)
from .snapshots import load_info, load_state
from .timenames import MAX_LISTED, coarsen, parse_time, point_name
from .vv import VV

STATE_CACHE = 4                  # computed states kept (LRU)
SNAPSHOT_CACHE = 2               # loaded snapshot states kept (LRU)
DATA_CACHE_BYTES = 8 << 20       # plaintext DATA blocks kept for reads of past versions
_NOOPS = (End, SnapshotMark, Prepare, Cancel)


class PointGone(NotFound):
    """ENOENT: a version this client showed earlier is no longer among the
    records it holds (a removed writer's records were dropped)."""


@dataclass(frozen=True, slots=True)
class Point:
    """One version of the volume: the first ``count`` records of the total
    order, which are the records ``cover`` names (per writer, seq 1 to
    ``cover[writer]``). ``key`` is the order key of its last record,
    ``writer`` that record's writer, ``epoch`` the order it was cut from
    (``History.epoch``), ``snapshot`` the root of a stored snapshot of
    exactly this prefix, if any."""

    name: str
    time_ns: int
    cover: VV
    count: int
    key: tuple
    writer: bytes
    epoch: int
    snapshot: bytes | None = None


@dataclass(frozen=True, slots=True)
class SnapshotRef:
    """A stored snapshot: its root BGUID, the writer that stored it, the
    records it covers and the time of its SnapshotMark record (None when it
    is known only from a log-head). ``point`` is the name of the version it
    holds, when that is a prefix of this client's order."""

    root: bytes
    writer: bytes
    cover: VV
    time_ns: int | None
    point: str | None = None


def touched(rec: Record) -> tuple[int, ...]:
    """The inodes a record names (its effects land on them or, for data
    changes that lose a conflict, on a copy of them)."""
    b = rec.body
    if isinstance(b, (MkInode, Write, SetAttr, SetXattr)):
        return (b.ino,)
    if isinstance(b, (Link, Unlink)):
        return (b.dir, b.ino)
    if isinstance(b, Rename):
        return (b.sdir, b.ddir, b.ino) + ((b.dino,) if b.dino is not None else ())
    return ()


# --------------------------------------------------------------------------


class History:
    """Every version of a mounted volume (module docstring). ``session`` is
    a mounted ``storage.session.Session`` (a ``Namespace``); call
    ``await refresh()`` to take in what it has accepted since."""

    def __init__(self, session, *, use_snapshots: bool = True, cache_states: int = STATE_CACHE,
                 max_listed: int = MAX_LISTED):
        self.session = session
        self.volume = session.view.volume
        self.use_snapshots = use_snapshots
        self.cache_states = max(1, cache_states)
        self.max_listed = max_listed
        self.reader = LogReader(self.volume, session.blocks)
        self.logs: dict[bytes, list[Record]] = {}     # writer -> records seq 1.. read so far
        self.caps: dict[bytes, int] = {}              # writer -> last seq included
        self.order: list[Record] = []                 # included records, total order
        self.epoch = 0                                # bumped when the order changes but by appending
        self.problems: dict[bytes, StorageError] = {}
        self.bad_snapshots: dict[bytes, StorageError] = {}
        self.replayed = 0                             # records applied computing states
        self.snapshot_loads = 0
        self.last_start = ""                          # "empty", "cache" or "snapshot"
        self._versions: list[Point] = []
        self._by_name: dict[str, Point] = {}
        self._by_cover: dict[VV, Point] = {}
        self._listed: list[Point] | None = None
        self._touch: dict[int, list[int]] = {}        # ino -> positions in order
        self._marks: dict[bytes, SnapshotRef] = {}    # root -> snapshot
        self._states: OrderedDict[VV, tuple[int, tuple | None, FsState]] = OrderedDict()
        self._snap_states: OrderedDict[bytes, tuple[tuple, FsState]] = OrderedDict()
        self._data: OrderedDict[bytes, bytes] = OrderedDict()
        self._data_bytes = 0
        self._lock = trio.Lock()

    # ------------------------------------------------------------------
    # Taking in records

    async def refresh(self) -> bool:
        """Read what the session's accepted heads add; returns whether the
        included records changed. Concurrent calls take turns."""
        async with self._lock:
            return await self._refresh_locked()

    async def _refresh_locked(self) -> bool:
        s = self.session
        heads = dict(s.reader.heads)
        for p in s.view.participants:
            head = heads.get(p.id)
            if head is None or p.id in self.problems:
                continue
            try:
                recs = await self.reader.read_new(head)
            except StorageError as e:
                self.problems[p.id] = e       # keep what was read before
                continue
            self.logs.setdefault(p.id, []).extend(recs)
            for r in recs:
                if isinstance(r.body, SnapshotMark) and r.body.root not in self._marks:
                    self._marks[r.body.root] = SnapshotRef(r.body.root, r.writer, r.body.cover,
                                                           r.time)
        for w, head in heads.items():
            if head.snap is not None and head.snap not in self._marks:
                await self._note_head_snapshot(w, head.snap)
        caps = self._closed_caps()
        if caps == self.caps:
            return False
        grow = all(caps.get(w, 0) >= c for w, c in self.caps.items())
        new = [r for w, c in caps.items() for r in self.logs[w][self.caps.get(w, 0):c]]
        new.sort(key=lambda r: r.key)
        self.caps = caps
        if grow and (not self.order or not new or new[0].key > self.order[-1].key):
            start = len(self.order)
            self.order.extend(new)
        else:
            self.order = sorted((r for w, c in caps.items() for r in self.logs[w][:c]),
                                key=lambda r: r.key)
            self.epoch += 1
            self._touch = {}
            start = 0
        for i in range(start, len(self.order)):
            for ino in touched(self.order[i]):
                self._touch.setdefault(ino, []).append(i)
        self._compute_versions()
        return True

    async def _note_head_snapshot(self, writer: bytes, root: bytes) -> None:
        if root in self.bad_snapshots:
            return
        try:
            info = await load_info(self.session.blocks, root, self.volume)
        except StorageError as e:
            self.bad_snapshots[root] = e
            return
        self._marks[root] = SnapshotRef(root, info.writer, info.cover, None)

    def _closed_caps(self) -> dict[bytes, int]:
        """Per writer, the last seq to include: read, delivered by the
        replica, counted by the view, and every cause included."""
        s = self.session
        known = s.replica.known
        caps = {}
        for p in s.view.participants:
            n = min(len(self.logs.get(p.id, ())), known[p.id])
            if p.removed_at is not None:
                n = min(n, p.removed_at)
            if n:
                caps[p.id] = n
        changed = True
        while changed:
            changed = False
            for w, n in list(caps.items()):
                log = self.logs[w]
                k = n
                while k and any(sq > caps.get(x, 0) for x, sq in log[k - 1].vv.items() if x != w):
                    k -= 1
                if k != n:
                    changed = True
                    if k:
                        caps[w] = k
                    else:
                        del caps[w]
        return caps

    def _cover_key(self, cover: VV) -> tuple | None:
        """The key of the last record of a cover, None if not all included."""
        if not cover or any(sq > self.caps.get(w, 0) for w, sq in cover.items()):
            return None
        return max(self.logs[w][sq - 1].key for w, sq in cover.items())

    def _compute_versions(self) -> None:
        """Cut the order into versions. Every rule looks only at the prefix
        before the cut (block ends are fixed once a log is read), so a
        settled version, and its name, never change."""
        order = self.order
        ends = {w: {last for _, last, _ in idx} for w, idx in self.reader.block_index.items()}
        removed = {p.id: p.removed_at for p in self.session.view.participants
                   if p.removed_at is not None}
        snap_at: dict[int, bytes] = {}
        for ref in self._marks.values():
            n = ref.cover.total
            k = self._cover_key(ref.cover)
            if k is not None and 0 < n <= len(order) and order[n - 1].key == k:
                snap_at.setdefault(n, ref.root)
        versions: list[Point] = []
        cover: dict[bytes, int] = {}
        tmax, effect, last_ms, rank = None, False, None, 0
        for i, r in enumerate(order, 1):
            cover[r.writer] = r.seq
            tmax = r.time if tmax is None else max(tmax, r.time)
            effect = effect or not isinstance(r.body, _NOOPS)
            cut = r.seq in ends.get(r.writer, ()) or r.seq == removed.get(r.writer)
            if not cut or not (effect or not versions):
                continue
            ms = tmax // 1_000_000
            rank = rank + 1 if ms == last_ms else 1
            last_ms = ms
            versions.append(Point(point_name(tmax, rank), tmax, VV(cover), i, r.key, r.writer,
                                  self.epoch, snap_at.get(i)))
            effect = False
        self._versions = versions
        self._by_name = {p.name: p for p in versions}
        self._by_cover = {p.cover: p for p in versions}
        self._listed = None

    # ------------------------------------------------------------------
    # Versions

    def versions(self) -> list[Point]:
        """Every version, oldest first."""
        return list(self._versions)

    def listed(self) -> list[Point]:
        """The versions to list, oldest first (``coarsen``)."""
        if self._listed is None:
            self._listed = coarsen(self._versions, self.max_listed)
        return list(self._listed)

    def latest(self) -> Point | None:
        return self._versions[-1] if self._versions else None

    def version(self, name: str) -> Point | None:
        """The version with exactly this name, or None."""
        return self._by_name.get(name)

    def at_cover(self, cover: VV) -> Point | None:
        """The version with exactly this version vector, or None."""
        return self._by_cover.get(cover)

    def as_of(self, time_ns: int) -> Point | None:
        """The newest version whose time is at or before ``time_ns``."""
        i = bisect.bisect_right(self._versions, time_ns, key=lambda p: p.time_ns)
        return self._versions[i - 1] if i else None

    def resolve(self, name: str) -> Point | None:
        """A version by exact name, else by a time name (``parse_time``):
        the newest version in or before that millisecond."""
        p = self._by_name.get(name)
        if p is not None:
            return p
        t = parse_time(name)
        if t is None or t[1] is not None:
            return None
        return self.as_of(t[0] * 1_000_000 + 999_999)

    def is_settled(self, point: Point) -> bool:
        """Whether every writer has promised to have seen this version's
        records: no record can arrive any more that sorts inside it, so it
        (and its name) is final."""
        bk = self.session.replica.base_key
        return bk is not None and point.key <= bk

    def snapshots(self) -> list[SnapshotRef]:
        """Stored snapshots known from SnapshotMark records and log-heads,
        by cover size; ``point`` names the version each one holds."""
        out = []
        for ref in sorted(self._marks.values(), key=lambda r: (r.cover.total, r.root)):
            p = self._by_cover.get(ref.cover)
            out.append(SnapshotRef(ref.root, ref.writer, ref.cover, ref.time_ns,
                                   p.name if p is not None and p.snapshot is not None else None))
        return out

    def last_touch(self, ino: int, point: Point | None = None) -> Record | None:
        """The last record naming ``ino`` (``touched``), in ``point`` if given."""
        pos = self._touch.get(ino)
        if not pos:
            return None
        if point is None:
            return self.order[pos[-1]]
        if point.epoch == self.epoch:
            k = bisect.bisect_left(pos, point.count)
            return self.order[pos[k - 1]] if k else None
        for i in reversed(pos):
            r = self.order[i]
            if r.seq <= point.cover[r.writer]:
                return r
        return None

    # ------------------------------------------------------------------
    # States

    def exists(self, point: Point) -> bool:
        """Whether every record of ``point`` is still included."""
        return all(sq <= self.caps.get(w, 0) for w, sq in point.cover.items())

    def _records_of(self, point: Point) -> list[Record]:
        if (point.epoch == self.epoch and point.count <= len(self.order)
                and self.order[point.count - 1].key == point.key):
            return self.order[:point.count]
        return sorted((r for w, sq in point.cover.items() for r in self.logs[w][:sq]),
                      key=lambda r: r.key)

    def cached_state(self, point: Point) -> FsState | None:
        """The state of ``point`` if it is cached (do not change it)."""
        hit = self._states.get(point.cover)
        return hit[2] if hit is not None and self.exists(point) else None

    async def state_at(self, point: Point) -> FsState:
        """The file system as of ``point`` (module docstring). Shared: read
        only. Raises :class:`PointGone` for a version whose records are gone."""
        if not self.exists(point):
            raise PointGone(f"version {point.name} is no longer among this client's records")
        hit = self._states.get(point.cover)
        if hit is not None:
            self._states.move_to_end(point.cover)
            return hit[2]
        recs = self._records_of(point)
        n0, start, how = 0, None, "empty"
        for cover, (n, key, st) in self._states.items():
            if n0 < n <= len(recs) and recs[n - 1].key == key and cover <= point.cover:
                n0, start, how = n, st, "cache"
        if self.use_snapshots:
            for ref in sorted(self._marks.values(), key=lambda r: -r.cover.total):
                n = ref.cover.total
                if n <= n0:
                    break
                if (n > len(recs) or not ref.cover <= point.cover
                        or recs[n - 1].key != self._cover_key(ref.cover)
                        or not all(ref.cover <= r.vv for r in recs[n:])):
                    continue
                st = await self._snapshot_state(ref)
                if st is not None:
                    n0, start, how = n, st, "snapshot"
                    break
        st = start.clone() if start is not None else FsState()
        st.ranges = {q.id: q.index + 1 for q in self.session.view.participants}
        for r in recs[n0:]:
            apply(st, r)
        st.clear_dirty()
        self.replayed += len(recs) - n0
        self.last_start = how
        self._states[point.cover] = (len(recs), recs[-1].key if recs else None, st)
        while len(self._states) > self.cache_states:
            self._states.popitem(last=False)
        return st

    async def _snapshot_state(self, ref: SnapshotRef) -> FsState | None:
        hit = self._snap_states.get(ref.root)
        if hit is not None:
            self._snap_states.move_to_end(ref.root)
            return hit[1]
        if ref.root in self.bad_snapshots:
            return None
        try:
            info = await load_info(self.session.blocks, ref.root, self.volume)
            if info.cover != ref.cover or info.key != self._cover_key(ref.cover):
                raise IOFailure("snapshot root does not match its SnapshotMark")
            st = await load_state(self.session.blocks, info)
        except StorageError as e:
            self.bad_snapshots[ref.root] = e
            return None
        self.snapshot_loads += 1
        self._snap_states[ref.root] = (info.key, st)
        while len(self._snap_states) > SNAPSHOT_CACHE:
            self._snap_states.popitem(last=False)
        return st

    # ------------------------------------------------------------------
    # File data of past versions

    async def fetch(self, bguids: list[bytes]) -> dict[bytes, bytes]:
        """Plaintext DATA blocks (an LRU of ``DATA_CACHE_BYTES``)."""
        out, missing = {}, []
        for g in dict.fromkeys(bguids):
            b = self.session.held_data(g)   # named ahead, not stored until the next sync
            if b is not None:
                out[g] = b
                continue
            b = self._data.get(g)
            if b is None:
                missing.append(g)
            else:
                self._data.move_to_end(g)
                out[g] = b
        if missing:
            try:
                got = await self.session.blocks.get_many([(g, Kind.DATA) for g in missing])
            except StorageError as e:
                raise IOFailure(f"cannot read file data of a past version: {e}") from e
            for g, b in zip(missing, got):
                out[g] = b
                if g not in self._data:
                    self._data[g] = b
                    self._data_bytes += len(b)
            while self._data_bytes > DATA_CACHE_BYTES and self._data:
                _, old = self._data.popitem(last=False)
                self._data_bytes -= len(old)
        return out
