"""What the block store does with entries it finds damaged, and the recount
that mends them (``BlockStore.repair``; issue 4). The entries and their
checked decoders are ``storage.blockstore_entries``.

LMDB keeps no checksums, so disk damage can reach any entry, not only
block values, and each decoder raises StoreEntryDamaged naming the entry.
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

The recount (``recount``) computes the counters from the entries in one
write transaction, mending on the way what the list above says: stamps
rewritten or dropped, blocks that fail verification quarantined. The store
runs it when ``load_sums`` refuses its counters and when an update leaves
them unsure; ``repair`` runs it on demand, ``verify=True`` reading every
block. ``recount`` and ``vet_stamp`` take the store as their first
argument and work on its databases, within one of its write transactions.
``DamagedEntries`` (one per open store) reads entries the lenient or the
strict way and logs and counts each damaged one it meets.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from .blockstore_entries import (
    _COUNTERS,
    _STAMP,
    _SUMS_KEY,
    _TOMB,
    _damaged,
    _quarantine_payload,
    _sums_check,
    _Sums,
    Tombstone,
    decode_counter,
    decode_quarantine,
    decode_stamp,
    decode_tombstone,
)
from .errors import StoreEntryDamaged

if TYPE_CHECKING:
    from .blockstore import BlockStore

# The store's log, as before this module was split out of it.
log = logging.getLogger("storage.blockstore")

_MAX_CORRUPTIONS = 1 << 32  # a recount distrusts a stored history beyond this


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What ``BlockStore.repair`` found and did, in its one transaction."""

    stamps_rewritten: int     # damaged or missing stamps of verified blocks, written anew
    stamps_dropped: int       # stamps whose block was gone
    quarantined: int          # blocks whose bytes failed verification
    damaged_tombstones: int   # left in place (they still refuse stale puts)
    damaged_quarantine: int   # quarantine entries whose found_at is unreadable
    counters_fixed: bool      # the stored counters (or their check) were wrong


class DamagedEntries:
    """The damaged entries one open store has met, and the readings of its
    entries that note them. Each is logged the first time it is met and
    counted (``len``, the store's ``stats().damaged``). ``clock`` is the
    store's, ``path`` names it in the log. Thread-safe."""

    def __init__(self, path: Path, clock: Callable[[], float], max_len: int):
        self.path = path
        self._clock = clock
        # A stamp recording more than this is damaged unless its block says
        # otherwise (``vet_stamp``): no block this store took can be larger.
        self.max_len = max_len
        self._seen: set[tuple[str, bytes]] = set()  # (db, key) met damaged since open
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def note(self, err: StoreEntryDamaged) -> None:
        """Log a damaged entry the first time this open meets it, and count
        it (``stats().damaged``)."""
        with self._lock:
            if (err.db, err.key) in self._seen:
                return
            self._seen.add((err.db, err.key))
        log.warning("%s (in %s)", err, self.path)

    def strict(self, decode, key: bytes, v: bytes):
        """``decode(key, v)``, noting the damage before it is raised."""
        try:
            return decode(key, v)
        except StoreEntryDamaged as e:
            self.note(e)
            raise

    def lenient_stamp(self, g: bytes, v: bytes) -> float:
        """A held block's stored_at; a damaged one reads as now, the reading
        that spares the block everywhere."""
        try:
            return decode_stamp(g, v)[0]
        except StoreEntryDamaged as e:
            self.note(e)
            return self._clock()

    def lenient_tombstone(self, g: bytes, v: bytes) -> Tombstone:
        """A tombstone; a damaged one reads as the oldest possible, so it
        never makes anyone drop a copy and the next purge drops it."""
        try:
            return decode_tombstone(g, v)
        except StoreEntryDamaged as e:
            self.note(e)
            return Tombstone(0, 0.0)

    def damaged_quarantine(self, g: bytes, v: bytes) -> bool:
        """Whether a quarantine entry is damaged. Damage may have changed its
        length, and its length is what it was charged for, so the caller
        recounts."""
        try:
            decode_quarantine(g, v)
        except StoreEntryDamaged as e:
            self.note(e)
            return True
        return False

    def stamp_fits(self, g: bytes, stamp: bytes | None, length: int) -> bool:
        """Whether ``stamp`` reads and records ``length``, the length of the
        verified bytes held under ``g``."""
        try:
            if stamp is None:
                raise _damaged("stamps", g, "missing for a block held")
            n = decode_stamp(g, stamp)[1]
            if n != length:
                raise _damaged("stamps", g, f"records length {n}, the verified block has {length}")
        except StoreEntryDamaged as e:
            self.note(e)
            return False
        return True

    def charged(self, g: bytes, stamp: bytes) -> int | None:
        """The length a held block was charged for, from its stamp; None
        when the stamp cannot say (then the caller recounts)."""
        try:
            n = decode_stamp(g, stamp)[1]
        except StoreEntryDamaged as e:
            self.note(e)
            return None
        return n if n <= self.max_len else None


_OK, _MEND, _CORRUPT, _ORPHAN = "ok", "mend", "corrupt", "orphan"


@dataclass(frozen=True, slots=True)
class _Vetted:
    """What ``vet_stamp`` makes of a stamp. The verdict is one of:

    * _OK: trust ``when`` and ``length``;
    * _MEND: the held bytes verify, but the stamp is damaged or missing, so
      it must be written anew with ``length``;
    * _CORRUPT: the held bytes (``bad``) fail their BGUID;
    * _ORPHAN: the block is gone, and only the stamp is left."""

    verdict: str
    when: float | None = None
    length: int | None = None
    bad: bytes = b""


def vet_stamp(store: BlockStore, txn, g: bytes, stamp: bytes | None, *,
              verify: bool = False) -> _Vetted:
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
            if not verify and n <= store._damage.max_len:
                return _Vetted(_OK, when, n)
    data = txn.get(g, db=store._blocks)
    if data is None:
        if problem is not None:
            store._damage.note(problem)
        return _Vetted(_ORPHAN)
    if hashlib.sha256(data).digest() != g:
        log.error("block %s failed verification in %s; moved to quarantine",
                  g.hex()[:16], store.path)
        return _Vetted(_CORRUPT, bad=data)
    if problem is None and n == len(data):
        return _Vetted(_OK, when, n)
    store._damage.note(problem or _damaged(
        "stamps", g, f"records length {n}, the verified block has {len(data)}"))
    return _Vetted(_MEND, length=len(data))


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


def recount(store: BlockStore, txn, *, verify: bool = False) -> tuple[_Sums, RepairReport]:
    """Within ``txn``: the counters as the entries say, after mending
    stamps and quarantining blocks as ``repair`` describes. Reads only
    keys and stamps, except for blocks whose stamp is in doubt (all of
    them with ``verify``)."""
    now = store._clock()
    fp = store._footprint
    c = _Sums()
    mend: dict[bytes, int] = {}
    orphans: list[bytes] = []
    corrupt: dict[bytes, bytes] = {}
    keys = txn.cursor(db=store._blocks).iternext(keys=True, values=False)
    for g, held, stamp in _join(keys, txn.cursor(db=store._stamps).iternext()):
        if not held:
            orphans.append(g)
            store._damage.note(_damaged("stamps", g, "no block held under it"))
            continue
        v = vet_stamp(store, txn, g, stamp, verify=verify)
        if v.verdict == _CORRUPT:
            corrupt[g] = v.bad
            continue
        if v.verdict == _MEND:
            mend[g] = v.length
        c.bytes += v.length
        c.used += fp(v.length) + fp(_STAMP.size)
    # Change the databases only now: the cursors above are done.
    for g, n in mend.items():
        txn.put(g, _STAMP.pack(now, n), db=store._stamps)
    for g in orphans:
        txn.delete(g, db=store._stamps)
    for g, bad in corrupt.items():
        store._move_to_quarantine(txn, _Sums(), g, bad, None, now)
        txn.delete(g, db=store._stamps)
    damaged_q = 0
    for g, v in txn.cursor(db=store._quar):
        c.qbytes += _quarantine_payload(len(v))
        c.used += fp(len(v))
        damaged_q += store._damage.damaged_quarantine(g, v)
    damaged_t = 0
    for g, v in txn.cursor(db=store._tombs):
        c.used += fp(_TOMB.size)  # what deletes and purges add and take back
        try:
            decode_tombstone(g, v)
        except StoreEntryDamaged as e:
            store._damage.note(e)
            damaged_t += 1
    # ``corruptions`` is a history: keep it if it reads as a plausible
    # count (damage rarely leaves one, and a huge one could overflow),
    # never below the copies quarantined (each was a corruption found).
    stored = []
    for name in _COUNTERS:
        try:
            stored.append(decode_counter(name, txn.get(name.encode(), db=store._meta)))
        except StoreEntryDamaged:
            stored.append(None)
    history = stored[3] if stored[3] is not None and stored[3] < _MAX_CORRUPTIONS else 0
    c.corruptions = max(history + len(corrupt), txn.stat(store._quar)["entries"])
    check = txn.get(_SUMS_KEY, db=store._meta)
    fixed = (None in stored or tuple(stored) != c.values()
             or check != _sums_check(c.values()))
    report = RepairReport(stamps_rewritten=len(mend), stamps_dropped=len(orphans),
                          quarantined=len(corrupt), damaged_tombstones=damaged_t,
                          damaged_quarantine=damaged_q, counters_fixed=fixed)
    if fixed:
        log.warning("block store %s: counters recounted: %s (were %s)", store.path,
                    dict(zip(_COUNTERS, c.values())), dict(zip(_COUNTERS, stored)))
    return c, report
