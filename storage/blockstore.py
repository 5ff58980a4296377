"""A node's local block store on LMDB (DESIGN.md "storage/blocks": each node
keeps its blocks in LMDB, checked against their BGUID when read; quotas;
refusal with a clear error when full).

Blocks are opaque bytes here (sealed ciphertext, see ``storage.seal``) named
by their BGUID = SHA-256(bytes). This module knows nothing of keys, kinds,
replication or the network.

The store is cut into modules of one idea each; everything they define for
callers is importable from here too:

* ``storage.blockstore_entries``: the on-disk layout and its invariants
  (I1-I5), quota charges (``footprint``), a checked decoder per kind of
  entry, and the counters with their check;
* ``storage.blockstore_repair``: what a damaged entry does to the rest of
  the store, the recount and ``RepairReport``;
* ``storage.lmdb_gate``: the LMDB environment shared by threads (quiet
  sections, map growth);
* here: the store's operations, and :class:`AsyncBlockStore` for trio.

Garbage collection hooks (the collector itself lives above: likely
mark-and-sweep from live roots with a grace period):

* ``stored_at`` is refreshed by every put, even of a block already held, so
  a writer that re-references an existing block (convergent encryption
  deduplicates identical content) protects it from a sweep in progress;
* ``delete_many(..., unless_stored_after=mark_time)`` deletes atomically only
  blocks not put since the mark phase began, and tombstones them with the
  collector's ``epoch``;
* tombstones stop a holder that returns with stale copies (or replica repair
  from one) from resurrecting collected blocks; ``purge_tombstones`` drops
  them once every holder must have heard (after the grace period).

Threads: every method is blocking and thread-safe. One environment per
store directory per process (LMDB's locks are per process; opening the same
directory twice in one process is refused). Writers are serialised by a
lock; readers run concurrently with them. Aborting a write (a refused batch)
and resizing the map happen in a *quiet section* that new readers queue
behind and that waits only for the readers already in (``storage.lmdb_gate``:
py-lmdb drains every in-flight call for both, which back-to-back readers
could put off for minutes). Async code calls through :class:`AsyncBlockStore`,
which runs each call in a worker thread (``trio.to_thread.run_sync``) so the
trio thread never waits on disk.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import lmdb
import trio

# Some names below are not used here but imported so that they stay
# importable from this module, as before the split: STAMP_BYTES,
# TOMBSTONE_BYTES, decode_counter, StoreClosed and _Gate (tests use it).
from .blockstore_entries import (
    _COUNTERS,
    _STAMP,
    _TIME,
    _TOMB,
    _U32,
    _U64,
    BGUID_BYTES,
    FORMAT,
    STAMP_BYTES,
    TOMBSTONE_BYTES,
    Tombstone,
    _Sums,
    _SumsDamaged,
    _quarantine_payload,
    decode_counter,
    decode_format,
    decode_quarantine,
    decode_stamp,
    decode_tombstone,
    footprint,
    load_sums,
    put_sums,
)
from .blockstore_repair import (
    _CORRUPT,
    _MEND,
    _OK,
    DamagedEntries,
    RepairReport,
    recount,
    vet_stamp,
)
from .errors import (
    BlockCorrupt,
    BlockNotFound,
    BlockTombstoned,
    BlockTooLarge,
    StorageError,
    StoreClosed,
    StoreEntryDamaged,
    StoreFormatError,
    StoreFull,
)
from .blockstore_stage import (
    STAGE_BELOW,
    STAGE_DELAY,
    STAGE_FILE,
    STAGE_MAX_BYTES,
    STAGE_MAX_ENTRIES,
    Staged,
    StageLog,
    decode_all,
    encode,
)
from .lmdb_gate import GatedEnv, _Gate
from .seal import MAX_SEALED

log = logging.getLogger(__name__)

DEFAULT_QUOTA = 1 << 30
DEFAULT_MIN_DISK_FREE = 64 << 20
MAP_HEADROOM = 64 << 20
INLINE_PUT_BYTES = 64 << 10    # AsyncBlockStore: smaller puts commit on the trio thread
_STAGE_GEN_KEY = b"stage_gen"  # meta: the last staging generation committed
ABSENT, HELD, TOMBSTONED = 0, 1, 2   # what ``states`` reports per BGUID


@dataclass(frozen=True, slots=True)
class StoreStats:
    blocks: int               # blocks held
    bytes: int                # their payload bytes
    used: int                 # bytes charged against the quota
    quota: int
    free: int                 # quota - used (never negative)
    quarantined: int          # copies held in quarantine
    quarantined_bytes: int
    corruptions: int          # corrupt copies detected since creation
    tombstones: int
    map_size: int             # LMDB's current map size
    damaged: int = 0          # damaged entries met since this store was opened


class BlockStore:
    """Blocks of one node, in LMDB at ``path`` (a directory, created if
    missing). Its layout and invariants are in ``storage.blockstore_entries``.

    ``quota``: bytes that may be charged (see :func:`footprint`);
    ``max_block``: the largest block accepted (default: a sealed 64 KiB block);
    ``min_disk_free``: bytes left free on the file system under the store;
    ``sync``: fsync every commit, so acknowledged puts survive power loss (a
    killed process loses nothing committed either way);
    ``map_size``: initial LMDB map (default twice the quota plus 64 MiB; it
    grows up to four times that);
    ``clock``: the time source of stamps and tombstones;
    ``readahead``: let the OS read ahead when a block's pages are first
    touched (off by default: a holder serving random blocks would read
    pages it never uses; a single-node volume read file by file wants it);
    ``stage``: accept small puts through the staging log (below).

    Staged puts (``storage.blockstore_stage``): with ``stage=True``,
    :meth:`stage` takes a small batch once it is checked (BGUIDs, sizes,
    tombstones, quota, disk) and appended to the staging log, and
    :meth:`flush_staged` commits everything staged in one transaction. Reads
    see staged blocks at once. Every other write, and every read that must
    be exact about the whole store (listing, stats, tombstones), commits the
    staged blocks first, so none of them can tell staging from a direct
    put. Whatever a crash left staged is committed when the store is next
    opened.
    """

    def __init__(self, path: str | os.PathLike, *, quota: int = DEFAULT_QUOTA,
                 max_block: int = MAX_SEALED, min_disk_free: int = DEFAULT_MIN_DISK_FREE,
                 sync: bool = True, map_size: int | None = None,
                 clock: Callable[[], float] = time.time, readahead: bool = False,
                 stage: bool = False):
        if quota <= 0:
            raise ValueError("quota must be positive")
        self.path = Path(path)
        self.quota = quota
        self.max_block = max_block
        self.min_disk_free = min_disk_free
        self._clock = clock
        self._damage = DamagedEntries(self.path, clock, max_len=max(max_block, MAX_SEALED))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create block store directory {self.path}: {e}") from None
        # LMDB maps the file's address space, not memory, and the file grows
        # only as pages are written, so a generous map costs nothing.
        want = _round_up(map_size or 2 * quota + MAP_HEADROOM, 1 << 20)
        try:
            env = lmdb.open(str(self.path), map_size=want, max_dbs=8,
                            sync=sync, metasync=sync, readahead=readahead, lock=True)
        except (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError) as e:
            raise StoreFormatError(f"{self.path} is not a block store LMDB: {e}") from None
        except lmdb.Error as e:
            raise StorageError(f"cannot open block store {self.path}: {e}") from None
        try:
            self._open_dbs(env)
        except BaseException:
            env.close()
            raise
        # The map may grow to four times what was asked, and never shrinks
        # below what an earlier open grew it to (GatedEnv reads the size
        # LMDB settled on).
        self._lmdb = GatedEnv(env, self.path, max_map=4 * want)
        psize = env.stat()["psize"]
        self._footprint = functools.partial(footprint, psize=psize)
        # Staging (class docstring). The lock orders staging, commits of
        # what is staged, and every write after them.
        self._stage_lock = threading.RLock()
        self._staged: dict[bytes, Staged] = {}
        self._staged_bytes = 0
        self._staged_charge = 0
        self._stage_log: StageLog | None = None
        try:
            self._open_stage_log(stage)
        except BaseException:
            self._lmdb.close()
            raise

    # ------------------------------------------------------------------
    # The staging log

    @property
    def staging(self) -> bool:
        """Whether small puts may go through :meth:`stage`."""
        return self._stage_log is not None

    @property
    def staged(self) -> int:
        """Blocks staged and not yet committed."""
        return len(self._staged)

    def _open_stage_log(self, stage: bool) -> None:
        path = self.path / STAGE_FILE
        if not stage and not path.exists():
            return
        wal = StageLog(path, own=stage)
        try:
            if wal.owned and wal.size:
                self._replay(wal)
        except BaseException:
            wal.close()
            raise
        if stage:
            self._stage_log = wal
            self._stage_gen = self._committed_gen() + 1
        else:
            wal.close()

    def _committed_gen(self) -> int:
        with self._lmdb.read() as txn:
            v = txn.get(_STAGE_GEN_KEY, db=self._meta)
        return 0 if v is None or len(v) != _U64.size else _U64.unpack(v)[0]

    def _replay(self, wal: StageLog) -> None:
        """Commit what a crash left in the staging log."""
        gen = self._committed_gen()
        entries, used = decode_all(wal.read(), gen, self.max_block)
        if entries:
            self._commit_staged(dict(entries), gen + 1)
            log.info("%s: committed %d blocks staged before a crash", self.path, len(entries))
        if used < wal.size:
            log.info("%s: %d bytes at the end of the staging log were not whole entries "
                     "of the open generation (a torn or committed tail); dropped",
                     self.path, wal.size - used)
        wal.truncate()

    def stage(self, items: Iterable[tuple[bytes, bytes]], *, revive: bool = False) -> int:
        """Take blocks as :meth:`put_many` would, with the same checks and
        errors, through the staging log (class docstring); returns how many
        were not held before. Without staging, or for a batch of
        ``STAGE_BELOW`` bytes or more, this is :meth:`put_many`."""
        batch = self._verified(items)
        if not batch:
            return 0
        size = sum(len(d) for d in batch.values())
        if self._stage_log is None or size >= STAGE_BELOW:
            return self.put_many(batch.items(), revive=revive)
        self._check_disk(size)
        with self._stage_lock:
            wal = self._stage_log
            if wal is None:     # closed meanwhile
                raise StoreClosed(f"block store {self.path} is closed")
            if (self._staged_bytes + size > STAGE_MAX_BYTES
                    or len(self._staged) + len(batch) > STAGE_MAX_ENTRIES):
                self._flush_locked()
            try:
                new, charge = self._stage_check(batch, revive)
            except _SumsDamaged:
                # Counters to recount first: the ordinary put does that.
                self._flush_locked()
                return self.put_many(batch.items(), revive=revive)
            now = self._clock()
            wal.append(b"".join(encode(self._stage_gen, g, d, revive, now)
                                for g, d in batch.items()))
            for g, d in batch.items():
                old = self._staged.get(g)
                if old is None:
                    self._staged_bytes += len(d)
                self._staged[g] = Staged(d, revive or (old is not None and old.revive), now)
            self._staged_charge += charge
            return new

    def _stage_check(self, batch: dict[bytes, bytes], revive: bool) -> tuple[int, int]:
        """(blocks new here, bytes they will be charged) for staging
        ``batch``; BlockTombstoned or StoreFull as the put would raise."""
        new = charge = 0
        with self._lmdb.read() as txn:
            c = load_sums(txn, self._meta)
            for g, d in batch.items():
                if g in self._staged:
                    continue
                if txn.get(g, db=self._tombs) is not None:
                    if not revive:
                        raise BlockTombstoned(
                            f"block {g.hex()[:16]} was deleted here; put with revive=True "
                            "to store it again", g)
                    charge -= self._footprint(_TOMB.size)   # the revive drops it
                if txn.get(g, db=self._stamps) is None:
                    new += 1
                    charge += self._footprint(len(d)) + self._footprint(_STAMP.size)
        over = c.used + self._staged_charge + charge - self.quota
        if over > 0:
            raise StoreFull(f"block store quota of {self.quota} bytes would be exceeded "
                            f"by {over} bytes; nothing of this batch was stored")
        return new, charge

    def flush_staged(self) -> int:
        """Commit every staged block (one write transaction); returns how
        many. On failure they stay staged, and the error is raised."""
        with self._stage_lock:
            return self._flush_locked()

    def _flush_locked(self) -> int:
        staged = self._staged
        if not staged or self._stage_log is None:
            return 0
        gen = self._stage_gen
        self._commit_staged(staged, gen)
        self._staged = {}
        self._staged_bytes = self._staged_charge = 0
        self._stage_gen = gen + 1
        self._stage_log.truncate()
        return len(staged)

    def _commit_staged(self, staged: dict[bytes, Staged], gen: int) -> None:
        def apply(txn) -> None:
            c = load_sums(txn, self._meta)
            for g, e in staged.items():
                try:
                    self._put_one(txn, c, g, e.data, e.revive, e.at)
                except BlockTombstoned:
                    # Staging checked this, and deletes commit what is staged
                    # before they run; should a tombstone be here anyway, it
                    # wins (the block was collected).
                    log.warning("%s: staged block %s was tombstoned meanwhile; not stored",
                                self.path, g.hex()[:16])
            txn.put(_STAGE_GEN_KEY, _U64.pack(gen), db=self._meta)
            self._store_sums(txn, c)

        self._write(apply)

    def _exact(self) -> None:
        """Commit what is staged before an operation that must see it in
        LMDB (class docstring)."""
        if self._staged:
            with self._stage_lock:
                self._flush_locked()

    def _open_dbs(self, env: lmdb.Environment) -> None:
        # One write transaction. Any refusal aborts it, so a store that is
        # refused is left exactly as it was found.
        with env.begin(write=True) as txn:
            names = set(env.dbs(txn)) if hasattr(env, "dbs") else set()
            self._meta = env.open_db(b"meta", txn=txn)
            fmt = txn.get(b"format", db=self._meta)
            if fmt is None and names & {b"blocks", b"stamps", b"tombstones", b"quarantine"}:
                raise StoreFormatError(
                    f"{self.path}: the block store's format record is missing (damaged); "
                    "refusing to guess the layout")
            if fmt is None and names - {b"meta"}:
                raise StoreFormatError(f"{self.path} holds an LMDB that is not a block store")
            if fmt is not None:
                decode_format(self.path, fmt)
            self._blocks = env.open_db(b"blocks", txn=txn)
            self._stamps = env.open_db(b"stamps", txn=txn)
            self._tombs = env.open_db(b"tombstones", txn=txn)
            self._quar = env.open_db(b"quarantine", txn=txn)
            if fmt is None:  # a new store
                txn.put(b"format", _U32.pack(FORMAT), db=self._meta)
                put_sums(txn, self._meta, _Sums())

    # ------------------------------------------------------------------
    # Lifecycle

    def close(self) -> None:
        """Commit what is staged, then close the environment; waits for
        calls in flight. Idempotent."""
        with self._stage_lock:
            if self._stage_log is not None:
                try:
                    self._flush_locked()
                except StorageError as e:
                    log.error("%s: %d staged blocks left in the staging log for the next "
                              "open: %s", self.path, len(self._staged), e)
                finally:
                    wal, self._stage_log = self._stage_log, None
                    wal.close()
        self._lmdb.close()

    def __enter__(self) -> "BlockStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._lmdb.closed

    # ------------------------------------------------------------------
    # Reads

    def get(self, bguid: bytes) -> bytes:
        """The block's bytes, verified against ``bguid``. Raises
        BlockNotFound, or BlockCorrupt after moving a bad copy to quarantine."""
        _check_bguid(bguid)
        e = self._staged.get(bguid)
        if e is not None:
            return e.data       # verified when staged
        with self._lmdb.read() as txn:
            data = txn.get(bguid, db=self._blocks)
        if data is None:
            raise BlockNotFound(f"block {bguid.hex()[:16]} is not stored here", bguid)
        if hashlib.sha256(data).digest() != bguid:
            self._quarantine(bguid, data)
            raise BlockCorrupt(f"stored copy of block {bguid.hex()[:16]} is corrupt; quarantined",
                               bguid)
        return data

    def get_many(self, bguids: Iterable[bytes]) -> dict[bytes, bytes]:
        """The verified blocks among ``bguids`` that are held here. Missing
        ones are left out; corrupt ones are quarantined and left out."""
        want = list(dict.fromkeys(bguids))
        for g in want:
            _check_bguid(g)
        staged = self._staged
        with self._lmdb.read() as txn:
            found = {g: d for g in want if g not in staged
                     and (d := txn.get(g, db=self._blocks)) is not None}
        for g, d in list(found.items()):
            if hashlib.sha256(d).digest() != g:
                self._quarantine(g, d)
                del found[g]
        for g in want:
            e = staged.get(g)
            if e is not None:
                found[g] = e.data
        return found

    def has(self, bguid: bytes) -> bool:
        """Whether a block is held (not verified; ``get`` verifies)."""
        return self.has_many([bguid])[0]

    def has_many(self, bguids: Iterable[bytes]) -> list[bool]:
        bguids = list(bguids)
        for g in bguids:
            _check_bguid(g)
        staged = self._staged
        with self._lmdb.read() as txn:
            return [g in staged or txn.get(g, db=self._stamps) is not None for g in bguids]

    def states(self, bguids: Iterable[bytes]) -> list[tuple[int, float | None, int]]:
        """For each BGUID, in one read transaction: (HELD, stored_at, 0),
        (TOMBSTONED, deleted_at, epoch) or (ABSENT, None, 0). Replica repair
        compares these across holders (``storage.maintenance``). A damaged
        stamp reads as put just now, and a damaged tombstone as the oldest
        possible (``storage.blockstore_repair``), so neither makes anyone
        drop a copy."""
        bguids = list(bguids)
        for g in bguids:
            _check_bguid(g)
        out: list[tuple[int, float | None, int]] = []
        staged = self._staged
        with self._lmdb.read() as txn:
            for g in bguids:
                e = staged.get(g)
                if e is not None:
                    out.append((HELD, e.at, 0))
                    continue
                v = txn.get(g, db=self._stamps)
                if v is not None:
                    out.append((HELD, self._damage.lenient_stamp(g, v), 0))
                    continue
                v = txn.get(g, db=self._tombs)
                if v is None:
                    out.append((ABSENT, None, 0))
                else:
                    t = self._damage.lenient_tombstone(g, v)
                    out.append((TOMBSTONED, t.deleted_at, t.epoch))
        return out

    def stored_at(self, bguid: bytes) -> float | None:
        """When the block was last put (or revived), or None if not held.
        StoreEntryDamaged if its stamp is damaged (its bytes can still be
        read)."""
        _check_bguid(bguid)
        e = self._staged.get(bguid)
        if e is not None:
            return e.at
        with self._lmdb.read() as txn:
            v = txn.get(bguid, db=self._stamps)
        return None if v is None else self._damage.strict(decode_stamp, bguid, v)[0]

    def list_bguids(self, after: bytes | None = None, limit: int = 1000) -> list[bytes]:
        """Up to ``limit`` BGUIDs held, in byte order, strictly after
        ``after``; page through all of them by passing the last one back."""
        self._exact()
        return self._list(self._stamps, after, limit)

    def __iter__(self) -> Iterator[bytes]:
        """All BGUIDs held, paged so that no transaction stays open while the
        caller works (blocks added or deleted meanwhile may or may not show)."""
        after = None
        while page := self.list_bguids(after, 1000):
            yield from page
            after = page[-1]

    def tombstone(self, bguid: bytes) -> Tombstone | None:
        """The block's tombstone, or None. StoreEntryDamaged if it is
        damaged (it still refuses stale puts)."""
        _check_bguid(bguid)
        self._exact()
        with self._lmdb.read() as txn:
            v = txn.get(bguid, db=self._tombs)
        return None if v is None else self._damage.strict(decode_tombstone, bguid, v)

    def tombstones(self, after: bytes | None = None, limit: int = 1000) -> list[tuple[bytes, Tombstone]]:
        """A page of tombstones in BGUID order, strictly after ``after``
        (a damaged one as epoch 0 at time 0)."""
        self._exact()
        with self._lmdb.read() as txn:
            return [(k, self._damage.lenient_tombstone(k, v))
                    for k, v in self._page(txn, self._tombs, after, limit)]

    def quarantined(self, after: bytes | None = None, limit: int = 100) -> list[tuple[bytes, float, bytes]]:
        """A page of quarantined copies: (BGUID, found_at, the bad bytes).
        An entry with an unreadable found_at is listed at 0.0 with every
        byte past where the time would be."""
        with self._lmdb.read() as txn:
            page = self._page(txn, self._quar, after, limit)
        out = []
        for k, v in page:
            try:
                when, bad = decode_quarantine(k, v)
            except StoreEntryDamaged as e:
                self._damage.note(e)
                when, bad = 0.0, bytes(v[_TIME.size:]) if len(v) >= _TIME.size else bytes(v)
            out.append((k, when, bad))
        return out

    def stats(self) -> StoreStats:
        """Counts and sums. Counters found damaged are recounted first (a
        write transaction)."""
        self._exact()
        for attempt in range(2):
            try:
                with self._lmdb.read() as txn:
                    c = load_sums(txn, self._meta)
                    n_blocks = txn.stat(self._blocks)["entries"]
                    n_quar = txn.stat(self._quar)["entries"]
                    n_tombs = txn.stat(self._tombs)["entries"]
                break
            except _SumsDamaged as e:
                if attempt:  # damaged again right after a recount: say so, named
                    raise e.err from None
                self._recount_now(e)
        return StoreStats(
            blocks=n_blocks, bytes=c.bytes, used=c.used, quota=self.quota,
            free=max(0, self.quota - c.used), quarantined=n_quar,
            quarantined_bytes=c.qbytes, corruptions=c.corruptions,
            tombstones=n_tombs, map_size=self._lmdb.map_size, damaged=len(self._damage))

    # ------------------------------------------------------------------
    # Writes

    def put(self, bguid: bytes, data: bytes, *, revive: bool = False) -> bool:
        """Store one block; True if it was not held before. See put_many."""
        return self.put_many([(bguid, data)], revive=revive) == 1

    def put_many(self, items: Iterable[tuple[bytes, bytes]], *, revive: bool = False) -> int:
        """Store blocks atomically: all of them, or (on any error) none.
        Returns how many were not held before.

        Each block is checked against its BGUID first (BlockCorrupt) and
        against ``max_block`` (BlockTooLarge). A tombstoned BGUID is refused
        (BlockTombstoned) unless ``revive``. StoreFull if the quota, the disk
        or the LMDB map cannot take the batch. A block already held has its
        ``stored_at`` refreshed (which also mends a damaged stamp); if the
        copy held differs from the verified one offered, the held copy was
        corrupt and is replaced (and its bytes quarantined)."""
        batch = self._verified(items)
        if not batch:
            return 0
        self._check_disk(sum(len(d) for d in batch.values()))
        now = self._clock()

        def apply(txn) -> int:
            c = load_sums(txn, self._meta)
            new = sum(self._put_one(txn, c, g, d, revive, now) for g, d in batch.items())
            c = self._store_sums(txn, c)
            # Staged blocks are charged already, though not committed yet.
            over = c.used + self._staged_charge - self.quota
            if over > 0:
                raise StoreFull(f"block store quota of {self.quota} bytes would be exceeded "
                                f"by {over} bytes; nothing of this batch was stored")
            return new

        return self._write(apply)

    def _verified(self, items: Iterable[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
        """``items`` as a dict, each checked against its BGUID (BlockCorrupt)
        and ``max_block`` (BlockTooLarge)."""
        batch: dict[bytes, bytes] = {}
        for g, d in items:
            _check_bguid(g)
            d = bytes(d)
            if len(d) > self.max_block:
                raise BlockTooLarge(
                    f"block {g.hex()[:16]} of {len(d)} bytes exceeds this store's limit "
                    f"of {self.max_block}", g)
            if hashlib.sha256(d).digest() != g:
                raise BlockCorrupt(f"bytes offered as block {g.hex()[:16]} do not hash to it", g)
            batch[g] = d
        return batch

    def _put_one(self, txn, c: _Sums, g: bytes, d: bytes, revive: bool, now: float) -> bool:
        """Put one verified block within ``txn``, keeping the counters ``c``;
        True if it was not held before."""
        if txn.get(g, db=self._tombs) is not None:  # damaged or not: it refuses
            if not revive:
                raise BlockTombstoned(
                    f"block {g.hex()[:16]} was deleted here; put with revive=True "
                    "to store it again", g)
            txn.delete(g, db=self._tombs)
            c.used -= self._footprint(_TOMB.size)
        stamp = _STAMP.pack(now, len(d))
        held = txn.get(g, db=self._blocks)
        old_stamp = txn.get(g, db=self._stamps)
        if held == d:
            # The new stamp replaces a damaged one too. The bytes were
            # charged at their put, but a missing or damaged stamp leaves
            # that unsure: recount.
            if not self._damage.stamp_fits(g, old_stamp, len(d)):
                c.recount = True
            txn.put(g, stamp, db=self._stamps)
            return False
        new = False
        if old_stamp is None:
            new = True
            c.used += self._footprint(len(d)) + self._footprint(_STAMP.size)
            if held is not None:  # a block without its stamp, overwritten
                c.recount = True
        else:
            log.warning("block %s: held copy is corrupt, replaced by a verified one",
                        g.hex()[:16])
            self._move_to_quarantine(txn, c, g, held or b"",
                                     self._damage.charged(g, old_stamp), now)
            c.used += self._footprint(len(d))  # its stamp is charged already
        txn.put(g, d, db=self._blocks)
        txn.put(g, stamp, db=self._stamps)
        c.bytes += len(d)
        return new

    def delete(self, bguid: bytes, *, epoch: int = 0, tombstone: bool = True,
               unless_stored_after: float | None = None) -> bool:
        """Delete one block; True if it was held. See delete_many."""
        return bool(self.delete_many([bguid], epoch=epoch, tombstone=tombstone,
                                     unless_stored_after=unless_stored_after))

    def delete_many(self, bguids: Iterable[bytes], *, epoch: int = 0, tombstone: bool = True,
                    unless_stored_after: float | None = None,
                    spare_within: float | None = None) -> list[bytes]:
        """Delete blocks in one transaction; returns those that were held
        and removed. With ``tombstone`` (the default) a tombstone of
        ``epoch`` is recorded for each, held or not, so stale copies are not
        stored again. With ``unless_stored_after``, a block put at or after
        that time is kept (a GC sweep spares blocks written since its mark
        began). ``spare_within`` says the same as an age on this store's
        own clock (blocks put in the last ``spare_within`` seconds are kept):
        a remote collector sends that, so its clock and ours need not agree.
        Deletes are never refused for quota.

        A held block whose stamp is damaged (or missing) is never deleted,
        by any call: its stamp is rewritten from its verified bytes as put
        now, and the block is spared with no tombstone (I3). If its bytes
        fail verification they are quarantined, and it counts as not held."""
        bguids = list(dict.fromkeys(bguids))
        for g in bguids:
            _check_bguid(g)
        now = self._clock()
        if spare_within is not None:
            if not (math.isfinite(spare_within) and spare_within >= 0):
                raise ValueError("spare_within must be a finite number of seconds >= 0")
            since = now - spare_within
            unless_stored_after = (since if unless_stored_after is None
                                   else max(since, unless_stored_after))
        tomb = _TOMB.pack(epoch, now)

        def apply(txn) -> list[bytes]:
            c = load_sums(txn, self._meta)
            removed = []
            for g in bguids:
                st = txn.get(g, db=self._stamps)
                # A block without its stamp (I2 broken) is vetted like a
                # damaged stamp; it must not end up beside a tombstone (I3).
                if st is not None or txn.get(g, db=self._blocks) is not None:
                    v = vet_stamp(self, txn, g, st)
                    if v.verdict == _MEND:
                        txn.put(g, _STAMP.pack(now, v.length), db=self._stamps)
                        c.recount = True  # what was charged for it is unsure
                        continue
                    if v.verdict == _OK:
                        if unless_stored_after is not None and v.when >= unless_stored_after:
                            continue
                        txn.delete(g, db=self._blocks)
                        c.bytes -= v.length
                        c.used -= self._footprint(v.length) + self._footprint(_STAMP.size)
                        removed.append(g)
                    elif v.verdict == _CORRUPT:
                        self._move_to_quarantine(txn, c, g, v.bad, None, now)
                    else:  # _ORPHAN: a stamp with no block, charged unknown
                        c.recount = True
                    if st is not None:
                        txn.delete(g, db=self._stamps)
                if tombstone:
                    if txn.get(g, db=self._tombs) is None:
                        c.used += self._footprint(_TOMB.size)
                    txn.put(g, tomb, db=self._tombs)
            self._store_sums(txn, c)
            return removed

        return self._write_exact(apply)

    def purge_tombstones(self, *, before_epoch: int | None = None,
                         older_than: float | None = None) -> int:
        """Drop tombstones of an epoch below ``before_epoch`` or written
        before ``older_than`` (at least one must be given); returns how many.
        After this a stale copy of those blocks would be accepted again, so
        purge only past the collector's grace period. A damaged tombstone
        counts as epoch 0 at time 0, the first to go."""
        if before_epoch is None and older_than is None:
            raise ValueError("purge_tombstones needs before_epoch or older_than")

        def apply(txn) -> int:
            c = load_sums(txn, self._meta)
            doomed = []
            for g, v in txn.cursor(db=self._tombs):
                t = self._damage.lenient_tombstone(g, v)
                if ((before_epoch is not None and t.epoch < before_epoch)
                        or (older_than is not None and t.deleted_at < older_than)):
                    doomed.append(g)
            for g in doomed:
                txn.delete(g, db=self._tombs)
            c.used -= len(doomed) * self._footprint(_TOMB.size)
            self._store_sums(txn, c)
            return len(doomed)

        return self._write_exact(apply)

    def purge_quarantine(self) -> int:
        """Drop every quarantined copy (after fsck or an operator looked);
        returns how many."""

        def apply(txn) -> int:
            c = load_sums(txn, self._meta)
            n = 0
            for g, v in txn.cursor(db=self._quar):
                c.qbytes -= _quarantine_payload(len(v))
                c.used -= self._footprint(len(v))
                c.recount |= self._damage.damaged_quarantine(g, v)
                n += 1
            txn.drop(self._quar, delete=False)
            self._store_sums(txn, c)
            return n

        return self._write(apply)

    def repair(self, *, verify: bool = False) -> RepairReport:
        """Recount every counter from the entries, and mend what the scan
        finds on the way, in one write transaction
        (``storage.blockstore_repair``). A stamp that is damaged or missing
        is rewritten from its verified block, as put now. A stamp without its
        block is dropped. A block that fails verification is quarantined. With
        ``verify``, every block is read and checked against its BGUID and its
        stamp's length. That reads the whole store while holding the write
        lock, so it is for maintenance windows. The store recounts by itself
        when it finds its counters damaged; this is for operators and fsck."""

        def apply(txn) -> RepairReport:
            c, report = recount(self, txn, verify=verify)
            put_sums(txn, self._meta, c)
            return report

        report = self._write_exact(apply)
        if report != RepairReport(0, 0, 0, 0, 0, False):
            log.warning("block store %s repaired: %s", self.path, report)
        return report

    # ------------------------------------------------------------------
    # Internals: the counters, quarantine moves, disk space and writes

    def _store_sums(self, txn, c: _Sums) -> _Sums:
        """Write the counters at the end of a write transaction; returns
        them. They are recounted first if an entry of unknown charge came or
        went, or if an update took one below zero. That happens when a
        subtracted length was damaged although it looked plausible."""
        if c.recount or min(c.values()) < 0:
            if not c.recount:
                log.warning("block store %s: a counter would go negative (%s); recounting",
                            self.path, dict(zip(_COUNTERS, c.values())))
            c, _ = recount(self, txn)
        put_sums(txn, self._meta, c)
        return c

    def _recount_now(self, e: _SumsDamaged) -> None:
        """Answer damaged counters: recount them in a transaction of their own."""
        if e.legacy:
            log.info("block store %s: %s (written by older code?); recounting",
                     self.path, e.err)
        else:
            self._damage.note(e.err)

        def apply(txn) -> None:
            c, _ = recount(self, txn)
            put_sums(txn, self._meta, c)

        self._write(apply)

    def _quarantine(self, bguid: bytes, bad: bytes) -> None:
        log.error("block %s failed verification in %s; moved to quarantine",
                  bguid.hex()[:16], self.path)

        def apply(txn) -> None:
            # Move only the copy we saw: another thread may have quarantined
            # it already, or replaced it by a verified copy, meanwhile.
            if txn.get(bguid, db=self._blocks) != bad:
                return
            c = load_sums(txn, self._meta)
            stamp = txn.get(bguid, db=self._stamps)
            charged = None if stamp is None else self._damage.charged(bguid, stamp)
            self._move_to_quarantine(txn, c, bguid, bad, charged, self._clock())
            if stamp is not None:
                txn.delete(bguid, db=self._stamps)
                c.used -= self._footprint(_STAMP.size)
            self._store_sums(txn, c)

        self._write(apply)

    def _move_to_quarantine(self, txn, c: _Sums, g: bytes, bad: bytes, charged: int | None,
                            now: float) -> None:
        """Within ``txn``: take ``bad`` out of ``blocks`` (its stamp stays;
        the caller decides) and keep it in ``quarantine``. ``charged``: the
        length the block was charged for, as its stamp recorded at put (not
        len(bad)); None if the stamp cannot say, and then ``c`` is recounted."""
        txn.delete(g, db=self._blocks)
        if charged is None:
            c.recount = True
        else:
            c.bytes -= charged
            c.used -= self._footprint(charged)
        old = txn.get(g, db=self._quar)
        if old is not None:
            c.qbytes -= _quarantine_payload(len(old))
            c.used -= self._footprint(len(old))
            c.recount |= self._damage.damaged_quarantine(g, old)
        q = _TIME.pack(now) + bad
        txn.put(g, q, db=self._quar)
        c.qbytes += len(bad)
        c.used += self._footprint(len(q))
        c.corruptions += 1

    def _check_disk(self, incoming: int) -> None:
        try:
            free = shutil.disk_usage(self.path).free
        except OSError as e:
            raise StorageError(f"cannot stat the disk under {self.path}: {e}") from None
        if free < incoming + self.min_disk_free:
            raise StoreFull(f"disk under {self.path} has {free} bytes free; keeping "
                            f"{self.min_disk_free} in reserve")

    def _write_exact(self, apply):
        """``_write`` after committing what is staged, with no staging in
        between: a delete must not overtake a staged put of the same block."""
        with self._stage_lock:
            self._flush_locked()
            return self._write(apply)

    def _write(self, apply):
        """Run ``apply(txn)`` in one write transaction and commit it (see
        ``GatedEnv.write``). If ``apply`` finds the counters damaged, they are
        recounted and committed in a transaction of their own first, so
        the recount stays even if ``apply`` is refused. Then ``apply`` runs
        again, once."""
        try:
            return self._lmdb.write(apply)
        except _SumsDamaged as e:
            self._recount_now(e)
        try:
            return self._lmdb.write(apply)
        except _SumsDamaged as e:  # damaged again at once: not for us to loop on
            raise e.err from None

    def _list(self, db, after: bytes | None, limit: int) -> list[bytes]:
        with self._lmdb.read() as txn:
            return [k for k, _ in self._page(txn, db, after, limit)]

    @staticmethod
    def _page(txn, db, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        if limit <= 0:
            return []
        cur = txn.cursor(db=db)
        ok = cur.set_range(after) if after is not None else cur.first()
        out = []
        while ok and len(out) < limit:
            k = cur.key()
            if k != after:
                out.append((k, cur.value()))
            ok = cur.next()
        return out


def _check_bguid(g: bytes) -> None:
    if type(g) is not bytes or len(g) != BGUID_BYTES:
        raise ValueError(f"a BGUID is {BGUID_BYTES} bytes, got {type(g).__name__} "
                         f"of length {len(g) if isinstance(g, (bytes, bytearray)) else '?'}")


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class AsyncBlockStore:
    """The same store for trio code: each call runs in a worker thread, so
    disk waits and hashing never block the trio thread. Cancelling a caller
    waits for its call to finish (an LMDB transaction is never abandoned
    half way), then raises Cancelled.

    ``inline=True`` runs calls on the trio thread instead. Only for
    simulations on virtual time: with ``MockClock(autojump_threshold=0)`` a
    task waiting on a worker thread counts as idle, so the clock would jump
    past every timeout while the thread works.

    Small puts (fewer than ``inline_below`` bytes, a small file's blocks) run
    on the trio thread too: the commit's own wait (one fsync) is shorter
    than a hand-off to a worker thread and back under load, which on the
    small-file path cost more CPU and latency than the commit itself.
    LMDB allows one write transaction at a time anyway, so no other write
    is held up that could have run; the cost is that a small put arriving
    while a large one commits in a worker thread waits for that commit on
    the trio thread.

    With a staging store (``BlockStore(stage=True)``) those small puts are
    staged instead (``BlockStore.stage``: one append to a file), and a
    system task commits what is staged ``stage_delay`` seconds after the
    first of them, in a worker thread."""

    def __init__(self, store: BlockStore, limiter: trio.CapacityLimiter | None = None, *,
                 inline: bool = False, inline_below: int = INLINE_PUT_BYTES,
                 stage_delay: float = STAGE_DELAY):
        self.store = store
        self.inline = inline
        self.inline_below = inline_below
        self.stage_delay = stage_delay
        self._limiter = limiter or trio.CapacityLimiter(4)
        self._commit_armed = False

    async def _run(self, fn, *args, **kw):
        if self.inline:
            await trio.lowlevel.checkpoint()
            return fn(*args, **kw)
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kw),
                                             limiter=self._limiter)

    async def get(self, bguid: bytes) -> bytes:
        return await self._run(self.store.get, bguid)

    async def get_many(self, bguids: Iterable[bytes]) -> dict[bytes, bytes]:
        return await self._run(self.store.get_many, list(bguids))

    async def has_many(self, bguids: Iterable[bytes]) -> list[bool]:
        return await self._run(self.store.has_many, list(bguids))

    async def put(self, bguid: bytes, data: bytes, *, revive: bool = False) -> bool:
        return await self._run(self.store.put, bguid, data, revive=revive)

    async def put_many(self, items: Iterable[tuple[bytes, bytes]], *, revive: bool = False) -> int:
        items = list(items)
        if sum(len(d) for _, d in items) < self.inline_below:
            await trio.lowlevel.checkpoint()
            if not self.store.staging:
                return self.store.put_many(items, revive=revive)
            n = self.store.stage(items, revive=revive)
            self._arm_commit()
            return n
        return await self._run(self.store.put_many, items, revive=revive)

    def _arm_commit(self) -> None:
        if self._commit_armed or not self.store.staged:
            return
        self._commit_armed = True
        try:
            trio.lowlevel.spawn_system_task(self._commit_later, name="commit staged blocks")
        except RuntimeError:    # the run is ending: commit now
            self._commit_armed = False
            self.store.flush_staged()

    async def _commit_later(self) -> None:
        # A system task: it must never raise (trio would end the run).
        try:
            await trio.sleep(self.stage_delay)
            await self._run(self.store.flush_staged)
        except trio.Cancelled:
            self._commit_armed = False
            raise       # the run is ending; closing the store commits the rest
        except Exception as e:  # noqa: BLE001 - logged; the next put or close retries
            self._commit_armed = False
            log.error("%s: committing staged blocks failed (they stay in the staging "
                      "log): %s", self.store.path, e)
            return
        self._commit_armed = False
        self._arm_commit()      # what was staged while this commit ran

    async def delete_many(self, bguids: Iterable[bytes], **kw) -> list[bytes]:
        return await self._run(self.store.delete_many, list(bguids), **kw)

    async def list_bguids(self, after: bytes | None = None, limit: int = 1000) -> list[bytes]:
        return await self._run(self.store.list_bguids, after, limit)

    async def tombstone(self, bguid: bytes) -> Tombstone | None:
        return await self._run(self.store.tombstone, bguid)

    async def states(self, bguids: Iterable[bytes]) -> list[tuple[int, float | None, int]]:
        return await self._run(self.store.states, list(bguids))

    async def purge_tombstones(self, **kw) -> int:
        return await self._run(self.store.purge_tombstones, **kw)

    async def stats(self) -> StoreStats:
        return await self._run(self.store.stats)

    async def repair(self, *, verify: bool = False) -> RepairReport:
        return await self._run(self.store.repair, verify=verify)


__all__ = [
    "ABSENT", "HELD", "TOMBSTONED", "BGUID_BYTES", "FORMAT", "STAMP_BYTES", "TOMBSTONE_BYTES",
    "DEFAULT_QUOTA", "DEFAULT_MIN_DISK_FREE", "MAP_HEADROOM",
    "BlockStore", "AsyncBlockStore", "StoreStats", "RepairReport", "Tombstone", "footprint",
    "decode_stamp", "decode_tombstone", "decode_quarantine", "decode_counter", "decode_format",
]
