"""Checking the logs of a volume and replaying them, and saying what each
block holds (Ivy, OSDI 2002, sections 3-4: the file system is a pure
function of the log records; DESIGN.md "storage/logs").

Logs. Each writer's log is read from its head back to seq 1 with the checks
of ``storage.logs.LogReader`` (strict decoding, this volume and writer, a
chain of consecutive seqs, vectors that never go back, an End record first,
the head's vector covering its newest record), done here block by block so
that a log broken in the middle still yields the records after the break
(the newest) and names the block where it broke.

Replay. The records of every writer whose log is whole (up to
``removed_at`` for a removed writer, cut back so the set is causally
closed, as ``storage.history`` does) are applied in the one total order
(``storage.vv``) to a fresh ``FsState``: that is the file system every
client computes, and its invariants are checked (``FsState.check``). The
replay stops at each snapshot's cover for ``storage.fsck_snapshots`` to
compare.

What a block affects. Every block reached goes into the :class:`LiveSet`
(``storage.fsck_refs``) with what reaches it; :meth:`LogCheck.affects`
turns that into paths in the newest version (or, for a broken log, in the
newest snapshot), versions (record times and writers, snapshots) and logs.
"""

from __future__ import annotations

from typing import Callable

import trio

from overlay.wire.ids import short

from .blockapi import BlockAccess, Kind
from .errors import StorageError
from .extents import Blk
from .fsapply import apply
from .fsck_refs import LiveSet, Ref
from .fsck_snapshots import RecordingBlocks, Snap, SnapshotCheck
from .fsstate import FsState
from .history import touched
from .logs import BadLogHead, LogCorrupt, LogHead
from .records import LogBlock, Op, Record, RecordError, Write, decode_block
from .snapshots import load_info
from .timenames import time_text
from .volume import View
from .vv import VV

MAX_AFFECTS = 50        # entries listed per problem (the rest are counted)
MAX_ANCHOR_SNAPSHOTS = 64   # snapshots read ahead for their log positions
PREFETCH_PARALLEL = 8       # stretches of logs fetched at once

Progress = Callable[[str, int, int], None]


class LogCheck:
    """Logs, replay and snapshots of one volume (module docstring)."""

    def __init__(self, view: View, blocks: BlockAccess, *, progress: Progress | None = None,
                 skip_snapshots: set[bytes] = frozenset()):
        self.view = view
        self.blocks = blocks
        self.progress = progress or (lambda *a: None)
        self.live = LiveSet()
        self.records: dict[bytes, list[Record]] = {}     # writer -> its records, seq order
        self.broken: dict[bytes, str] = {}               # writer -> why its log is unusable
        self.caps: dict[bytes, int] = {}                 # writer -> records replayed
        self.state: FsState | None = None                # the newest file system
        self.snaps = SnapshotCheck(view, blocks, self.live, self.progress,
                                   skip=skip_snapshots)
        self.stats: dict[str, int] = {}
        self._paths: dict[int, str | None] = {}
        self._data_inos: dict[bytes, set[int]] = {}
        self._fetched: dict[bytes, LogBlock] = {}     # log blocks prefetched

    @property
    def snapshots(self) -> dict[bytes, Snap]:
        return self.snaps.snapshots

    async def run(self, heads: dict[bytes, LogHead], report) -> None:
        """Every check of the module docstring; problems go to ``report``."""
        from .fsck import Problem   # the problem type lives with the report

        self.progress("logs", 0, len(self.view.participants))
        await self._prefetch(heads)
        for k, p in enumerate(self.view.participants):
            self.progress("logs", k, len(self.view.participants))
            head = heads.get(p.id)
            if head is not None:
                await self._read_log(p.id, head)
        self._fetched.clear()
        self.stats["records"] = sum(len(v) for v in self.records.values())
        order = self._order()
        await self.snaps.load(heads, self.records)
        self.progress("replay", 0, len(order))
        self._replay(order, report, Problem)
        await self.snaps.finish()
        self.stats["snapshots"] = len(self.snaps.snapshots)
        if self.snaps.quarantined:
            self.stats["snapshots_quarantined"] = self.snaps.quarantined
        for w, why in self.broken.items():
            recs = self.records.get(w, [])
            report.add(Problem("log-broken", f"writer {short(w)}: {why}", [w],
                               affects=[f"writer {short(w)}: readers ignore its log"]
                               + self._touched_paths(recs)))
        for s in self.snaps.bad.values():
            users = (["mounting: clients skip it and start from an older snapshot or the "
                      "logs (slower)"] if s.head_of else [])
            who = f" of writer {short(s.writer)}" if s.writer else ""
            report.add(Problem("snapshot-bad", f"snapshot {short(s.root)}{who}: {s.error}",
                               [s.root], affects=users + self.snaps.label(s),
                               hint={"head_of": set(s.head_of)}))
        self._index_data()

    # ---- logs ------------------------------------------------------------

    async def _prefetch(self, heads: dict[bytes, LogHead]) -> None:
        """Fetch log blocks several at a time. A log is a chain read one
        block per round trip; but the snapshots along the newest one's
        ``prev`` chain say which block holds which seq of each writer
        (their ``positions``), so the stretches between those points are
        walked at once. Only a speed-up: the walk (``_read_log``) checks
        every block as if it had fetched it itself, and fetches any block
        the stretches did not reach."""
        anchors: dict[bytes, dict[int, bytes]] = {}
        roots = [h.snap for h in heads.values() if h.snap is not None]
        seen: set[bytes] = set()
        while roots and len(seen) < MAX_ANCHOR_SNAPSHOTS:
            root = roots.pop()
            if root in seen:
                continue
            seen.add(root)
            try:
                info = await load_info(RecordingBlocks(self.blocks, self.snaps.cache), root,
                                       self.view.volume)
            except StorageError:
                continue          # the snapshot check reports it
            for w, (seq, blk, _vv) in info.positions.items():
                if blk is not None and seq > 0:
                    anchors.setdefault(w, {})[seq] = blk
            if info.prev is not None:
                roots.append(info.prev)
        stretches = []
        for w, head in heads.items():
            points = sorted(((sq, g) for sq, g in anchors.get(w, {}).items()
                             if sq < head.seq), reverse=True)
            if head.block is not None:
                points.insert(0, (head.seq, head.block))
            for (_, g), below in zip(points, points[1:] + [(0, None)]):
                stretches.append((g, below[0]))
        limiter = trio.CapacityLimiter(PREFETCH_PARALLEL)

        async def walk(g: bytes | None, stop: int) -> None:
            async with limiter:
                while g is not None and g not in self._fetched:
                    try:
                        raw = (await self.blocks.get_many([(g, Kind.RECORD)]))[0]
                        blk = decode_block(raw)
                    except (RecordError, StorageError):
                        return            # the walk meets it again, and says so
                    self._fetched[g] = blk
                    if blk.first <= stop + 1:
                        return            # the next stretch starts at the block before
                    g = blk.prev

        async with trio.open_nursery() as n:
            for g, stop in stretches:
                n.start_soon(walk, g, stop)

    async def _read_log(self, w: bytes, head: LogHead) -> None:
        """Walk ``w``'s log newest-first (module docstring)."""
        newest_first: list[Record] = []
        g, expect_last = head.block, head.seq
        try:
            while g is not None:
                try:
                    blk = self._fetched.get(g)
                    if blk is None:
                        # get_many: fetched by placement (one request), where
                        # get would first look the block up in the DOLR.
                        raw = (await self.blocks.get_many([(g, Kind.RECORD)]))[0]
                        blk = decode_block(raw)
                except (RecordError, StorageError) as e:
                    self.live.add(g, Kind.RECORD, Ref("log", writer=w, last=expect_last))
                    what = "is malformed" if isinstance(e, RecordError) else "cannot be read"
                    raise LogCorrupt(f"log block {short(g)} (records up to seq {expect_last}) "
                                     f"{what}: {e}", w) from None
                self.live.add(g, Kind.RECORD, Ref("log", writer=w, first=blk.first,
                                                  last=blk.last, time=blk.records[-1].time))
                if blk.volume != self.view.volume or blk.writer != w:
                    raise LogCorrupt(f"log block {short(g)} belongs to another volume or "
                                     f"writer", w)
                if blk.last != expect_last:
                    raise LogCorrupt(f"log block {short(g)} ends at seq {blk.last}, its "
                                     f"successor expects {expect_last}", w)
                newest_first.extend(reversed(blk.records))
                g, expect_last = blk.prev, blk.first - 1
            if expect_last != 0:
                raise LogCorrupt(f"the oldest log block starts at seq {expect_last + 1}, "
                                 f"not 1", w)
            recs = newest_first[::-1]
            if recs and (recs[0].op != Op.END or recs[0].body.volume != self.view.volume):
                raise LogCorrupt("the log does not start with an End record for this volume", w)
            for a, b in zip(recs, recs[1:]):
                if not a.vv <= b.vv:
                    raise LogCorrupt(f"record {b.seq}'s vector goes backwards", w)
            if recs and not recs[-1].vv <= head.vv:
                raise BadLogHead("the head's vector is behind its newest record", w)
        except (LogCorrupt, BadLogHead) as e:
            self.broken[w] = str(e)
            self.records[w] = newest_first[::-1]     # what could be read (the newest)
            self._data_refs(self.records[w])
            return
        p = self.view.participant(w)
        if p.removed_at is not None:
            recs = [r for r in recs if r.seq <= p.removed_at]
        self.records[w] = recs
        self._data_refs(recs)

    def _data_refs(self, recs: list[Record]) -> None:
        for r in recs:
            b = r.body
            if isinstance(b, Write) and b.blocks:
                for g, _n in b.blocks:
                    self.live.add(g, Kind.DATA, Ref("data", writer=r.writer, first=r.seq,
                                                    ino=b.ino, time=r.time))

    def _order(self) -> list[Record]:
        """The records every client applies: whole logs, causally closed,
        in the total order."""
        caps = {w: len(r) for w, r in self.records.items() if w not in self.broken and r}
        changed = True
        while changed:
            changed = False
            for w, n in list(caps.items()):
                log, k = self.records[w], n
                while k and any(sq > caps.get(x, 0) for x, sq in log[k - 1].vv.items()
                                if x != w):
                    k -= 1
                if k != n:
                    changed = True
                    if k:
                        caps[w] = k
                    else:
                        del caps[w]
        self.caps = caps
        order = [r for w, n in caps.items() for r in self.records[w][:n]]
        order.sort(key=lambda r: r.key)
        return order

    # ---- replay ----------------------------------------------------------------

    def _replay(self, order: list[Record], report, Problem) -> None:
        """Apply ``order``; stop at each snapshot's cover to compare."""
        checks = sorted((s for s in self.snaps.snapshots.values() if s.state is not None
                         and s.root not in self.snaps.bad),
                        key=lambda s: s.info.cover.total)
        st = FsState()
        st.ranges = {q.id: q.index + 1 for q in self.view.participants}
        cover: dict[bytes, int] = {}
        i = 0
        for s in checks:
            n = s.info.cover.total
            if any(sq > self.caps.get(w, 0) for w, sq in s.info.cover.items()):
                continue      # covers records not readable here (a broken log): not compared
            while i < n and i < len(order):
                r = order[i]
                apply(st, r)
                cover[r.writer] = r.seq
                i += 1
            if VV(cover) != s.info.cover:
                s.error = ("its cover is not a prefix of the records' total order (records "
                           "it claims to hold sort after ones it does not)")
                self.snaps.bad[s.root] = s
                continue
            why = self.snaps.compare(st, s)
            if why:
                s.error = f"differs from the file system its records compute: {why}"
                self.snaps.bad[s.root] = s
        for r in order[i:]:
            apply(st, r)
        st.clear_dirty()
        self.state = st
        self.stats["replayed"] = len(order)
        self.stats["inodes"] = len(st.inodes)
        self.stats["files"] = sum(1 for n in st.inodes.values() if n.data is not None)
        try:
            st.check()
        except AssertionError as e:
            report.add(Problem("log-broken", f"the replayed file system breaks an invariant: "
                               f"{e}", [], affects=["every client replaying these logs"]))

    # ---- what a block affects --------------------------------------------------

    def _index_data(self) -> None:
        """BGUID -> inodes of the newest state whose data uses it."""
        st = self.state
        if st is None:
            return
        for n in st.inodes.values():
            if n.data is not None:
                for x in n.data:
                    if isinstance(x.src, Blk):
                        self._data_inos.setdefault(x.src.bguid, set()).add(n.ino)

    def path(self, ino: int) -> str | None:
        """A path of ``ino`` in the newest state, else in the newest snapshot
        that has it (a broken log's files are in no replayed state)."""
        if ino not in self._paths:
            states = [self.state] + [s.state for s in sorted(
                self.snaps.snapshots.values(),
                key=lambda s: -(s.info.cover.total if s.info else 0))
                if s.state is not None and s.root not in self.snaps.bad]
            p = None
            for st in states:
                if st is not None and (p := st.path_of(ino)) is not None:
                    break
            self._paths[ino] = None if p is None else p.decode(errors="replace")
        return self._paths[ino]

    def _touched_paths(self, recs: list[Record]) -> list[str]:
        out: dict[str, None] = {}
        for r in recs:
            for ino in touched(r):
                p = self.path(ino)
                if p is not None and p != "/":
                    out[p] = None
        return list(out)

    def affects(self, gs: list[bytes]) -> list[str]:
        """Files (paths in the newest version), versions and writers that
        the blocks ``gs`` hold data of."""
        paths: dict[str, None] = {}
        other: dict[str, None] = {}
        for g in gs:
            for ino in sorted(self._data_inos.get(g, ())):
                p = self.path(ino)
                if p is not None:
                    paths[p] = None
            for ref in self.live.refs.get(g, ()):
                if ref.what == "data":
                    p = self.path(ref.ino)
                    where = p if p is not None else f"inode {ref.ino} (since deleted)"
                    other[f"version of {where} written {time_text(ref.time)} by writer "
                          f"{short(ref.writer)} (record {ref.first})"] = None
                elif ref.what == "log" and not ref.first:
                    other[f"log of writer {short(ref.writer)}, records up to {ref.last} "
                          f"(this block cannot be read)"] = None
                elif ref.what == "log":
                    other[f"log of writer {short(ref.writer)}, records {ref.first}-"
                          f"{ref.last}"] = None
                    recs = self.records.get(ref.writer, [])
                    if ref.first:
                        for p in self._touched_paths(recs[ref.first - 1:ref.last]):
                            paths[p] = None
                elif ref.what == "snapshot":
                    s = self.snaps.snapshots.get(ref.root)
                    if s is None:
                        continue
                    if self.live.kinds.get(g) != Kind.DATA:
                        for lab in self.snaps.label(s):
                            other[lab] = None
                    elif ref.ino and not self.live.refs[g][0].what == "data":
                        # Small writes a snapshot packed into a block of its own.
                        p = self.path(ref.ino)
                        if p is not None:
                            paths[p] = None
                        for lab in self.snaps.label(s):
                            other[f"{lab}: its copy of {p or f'inode {ref.ino}'}"] = None
                else:
                    other[ref.label] = None
        out = list(paths) + list(other)
        if len(out) > MAX_AFFECTS:
            out = out[:MAX_AFFECTS] + [f"... and {len(out) - MAX_AFFECTS} more"]
        return out
