"""The node-local block store (storage/blockstore.py): verification on every
read, quarantine of damaged copies (damaged through LMDB and through the file
itself), damaged stamps, tombstones, quarantine entries, counters and format
records (issue 4), quotas, tombstones, persistence, crash safety under kill -9,
and a property test against a dict model."""

import hashlib
import logging
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import struct
import tempfile
import threading
from pathlib import Path

import lmdb
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from storage.blockstore import (
    _Gate,
    HELD,
    STAMP_BYTES,
    TOMBSTONE_BYTES,
    TOMBSTONED,
    AsyncBlockStore,
    BlockStore,
    RepairReport,
    Tombstone,
    footprint,
)
from storage.errors import (
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
from storage.seal import MAX_SEALED

ROOT = Path(__file__).resolve().parent.parent


def blk(n: int, rng=random) -> tuple[bytes, bytes]:
    data = rng.randbytes(n)
    return hashlib.sha256(data).digest(), data


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def path(tmp_path):
    return tmp_path / "blocks"


@pytest.fixture
def store(path):
    s = BlockStore(path, quota=16 << 20, sync=False)
    yield s
    s.close()


def raw_put(path, db_name: bytes, key: bytes, value: bytes):
    """Write straight into the store's LMDB, bypassing every check (the store
    must be closed: one environment per process)."""
    env = lmdb.open(str(path), max_dbs=8)
    try:
        db = env.open_db(db_name, create=False)
        with env.begin(write=True) as txn:
            txn.put(key, value, db=db)
    finally:
        env.close()


def raw_delete(path, db_name: bytes, key: bytes):
    """Remove one entry behind the store's back (it must be closed)."""
    env = lmdb.open(str(path), max_dbs=8)
    try:
        db = env.open_db(db_name, create=False)
        with env.begin(write=True) as txn:
            assert txn.delete(key, db=db)
    finally:
        env.close()


NOTHING_TO_REPAIR = RepairReport(0, 0, 0, 0, 0, False)


def charge(*blocks: bytes, tombstones: int = 0, quarantined: tuple[int, ...] = ()) -> int:
    """What ``used`` must be for these held blocks, tombstones and quarantine
    entries (of these value lengths)."""
    return (sum(footprint(len(d)) + footprint(STAMP_BYTES) for d in blocks)
            + tombstones * footprint(TOMBSTONE_BYTES) + sum(map(footprint, quarantined)))


# --------------------------------------------------------------------------
# Basics


def test_put_get_has_delete(store):
    g, d = blk(5000)
    assert not store.has(g)
    assert store.put(g, d) is True
    assert store.put(g, d) is False  # already held: idempotent
    assert store.has(g) and store.get(g) == d
    assert store.delete(g) is True
    assert not store.has(g)
    with pytest.raises(BlockNotFound):
        store.get(g)
    assert store.delete(g) is False


def test_put_of_bytes_not_matching_bguid_refused(store):
    g, d = blk(100)
    with pytest.raises(BlockCorrupt, match="do not hash"):
        store.put(g, d + b"x")
    assert not store.has(g) and store.stats().blocks == 0


def test_too_large_refused(store):
    data = bytes(MAX_SEALED + 1)
    with pytest.raises(BlockTooLarge):
        store.put(hashlib.sha256(data).digest(), data)
    g, d = blk(MAX_SEALED)
    assert store.put(g, d)


def test_bad_bguid_is_a_caller_error(store):
    with pytest.raises(ValueError):
        store.get(b"short")
    with pytest.raises(ValueError):
        store.put("x" * 32, b"")


def test_get_many_has_many_and_listing(store):
    items = [blk(n) for n in (10, 3000, 70, 60000, 1)]
    assert store.put_many(items) == 5
    missing = hashlib.sha256(b"nope").digest()
    got = store.get_many([g for g, _ in items] + [missing])
    assert got == dict(items)
    assert store.has_many([items[0][0], missing]) == [True, False]
    all_ids = sorted(g for g, _ in items)
    assert list(store) == all_ids
    assert store.list_bguids(limit=2) == all_ids[:2]
    assert store.list_bguids(after=all_ids[1], limit=10) == all_ids[2:]
    assert store.list_bguids(after=all_ids[-1]) == []


def test_stats(store):
    items = [blk(n) for n in (100, 20000, 60000)]
    store.put_many(items)
    s = store.stats()
    assert s.blocks == 3 and s.bytes == 80100
    assert s.used == sum(footprint(len(d)) + footprint(STAMP_BYTES) for _, d in items)
    assert s.free == s.quota - s.used
    assert (s.quarantined, s.corruptions, s.tombstones) == (0, 0, 0)


# --------------------------------------------------------------------------
# Damage on disk


def test_flipped_bytes_through_lmdb_detected_and_quarantined(path):
    g, d = blk(4000)
    with BlockStore(path, sync=False) as s:
        s.put(g, d)
    bad = bytearray(d)
    bad[1234] ^= 0x40
    raw_put(path, b"blocks", g, bytes(bad))
    with BlockStore(path, sync=False) as s:
        assert s.has(g)
        with pytest.raises(BlockCorrupt, match="quarantined"):
            s.get(g)
        # never served again, and the bad copy is kept aside, not lost
        assert not s.has(g)
        with pytest.raises(BlockNotFound):
            s.get(g)
        st_ = s.stats()
        assert (st_.blocks, st_.bytes, st_.quarantined, st_.corruptions) == (0, 0, 1, 1)
        assert st_.quarantined_bytes == len(d)
        [(qg, _, qdata)] = s.quarantined()
        assert qg == g and qdata == bytes(bad)
        # a verified copy from elsewhere repairs it
        assert s.put(g, d) and s.get(g) == d
        assert s.purge_quarantine() == 1
        assert s.stats().quarantined == 0
        assert s.stats().used == footprint(len(d)) + footprint(STAMP_BYTES)


def test_flipped_bytes_in_the_file_detected(path):
    g, d = blk(50000)
    other_g, other_d = blk(3000)
    with BlockStore(path, sync=False) as s:
        s.put_many([(g, d), (other_g, other_d)])
    f = path / "data.mdb"
    raw = bytearray(f.read_bytes())
    at = raw.find(d[1000:1100])
    assert at >= 0
    raw[at + 50] ^= 0xFF
    f.write_bytes(raw)
    with BlockStore(path, sync=False) as s:
        assert s.get_many([g, other_g]) == {other_g: other_d}
        assert s.stats().corruptions == 1 and not s.has(g)


def test_held_corrupt_copy_is_replaced_by_a_verified_put(path):
    g, d = blk(3000)
    with BlockStore(path, sync=False) as s:
        s.put(g, d)
    raw_put(path, b"blocks", g, b"garbage")
    with BlockStore(path, sync=False) as s:
        assert s.put(g, d) is False  # held already, but the held copy was bad
        assert s.get(g) == d
        st_ = s.stats()
        assert st_.corruptions == 1 and st_.quarantined == 1 and st_.bytes == len(d)


# --------------------------------------------------------------------------
# Damaged entries other than block values (issue 4)

STAMP_DAMAGE = {  # name: (stamp given the block's length, whether its time still reads)
    "short": (lambda n: b"\x00\x01\x02", False),
    "nan-time": (lambda n: struct.pack(">dI", math.nan, n), False),
    "huge-length": (lambda n: struct.pack(">dI", 100.0, 10**6), True),
}


@pytest.mark.parametrize("damage, time_reads", STAMP_DAMAGE.values(), ids=STAMP_DAMAGE.keys())
def test_damaged_stamp_block_still_readable_and_never_collected(path, damage, time_reads,
                                                                caplog):
    clock = Clock(100.0)
    (x, xd), (y, yd) = blk(3000), blk(4000)
    with BlockStore(path, sync=False, clock=clock) as s:
        s.put_many([(x, xd), (y, yd)])
    raw_put(path, b"stamps", x, damage(len(xd)))
    clock.t = 200.0
    with BlockStore(path, sync=False, clock=clock) as s:
        # The bytes are checked against their BGUID, not the stamp.
        assert s.get(x) == xd and s.get_many([x, y]) == {x: xd, y: yd}
        assert s.has(x) and list(s) == sorted([x, y])
        if time_reads:  # only the length is off, which only deletes look at
            assert s.stored_at(x) == 100.0
            assert s.states([x, y]) == [(HELD, 100.0, 0), (HELD, 100.0, 0)]
        else:
            # Only a call about exactly that stamp refuses, naming it.
            with pytest.raises(StoreEntryDamaged, match=x.hex()[:16]) as e:
                s.stored_at(x)
            assert (e.value.db, e.value.key) == ("stamps", x)
            # Batch reads: held, put just now, so replica repair keeps it.
            assert s.states([x, y]) == [(HELD, 200.0, 0), (HELD, 100.0, 0)]
            assert s.stats().damaged == 1
        # A sweep marked before now collects the other block, never this one,
        # and leaves no tombstone on a block it keeps (I3).
        assert s.delete_many([x, y], epoch=1, unless_stored_after=150.0) == [y]
        assert s.get(x) == xd and s.tombstone(x) is None
        # The sweep rewrote the stamp from the verified bytes, as put now:
        # it reads again, and another sweep of the same mark spares it too.
        assert s.stored_at(x) == 200.0
        assert s.delete_many([x], unless_stored_after=150.0) == []
        st_ = s.stats()
        assert (st_.blocks, st_.bytes, st_.damaged) == (1, len(xd), 1)
        assert st_.used == charge(xd, tombstones=1)
        assert s.repair() == NOTHING_TO_REPAIR
        # Only a sweep marked after the stamp was mended may take it.
        assert s.delete_many([x], epoch=2, unless_stored_after=250.0) == [x]
        assert s.stats().used == charge(tombstones=2)
    warned = [r for r in caplog.records
              if r.levelno == logging.WARNING and x.hex()[:16] in r.getMessage()]
    assert len(warned) == 1  # once, however often it was met


def test_block_found_without_its_stamp_is_restamped_not_deleted(path):
    clock = Clock(100.0)
    (x, xd), (y, yd) = blk(3000), blk(10)
    with BlockStore(path, sync=False, clock=clock) as s:
        s.put_many([(x, xd), (y, yd)])
    raw_delete(path, b"stamps", x)
    clock.t = 200.0
    with BlockStore(path, sync=False, clock=clock) as s:
        assert s.get(x) == xd and not s.has(x)  # listed by its stamp only
        assert s.delete_many([x, y], epoch=1, unless_stored_after=150.0) == [y]
        assert s.has(x) and s.stored_at(x) == 200.0 and s.tombstone(x) is None
        assert s.stats().used == charge(xd, tombstones=1)
        assert s.repair() == NOTHING_TO_REPAIR


def test_one_damaged_stamp_does_not_stop_the_sweep_of_the_others(path):
    # One bad stamp in a batch of a hundred: the other 99 are collected.
    items = [blk(100) for _ in range(100)]
    with BlockStore(path, sync=False) as s:
        s.put_many(items)
    bad = items[37][0]
    raw_put(path, b"stamps", bad, b"\xff" * 5)
    with BlockStore(path, sync=False) as s:
        gone = s.delete_many([g for g, _ in items], epoch=3)
        assert sorted(gone) == sorted(g for g, _ in items if g != bad)
        assert list(s) == [bad] and s.get(bad) == items[37][1]
        assert s.stats().used == charge(items[37][1], tombstones=99)


@pytest.mark.parametrize("stamp", [b"\x01", None], ids=["damaged", "missing"])
@pytest.mark.parametrize("met_by", ["sweep", "get"])
def test_bad_stamp_of_a_corrupt_block_goes_to_quarantine(path, stamp, met_by):
    (x, xd), (y, yd) = blk(3000), blk(50)
    with BlockStore(path, sync=False) as s:
        s.put_many([(x, xd), (y, yd)])
    if stamp is None:
        raw_delete(path, b"stamps", x)
    else:
        raw_put(path, b"stamps", x, stamp)
    raw_put(path, b"blocks", x, xd[:-10])
    with BlockStore(path, sync=False) as s:
        if met_by == "sweep":
            assert s.delete_many([x], epoch=4) == []  # it was not held intact
            assert s.tombstone(x).epoch == 4
            tombs = 1
        else:
            with pytest.raises(BlockCorrupt):
                s.get(x)
            tombs = 0
        assert not s.has(x)
        with pytest.raises(BlockNotFound):
            s.get(x)
        [(qg, _, qd)] = s.quarantined()
        assert qg == x and qd == xd[:-10]
        st_ = s.stats()
        assert (st_.blocks, st_.bytes, st_.corruptions, st_.quarantined_bytes) == \
            (1, len(yd), 1, len(xd) - 10)
        assert st_.used == charge(yd, tombstones=tombs, quarantined=(8 + len(xd) - 10,))
        assert s.repair() == NOTHING_TO_REPAIR


def test_a_length_that_would_take_a_counter_below_zero_is_recounted(path):
    # A plausible but wrong length in a stamp: the delete would subtract more
    # than was ever added, and the counters are recounted instead of failing.
    (x, xd), (y, yd) = blk(100), blk(200)
    with BlockStore(path, sync=False, clock=Clock(5.0)) as s:
        s.put_many([(x, xd), (y, yd)])
    raw_put(path, b"stamps", x, struct.pack(">dI", 5.0, 60000))
    with BlockStore(path, sync=False) as s:
        assert s.delete_many([x], tombstone=False) == [x]
        st_ = s.stats()
        assert (st_.blocks, st_.bytes, st_.used) == (1, len(yd), charge(yd))


COUNTER_DAMAGE = {
    "used-zero": (b"used", bytes(8)),
    "used-short": (b"used", b"\x00\x01\x02"),
    "used-huge": (b"used", (1 << 62).to_bytes(8, "big")),
    "bytes-garbage": (b"bytes", b"\xff" * 8),
    "corruptions": (b"corruptions", b"\x07"),
    "check": (b"sums", b"\x00" * 8),
}


@pytest.mark.parametrize("key, value", COUNTER_DAMAGE.values(), ids=COUNTER_DAMAGE.keys())
@pytest.mark.parametrize("first", ["stats", "put"])
def test_damaged_counter_is_recounted_and_quota_still_enforced(path, key, value, first):
    quota = 1 << 20
    with BlockStore(path, quota=quota, sync=False) as s:
        s.delete(blk(10)[0], epoch=1)
        held = []
        with pytest.raises(StoreFull):
            while True:
                g, d = blk(60000)
                s.put(g, d)
                held.append(g)
        before = s.stats()
    raw_put(path, b"meta", key, value)
    with BlockStore(path, quota=quota, sync=False) as s:
        big = blk(60000)
        if first == "put":  # the recount happens in the write path
            with pytest.raises(StoreFull, match="quota"):
                s.put_many([big, big])
        after = s.stats()
        assert (after.blocks, after.bytes, after.used, after.tombstones) == \
            (before.blocks, before.bytes, before.used, before.tombstones)
        assert after.damaged == 1 and after.corruptions == 0
        # The quota holds against the true use, whatever the damage said.
        assert after.free < footprint(60000) + footprint(STAMP_BYTES)
        with pytest.raises(StoreFull, match="quota"):
            s.put_many([big, blk(60000)])
        s.delete_many(held[:2])
        assert s.put_many([big]) == 1
        assert s.repair() == NOTHING_TO_REPAIR


def test_counters_written_by_older_code_are_recounted_quietly(path):
    items = [blk(n) for n in (10, 5000)]
    with BlockStore(path, sync=False) as s:
        s.put_many(items)
        before = s.stats()
    raw_delete(path, b"meta", b"sums")
    raw_put(path, b"meta", b"used", bytes(8))
    with BlockStore(path, sync=False) as s:
        assert s.stats() == before  # recounted, and not counted as damage


@pytest.mark.parametrize("damage", ["short", "missing", "version"])
def test_damaged_format_record_refused_on_open_and_nothing_changed(path, damage):
    with BlockStore(path, sync=False) as s:
        s.put(*blk(100))
    if damage == "missing":
        raw_delete(path, b"meta", b"format")
    else:
        raw_put(path, b"meta", b"format", b"\x00\x01\x02" if damage == "short" else
                (7).to_bytes(4, "big"))
    image = (path / "data.mdb").read_bytes()
    msg = {"short": "format record is 3 bytes", "missing": "format record is missing",
           "version": "format 7 is not supported"}[damage]
    with pytest.raises(StoreFormatError, match=msg):
        BlockStore(path, sync=False)
    assert (path / "data.mdb").read_bytes() == image
    with pytest.raises(StoreFormatError):  # and the next open says the same
        BlockStore(path, sync=False)


def test_damaged_tombstone_still_refuses_and_is_purged_first(path):
    clock = Clock(1000.0)
    g, d = blk(100)
    other = blk(10)[0]
    with BlockStore(path, sync=False, clock=clock) as s:
        s.put(g, d)
        s.delete(g, epoch=5)
        s.delete(other, epoch=5)
    raw_put(path, b"tombstones", g, b"\x00" * 15)
    with BlockStore(path, sync=False, clock=clock) as s:
        with pytest.raises(BlockTombstoned):
            s.put(g, d)
        with pytest.raises(StoreEntryDamaged) as e:
            s.tombstone(g)
        assert (e.value.db, e.value.key) == ("tombstones", g)
        # The oldest possible: it never makes another holder drop a copy.
        assert s.states([g]) == [(TOMBSTONED, 0.0, 0)]
        assert dict(s.tombstones())[g] == Tombstone(0, 0.0)
        assert s.repair() == RepairReport(0, 0, 0, 1, 0, False)
        assert s.purge_tombstones(before_epoch=1) == 1
        assert [t for t, _ in s.tombstones()] == [other]
        assert s.put(g, d) and s.stats().used == charge(d, tombstones=1)
        assert s.stats().damaged == 1


def test_damaged_quarantine_entry_is_listed_and_purged(path):
    g, d = blk(5000)
    with BlockStore(path, sync=False) as s:
        s.put(g, d)
    raw_put(path, b"blocks", g, d[:100])
    with BlockStore(path, sync=False) as s:
        with pytest.raises(BlockCorrupt):
            s.get(g)
    raw_put(path, b"quarantine", g, b"\x00\x01\x02")
    with BlockStore(path, sync=False) as s:
        assert s.quarantined() == [(g, 0.0, b"\x00\x01\x02")]
        assert s.purge_quarantine() == 1
        st_ = s.stats()
        assert (st_.quarantined, st_.quarantined_bytes, st_.used, st_.corruptions) == \
            (0, 0, 0, 1)
        assert st_.damaged == 1


def test_repair_mends_stamps_drops_orphans_and_quarantines(path):
    (w, wd), (x, xd), (y, yd), (z, zd), (k, kd) = (blk(n) for n in (900, 3000, 40, 7000, 1))
    with BlockStore(path, sync=False, clock=Clock(10.0)) as s:
        s.put_many([(w, wd), (x, xd), (y, yd), (z, zd), (k, kd)])
    raw_delete(path, b"stamps", x)                               # a block without its stamp
    raw_delete(path, b"blocks", y)                               # a stamp without its block
    raw_put(path, b"stamps", z, b"?")                            # damaged stamp, corrupt block
    raw_put(path, b"blocks", z, zd[1:])
    raw_put(path, b"stamps", w, struct.pack(">dI", 10.0, 901))  # plausible, wrong length
    with BlockStore(path, sync=False, clock=Clock(20.0)) as s:
        assert s.repair() == RepairReport(stamps_rewritten=1, stamps_dropped=1, quarantined=1,
                                          damaged_tombstones=0, damaged_quarantine=0,
                                          counters_fixed=True)
        assert s.stored_at(x) == 20.0 and s.has(x) and not s.has(y) and not s.has(z)
        assert s.stats().bytes == len(wd) + 1 + len(xd) + len(kd)  # w's stamp is still off
        # Reading every block finds the plausible but wrong length too.
        assert s.repair(verify=True) == RepairReport(1, 0, 0, 0, 0, True)
        assert s.stored_at(w) == 20.0
        st_ = s.stats()
        assert list(s) == sorted([w, x, k])
        assert (st_.bytes, st_.corruptions, st_.quarantined) == (len(wd + xd + kd), 1, 1)
        assert st_.used == charge(wd, xd, kd, quarantined=(8 + len(zd) - 1,))
        assert s.repair(verify=True) == NOTHING_TO_REPAIR
        assert s.get_many([w, x, k]) == {w: wd, x: xd, k: kd}


# --------------------------------------------------------------------------
# Quota and space


def test_quota_refusal_is_whole_and_clear(path):
    quota = 1 << 20
    with BlockStore(path, quota=quota, sync=False) as s:
        stored = []
        with pytest.raises(StoreFull, match="quota"):
            for _ in range(100):
                g, d = blk(60000)
                s.put(g, d)
                stored.append(g)
        assert 10 <= len(stored) < 100
        before = s.stats()
        assert before.used <= quota
        # a batch that does not fit is refused whole, even its small members
        small = blk(10)
        with pytest.raises(StoreFull):
            s.put_many([small, blk(60000), blk(60000)])
        assert s.stats() == before and not s.has(small[0])
        # space comes back with deletes
        s.delete_many(stored[:3])
        assert s.put_many([small, blk(60000)]) == 2
        assert s.stats().used <= quota


def test_disk_reserve_refused(path):
    with BlockStore(path, sync=False, min_disk_free=1 << 62) as s:
        with pytest.raises(StoreFull, match="disk"):
            s.put(*blk(10))


def test_map_grows_and_never_raises_map_full(path):
    # A map far smaller than the quota: the store must grow it, and refuse
    # with StoreFull (not MapFullError) once it may grow no further.
    with BlockStore(path, quota=1 << 30, map_size=1 << 20, sync=False) as s:
        first = s.stats().map_size
        held = []
        with pytest.raises(StoreFull, match="map"):
            for _ in range(200):
                g, d = blk(60000)
                s.put(g, d)
                held.append((g, d))
        assert s.stats().map_size > first
        assert len(held) > (1 << 20) // 60000
        assert all(s.get(g) == d for g, d in held)


class TightReaders:
    """Threads reading the same blocks back to back, with no pause, until
    stopped or until each has done ``budget`` passes. A writer that finishes
    while they still run was not starved by them; with the starvation this
    guards against, a writer could only finish once the budget ran out."""

    def __init__(self, store, seed, n=3, budget=50_000):
        self.store, self.seed, self.budget = store, seed, budget
        self.errors: list[BaseException] = []
        self.exhausted = threading.Event()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(n)]

    def _run(self):
        try:
            for _ in range(self.budget):
                if self.stop.is_set():
                    return
                for g, d in self.seed:
                    assert self.store.get(g) == d
            self.exhausted.set()
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def test_concurrent_readers_while_the_map_grows(path):
    # Readers never pause: the resize (and the abort of the map-full put
    # before it) must not wait for a moment with no read in flight.
    with BlockStore(path, quota=1 << 30, map_size=1 << 20, sync=False) as s:
        seed = [blk(2000) for _ in range(20)]
        s.put_many(seed)
        with TightReaders(s, seed) as readers:
            for _ in range(60):
                try:
                    s.put(*blk(60000))
                except StoreFull:
                    break
            starved = readers.exhausted.is_set()
        assert not readers.errors
        assert not starved, "the writer finished only after the readers stopped"
        assert s.stats().map_size > 1 << 20


def test_refused_puts_are_not_starved_by_readers(path):
    # A refused batch is aborted, and py-lmdb's abort of a write transaction
    # drains every LMDB call of the process, like a resize does.
    with BlockStore(path, quota=1 << 20, sync=False) as s:
        seed = [blk(2000) for _ in range(20)]
        s.put_many(seed)
        tomb = blk(100)
        s.put(*tomb)
        s.delete(tomb[0])
        with TightReaders(s, seed) as readers:
            for _ in range(20):
                with pytest.raises(StoreFull, match="quota"):
                    s.put_many([blk(60000) for _ in range(20)])
                with pytest.raises(BlockTombstoned):
                    s.put(*tomb)
            s.put(*blk(60000))  # and the store still takes what fits
            starved = readers.exhausted.is_set()
        assert not readers.errors
        assert not starved, "the writer finished only after the readers stopped"


def _until(cond):
    """Wait for a condition set by another thread (a liveness wait, not a
    timing assertion: it fails only if the condition never comes)."""
    for _ in range(20_000):
        if cond():
            return
        threading.Event().wait(0.001)
    raise AssertionError("condition never came")


def test_gate_queues_readers_behind_a_pending_quiet_section_and_admits_them_next():
    gate = _Gate()
    log = []
    release_a, release_b, release_y = threading.Event(), threading.Event(), threading.Event()

    def reader(name, release):
        with gate.shared():
            log.append(f"{name} in")
            release.wait()
        log.append(f"{name} out")

    def quiet(name, release):
        with gate.exclusive():
            log.append(f"{name} in")
            release.wait()
        log.append(f"{name} out")

    a = threading.Thread(target=reader, args=("A", release_a))
    a.start()
    _until(lambda: "A in" in log)
    x_release = threading.Event()
    x = threading.Thread(target=quiet, args=("X", x_release))
    x.start()
    _until(lambda: gate._closed)
    # B arrives while X is pending: it queues instead of overtaking X.
    b = threading.Thread(target=reader, args=("B", release_b))
    b.start()
    _until(lambda: gate._queued == 1)
    assert log == ["A in"]
    release_a.set()
    _until(lambda: "X in" in log)
    assert "B in" not in log
    x_release.set()
    x.join()
    # B was admitted when X ended; a quiet section begun now waits for it.
    y = threading.Thread(target=quiet, args=("Y", release_y))
    y.start()
    _until(lambda: "B in" in log)
    _until(lambda: gate._closed)
    assert "Y in" not in log
    release_b.set()
    _until(lambda: "Y in" in log)
    release_y.set()
    for t in (a, b, y):
        t.join()
    assert log.index("B out") < log.index("Y in")
    assert gate._active == 0 and not gate._closed and gate._queued == 0


# --------------------------------------------------------------------------
# Tombstones and GC primitives


def test_tombstone_refuses_stale_put_until_revived(path):
    clock = Clock(1000.0)
    g, d = blk(500)
    with BlockStore(path, sync=False, clock=clock) as s:
        s.put(g, d)
        clock.t = 1010.0
        assert s.delete(g, epoch=7)
        t = s.tombstone(g)
        assert (t.epoch, t.deleted_at) == (7, 1010.0)
        with pytest.raises(BlockTombstoned, match="revive"):
            s.put(g, d)
        with pytest.raises(BlockTombstoned):
            s.put_many([blk(10), (g, d)])
        assert s.stats().blocks == 0  # the batch was refused whole
        assert s.put(g, d, revive=True)
        assert s.tombstone(g) is None and s.get(g) == d


def test_delete_of_a_block_not_held_still_tombstones(store):
    g, d = blk(100)
    assert store.delete(g, epoch=3) is False
    assert store.tombstone(g).epoch == 3
    with pytest.raises(BlockTombstoned):
        store.put(g, d)
    assert store.stats().tombstones == 1
    assert store.stats().used == footprint(TOMBSTONE_BYTES)


def test_delete_without_tombstone(store):
    g, d = blk(100)
    store.put(g, d)
    store.delete(g, tombstone=False)
    assert store.tombstone(g) is None
    assert store.put(g, d)


def test_purge_tombstones_by_epoch_and_age(path):
    clock = Clock(100.0)
    with BlockStore(path, sync=False, clock=clock) as s:
        a, b, c = (blk(10)[0] for _ in range(3))
        s.delete(a, epoch=1)
        clock.t = 200.0
        s.delete(b, epoch=2)
        clock.t = 300.0
        s.delete(c, epoch=3)
        assert s.purge_tombstones(before_epoch=2) == 1
        assert s.purge_tombstones(older_than=250.0) == 1
        assert [g for g, _ in s.tombstones()] == [c]
        assert s.stats().used == footprint(TOMBSTONE_BYTES)
        with pytest.raises(ValueError):
            s.purge_tombstones()


def test_sweep_spares_blocks_put_since_the_mark(path):
    clock = Clock(100.0)
    with BlockStore(path, sync=False, clock=clock) as s:
        old, fresh, touched = blk(10), blk(10), blk(10)
        s.put_many([old, touched])
        clock.t = 200.0
        mark = 150.0
        s.put(*fresh)
        s.put(*touched)  # re-referenced since the mark: stamp refreshed
        assert s.stored_at(touched[0]) == 200.0
        removed = s.delete_many([old[0], fresh[0], touched[0]], epoch=1,
                                unless_stored_after=mark)
        assert removed == [old[0]]
        assert s.has(fresh[0]) and s.has(touched[0]) and not s.has(old[0])
        # Spared blocks get no tombstone; collected ones do.
        assert s.tombstone(fresh[0]) is None and s.tombstone(old[0]) is not None


# --------------------------------------------------------------------------
# Persistence, formats, lifecycle


def test_reopen_keeps_everything(path):
    items = [blk(n) for n in (1, 100, 5000, 60000)]
    gone = blk(10)
    with BlockStore(path) as s:  # sync=True: the real configuration
        s.put_many(items + [gone])
        s.delete(gone[0], epoch=4)
        before = s.stats()
    with BlockStore(path) as s:
        assert s.stats() == before
        assert all(s.get(g) == d for g, d in items)
        assert s.tombstone(gone[0]).epoch == 4


def test_unknown_format_refused(path):
    BlockStore(path, sync=False).close()
    raw_put(path, b"meta", b"format", (2).to_bytes(4, "big"))
    with pytest.raises(StoreFormatError, match="format"):
        BlockStore(path)


def test_not_lmdb_refused(path):
    path.mkdir()
    (path / "data.mdb").write_bytes(b"this is not an LMDB file" * 500)
    with pytest.raises(StoreFormatError):
        BlockStore(path)


def test_foreign_lmdb_refused(path):
    env = lmdb.open(str(path), max_dbs=4)
    env.open_db(b"someone-else")
    env.close()
    with pytest.raises(StoreFormatError, match="not a block store"):
        BlockStore(path)


def test_second_open_in_one_process_refused(store, path):
    with pytest.raises(StorageError, match="already open"):
        BlockStore(path)


def test_use_after_close(path):
    s = BlockStore(path, sync=False)
    s.close()
    s.close()
    with pytest.raises(StoreClosed):
        s.get(bytes(32))


async def test_async_facade(store):
    a = AsyncBlockStore(store)
    items = [blk(n) for n in (10, 60000)]
    assert await a.put_many(items) == 2
    assert await a.get(items[0][0]) == items[0][1]
    assert await a.get_many([g for g, _ in items]) == dict(items)
    assert await a.has_many([items[1][0]]) == [True]
    assert await a.delete_many([items[0][0]]) == [items[0][0]]
    assert (await a.stats()).blocks == 1
    with pytest.raises(BlockNotFound):
        await a.get(items[0][0])


# --------------------------------------------------------------------------
# Crash safety: kill -9 in the middle of a put loop

CHILD = r"""
import hashlib, random, sys
from storage.blockstore import BlockStore
s = BlockStore(sys.argv[1], quota=1 << 30)
rng = random.Random(int(sys.argv[2]))
while True:
    batch = [rng.randbytes(rng.randrange(1, 64000)) for _ in range(rng.randrange(1, 6))]
    items = [(hashlib.sha256(b).digest(), b) for b in batch]
    s.put_many(items)
    for g, _ in items:
        print(g.hex(), flush=True)
"""


def kill_9_after(path, child: str, round_: int, want: int) -> set[bytes]:
    """Run ``child`` (source printing each acknowledged BGUID) on the store
    at ``path``, kill -9 it after ``want`` lines; every BGUID it printed."""
    acked: set[bytes] = set()
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(path), str(round_)],
        stdout=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for _ in range(want):
            line = proc.stdout.readline()
            assert line, "child exited early"
            acked.add(bytes.fromhex(line.decode().strip()))
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
        acked.update(bytes.fromhex(x) for x in rest.decode().split())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return acked


def check_nothing_acknowledged_lost(path, acked: set[bytes]) -> None:
    with BlockStore(path) as s:
        held = list(s)
        # nothing acknowledged is lost
        assert acked <= set(held)
        # every block present is intact, and the counters match the blocks
        blocks = {g: s.get(g) for g in held}
        st_ = s.stats()
        assert st_.corruptions == 0 and st_.blocks == len(held)
        assert st_.bytes == sum(map(len, blocks.values()))
        assert st_.used == sum(footprint(len(d)) + footprint(STAMP_BYTES) for d in blocks.values())


def test_kill_9_mid_put_leaves_whole_blocks_or_nothing(path):
    acked: set[bytes] = set()
    for round_ in range(3):
        acked |= kill_9_after(path, CHILD, round_, 40 + 37 * round_)
        check_nothing_acknowledged_lost(path, acked)


# --------------------------------------------------------------------------
# Property test against a dict model

_R = random.Random(4)
POOL = [blk(n, _R) for n in (0, 1, 33, 2000, 2100, 9000, 30000, 60000, 65000)]
QUOTA = 120_000  # room for about two of the largest blocks: StoreFull is reachable


class StoreVsModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bs-model-")
        self.store = BlockStore(self.dir, quota=QUOTA, sync=False)
        self.blocks: dict[bytes, bytes] = {}
        self.tombs: set[bytes] = set()
        self.quar: dict[bytes, int] = {}  # bguid -> length of the bad copy
        self.corruptions = 0

    def used(self) -> int:
        return (sum(footprint(len(d)) + footprint(STAMP_BYTES) for d in self.blocks.values())
                + len(self.tombs) * footprint(TOMBSTONE_BYTES)
                + sum(footprint(n + 8) for n in self.quar.values()))

    def expect_put(self, items, revive):
        items = dict(items)
        if not revive and any(g in self.tombs for g in items):
            return BlockTombstoned
        used = self.used()
        for g, d in items.items():
            if g in self.tombs:
                used -= footprint(TOMBSTONE_BYTES)
            if g not in self.blocks:
                used += footprint(len(d)) + footprint(STAMP_BYTES)
        return StoreFull if used > QUOTA else None

    @rule(i=st.integers(0, len(POOL) - 1), revive=st.booleans())
    def put(self, i, revive):
        self.put_many([i], revive)

    @rule(ix=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=4), revive=st.booleans())
    def put_many(self, ix, revive):
        self.check_put(self.store.put_many, [POOL[i] for i in ix], revive)

    def check_put(self, put, items, revive):
        """``put(items, revive=)`` (put_many, or a variant with the same
        contract) against the model."""
        err = self.expect_put(items, revive)
        if err:
            with pytest.raises(err):
                put(items, revive=revive)
            return
        new = put(items, revive=revive)
        assert new == len({g for g, _ in items} - self.blocks.keys())
        for g, d in items:
            self.blocks[g] = d
            self.tombs.discard(g)

    @rule(i=st.integers(0, len(POOL) - 1))
    def get(self, i):
        g, d = POOL[i]
        if g in self.blocks:
            assert self.store.get(g) == d
        else:
            with pytest.raises(BlockNotFound):
                self.store.get(g)

    @rule(i=st.integers(0, len(POOL) - 1), tombstone=st.booleans(), epoch=st.integers(0, 3))
    def delete(self, i, tombstone, epoch):
        g, _ = POOL[i]
        assert self.store.delete(g, epoch=epoch, tombstone=tombstone) == (g in self.blocks)
        self.blocks.pop(g, None)
        if tombstone:
            self.tombs.add(g)

    @rule(epoch=st.integers(0, 4))
    def purge(self, epoch):
        gone = {g for g in self.tombs if self.store.tombstone(g).epoch < epoch}
        assert self.store.purge_tombstones(before_epoch=epoch) == len(gone)
        self.tombs -= gone

    @rule()
    def reopen(self):
        self.store.close()
        self.store = BlockStore(self.dir, quota=QUOTA, sync=False)

    @rule(verify=st.booleans())
    def repair(self, verify):
        # The counters kept step by step equal a recount from the entries.
        assert self.store.repair(verify=verify) == NOTHING_TO_REPAIR

    @rule(i=st.integers(0, len(POOL) - 1))
    def corrupt_on_disk(self, i):
        g, d = POOL[i]
        if g not in self.blocks:
            return
        self.store.close()
        raw_put(self.dir, b"blocks", g, d + b"!")
        self.store = BlockStore(self.dir, quota=QUOTA, sync=False)
        with pytest.raises(BlockCorrupt):
            self.store.get(g)
        del self.blocks[g]
        self.quar[g] = len(d) + 1
        self.corruptions += 1

    @invariant()
    def matches_model(self):
        s = self.store.stats()
        assert list(self.store) == sorted(self.blocks)
        assert s.blocks == len(self.blocks)
        assert s.bytes == sum(map(len, self.blocks.values()))
        assert s.tombstones == len(self.tombs)
        assert (s.quarantined, s.corruptions) == (len(self.quar), self.corruptions)
        assert s.used == self.used()

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


StoreVsModel.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_store_against_model = StoreVsModel.TestCase
