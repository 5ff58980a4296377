"""A mounted volume's machinery: mounting, refreshing, syncing, snapshots
(Ivy, OSDI 2002, sections 4.1-4.4; DESIGN.md "storage/logs").

A :class:`Session` ties one participant (or a reader) to a volume: its own
:class:`~storage.logs.Log`, a :class:`~storage.logs.LogReader` for everyone's
logs, the merged state (:class:`~storage.replica.Replica`) and a
:class:`~storage.snapshots.SnapshotWriter`. ``storage.namespace`` builds the
POSIX operations on top of it.

* ``mount``: fetch every writer's log-head, load the newest usable snapshot
  named in them (the largest cover whose replay is exact; a snapshot that
  turns out not to be, or is malformed, is skipped), then read each log back
  from its head to the snapshot and apply only those newer records. A writer
  with no log yet starts one (End record) and publishes its head, so its
  promise counts and others can settle.
* ``sync`` (fsync, close): group-commit the queued records into blocks and
  publish a new signed head; returns once both are stored. Close-to-open:
  what ``sync`` returned for is visible to any later ``refresh``. With a
  board that keeps journals (``HeadBoard.publish_ahead``) and up to
  ``AHEAD_BYTES`` queued, the blocks are named before they are stored
  (convergent sealing), and the head is made durable locally, with the
  blocks' bytes, *while* they are stored: a close waits for the longer of
  the two instead of their sum. The head is released to others (certified)
  only once its blocks are stored; a crash in between is repaired at the
  next mount, which stores the journal again before anything else; a failed
  store is retried by the next sync before it says anything new.
  File data written in small pieces is named ahead the same way
  (``name_ahead``: up to ``DEFER_BYTES`` held here, readable at once) and
  stored by the sync, in the same batch as the records that name it, so a
  close of a small file costs one replicated round trip, not two.
* ``refresh`` (open): fetch the heads again, check them (rollback, fork),
  read the new records, merge them (rolling back and replaying if they sort
  before records shown already), settle what every writer has seen, publish
  this writer's new promise, and every ``snapshot_every`` settled records
  store a snapshot when the settled state is a clean cut.

Storage is not trusted: a head rolled back behind one accepted before (also
across restarts, with a :class:`~storage.logcache.LogCache`) is reported in
``problems`` and the newer head already accepted is used instead; a forked
or corrupt log is reported and that writer's new records are not used.
A record that breaks its writer's promise makes the session replay from the
logs (``rebuilds``), so it agrees with clients that never relied on it.

Concurrency: sync, refresh, snapshot and view changes hold one trio lock;
operations on the namespace run between awaits and never wait for it (only
an automatic commit of a large queue does).
"""

from __future__ import annotations

import time
import logging
from collections import OrderedDict

import trio

from overlay.wire.ids import Identity

from .blockapi import BlockAccess, Kind
from .errors import StorageError
from .fs_errors import IOFailure
from .fsstate import FsState
from .logcache import CachedBlockAccess, LogCache
from .logs import HeadBoard, Log, LogHead, LogReader, LogRolledBack, decode_head
from .records import Body, SnapshotMark
from .replica import LateRecord, Replica
from .snapshots import SnapshotError, SnapshotInfo, SnapshotWriter, load_info, load_state
from .volume import BadView, View
from .vv import EMPTY

_log = logging.getLogger(__name__)

AUTO_COMMIT_BYTES = 1 << 20      # commit (not publish) once this much is queued
AHEAD_BYTES = 1 << 20            # at most this much queued: head written ahead (docstring)
DEFER_BYTES = 1 << 20            # file data named ahead and held until the next sync


class Session:
    """One client's view of a volume (module docstring). Build with :meth:`mount`."""

    def __init__(self, view: View, identity: Identity, blocks: BlockAccess, board: HeadBoard,
                 *, clock=time.time_ns, snapshot_every: int = 2000, use_snapshots: bool = True,
                 publish_on_refresh: bool = True, cache: LogCache | None = None):
        self.view = view
        self.identity = identity
        self.cache = cache
        if cache is not None:
            blocks = CachedBlockAccess(blocks, cache)
        self.blocks = blocks
        self.board = board
        self.clock = clock
        self.snapshot_every = snapshot_every
        self.use_snapshots = use_snapshots
        self.publish_on_refresh = publish_on_refresh
        try:
            self.me = view.participant(identity.id)
            if not self.me.active:
                self.me = None
        except StorageError:
            self.me = None
        self.log: Log | None = None
        self.reader = LogReader(view.volume, blocks)
        self.replica = Replica(self_id=identity.id)
        self.snapshots = SnapshotWriter(blocks, view.volume, identity.id)
        self.problems: dict[bytes, StorageError] = {}   # writer id -> what is wrong with its log
        self.bad_snapshots: list[tuple[bytes, StorageError]] = []
        self.snapshot_used: SnapshotInfo | None = None
        self._lock = trio.Lock()
        self._open: dict[int, int] = {}
        self._data: OrderedDict[bytes, bytes] = OrderedDict()   # DATA block LRU
        self._data_bytes = 0
        self.data_cache_limit = 32 << 20
        self._settled_at_snapshot = 0
        self._published: LogHead | None = None
        self._unstored: list[bytes] = []   # journaled record blocks whose store failed
        self._deferred: OrderedDict[bytes, bytes] = OrderedDict()  # DATA named, not stored
        self._deferred_bytes = 0
        self.rebuilds = 0
        self.refresh_interval_ns = 0     # open() refreshes at most this often
        self.last_refresh = -(2**62)

    # ------------------------------------------------------------------
    # Mounting, refreshing, syncing

    @classmethod
    async def mount(cls, view: View, identity: Identity, blocks: BlockAccess,
                    board: HeadBoard, **kw):
        """Mount a volume: newest usable snapshot, then newer records. A
        participant's log is started (End record) if it has none yet, and its
        head is published so its promise counts."""
        ns = cls(view, identity, blocks, board, **kw)
        async with ns._lock:
            ns._load_cached_heads()
            await ns._mount()
            if ns.log is not None and (ns._published is None
                                       or ns._published.vv != ns._promise()):
                await ns._sync_locked()
        return ns

    def _load_cached_heads(self) -> None:
        """Heads accepted before a restart: a rollback behind them is caught."""
        if self.cache is None:
            return
        for w, raw in self.cache.heads().items():
            try:
                p = self.view.participant(w)
                h = decode_head(raw)
                h.verify(p.public_key, self.view.volume)
            except StorageError:
                continue
            self.reader.heads[w] = h

    def _save_heads(self) -> None:
        if self.cache is not None:
            self.cache.remember_heads({w: h.encode() for w, h in self.reader.heads.items()})

    async def _replay_journal(self) -> None:
        """Store again the record blocks journaled with this writer's newest
        local head (a crash may have come before they were all stored), then
        release that head (module docstring, ``sync``)."""
        if not (self.board.journals and self.me is not None):
            return
        try:
            journal = await self.board.journal(self.identity.id)
        except StorageError as e:
            _log.warning("%s: going on (its blocks are read back as usual)", e)
            return
        if not journal:
            return
        await self.blocks.put_many([(Kind(k), raw) for k, raw in journal])
        own = (await self.board.fetch([self.identity.id])).get(self.identity.id)
        if own is not None:
            await self.board.release(decode_head(own))

    async def _mount(self) -> None:
        await self._replay_journal()
        ids = [p.id for p in self.view.participants]
        raws = await self.board.fetch(ids)
        candidates: list[SnapshotInfo] = []
        if self.use_snapshots:
            for p in self.view.participants:
                raw = raws.get(p.id)
                if raw is None:
                    continue
                try:
                    head = LogReader(self.view.volume, self.blocks).accept_head(raw, p.public_key)
                    if head.snap is not None:
                        candidates.append(await load_info(self.blocks, head.snap,
                                                          self.view.volume))
                except StorageError as e:
                    self.bad_snapshots.append((p.id, e))   # its log may still be fine
            candidates.sort(key=lambda i: (i.cover.total, i.key or ()), reverse=True)
        for info in candidates + [None]:
            try:
                await self._mount_from(info, raws)
                self._save_heads()
                return
            except StorageError as e:
                if info is not None:   # a missing, corrupt or unusable snapshot
                    self.bad_snapshots.append((info.writer, e))
                elif isinstance(e, (LateRecord, SnapshotError)):
                    raise IOFailure(f"logs cannot be replayed: {e}") from e
                else:
                    raise

    async def _mount_from(self, info: SnapshotInfo | None, raws: dict[bytes, bytes]) -> None:
        old_heads = self.reader.heads
        reader = LogReader(self.view.volume, self.blocks)
        reader.heads = dict(old_heads)
        if info is not None:
            state = await load_state(self.blocks, info)
            replica = Replica(state, info.cover, info.key, self_id=self.identity.id)
            for w, (seq, blk, vv) in info.positions.items():
                reader.start_at(w, seq, blk, vv)
                replica.base_vv[w] = vv
                replica.last_vv[w] = vv
        else:
            replica = Replica(self_id=self.identity.id)
        replica.set_active(self.view.active_ids())
        records, own_head, own_broken = [], None, False
        problems: dict[bytes, StorageError] = {}
        for p in self.view.participants:
            raw = raws.get(p.id)
            if raw is None and p.id not in reader.heads:
                replica.promise(p.id, p.joined)
                continue
            try:
                head, recs = await self._read_log(reader, p, raw, problems)
            except StorageError as e:
                problems[p.id] = e
                replica.promise(p.id, p.joined)
                if p.id == self.identity.id:
                    own_broken = True
                continue
            if p.id == self.identity.id:
                own_head = head
            if p.removed_at is not None:
                recs = [r for r in recs if r.seq <= p.removed_at]
            records.extend(recs)
            replica.promise(p.id, head.vv)
        replica.add(records)
        # Records queued here but not yet committed (a rebuild while writing).
        if self.log is not None and self.log.pending:
            replica.add(list(self.log.pending))
        replica.pinned = set(self._open)
        replica.settle()
        self.reader, self.replica = reader, replica
        self.problems.update(problems)
        self.snapshot_used = info
        self._settled_at_snapshot = replica.settled
        if info is not None:
            self.snapshots.adopt(info)
        self._set_ranges(replica)
        if self.me is not None and self.log is None and not own_broken:
            # (With our own log unreadable we stay read-only: starting it
            # afresh would fork it.)
            self.log = Log(self.view.volume, self.identity, self.blocks, head=own_head,
                           clock=self.clock)
            self._published = own_head
            if own_head is None:
                self.replica.add_own(self.log.start(self.replica.knowledge))

    def _set_ranges(self, replica: Replica) -> None:
        """Each writer may create inodes in its own number range only."""
        ranges = {q.id: q.index + 1 for q in self.view.participants}
        for st in (replica.base, replica.current):
            st.ranges = ranges

    async def _read_log(self, reader: LogReader, p, raw: bytes | None, problems: dict):
        """Check a writer's head and read its new records. A head rolled back
        behind one accepted earlier, or missing from storage, is reported and
        the head accepted earlier is read instead: storage cannot make us
        forget records."""
        try:
            if raw is None:
                raise LogRolledBack("storage has no head for a writer we had a head of", p.id)
            head = reader.accept_head(raw, p.public_key)
        except LogRolledBack as e:
            problems[p.id] = e
            head = reader.heads.get(p.id)
            if head is None:
                raise
        return head, await reader.read_new(head)

    def _promise(self):
        return self.replica.knowledge.with_entry(self.identity.id, self.log.seq)

    async def sync(self) -> None:
        """Store queued records and publish a new log-head (fsync/close)."""
        if self.log is None:
            return
        async with self._lock:
            await self._sync_locked()

    async def _sync_locked(self, snap: bytes | None = None) -> None:
        log = self.log
        if self._unstored:          # a write-ahead head's blocks: store them first
            data = list(self._deferred.items())
            await self._put_checked(data, self._unstored)
            self._unstored = []
            if self._published is not None:
                await self.board.release(self._published)
        prepared = None
        if (snap is None and self.board.journals and log.pending
                and log.pending_bytes + self._deferred_bytes <= AHEAD_BYTES):
            prepared = log.prepare(self.blocks.name_of)
        if prepared:
            head = await self._store_ahead(prepared)
        else:
            # Data first, then the records naming it; until neither is left
            # (writes go on between awaits), with no await before the head.
            while self._deferred or log.pending:
                await self._put_checked(list(self._deferred.items()), [])
                await log.commit()
            if (snap is None and self._published is not None
                    and self._published.seq == log.committed
                    and self._published.vv == self._promise()):
                return  # nothing new to say
            head = log.make_head(self.replica.knowledge, snap=snap)
            await self.board.publish(head)
        self._published = head
        self.reader.heads[head.writer] = head
        self._save_heads()
        self.replica.settle()
        if snap is None:
            await self._maybe_snapshot()

    async def _store_ahead(self, prepared: list[tuple[bytes, int, int, bytes]]) -> LogHead:
        """Store ``prepared`` record blocks and make the head naming them
        durable locally at the same time; release the head once both are
        done (module docstring, ``sync``)."""
        log = self.log
        raws = [raw for raw, *_ in prepared]
        data = list(self._deferred.items())     # what these records name (and maybe more)
        log.adopt(prepared)         # the head covers them; its counter is spent either way
        head = log.make_head(self.replica.knowledge)
        journal = [(int(Kind.DATA), b) for _, b in data] + [(int(Kind.RECORD), r) for r in raws]
        failed: list[BaseException] = []
        ahead = False

        async def store() -> None:
            try:
                await self._put_checked(data, raws, [g for *_, g in prepared])
            except Exception as e:  # noqa: BLE001 - re-raised below, after the head's outcome
                self._unstored = raws
                failed.append(e)

        async def write_head() -> None:
            nonlocal ahead
            try:
                await self.board.publish_ahead(head, journal)
                ahead = True
            except Exception as e:  # noqa: BLE001 - re-raised below
                failed.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store)
            nursery.start_soon(write_head)
        if ahead:
            self._published = head
        if failed:
            raise failed[0]
        await self.board.release(head)
        return head

    async def _put_checked(self, data: list[tuple[bytes, bytes]], records: list[bytes],
                           names: list[bytes] | None = None) -> None:
        """Store deferred DATA blocks ``data`` [(BGUID, plaintext)] and
        record blocks in one batch; check every BGUID against the name it
        was given ahead (``names`` for the records, when known); the stored
        data leaves the deferred set for the block cache."""
        if not data and not records:
            return
        items = [(Kind.DATA, b) for _, b in data] + [(Kind.RECORD, r) for r in records]
        got = await self.blocks.put_many(items)     # its errors (StoreFull, ...) as they are
        want = [g for g, _ in data] + (names if names is not None else got[len(data):])
        if got != want:
            raise IOFailure("blocks were stored under other names than sealing gave them ahead")
        for g, b in data:
            if self._deferred.pop(g, None) is not None:
                self._deferred_bytes -= len(b)
            self._remember(g, b)

    def name_ahead(self, chunks: list[bytes]) -> list[bytes] | None:
        """Name DATA blocks without storing them yet (module docstring,
        ``sync``): their BGUIDs, or None when they should be stored now (too
        much held already, or the block access cannot name ahead)."""
        if self._deferred_bytes + sum(len(c) for c in chunks) > DEFER_BYTES:
            return None
        names = []
        for c in chunks:
            g = self.blocks.name_of(Kind.DATA, c)
            if g is None:
                return None
            names.append(g)
        for g, c in zip(names, chunks):
            if g not in self._deferred:
                self._deferred[g] = c
                self._deferred_bytes += len(c)
        return names

    def held_data(self, g: bytes) -> bytes | None:
        """A DATA block named ahead and not stored yet (None otherwise)."""
        return self._deferred.get(g)

    def _forget_settled_blocks(self) -> None:
        """Block positions are needed only from the settled point on."""
        for w, seq in self.replica.base_cover.items():
            self.reader.forget_blocks_before(w, seq)
        if self.log is not None:
            seq = self.replica.base_cover[self.identity.id]
            self.log.blocks_written = [e for e in self.log.blocks_written if e[1] >= seq]

    async def _maybe_snapshot(self) -> None:
        """Every ``snapshot_every`` settled records, when the settled state
        is a clean cut, store a snapshot (and publish it in a new head)."""
        r = self.replica
        if (self.snapshot_every and r.settled - self._settled_at_snapshot >= self.snapshot_every
                and r.clean()):
            await self._snapshot_locked()
        self._forget_settled_blocks()

    async def fsync(self, ino: int | None = None) -> None:
        """Make this writer's updates durable and visible (the whole log:
        one log per writer, so per-file and whole-volume sync coincide),
        including against a crash of this machine: the head board commits
        a head it keeps staged (``storage.heads_stage``) before this returns."""
        await self.sync()
        await self.board.flush()

    async def refresh(self) -> None:
        """Fetch other writers' new records (close-to-open: call on open)."""
        async with self._lock:
            await self._refresh_locked()

    async def _refresh_locked(self) -> None:
        self.last_refresh = self.clock()
        others = [p for p in self.view.participants if p.id != self.identity.id]
        raws = await self.board.fetch([p.id for p in others])
        new = []
        for p in others:
            raw = raws.get(p.id)
            if raw is None and p.id not in self.reader.heads:
                continue
            try:
                head, recs = await self._read_log(self.reader, p, raw, self.problems)
            except StorageError as e:
                self.problems[p.id] = e
                continue
            if p.removed_at is not None:
                recs = [r for r in recs if r.seq <= p.removed_at]
            new.extend(recs)
            self.replica.promise(p.id, head.vv)
        try:
            self.replica.add(new)
        except LateRecord:
            # A writer broke its promise: start over from the logs so this
            # client agrees with everyone who never trusted that promise.
            self.rebuilds += 1
            if self.log is not None:
                await self._sync_locked()
            await self._mount()
        self.replica.pinned = set(self._open)
        self.replica.settle()
        self._save_heads()
        if self.log is not None:
            if self.publish_on_refresh:
                try:
                    await self._sync_locked()    # our new promise; may snapshot
                except StorageError as e:
                    # Reads go on (a lookup or open must not fail because our
                    # own queue cannot be stored now); the records stay
                    # queued and the next close or fsync reports the error.
                    _log.warning("after a refresh, this writer's updates could not be "
                                 "stored yet: %s", e)
            else:
                await self._maybe_snapshot()

    async def snapshot(self) -> bytes | None:
        """Store a snapshot of the settled state and name it in this
        writer's head; returns its root BGUID. None when this client is a
        reader, or when the settled state is not a clean cut right now (a
        known concurrent record has not seen all of it: ``Replica.clean``)."""
        if self.log is None:
            return None
        async with self._lock:
            self.replica.settle()
            if not self.replica.clean():
                return None
            return await self._snapshot_locked()

    async def _snapshot_locked(self) -> bytes:
        r = self.replica
        positions = {}
        for w, seq in r.base_cover.items():
            blk = self.reader.block_of(w, seq)
            if blk is None and w == self.identity.id:
                blk = next((g for a, b, g in self.log.blocks_written if a <= seq <= b), None)
            positions[w] = (seq, blk, r.base_vv.get(w, EMPTY))
        root = await self.snapshots.write(r.base, r.base_cover, r.base_key, positions,
                                          time_ns=self.clock())
        self._settled_at_snapshot = r.settled
        self._append(SnapshotMark(root, r.base_cover))
        await self._sync_locked(snap=root)
        return root

    async def close(self, settle: float = 10.0) -> None:
        """Sync, then give the board up to ``settle`` s to certify."""
        await self.sync()
        if not await self.board.settle(settle):
            _log.warning("the newest log-head is not certified yet: it is kept locally and "
                         "certified at the next mount")

    async def update_view(self, view: View) -> None:
        """Adopt a newer version of the volume's view (a writer added or
        removed, a new ring). Records of a removed writer past its last
        counted seq are dropped, by replaying the logs if any were applied."""
        if (view.volume, view.owner) != (self.view.volume, self.view.owner):
            raise BadView("a view of another volume")
        if view.version <= self.view.version:
            return
        view.verify()
        async with self._lock:
            self.view = view
            try:
                me = view.participant(self.identity.id)
            except StorageError:
                me = None
            if me is None or not me.active:
                if self.log is not None:
                    await self._sync_locked()
                self.log, self.me = None, None
            self.replica.set_active(view.active_ids())
            self._set_ranges(self.replica)
            for p in view.participants:
                if p.id not in self.replica.promises:
                    self.replica.promise(p.id, p.joined)
            if any(p.removed_at is not None and self.replica.known[p.id] > p.removed_at
                   for p in view.participants):
                await self._mount()

    # ------------------------------------------------------------------
    # State and the local log

    @property
    def _st(self) -> FsState:
        """The state shown: every record known here applied."""
        return self.replica.current

    def _append(self, body: Body):
        rec = self.log.append(self.replica.knowledge, body)
        self.replica.add_own(rec)
        return rec

    async def _maybe_commit(self) -> None:
        if self.log.pending_bytes >= AUTO_COMMIT_BYTES and not self._lock.locked():
            async with self._lock:
                await self.log.commit()

    # ------------------------------------------------------------------
    # File data blocks (an LRU of plaintexts)

    async def _fetch(self, bguids: list[bytes]) -> dict[bytes, bytes]:
        out, missing = {}, []
        for g in dict.fromkeys(bguids):
            b = self._deferred.get(g)
            if b is None:
                b = self._data.get(g)
                if b is None:
                    missing.append(g)
                    continue
                self._data.move_to_end(g)
            out[g] = b
        if missing:
            try:
                got = await self.blocks.get_many([(g, Kind.DATA) for g in missing])
            except StorageError as e:
                raise IOFailure(f"cannot read file data: {e}") from e
            for g, b in zip(missing, got):
                out[g] = b
                self._remember(g, b)
        return out

    def _remember(self, g: bytes, b: bytes) -> None:
        if g in self._data:
            return
        self._data[g] = b
        self._data_bytes += len(b)
        while self._data_bytes > self.data_cache_limit and self._data:
            _, old = self._data.popitem(last=False)
            self._data_bytes -= len(old)

    def conflicts(self) -> list:
        """Conflicts found so far (``fsstate.Conflict``), oldest first."""
        return list(self._st.conflicts)
