"""The single-node volume: blocks and log-heads kept on this machine only
(DESIGN.md "storage/blocks" with r = 1, "storage/logs" log-heads).

A real configuration, not a stand-in: one node holds every block of the
volume in its LMDB :class:`~storage.blockstore.BlockStore` and every
writer's current log-head in a small LMDB of its own. It is what a laptop
volume, a benchmark baseline or a volume created before any peer exists
runs on; the replicated block layer and the ring-certified head board plug
in behind the same two interfaces (``BlockAccess``, ``HeadBoard``).

What still holds with r = 1:

* blocks are sealed (``storage.seal``) before they reach the store, so the
  LMDB files hold ciphertext only, and every read is checked twice: the
  store checks the bytes against their BGUID (and quarantines a bad copy),
  the sealer checks the AEAD tag and the kind;
* ``put`` returns once its LMDB transaction is committed with fsync, and a
  head is published in a synced transaction after the blocks it names, so
  whatever ``Namespace.sync`` (fsync, close) returned for survives a crash
  of the process or the machine. Puts that arrive while a transaction is
  being synced share the next one (group commit), so concurrent writers
  pay for one fsync, not one each;
* a head older than the stored one is refused (:class:`StaleHead`), so a
  confused caller cannot roll a writer's log back.

What does not: a dead disk loses the volume (there are no other replicas).

Blocking work (LMDB write transactions with their fsync, SHA-256 and
AES-GCM over many blocks) runs in worker threads (``trio.to_thread``),
batched per call, so the trio thread that serves FUSE does not wait on the
disk or the cipher; reading one or two metadata blocks (a log chain is
walked one block at a time) stays on the calling thread, where it costs
less than the hop to a worker.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import lmdb
import msgpack
import trio

from . import seal
from .blockapi import BlockAccess, Kind
from .blockstore import BlockStore, StoreStats
from .errors import BlockNotFound, StorageError, StoreClosed, StoreFormatError
from .heads_stage import AHEAD_DELAY, AheadLog, decode_entries, encode_entry
from .logs import HeadBoard, LogError, LogHead, decode_head

log = logging.getLogger(__name__)

HEADS_FORMAT = b"p2pfs local heads 1"
HEADS_MAP_SIZE = 64 << 20        # heads are < 1 KiB each; room for many writers
INLINE_GETS = 2                  # reads of this many metadata blocks skip the thread hop
INLINE_SEAL = 64 << 10           # puts this small are sealed without the thread hop


class StaleHead(StorageError):
    """A log-head was offered whose publish counter is not newer than the
    head already stored for that writer (a caller bug or a replayed head);
    the stored head is kept."""


@dataclass(frozen=True, slots=True, eq=False)
class _Ahead:
    """A staged head: its publish counter, encoding and packed journal."""
    n: int
    raw: bytes
    packed: bytes | None


class _Batch:
    """Sealed blocks of one ``put_many``, waiting for a transaction."""

    __slots__ = ("items", "done", "error")

    def __init__(self, items: list[tuple[bytes, bytes]]):
        self.items = items
        self.done = False
        self.error: StorageError | None = None


class LocalBlocks(BlockAccess):
    """Sealed blocks of one volume in one node's LMDB store (r = 1).

    ``store`` is owned by the caller (who closes it); ``volume_key`` seals
    and opens blocks; ``limiter`` bounds the worker threads used."""

    replicas = 1

    def __init__(self, store: BlockStore, volume_key: bytes, *,
                 limiter: trio.CapacityLimiter | None = None):
        self.store = store
        self._sealer = seal.Sealer(volume_key)
        self._limiter = limiter or trio.CapacityLimiter(4)
        self._queue: list[_Batch] = []       # sealed, waiting for a transaction
        self._commit_lock = trio.Lock()      # FIFO: one transaction at a time
        self._committer = trio.CapacityLimiter(1)  # its thread never waits behind seals
        self.commits = 0                     # transactions made (for benchmarks)

    async def _run(self, fn, *args):
        # Not abandoned on cancel: an LMDB transaction always completes.
        return await trio.to_thread.run_sync(functools.partial(fn, *args),
                                             limiter=self._limiter)

    def name_of(self, kind: Kind, plaintext: bytes) -> bytes | None:
        return self._sealer.seal(kind, bytes(plaintext)).bguid

    async def put(self, kind: Kind, plaintext: bytes) -> bytes:
        return (await self.put_many([(kind, plaintext)]))[0]

    async def put_many(self, items: list[tuple[Kind, bytes]]) -> list[bytes]:
        """Seal a batch, then store it durably (group commit, below)."""
        items = list(items)
        if not items:
            return []
        if sum(len(p) for _, p in items) <= INLINE_SEAL:
            sealed = self._seal(items)
        else:
            sealed = await self._run(self._seal, items)
        await self._commit(_Batch([(x.bguid, x.data) for x in sealed]))
        return [x.bguid for x in sealed]

    def _seal(self, items: list[tuple[Kind, bytes]]) -> list[seal.Sealed]:
        return [self._sealer.seal(k, bytes(p)) for k, p in items]

    async def _commit(self, batch: "_Batch") -> None:
        """Group commit: batches that queue while a transaction is being
        synced go into the next transaction together, so a slow fsync is
        paid once for all of them (the batches grow as the disk slows)."""
        self._queue.append(batch)
        async with self._commit_lock:
            if not batch.done:
                todo, self._queue = self._queue, []
                items = [it for b in todo for it in b.items]
                error = None
                try:
                    # revive: the volume's own writer references this content
                    # again, so a tombstone left by a collector must not refuse it.
                    await trio.to_thread.run_sync(
                        functools.partial(self.store.put_many, items, revive=True),
                        limiter=self._committer)
                    self.commits += 1
                except StorageError as e:
                    error = e
                except BaseException:
                    # Cancelled: the transaction ran to its end or not at all;
                    # the others' batches go back to be stored (again: puts
                    # are idempotent) by the next holder of the lock.
                    self._queue[:0] = [b for b in todo if b is not batch]
                    raise
                for b in todo:
                    b.done, b.error = True, error
        if batch.error is not None:
            raise batch.error

    async def get(self, bguid: bytes, kind: Kind) -> bytes:
        return (await self.get_many([(bguid, kind)]))[0]

    async def get_many(self, items: list[tuple[bytes, Kind]]) -> list[bytes]:
        """Fetch, verify and open a batch in one read transaction."""
        items = list(items)
        if len(items) <= INLINE_GETS and all(k != Kind.DATA for _, k in items):
            # A small metadata block from a memory-mapped store costs less
            # than the hop to a worker thread (log chains are read one block
            # at a time). File data goes to a thread: several reads of a
            # file then proceed at once, and the disk waits are not ours.
            await trio.lowlevel.checkpoint()
            return self._get_sync(items)
        return await self._run(self._get_sync, items)

    def _get_sync(self, items: list[tuple[bytes, Kind]]) -> list[bytes]:
        # One read transaction per block (LMDB's are nearly free) so that a
        # bad copy raises BlockCorrupt, and a missing one BlockNotFound. The
        # store checks the bytes against their BGUID; the sealer checks
        # header, kind and AEAD tag.
        return [self._sealer.open(k, self.store.get(g)) for g, k in items]

    async def space(self) -> tuple[int, int]:
        """(capacity, free) bytes of the store, for statfs."""
        st: StoreStats = await self._run(self.store.stats)
        return st.quota, st.free


class LocalHeadBoard(HeadBoard):
    """Writers' current log-heads in an LMDB environment at ``path`` (a
    directory, created if missing). Databases: ``heads``, writer id ->
    encoded head; ``journal``, writer id -> msgpack list of the encoded
    record blocks its head names that may not be stored yet (the
    write-ahead journal of ``HeadBoard.publish_ahead``); ``meta`` holds the
    format tag. Every publish is one synced transaction.

    With ``stage=True`` (a mount's board), a publish is appended to the
    board's staging log instead and committed, synced, ``stage_delay``
    seconds later or by :meth:`flush` (``storage.heads_stage``: what that
    promises, and why). Opening a board replays what a killed process left
    staged, unless a live process still owns the log."""

    journals = True

    def __init__(self, path: str | os.PathLike, *, sync: bool = True, stage: bool = False,
                 stage_delay: float = AHEAD_DELAY):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(str(self.path), map_size=HEADS_MAP_SIZE, max_dbs=4,
                                  sync=sync, metasync=sync, lock=True)
        except (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError) as e:
            raise StoreFormatError(f"{self.path} is not a head board: {e}") from None
        except (OSError, lmdb.Error) as e:
            raise StorageError(f"cannot open head board {self.path}: {e}") from None
        try:
            with self._env.begin(write=True) as txn:
                self._meta = self._env.open_db(b"meta", txn=txn)
                fmt = txn.get(b"format", db=self._meta)
                if fmt is None:
                    txn.put(b"format", HEADS_FORMAT, db=self._meta)
                elif fmt != HEADS_FORMAT:
                    raise StoreFormatError(f"{self.path}: head board format {fmt!r} is not "
                                           f"{HEADS_FORMAT!r}")
                self._heads = self._env.open_db(b"heads", txn=txn)
                self._journal = self._env.open_db(b"journal", txn=txn)
            self._env.reader_check()  # slots of a killed process
        except BaseException:
            self._env.close()
            raise
        self._lock = trio.Lock()
        self._n: dict[bytes, int] = {}      # writer -> publish counter stored (read once)
        self.stage_delay = stage_delay
        self._staged: dict[bytes, _Ahead] = {}      # writer -> its newest staged head
        self._stage_lock = threading.Lock()         # _staged and the log, across threads
        self._fold_lock = threading.Lock()          # one commit of staged heads at a time
        self._commit_armed = False
        self._ahead: AheadLog | None = None
        try:
            ahead = AheadLog(self.path, own=stage)
        except BaseException:
            self._env.close()
            raise
        try:
            if ahead.owned:
                self._replay(ahead)
        except BaseException:
            ahead.close()
            self._env.close()
            raise
        if stage:
            self._ahead = ahead
        else:
            ahead.close()

    def close(self) -> None:
        if self._env is None:
            return
        if self._ahead is not None:
            try:
                self._fold()
            except (StorageError, lmdb.Error) as e:
                log.warning("head board %s: staged heads stay in its log for the next open: %s",
                            self.path, e)
            self._ahead.close()
            self._ahead = None
        self._env.close()
        self._env = None

    # -- staging (storage.heads_stage) ----------------------------------------

    def _replay(self, ahead: AheadLog) -> None:
        """Commit what the log holds (newest head per writer), then empty it."""
        buf = ahead.read()
        entries, used = decode_entries(buf)
        if used < len(buf):
            log.info("head board %s: %d bytes at the end of its staging log were not whole "
                     "entries (a torn tail); dropped", self.path, len(buf) - used)
        newest: dict[bytes, _Ahead] = {}
        for raw, packed in entries:
            try:
                h = decode_head(raw)
            except LogError as e:
                log.warning("head board %s: a staged head is unreadable (%s); skipped",
                            self.path, e)
                continue
            if h.writer not in newest or h.n > newest[h.writer].n:
                newest[h.writer] = _Ahead(h.n, raw, packed)
        if newest:
            self._commit(newest)
            log.info("head board %s: committed %d staged head(s) left by a stopped process",
                     self.path, len(newest))
        ahead.rewrite(b"")

    def _commit(self, entries: dict[bytes, "_Ahead"]) -> None:
        """One synced transaction: each entry whose head is newer than the
        stored one replaces it, with its journal."""
        with self._live().begin(write=True) as txn:
            for w, e in entries.items():
                old = txn.get(w, db=self._heads)
                if old is not None:
                    try:
                        if decode_head(old).n >= e.n:
                            continue
                    except LogError:
                        pass        # unreadable: replaced, as a publish would
                txn.put(w, e.raw, db=self._heads)
                if e.packed is not None:
                    txn.put(w, e.packed, db=self._journal)
                else:
                    txn.delete(w, db=self._journal)

    def _fold(self) -> int:
        """Commit what is staged; the log keeps only what was staged since."""
        with self._fold_lock:
            with self._stage_lock:
                staged = dict(self._staged)
            if not staged:
                return 0
            self._commit(staged)
            with self._stage_lock:
                for w, e in staged.items():
                    if self._staged.get(w) is e:
                        del self._staged[w]
                if self._ahead is not None:
                    self._ahead.rewrite(b"".join(encode_entry(e.raw, e.packed)
                                                 for e in self._staged.values()))
            return len(staged)

    def _stage(self, head: LogHead, raw: bytes, packed: bytes | None) -> None:
        w = head.writer
        with self._stage_lock:
            cur = self._staged.get(w)
            if cur is not None:
                cur_n, cur_raw = cur.n, cur.raw
            elif self._n.get(w, head.n) < head.n:
                cur_n, cur_raw = self._n[w], None
            else:
                cur_n, cur_raw = self._stored(w)
            if cur_n >= head.n:
                if cur_n == head.n and cur_raw == raw:
                    return      # the same head again
                raise StaleHead(f"head n={head.n} of writer {w[:4].hex()} is not newer "
                                f"than the stored n={cur_n}")
            self._live()
            self._ahead.append(encode_entry(raw, packed))
            self._staged[w] = _Ahead(head.n, raw, packed)
        self._arm_commit()

    def _stored(self, w: bytes) -> tuple[int, bytes | None]:
        with self._live().begin() as txn:
            v = txn.get(w, db=self._heads)
            raw = bytes(v) if v is not None else None
        if raw is None:
            return 0, None
        try:
            return decode_head(raw).n, raw
        except LogError:
            log.warning("head board %s: stored head of %s is unreadable; replaced",
                        self.path, w[:4].hex())
            return 0, raw

    def _arm_commit(self) -> None:
        if self._commit_armed or not self._staged:
            return
        self._commit_armed = True
        try:
            trio.lowlevel.spawn_system_task(self._commit_later, name="commit staged heads")
        except RuntimeError:    # the run is ending: commit now
            self._commit_armed = False
            self._fold()

    async def _commit_later(self) -> None:
        # A system task: it must never raise (trio would end the run).
        try:
            await trio.sleep(self.stage_delay)
            await trio.to_thread.run_sync(self._fold)
        except trio.Cancelled:
            self._commit_armed = False
            raise       # the run is ending; close() commits the rest
        except Exception as e:  # noqa: BLE001 - logged; the next publish, flush or close retries
            self._commit_armed = False
            log.error("head board %s: committing staged heads failed (they stay in its "
                      "staging log): %s", self.path, e)
            return
        self._commit_armed = False
        self._arm_commit()      # what was staged while this commit ran

    async def flush(self) -> None:
        """Commit what is staged now (fsync(2)'s barrier)."""
        if self._ahead is not None and self._staged:
            await trio.to_thread.run_sync(self._fold)
        else:
            await trio.lowlevel.checkpoint()

    def _live(self):
        if self._env is None:
            raise StoreClosed(f"head board {self.path} is closed")
        return self._env

    async def publish(self, head: LogHead) -> None:
        await self.publish_ahead(head, [])

    async def publish_ahead(self, head: LogHead, journal: list[tuple[int, bytes]]) -> None:
        raw = head.encode()
        packed = msgpack.packb([[int(k), bytes(b)] for k, b in journal]) if journal else None
        if self._ahead is not None:
            await trio.lowlevel.checkpoint()
            self._stage(head, raw, packed)
            self._n[head.writer] = max(head.n, self._n.get(head.writer, 0))
            return
        async with self._lock:
            await trio.to_thread.run_sync(self._publish_sync, head, raw, packed)
        self._n[head.writer] = head.n

    async def journal(self, writer: bytes) -> list[tuple[int, bytes]]:
        staged = self._staged.get(writer)
        if staged is not None:
            await trio.lowlevel.checkpoint()
            return self._parse_journal(writer, staged.packed)
        return await trio.to_thread.run_sync(self._journal_sync, writer)

    def _journal_sync(self, writer: bytes) -> list[tuple[int, bytes]]:
        with self._live().begin() as txn:
            v = txn.get(writer, db=self._journal)
            v = bytes(v) if v is not None else None
        return self._parse_journal(writer, v)

    def _parse_journal(self, writer: bytes, v: bytes | None) -> list[tuple[int, bytes]]:
        if v is None:
            return []
        try:
            items = msgpack.unpackb(v)
            if not isinstance(items, list):
                raise ValueError("not a list of blocks")
            out = []
            for e in items:
                if (not isinstance(e, list) or len(e) != 2 or type(e[0]) is not int
                        or not isinstance(e[1], bytes) or e[0] not in set(Kind)):
                    raise ValueError("an entry is not [kind, block]")
                out.append((e[0], e[1]))
        except (ValueError, msgpack.UnpackException) as e:
            raise StorageError(f"head board {self.path}: journal of writer "
                               f"{writer[:4].hex()} is damaged: {e}") from None
        return out

    def _publish_sync(self, head: LogHead, raw: bytes, packed: bytes | None) -> None:
        with self._live().begin(write=True) as txn:
            old_n = self._n.get(head.writer)
            if old_n is None:
                old = txn.get(head.writer, db=self._heads)
                if old is not None and bytes(old) == raw and packed is None:
                    return
                old_n = 0
                if old is not None:
                    try:
                        old_n = decode_head(old).n
                    except LogError:
                        log.warning("head board %s: stored head of %s is unreadable; replaced",
                                    self.path, head.writer[:4].hex())
            if old_n >= head.n:
                if old_n == head.n and bytes(txn.get(head.writer, db=self._heads) or b"") == raw:
                    return      # the same head again
                raise StaleHead(f"head n={head.n} of writer {head.writer[:4].hex()} is "
                                f"not newer than the stored n={old_n}")
            txn.put(head.writer, raw, db=self._heads)
            if packed is not None:
                txn.put(head.writer, packed, db=self._journal)
            else:
                txn.delete(head.writer, db=self._journal)

    async def fetch(self, writers: list[bytes]) -> dict[bytes, bytes]:
        writers = list(writers)
        if not writers:
            return {}
        # Staged heads are newer than the stored ones. Taken before the
        # read: one committed meanwhile is then either here or read.
        staged = {w: e.raw for w in writers if (e := self._staged.get(w)) is not None}
        out = await trio.to_thread.run_sync(self._fetch_sync, writers)
        out.update(staged)
        return out

    def _fetch_sync(self, writers: list[bytes]) -> dict[bytes, bytes]:
        with self._live().begin() as txn:
            return {w: bytes(v) for w in writers
                    if (v := txn.get(w, db=self._heads)) is not None}
