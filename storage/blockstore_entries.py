"""The block store's entries on disk: the LMDB layout and its invariants,
what each entry is charged against the quota, a checked decoder for every
kind of entry, and the counters with their check (DESIGN.md
"storage/blocks"; the schema written once, STYLE.md section 5).

The store that keeps these invariants is ``storage.blockstore``. What it
does with an entry that a decoder here calls damaged, and how it recounts,
is ``storage.blockstore_repair``.

On-disk layout: one LMDB environment (a directory holding ``data.mdb`` and
``lock.mdb``, and on a holder the staging log ``stage.log`` of
``storage.blockstore_stage``) with these named databases. All keys are raw 32-byte BGUIDs
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
                b"stage_gen"   -> >Q  the last staging generation committed
                                  (``storage.blockstore_stage``; absent: 0)

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

Checked decoders (issue 4). Disk damage can reach any entry, not only block
values. Each kind of entry is read by its own checked decoder
(``decode_stamp``, ``decode_tombstone``, ``decode_quarantine``,
``decode_counter``, ``decode_format``). The decoder raises
StoreEntryDamaged (StoreFormatError for the format record) naming the
database, the key and what is wrong. No struct error and no assert escapes.
The counters are read together by ``load_sums``, which trusts them only if
they match ``sums`` (_SumsDamaged otherwise), and written together with
their check by ``put_sums``.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .errors import StoreEntryDamaged, StoreFormatError

FORMAT = 1
BGUID_BYTES = 32

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_TIME = struct.Struct(">d")
_STAMP = struct.Struct(">dI")
_TOMB = struct.Struct(">Qd")
STAMP_BYTES = _STAMP.size
TOMBSTONE_BYTES = _TOMB.size

# LMDB page geometry (mdb.c): a leaf node is an 8-byte header, the key and
# the value, plus a 2-byte slot in its page; a value too large for a node
# moves to its own overflow pages, each run with a 16-byte page header.
_NODE = 8
_SLOT = 2
_PAGE_HDR = 16
_ENTRY_SMALL = _NODE + BGUID_BYTES + _SLOT  # an entry without its value


def footprint(value_len: int, *, psize: int = 4096) -> int:
    """Bytes an entry with a 32-byte key and a value of ``value_len`` bytes
    is charged: its overflow pages when the value is too large for a leaf
    node (LMDB's ``me_nodemax``), else its leaf node and slot."""
    nodemax = (((psize - _PAGE_HDR) // 2) & ~1) - _SLOT
    if _NODE + BGUID_BYTES + value_len >= nodemax:
        pages = (_PAGE_HDR - 1 + value_len) // psize + 1
        return pages * psize + _ENTRY_SMALL + 8  # the node keeps an 8-byte page number
    return _ENTRY_SMALL + value_len + (value_len & 1)


@dataclass(frozen=True, slots=True)
class Tombstone:
    """A record that a block was deleted: by which GC epoch, and when."""

    epoch: int
    deleted_at: float


# --------------------------------------------------------------------------
# Checked decoders, one per kind of entry ("Checked decoders" above). Each
# takes the raw value as LMDB returned it and either returns what it means or
# raises StoreEntryDamaged naming the database, the key and the fault.

_SUMS_KEY = b"sums"
_COUNTERS = ("bytes", "qbytes", "used", "corruptions")


def _damaged(db: str, key: bytes, what: str) -> StoreEntryDamaged:
    name = key.decode("ascii", "replace") if db == "meta" else key.hex()[:16]
    return StoreEntryDamaged(f"block store entry {db}[{name}] is damaged: {what}", db, key)


def _time_ok(t: float) -> bool:
    return math.isfinite(t)  # NaN would compare false with every mark and cutoff


def decode_stamp(bguid: bytes, v: bytes) -> tuple[float, int]:
    """(stored_at, length) from the stamp ``v`` of block ``bguid``. Whether the
    length fits the block is for the store to check
    (``storage.blockstore_repair.vet_stamp``)."""
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
    """The stored counters cannot be trusted. Internal: the store's
    ``_write`` and ``stats`` answer it by recounting, so it never reaches a
    caller.
    ``legacy``: the counters have no check at all (a store written by older
    code). That is no damage, but a recount is still needed."""

    def __init__(self, err: StoreEntryDamaged, legacy: bool = False):
        super().__init__(str(err))
        self.err = err
        self.legacy = legacy


def load_sums(txn, meta) -> _Sums:
    """The counters in the ``meta`` database ``meta``, checked against
    ``meta[b"sums"]``; _SumsDamaged if they cannot be trusted."""
    try:
        values = [decode_counter(n, txn.get(n.encode(), db=meta)) for n in _COUNTERS]
    except StoreEntryDamaged as e:
        raise _SumsDamaged(e) from None
    check = txn.get(_SUMS_KEY, db=meta)
    if check is None:
        raise _SumsDamaged(_damaged("meta", _SUMS_KEY, "the counters have no check"),
                           legacy=True)
    if check != _sums_check(values):
        raise _SumsDamaged(_damaged("meta", _SUMS_KEY,
                                    "the counters do not match their check"))
    return _Sums(*values)


def put_sums(txn, meta, c: _Sums) -> None:
    """Write the counters and their check into ``meta``, within ``txn``."""
    for name, v in zip(_COUNTERS, c.values()):
        txn.put(name.encode(), _U64.pack(v), db=meta)
    txn.put(_SUMS_KEY, _sums_check(c.values()), db=meta)
