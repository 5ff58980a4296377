"""A node's local block store on LMDB (DESIGN.md "storage/blocks": each node
keeps its blocks in LMDB, checked against their BGUID when read; quotas;
refusal with a clear error when full).

Blocks are opaque bytes here (sealed ciphertext, see ``storage.seal``) named
by their BGUID = SHA-256(bytes). This module knows nothing of keys, kinds,
replication or the network.

On-disk layout: one LMDB environment (a directory holding ``data.mdb`` and
``lock.mdb``) with these named databases. All keys are raw 32-byte BGUIDs
except in ``meta``; integers are big-endian, times are float seconds since
the Unix epoch (``>d``)::

    blocks      BGUID -> the block's bytes, exactly as offered and verified
    stamps      BGUID -> stored_at (>d): time of the last put (or revive),
                         length (>I) of the block as verified at put
    tombstones  BGUID -> epoch (>Q), deleted_at (>d)
    quarantine  BGUID -> found_at (>d), then the bytes that failed verification
    meta        b"format"      -> >I  layout version, FORMAT (1)
                b"bytes"       -> >Q  sum of the lengths in ``stamps``
                b"qbytes"      -> >Q  sum of bad-byte lengths over ``quarantine``
                b"used"        -> >Q  bytes charged against the quota (below)
                b"corruptions" -> >Q  corrupt copies found since creation
                b"sums"        -> 8 bytes: check of the four counters above
                                  (``_sums_check``), written with them

Invariants, true after every committed transaction (every change below is
a single LMDB write transaction, so a crash, ``kill -9`` included, leaves
each put, batch, delete or quarantine move wholly done or not at all):

I1  every value in ``blocks`` hashes to its key. Checked before a put
    commits; since disk damage can break it behind LMDB's back (LMDB has no
    checksums), checked again on every read: a value found violating it is
    moved to ``quarantine`` (never served) and ``corruptions`` grows by one.
I2  ``stamps`` has exactly the keys of ``blocks``.
I3  no key is both in ``blocks`` and in ``tombstones``: a put of a
    tombstoned BGUID is refused (BlockTombstoned) unless ``revive=True``,
    which drops the tombstone in the same transaction.
I4  the ``meta`` counters equal the sums they name, and ``sums`` is their
    check. They are kept from the lengths recorded in ``stamps``, so a
    damaged value (even a truncated one) cannot skew them when it is
    quarantined.
I5  ``used <= quota`` after every put: a put or batch that would exceed it is
    refused whole (StoreFull). Only tombstones written by deletes of blocks
    we did not hold may push ``used`` past the quota; deletes are never
    refused, and ``purge_tombstones`` takes it back.

Quota accounting charges what an entry costs in LMDB, not just its payload:
a large value's overflow pages rounded up to the page size, a small value's
leaf node, plus the stamp, quarantine or tombstone entry (``footprint``).
B-tree branch pages, page fill and copy-on-write space are covered by map
headroom instead: the map is sized at twice the quota plus 64 MiB, grown on
MapFullError (then the put is retried once), and a put is refused with
StoreFull before it can fail for lack of map or disk space.

Damaged entries (issue 4). Disk damage can reach any entry, not only block
values. Each kind of entry is read by its own checked decoder
(``decode_stamp``, ``decode_tombstone``, ``decode_quarantine``,
``decode_counter``, ``decode_format``). The decoder raises
StoreEntryDamaged (StoreFormatError for the format record) naming the
database, the key and what is wrong. No struct error and no assert escapes.
Here is what a damaged entry does to the rest of the store:

* The format record: the store refuses to open (StoreFormatError) and
  changes nothing. It never guesses a layout.
* The counters. A counter that does not decode, that disagrees with
  ``sums`` (a missing ``sums`` counts as disagreeing, as in a store written
  by older code), or that an update would push below zero is recomputed
  from the entries (``repair``) before the call goes on. The quota is
  therefore checked against the true use. ``corruptions`` is a history,
  not a sum, so a recount keeps its stored value if that decodes to a
  plausible count (below 2**32), and raises it to at least the number of
  quarantined copies.
* The stamp of a held block. The block's bytes are still served, since
  they are checked against their BGUID and not against the stamp. A call
  about exactly that stamp (``stored_at``) raises StoreEntryDamaged.
  ``states`` reads it as "put just now", so replica repair keeps the block.
  No delete removes a block with a damaged stamp. The delete that meets it
  (or ``repair``) rewrites the stamp from the verified bytes, with
  stored_at = now as if a writer had just put the block, and spares the
  block: only a sweep marked after that can collect it. If the bytes fail
  verification too, they go to quarantine like any corrupt copy. A block
  found without its stamp is treated the same way, and a stamp left
  without its block is dropped. A recorded length larger than any
  block this store accepts counts as damage. A wrong length below that is
  found only by ``repair(verify=True)``; until then it skews the counters by
  less than one block.
* A tombstone still refuses stale puts, because its presence is what
  matters. Its contents read as the oldest possible (epoch 0, time 0), so
  it never makes another holder drop a copy, and the next purge drops it.
* A quarantine entry is listed with found_at 0.0, and purged as usual.

A damaged entry is logged once per open and counted in ``stats().damaged``.

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
behind and that waits only for the readers already in (``_Gate``: py-lmdb
drains every in-flight call for both, which back-to-back readers could put
off for minutes). Async code calls through :class:`AsyncBlockStore`, which
runs each call in a worker thread (``trio.to_thread.run_sync``) so the trio
thread never waits on disk.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import shutil
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import lmdb
import trio

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
from .seal import MAX_SEALED

log = logging.getLogger(__name__)

FORMAT = 1
BGUID_BYTES = 32
DEFAULT_QUOTA = 1 << 30
DEFAULT_MIN_DISK_FREE = 64 << 20
MAP_HEADROOM = 64 << 20

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_TIME = struct.Struct(">d")
_STAMP = struct.Struct(">dI")
_TOMB = struct.Struct(">Qd")
STAMP_BYTES = _STAMP.size
ABSENT, HELD, TOMBSTONED = 0, 1, 2   # what ``states`` reports per BGUID
TOMBSTONE_BYTES = _TOMB.size

# LMDB page geometry (mdb.c): a leaf node is an 8-byte header, the key and
# the value, plus a 2-byte slot in its page; a value too large for a node
# moves to its own overflow pages, each run with a 16-byte page header.
_NODE = 8
_SLOT = 2
_PAGE_HDR = 16
_ENTRY_SMALL = _NODE + BGUID_BYTES + _SLOT  # an entry without its value


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A record that a block was deleted: by which GC epoch, and when."""

    epoch: int
    deleted_at: float


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


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What ``BlockStore.repair`` found and did, in its one transaction."""

    stamps_rewritten: int     # damaged or missing stamps of verified blocks, written anew
    stamps_dropped: int       # stamps whose block was gone
    quarantined: int          # blocks whose bytes failed verification
    damaged_tombstones: int   # left in place (they still refuse stale puts)
    damaged_quarantine: int   # quarantine entries whose found_at is unreadable
    counters_fixed: bool      # the stored counters (or their check) were wrong


# --------------------------------------------------------------------------
# Checked decoders, one per kind of entry ("Damaged entries" above). Each
# takes the raw value as LMDB returned it and either returns what it means or
# raises StoreEntryDamaged naming the database, the key and the fault.

_SUMS_KEY = b"sums"
_COUNTERS = ("bytes", "qbytes", "used", "corruptions")
_MAX_CORRUPTIONS = 1 << 32  # a recount distrusts a stored history beyond this


def _damaged(db: str, key: bytes, what: str) -> StoreEntryDamaged:
    name = key.decode("ascii", "replace") if db == "meta" else key.hex()[:16]
    return StoreEntryDamaged(f"block store entry {db}[{name}] is damaged: {what}", db, key)


def _time_ok(t: float) -> bool:
    return math.isfinite(t)  # NaN would compare false with every mark and cutoff


def decode_stamp(bguid: bytes, v: bytes) -> tuple[float, int]:
    """(stored_at, length) from the stamp ``v`` of block ``bguid``. Whether the
    length fits the block is for the store to check (``_vet_stamp``)."""
    if len(v) != _STAMP.size:
        raise _damaged("stamps", bguid, f"{len(v)} bytes where a stamp has {_STAMP.size}")
    when, n = _STAMP.unpack(v)
    if not _time_ok(when):
        raise _damaged("stamps", bguid, f"stored_at {when!r} is not a time")
    return when, n


def decode_tombstone(bguid: bytes, v: bytes) -> Tombstone:
    if len(v) != _TOMB.size:
        raise _damaged("tombstones", bguid, f"{len(v)} bytes where a tombstone has {_TOMB.size}")
    epoch, when = _TOMB.unpack(v)
    if not _time_ok(when):
        raise _damaged("tombstones", bguid, f"deleted_at {when!r} is not a time")
    return Tombstone(epoch, when)


def decode_quarantine(bguid: bytes, v: bytes) -> tuple[float, bytes]:
    """(found_at, the bad bytes) from a quarantine entry."""
    if len(v) < _TIME.size:
        raise _damaged("quarantine", bguid, f"{len(v)} bytes, too short for its found_at")
    (when,) = _TIME.unpack_from(v)
    if not _time_ok(when):
        raise _damaged("quarantine", bguid, f"found_at {when!r} is not a time")
    return when, bytes(v[_TIME.size:])


def decode_counter(name: str, v: bytes | None) -> int:
    """A ``meta`` counter; absent means zero (a store that never counted)."""
    if v is None:
        return 0
    if len(v) != _U64.size:
        raise _damaged("meta", name.encode(), f"{len(v)} bytes where a counter has {_U64.size}")
    return _U64.unpack(v)[0]


def decode_format(path: Path, v: bytes) -> int:
    """The layout version in ``meta[b"format"]``; StoreFormatError unless it
    is one this code reads."""
    if len(v) != _U32.size:
        raise StoreFormatError(
            f"{path}: the block store's format record is {len(v)} bytes where it has "
            f"{_U32.size} (damaged); refusing to guess the layout")
    (fmt,) = _U32.unpack(v)
    if fmt != FORMAT:
        raise StoreFormatError(f"{path}: block store format {fmt} is not supported "
                               f"(this code reads format {FORMAT})")
    return fmt


def _quarantine_payload(entry_len: int) -> int:
    """The bad bytes a quarantine entry of ``entry_len`` bytes holds (what
    ``qbytes`` counts). A damaged entry shorter than its time holds none."""
    return max(0, entry_len - _TIME.size)


def _sums_check(values: Iterable[int]) -> bytes:
    """The check stored beside the counters. Any damage to a counter or to
    the check itself makes them disagree (but for a 2**-64 chance)."""
    packed = b"".join(_U64.pack(v) for v in values)
    return hashlib.sha256(b"p2pfs block store counters\0" + packed).digest()[:8]


class _Sums:
    """The counters as one write transaction reads and updates them.
    ``recount`` is set when an entry whose charge is unknown entered or
    left the store (its stamp was damaged). The counters are then
    recomputed from the entries before they are written."""

    __slots__ = ("bytes", "qbytes", "used", "corruptions", "recount")

    def __init__(self, bytes_: int = 0, qbytes: int = 0, used: int = 0, corruptions: int = 0):
        self.bytes, self.qbytes, self.used, self.corruptions = bytes_, qbytes, used, corruptions
        self.recount = False

    def values(self) -> tuple[int, int, int, int]:
        return self.bytes, self.qbytes, self.used, self.corruptions


class _SumsDamaged(Exception):
    """The stored counters cannot be trusted. Internal: ``_write`` and
    ``stats`` answer it by recounting, so it never reaches a caller.
    ``legacy``: the counters have no check at all (a store written by older
    code). That is no damage, but a recount is still needed."""

    def __init__(self, err: StoreEntryDamaged, legacy: bool = False):
        super().__init__(str(err))
        self.err = err
        self.legacy = legacy


_OK, _MEND, _CORRUPT, _ORPHAN = "ok", "mend", "corrupt", "orphan"


@dataclass(frozen=True, slots=True)
class _Vetted:
    """What ``BlockStore._vet_stamp`` makes of a stamp. The verdict is one of:

    * _OK: trust ``when`` and ``length``;
    * _MEND: the held bytes verify, but the stamp is damaged or missing, so
      it must be written anew with ``length``;
    * _CORRUPT: the held bytes (``bad``) fail their BGUID;
    * _ORPHAN: the block is gone, and only the stamp is left."""

    verdict: str
    when: float | None = None
    length: int | None = None
    bad: bytes = b""


def _join(block_keys: Iterator[bytes], stamps: Iterator[tuple[bytes, bytes]]):
    """Outer join of the ``blocks`` keys and the ``stamps`` entries, both in
    key order: yields (bguid, held, stamp or None)."""
    b, st = next(block_keys, None), next(stamps, None)
    while b is not None or st is not None:
        if st is None or (b is not None and b < st[0]):
            yield b, True, None
            b = next(block_keys, None)
        elif b is None or st[0] < b:
            yield st[0], False, st[1]
            st = next(stamps, None)
        else:
            yield b, True, st[1]
            b, st = next(block_keys, None), next(stamps, None)


class _Gate:
    """Read transactions, and now and then one *quiet section* during which
    no read transaction of this store is open.

    Why: py-lmdb's ``Transaction.abort()`` of a write transaction and
    ``Environment.set_mapsize()`` both wait until no LMDB call of the
    process is in flight (an environment-wide count of calls made with the
    GIL released). Readers looping on other threads keep that count above
    zero nearly all the time, so an abort (of a refused or map-full put) or a
    map resize could wait for minutes. Both therefore run in a quiet section.

    Fairness, both ways: a pending quiet section closes the gate, so read
    transactions that arrive meanwhile queue instead of overtaking it, and it
    waits only for those already open (each a few lookups; the store runs no
    caller code inside one). When it ends it admits every reader that queued
    behind it at once, counted as open, so the next quiet section waits for
    them in turn: a reader waits for at most one quiet section and a quiet
    section for at most the transactions open when it began. Both waits are
    thus bounded by the length of one short transaction or section, whatever
    the load (no timeout needed; none would be safe for an abort, which must
    happen)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._active = 0      # read transactions open (or admitted to open)
        self._closed = False  # a quiet section is pending or running
        self._queued = 0      # readers waiting for the current one to end
        self._generation = 0  # quiet sections ended so far

    @contextmanager
    def shared(self):
        with self._cond:
            if self._closed:
                self._queued += 1
                gen = self._generation
                try:
                    while self._generation == gen:
                        self._cond.wait()
                except BaseException:   # interrupted while queued
                    if self._generation == gen:
                        self._queued -= 1
                    else:
                        self._release()
                    raise
                # Admitted (and counted in _active) by the section that ended.
            else:
                self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._release()

    def _release(self) -> None:
        """One read transaction is over (caller holds _cond)."""
        self._active -= 1
        if not self._active and self._closed:
            self._cond.notify_all()

    @contextmanager
    def exclusive(self):
        with self._cond:
            while self._closed:  # callers hold the write lock: never in practice
                self._cond.wait()
            self._closed = True
            while self._active:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                # Admit the queue, counted as open, before anyone else runs.
                self._closed = False
                self._active += self._queued
                self._queued = 0
                self._generation += 1
                self._cond.notify_all()


class BlockStore:
    """Blocks of one node, in LMDB at ``path`` (a directory, created if
    missing). See the module docstring for layout and invariants.

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
    pages it never uses; a single-node volume read file by file wants it).
    """

    def __init__(self, path: str | os.PathLike, *, quota: int = DEFAULT_QUOTA,
                 max_block: int = MAX_SEALED, min_disk_free: int = DEFAULT_MIN_DISK_FREE,
                 sync: bool = True, map_size: int | None = None,
                 clock: Callable[[], float] = time.time, readahead: bool = False):
        if quota <= 0:
            raise ValueError("quota must be positive")
        self.path = Path(path)
        self.quota = quota
        self.max_block = max_block
        self.min_disk_free = min_disk_free
        self._clock = clock
        self._wlock = threading.Lock()
        self._gate = _Gate()
        # A stamp recording more than this is damaged unless its block says
        # otherwise (``_vet_stamp``): no block this store took can be larger.
        self._max_len = max(max_block, MAX_SEALED)
        self._damaged: set[tuple[str, bytes]] = set()  # (db, key) met damaged since open
        self._dlock = threading.Lock()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create block store directory {self.path}: {e}") from None
        # LMDB maps the file's address space, not memory, and the file grows
        # only as pages are written, so a generous map costs nothing.
        self._map_size = _round_up(map_size or 2 * quota + MAP_HEADROOM, 1 << 20)
        self._max_map = 4 * self._map_size
        try:
            self._env = lmdb.open(str(self.path), map_size=self._map_size, max_dbs=8,
                                  sync=sync, metasync=sync, readahead=readahead, lock=True)
        except (lmdb.InvalidError, lmdb.VersionMismatchError, lmdb.CorruptedError) as e:
            raise StoreFormatError(f"{self.path} is not a block store LMDB: {e}") from None
        except lmdb.Error as e:
            raise StorageError(f"cannot open block store {self.path}: {e}") from None
        try:
            self._open_dbs()
        except BaseException:
            self._env.close()
            raise
        self._map_size = self._env.info()["map_size"]  # a grown map stays grown
        self._max_map = max(self._max_map, self._map_size)
        psize = self._env.stat()["psize"]
        self._footprint = functools.partial(footprint, psize=psize)

    def _open_dbs(self) -> None:
        # One write transaction. Any refusal aborts it, so a store that is
        # refused is left exactly as it was found.
        env = self._env
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
                self._put_sums(txn, _Sums())

    # ------------------------------------------------------------------
    # Lifecycle

    def close(self) -> None:
        """Close the environment; waits for calls in flight. Idempotent."""
        with self._wlock, self._gate.exclusive():
            if self._env is not None:
                self._env.close()
                self._env = None

    def __enter__(self) -> "BlockStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._env is None

    # ------------------------------------------------------------------
    # Reads

    def get(self, bguid: bytes) -> bytes:
        """The block's bytes, verified against ``bguid``. Raises
        BlockNotFound, or BlockCorrupt after moving a bad copy to quarantine."""
        _check_bguid(bguid)
        with self._read() as txn:
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
        with self._read() as txn:
            found = {g: d for g in want if (d := txn.get(g, db=self._blocks)) is not None}
        for g, d in list(found.items()):
            if hashlib.sha256(d).digest() != g:
                self._quarantine(g, d)
                del found[g]
        return found

    def has(self, bguid: bytes) -> bool:
        """Whether a block is held (not verified; ``get`` verifies)."""
        return self.has_many([bguid])[0]

    def has_many(self, bguids: Iterable[bytes]) -> list[bool]:
        bguids = list(bguids)
        for g in bguids:
            _check_bguid(g)
        with self._read() as txn:
            return [txn.get(g, db=self._stamps) is not None for g in bguids]

    def states(self, bguids: Iterable[bytes]) -> list[tuple[int, float | None, int]]:
        """For each BGUID, in one read transaction: (HELD, stored_at, 0),
        (TOMBSTONED, deleted_at, epoch) or (ABSENT, None, 0). Replica repair
        compares these across holders (``storage.maintenance``). A damaged
        stamp reads as put just now, and a damaged tombstone as the oldest
        possible (module docstring), so neither makes anyone drop a copy."""
        bguids = list(bguids)
        for g in bguids:
            _check_bguid(g)
        out: list[tuple[int, float | None, int]] = []
        with self._read() as txn:
            for g in bguids:
                v = txn.get(g, db=self._stamps)
                if v is not None:
                    out.append((HELD, self._lenient_stamp(g, v), 0))
                    continue
                v = txn.get(g, db=self._tombs)
                if v is None:
                    out.append((ABSENT, None, 0))
                else:
                    t = self._lenient_tombstone(g, v)
                    out.append((TOMBSTONED, t.deleted_at, t.epoch))
        return out

    def stored_at(self, bguid: bytes) -> float | None:
        """When the block was last put (or revived), or None if not held.
        StoreEntryDamaged if its stamp is damaged (its bytes can still be
        read)."""
        _check_bguid(bguid)
        with self._read() as txn:
            v = txn.get(bguid, db=self._stamps)
        return None if v is None else self._strict(decode_stamp, bguid, v)[0]

    def list_bguids(self, after: bytes | None = None, limit: int = 1000) -> list[bytes]:
        """Up to ``limit`` BGUIDs held, in byte order, strictly after
        ``after``; page through all of them by passing the last one back."""
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
        with self._read() as txn:
            v = txn.get(bguid, db=self._tombs)
        return None if v is None else self._strict(decode_tombstone, bguid, v)

    def tombstones(self, after: bytes | None = None, limit: int = 1000) -> list[tuple[bytes, Tombstone]]:
        """A page of tombstones in BGUID order, strictly after ``after``
        (a damaged one as epoch 0 at time 0)."""
        with self._read() as txn:
            return [(k, self._lenient_tombstone(k, v))
                    for k, v in self._page(txn, self._tombs, after, limit)]

    def quarantined(self, after: bytes | None = None, limit: int = 100) -> list[tuple[bytes, float, bytes]]:
        """A page of quarantined copies: (BGUID, found_at, the bad bytes).
        An entry with an unreadable found_at is listed at 0.0 with every
        byte past where the time would be."""
        with self._read() as txn:
            page = self._page(txn, self._quar, after, limit)
        out = []
        for k, v in page:
            try:
                when, bad = decode_quarantine(k, v)
            except StoreEntryDamaged as e:
                self._note(e)
                when, bad = 0.0, bytes(v[_TIME.size:]) if len(v) >= _TIME.size else bytes(v)
            out.append((k, when, bad))
        return out

    def stats(self) -> StoreStats:
        """Counts and sums. Counters found damaged are recounted first (a
        write transaction)."""
        for attempt in range(2):
            try:
                with self._read() as txn:
                    c = self._load_sums(txn)
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
            tombstones=n_tombs, map_size=self._map_size, damaged=len(self._damaged))

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
        if not batch:
            return 0
        self._check_disk(sum(len(d) for d in batch.values()))
        now = self._clock()

        def apply(txn) -> int:
            c = self._load_sums(txn)
            new = 0
            for g, d in batch.items():
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
                    # The new stamp replaces a damaged one too. The bytes
                    # were charged at their put, but a missing or damaged
                    # stamp leaves that unsure: recount.
                    if not self._stamp_fits(g, old_stamp, len(d)):
                        c.recount = True
                    txn.put(g, stamp, db=self._stamps)
                    continue
                if old_stamp is None:
                    new += 1
                    c.used += self._footprint(len(d)) + self._footprint(_STAMP.size)
                    if held is not None:  # a block without its stamp, overwritten
                        c.recount = True
                else:
                    log.warning("block %s: held copy is corrupt, replaced by a verified one",
                                g.hex()[:16])
                    self._move_to_quarantine(txn, c, g, held or b"",
                                             self._charged(g, old_stamp), now)
                    c.used += self._footprint(len(d))  # its stamp is charged already
                txn.put(g, d, db=self._blocks)
                txn.put(g, stamp, db=self._stamps)
                c.bytes += len(d)
            c = self._store_sums(txn, c)
            if c.used > self.quota:
                st = c.used - self.quota
                raise StoreFull(f"block store quota of {self.quota} bytes would be exceeded "
                                f"by {st} bytes; nothing of this batch was stored")
            return new

        return self._write(apply)

    def delete(self, bguid: bytes, *, epoch: int = 0, tombstone: bool = True,
               unless_stored_after: float | None = None) -> bool:
        """Delete one block; True if it was held. See delete_many."""
        return bool(self.delete_many([bguid], epoch=epoch, tombstone=tombstone,
                                     unless_stored_after=unless_stored_after))

    def delete_many(self, bguids: Iterable[bytes], *, epoch: int = 0, tombstone: bool = True,
                    unless_stored_after: float | None = None) -> list[bytes]:
        """Delete blocks in one transaction; returns those that were held
        and removed. With ``tombstone`` (the default) a tombstone of
        ``epoch`` is recorded for each, held or not, so stale copies are not
        stored again. With ``unless_stored_after``, a block put at or after
        that time is kept (a GC sweep spares blocks written since its mark
        began). Deletes are never refused for quota.

        A held block whose stamp is damaged (or missing) is never deleted,
        by any call: its stamp is rewritten from its verified bytes as put
        now, and the block is spared with no tombstone (I3). If its bytes
        fail verification they are quarantined, and it counts as not held."""
        bguids = list(dict.fromkeys(bguids))
        for g in bguids:
            _check_bguid(g)
        now = self._clock()
        tomb = _TOMB.pack(epoch, now)

        def apply(txn) -> list[bytes]:
            c = self._load_sums(txn)
            removed = []
            for g in bguids:
                st = txn.get(g, db=self._stamps)
                # A block without its stamp (I2 broken) is vetted like a
                # damaged stamp; it must not end up beside a tombstone (I3).
                if st is not None or txn.get(g, db=self._blocks) is not None:
                    v = self._vet_stamp(txn, g, st)
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

        return self._write(apply)

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
            c = self._load_sums(txn)
            doomed = []
            for g, v in txn.cursor(db=self._tombs):
                t = self._lenient_tombstone(g, v)
                if ((before_epoch is not None and t.epoch < before_epoch)
                        or (older_than is not None and t.deleted_at < older_than)):
                    doomed.append(g)
            for g in doomed:
                txn.delete(g, db=self._tombs)
            c.used -= len(doomed) * self._footprint(_TOMB.size)
            self._store_sums(txn, c)
            return len(doomed)

        return self._write(apply)

    def purge_quarantine(self) -> int:
        """Drop every quarantined copy (after fsck or an operator looked);
        returns how many."""

        def apply(txn) -> int:
            c = self._load_sums(txn)
            n = 0
            for g, v in txn.cursor(db=self._quar):
                c.qbytes -= _quarantine_payload(len(v))
                c.used -= self._footprint(len(v))
                c.recount |= self._damaged_quarantine(g, v)
                n += 1
            txn.drop(self._quar, delete=False)
            self._store_sums(txn, c)
            return n

        return self._write(apply)

    def repair(self, *, verify: bool = False) -> RepairReport:
        """Recount every counter from the entries, and mend what the scan
        finds on the way, in one write transaction (module docstring,
        "Damaged entries"). A stamp that is damaged or missing is rewritten
        from its verified block, as put now. A stamp without its block is
        dropped. A block that fails verification is quarantined. With
        ``verify``, every block is read and checked against its BGUID and its
        stamp's length. That reads the whole store while holding the write
        lock, so it is for maintenance windows. The store recounts by itself
        when it finds its counters damaged; this is for operators and fsck."""

        def apply(txn) -> RepairReport:
            c, report = self._recount(txn, verify=verify)
            self._put_sums(txn, c)
            return report

        report = self._write(apply)
        if report != RepairReport(0, 0, 0, 0, 0, False):
            log.warning("block store %s repaired: %s", self.path, report)
        return report

    # ------------------------------------------------------------------
    # Internals: damaged entries and the counters

    def _note(self, err: StoreEntryDamaged) -> None:
        """Log a damaged entry the first time this open meets it, and count
        it (``stats().damaged``)."""
        with self._dlock:
            if (err.db, err.key) in self._damaged:
                return
            self._damaged.add((err.db, err.key))
        log.warning("%s (in %s)", err, self.path)

    def _strict(self, decode, key: bytes, v: bytes):
        """``decode(key, v)``, noting the damage before it is raised."""
        try:
            return decode(key, v)
        except StoreEntryDamaged as e:
            self._note(e)
            raise

    def _lenient_stamp(self, g: bytes, v: bytes) -> float:
        """A held block's stored_at; a damaged one reads as now, the reading
        that spares the block everywhere."""
        try:
            return decode_stamp(g, v)[0]
        except StoreEntryDamaged as e:
            self._note(e)
            return self._clock()

    def _lenient_tombstone(self, g: bytes, v: bytes) -> Tombstone:
        try:
            return decode_tombstone(g, v)
        except StoreEntryDamaged as e:
            self._note(e)
            return Tombstone(0, 0.0)

    def _damaged_quarantine(self, g: bytes, v: bytes) -> bool:
        """Whether a quarantine entry is damaged. Damage may have changed its
        length, and its length is what it was charged for, so the caller
        recounts."""
        try:
            decode_quarantine(g, v)
        except StoreEntryDamaged as e:
            self._note(e)
            return True
        return False

    def _stamp_fits(self, g: bytes, stamp: bytes | None, length: int) -> bool:
        """Whether ``stamp`` reads and records ``length``, the length of the
        verified bytes held under ``g``."""
        try:
            if stamp is None:
                raise _damaged("stamps", g, "missing for a block held")
            n = decode_stamp(g, stamp)[1]
            if n != length:
                raise _damaged("stamps", g, f"records length {n}, the verified block has {length}")
        except StoreEntryDamaged as e:
            self._note(e)
            return False
        return True

    def _charged(self, g: bytes, stamp: bytes) -> int | None:
        """The length a held block was charged for, from its stamp; None
        when the stamp cannot say (then the caller recounts)."""
        try:
            n = decode_stamp(g, stamp)[1]
        except StoreEntryDamaged as e:
            self._note(e)
            return None
        return n if n <= self._max_len else None

    def _vet_stamp(self, txn, g: bytes, stamp: bytes | None, *, verify: bool = False) -> _Vetted:
        """Within ``txn``, decide what to make of the stamp of ``g`` (None:
        ``g`` is in ``blocks`` without one). A stamp that decodes to a
        plausible length is trusted without reading the block, unless
        ``verify``. Otherwise the block decides (see _Vetted)."""
        problem: StoreEntryDamaged | None = None
        when = n = None
        if stamp is None:
            problem = _damaged("stamps", g, "missing for a block held")
        else:
            try:
                when, n = decode_stamp(g, stamp)
            except StoreEntryDamaged as e:
                problem = e
            else:
                if not verify and n <= self._max_len:
                    return _Vetted(_OK, when, n)
        data = txn.get(g, db=self._blocks)
        if data is None:
            if problem is not None:
                self._note(problem)
            return _Vetted(_ORPHAN)
        if hashlib.sha256(data).digest() != g:
            log.error("block %s failed verification in %s; moved to quarantine",
                      g.hex()[:16], self.path)
            return _Vetted(_CORRUPT, bad=data)
        if problem is None and n == len(data):
            return _Vetted(_OK, when, n)
        self._note(problem or _damaged(
            "stamps", g, f"records length {n}, the verified block has {len(data)}"))
        return _Vetted(_MEND, length=len(data))

    def _load_sums(self, txn) -> _Sums:
        """The counters, checked against ``meta[b"sums"]``; _SumsDamaged if
        they cannot be trusted."""
        try:
            values = [decode_counter(n, txn.get(n.encode(), db=self._meta)) for n in _COUNTERS]
        except StoreEntryDamaged as e:
            raise _SumsDamaged(e) from None
        check = txn.get(_SUMS_KEY, db=self._meta)
        if check is None:
            raise _SumsDamaged(_damaged("meta", _SUMS_KEY, "the counters have no check"),
                               legacy=True)
        if check != _sums_check(values):
            raise _SumsDamaged(_damaged("meta", _SUMS_KEY,
                                        "the counters do not match their check"))
        return _Sums(*values)

    def _put_sums(self, txn, c: _Sums) -> None:
        for name, v in zip(_COUNTERS, c.values()):
            txn.put(name.encode(), _U64.pack(v), db=self._meta)
        txn.put(_SUMS_KEY, _sums_check(c.values()), db=self._meta)

    def _store_sums(self, txn, c: _Sums) -> _Sums:
        """Write the counters at the end of a write transaction; returns
        them. They are recounted first if an entry of unknown charge came or
        went, or if an update took one below zero. That happens when a
        subtracted length was damaged although it looked plausible."""
        if c.recount or min(c.values()) < 0:
            if not c.recount:
                log.warning("block store %s: a counter would go negative (%s); recounting",
                            self.path, dict(zip(_COUNTERS, c.values())))
            c, _ = self._recount(txn)
        self._put_sums(txn, c)
        return c

    def _recount_now(self, e: _SumsDamaged) -> None:
        """Answer damaged counters: recount them in a transaction of their own."""
        if e.legacy:
            log.info("block store %s: %s (written by older code?); recounting",
                     self.path, e.err)
        else:
            self._note(e.err)

        def apply(txn) -> None:
            c, _ = self._recount(txn)
            self._put_sums(txn, c)

        self._write(apply)

    def _recount(self, txn, *, verify: bool = False) -> tuple[_Sums, RepairReport]:
        """Within ``txn``: the counters as the entries say, after mending
        stamps and quarantining blocks as ``repair`` describes. Reads only
        keys and stamps, except for blocks whose stamp is in doubt (all of
        them with ``verify``)."""
        now = self._clock()
        fp = self._footprint
        c = _Sums()
        mend: dict[bytes, int] = {}
        orphans: list[bytes] = []
        corrupt: dict[bytes, bytes] = {}
        keys = txn.cursor(db=self._blocks).iternext(keys=True, values=False)
        for g, held, stamp in _join(keys, txn.cursor(db=self._stamps).iternext()):
            if not held:
                orphans.append(g)
                self._note(_damaged("stamps", g, "no block held under it"))
                continue
            v = self._vet_stamp(txn, g, stamp, verify=verify)
            if v.verdict == _CORRUPT:
                corrupt[g] = v.bad
                continue
            if v.verdict == _MEND:
                mend[g] = v.length
            c.bytes += v.length
            c.used += fp(v.length) + fp(_STAMP.size)
        # Change the databases only now: the cursors above are done.
        for g, n in mend.items():
            txn.put(g, _STAMP.pack(now, n), db=self._stamps)
        for g in orphans:
            txn.delete(g, db=self._stamps)
        for g, bad in corrupt.items():
            self._move_to_quarantine(txn, _Sums(), g, bad, None, now)
            txn.delete(g, db=self._stamps)
        damaged_q = 0
        for g, v in txn.cursor(db=self._quar):
            c.qbytes += _quarantine_payload(len(v))
            c.used += fp(len(v))
            damaged_q += self._damaged_quarantine(g, v)
        damaged_t = 0
        for g, v in txn.cursor(db=self._tombs):
            c.used += fp(_TOMB.size)  # what deletes and purges add and take back
            try:
                decode_tombstone(g, v)
            except StoreEntryDamaged as e:
                self._note(e)
                damaged_t += 1
        # ``corruptions`` is a history: keep it if it reads as a plausible
        # count (damage rarely leaves one, and a huge one could overflow),
        # never below the copies quarantined (each was a corruption found).
        stored = []
        for name in _COUNTERS:
            try:
                stored.append(decode_counter(name, txn.get(name.encode(), db=self._meta)))
            except StoreEntryDamaged:
                stored.append(None)
        history = stored[3] if stored[3] is not None and stored[3] < _MAX_CORRUPTIONS else 0
        c.corruptions = max(history + len(corrupt), txn.stat(self._quar)["entries"])
        check = txn.get(_SUMS_KEY, db=self._meta)
        fixed = (None in stored or tuple(stored) != c.values()
                 or check != _sums_check(c.values()))
        report = RepairReport(stamps_rewritten=len(mend), stamps_dropped=len(orphans),
                              quarantined=len(corrupt), damaged_tombstones=damaged_t,
                              damaged_quarantine=damaged_q, counters_fixed=fixed)
        if fixed:
            log.warning("block store %s: counters recounted: %s (were %s)", self.path,
                        dict(zip(_COUNTERS, c.values())), dict(zip(_COUNTERS, stored)))
        return c, report

    def _quarantine(self, bguid: bytes, bad: bytes) -> None:
        log.error("block %s failed verification in %s; moved to quarantine",
                  bguid.hex()[:16], self.path)

        def apply(txn) -> None:
            # Move only the copy we saw: another thread may have quarantined
            # it already, or replaced it by a verified copy, meanwhile.
            if txn.get(bguid, db=self._blocks) != bad:
                return
            c = self._load_sums(txn)
            stamp = txn.get(bguid, db=self._stamps)
            charged = None if stamp is None else self._charged(bguid, stamp)
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
            c.recount |= self._damaged_quarantine(g, old)
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

    @contextmanager
    def _read(self):
        with self._gate.shared():
            env = self._live()
            with env.begin(buffers=False) as txn:
                yield txn

    def _write(self, apply):
        """Run ``apply(txn)`` in one write transaction and commit it (see
        ``_write_txn``). If ``apply`` finds the counters damaged, they are
        recounted and committed in a transaction of their own first, so
        the recount stays even if ``apply`` is refused. Then ``apply`` runs
        again, once."""
        try:
            return self._write_txn(apply)
        except _SumsDamaged as e:
            self._recount_now(e)
        try:
            return self._write_txn(apply)
        except _SumsDamaged as e:  # damaged again at once: not for us to loop on
            raise e.err from None

    def _write_txn(self, apply):
        """Run ``apply(txn)`` in one write transaction and commit it. On
        MapFullError the map is grown and the whole transaction retried once;
        if it cannot grow, StoreFull. A disk error is StoreFull as well.

        Writers are serialised by ``_wlock`` and do not take the gate (a map
        resize and ``close`` hold ``_wlock`` too). Aborting a write
        transaction, though, drains every LMDB call of the process (see
        ``_Gate``), so a refused batch is aborted in a quiet section."""
        with self._wlock:
            for attempt in range(2):
                env = self._live()
                try:
                    txn = env.begin(write=True)
                except lmdb.DiskError as e:
                    raise StoreFull(f"disk error writing {self.path}: {e}") from None
                try:
                    result = apply(txn)
                except lmdb.MapFullError:
                    grown = self._quietly(abort=txn, grow=not attempt)
                except lmdb.DiskError as e:
                    self._quietly(abort=txn)
                    raise StoreFull(f"disk error writing {self.path}: {e}") from None
                except BaseException:
                    self._quietly(abort=txn)
                    raise
                else:
                    try:
                        txn.commit()  # on failure LMDB has freed the txn: nothing to abort
                        return result
                    except lmdb.MapFullError:
                        grown = not attempt and self._quietly(grow=True)
                    except lmdb.DiskError as e:
                        raise StoreFull(f"disk error writing {self.path}: {e}") from None
                if not grown:
                    raise StoreFull(f"LMDB map of {self.path} is full at "
                                    f"{self._map_size} bytes and cannot grow")
        raise AssertionError("unreachable")

    def _quietly(self, *, abort=None, grow: bool = False) -> bool:
        """In one quiet section: abort the write transaction ``abort`` if
        given, then grow the map if ``grow``. Returns whether it grew."""
        with self._gate.exclusive():
            if abort is not None:
                abort.abort()
            return grow and self._grow()

    def _grow(self) -> bool:
        """Double the map (up to 4x its initial size). Caller holds _wlock
        and is in a quiet section (set_mapsize invalidates every open
        transaction of the process and, like an abort, drains its calls)."""
        new = min(self._map_size * 2, self._max_map)
        if new <= self._map_size:
            return False
        self._live().set_mapsize(new)
        self._map_size = self._env.info()["map_size"]
        log.info("block store %s: LMDB map grown to %d bytes", self.path, self._map_size)
        return True

    def _live(self):
        env = self._env
        if env is None:
            raise StoreClosed(f"block store {self.path} is closed")
        return env

    def _list(self, db, after: bytes | None, limit: int) -> list[bytes]:
        with self._read() as txn:
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


def footprint(value_len: int, *, psize: int = 4096) -> int:
    """Bytes an entry with a 32-byte key and a value of ``value_len`` bytes
    is charged: its overflow pages when the value is too large for a leaf
    node (LMDB's ``me_nodemax``), else its leaf node and slot."""
    nodemax = (((psize - _PAGE_HDR) // 2) & ~1) - _SLOT
    if _NODE + BGUID_BYTES + value_len >= nodemax:
        pages = (_PAGE_HDR - 1 + value_len) // psize + 1
        return pages * psize + _ENTRY_SMALL + 8  # the node keeps an 8-byte page number
    return _ENTRY_SMALL + value_len + (value_len & 1)


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
    past every timeout while the thread works."""

    def __init__(self, store: BlockStore, limiter: trio.CapacityLimiter | None = None, *,
                 inline: bool = False):
        self.store = store
        self.inline = inline
        self._limiter = limiter or trio.CapacityLimiter(4)

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
        return await self._run(self.store.put_many, list(items), revive=revive)

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
