"""Staged puts of the block store (storage/blockstore_stage.py and
BlockStore(stage=True)): staged blocks are read at once and committed in
groups; whatever a killed process left staged is committed at the next open;
a torn tail, stale bytes of a committed generation and a second owner are
handled; the store still matches the dict model of test_blockstore when
staging, committing and crashing are mixed in."""
import hashlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import rule

from storage.blockstore import HELD, AsyncBlockStore, BlockStore
from storage.blockstore_stage import HEAD_BYTES, STAGE_FILE, encode
from storage.errors import BlockCorrupt, BlockTombstoned, StorageError, StoreFull

from test_blockstore import (POOL, QUOTA, StoreVsModel, check_nothing_acknowledged_lost,
                             kill_9_after, raw_put)

ROOT = Path(__file__).resolve().parent.parent


def blk(n: int, rng=random) -> tuple[bytes, bytes]:
    data = rng.randbytes(n)
    return hashlib.sha256(data).digest(), data


@pytest.fixture
def path(tmp_path):
    return tmp_path / "blocks"


def crash(store: BlockStore) -> None:
    """Drop the store as a killed process would: nothing staged is
    committed, what was written to the staging log stays in the file."""
    wal, store._stage_log = store._stage_log, None
    if wal is not None:
        wal.close()
    store._staged = {}
    store._lmdb.close()


def test_staged_blocks_are_read_at_once_and_committed_by_flush(path):
    s = BlockStore(path, sync=False, stage=True)
    try:
        a, b = blk(100), blk(3000)
        assert s.stage([a, b], revive=True) == 2
        assert s.staged == 2
        assert s.get(a[0]) == a[1]
        assert s.get_many([a[0], b[0]]) == {a[0]: a[1], b[0]: b[1]}
        assert s.has_many([a[0], b[0], blk(5)[0]]) == [True, True, False]
        assert s.states([a[0]])[0][0] == HELD
        assert s.stored_at(a[0]) is not None
        assert (path / STAGE_FILE).stat().st_size == 2 * HEAD_BYTES + 3100
        assert s.flush_staged() == 2
        assert s.staged == 0
        assert (path / STAGE_FILE).stat().st_size == 0
        assert sorted(s) == sorted([a[0], b[0]])
        assert s.stage([a], revive=True) == 0        # held already
    finally:
        s.close()


def test_listing_and_stats_commit_what_is_staged_first(path):
    with BlockStore(path, sync=False, stage=True) as s:
        a = blk(10)
        s.stage([a])
        assert s.stats().blocks == 1 and s.staged == 0
        b = blk(20)
        s.stage([b])
        assert list(s) == sorted([a[0], b[0]]) and s.staged == 0


def test_large_batches_go_straight_to_lmdb(path):
    with BlockStore(path, sync=False, stage=True) as s:
        s.stage([blk(40000), blk(40000)])
        assert s.staged == 0 and s.stats().blocks == 2


def test_close_commits_and_reopen_keeps_everything(path):
    items = [blk(500) for _ in range(20)]
    with BlockStore(path, sync=False, stage=True) as s:
        for it in items:
            s.stage([it])
    assert (path / STAGE_FILE).stat().st_size == 0
    with BlockStore(path, sync=False) as s:
        assert sorted(s) == sorted(g for g, _ in items)


def test_what_a_crash_left_staged_is_committed_at_the_next_open(path):
    items = [blk(700) for _ in range(10)]
    s = BlockStore(path, sync=False, stage=True)
    s.stage(items[:4])
    s.flush_staged()
    s.stage(items[4:])
    crash(s)
    with BlockStore(path, sync=False, stage=True) as s:
        assert s.staged == 0
        assert sorted(s) == sorted(g for g, _ in items)
        assert all(s.get(g) == d for g, d in items)
        assert s.stats().bytes == 7000
    assert (path / STAGE_FILE).stat().st_size == 0


def _torn(raw: bytes) -> bytes:
    return raw[:-17]                      # b's entry cut short


def _flipped(raw: bytes) -> bytes:
    return raw[:-1] + bytes([raw[-1] ^ 1])   # b's data no longer hashes to its BGUID


def _garbage(raw: bytes) -> bytes:
    return raw + os.urandom(200)          # junk after whole entries: b is kept


@pytest.mark.parametrize("damage, kept", [(_torn, 1), (_flipped, 1), (_garbage, 2)])
def test_replay_stops_at_the_first_entry_that_is_not_whole_and_sound(path, damage, kept):
    a, b = blk(300), blk(300)
    s = BlockStore(path, sync=False, stage=True)
    s.stage([a])
    s.stage([b])
    crash(s)
    log = path / STAGE_FILE
    log.write_bytes(damage(log.read_bytes()))
    with BlockStore(path, sync=False) as s:
        assert sorted(s) == sorted([a[0], b[0]][:kept])
    assert log.stat().st_size == 0


def test_a_committed_generation_never_comes_back(path):
    """The log was truncated after a commit, but the truncation never reached
    the disk: its old entries are still in the file at the next open. One of
    those blocks was collected (deleted, tombstoned) meanwhile: it must not
    be resurrected."""
    a, b = blk(400), blk(400)
    s = BlockStore(path, sync=False, stage=True)
    s.stage([a, b], revive=True)
    stale = (path / STAGE_FILE).read_bytes()
    s.flush_staged()
    assert s.delete(a[0], epoch=1)
    s.close()
    (path / STAGE_FILE).write_bytes(stale)
    with BlockStore(path, sync=False, stage=True) as s:
        assert list(s) == [b[0]]
        assert s.tombstone(a[0]).epoch == 1


def test_stale_entries_behind_newer_ones_are_not_replayed(path):
    a, b, c = blk(400), blk(400), blk(400)
    s = BlockStore(path, sync=False, stage=True)
    s.stage([a, b], revive=True)
    stale = (path / STAGE_FILE).read_bytes()
    s.flush_staged()
    s.delete_many([a[0], b[0]], epoch=2)
    s.stage([c])                           # generation 2, written over the start
    crash(s)
    log = path / STAGE_FILE
    now = log.read_bytes()
    log.write_bytes(now + stale[len(now):])   # the old bytes beyond it survived
    with BlockStore(path, sync=False) as s:
        assert list(s) == [c[0]]


def test_staging_refuses_what_a_put_refuses(path):
    with BlockStore(path, quota=64 << 10, sync=False, stage=True) as s:
        a = blk(100)
        s.put(*a)
        s.delete(a[0], epoch=1)
        with pytest.raises(BlockTombstoned):
            s.stage([a])
        assert s.staged == 0
        s.stage([a], revive=True)
        assert s.tombstone(a[0]) is None and s.get(a[0]) == a[1]
        # The quota counts staged blocks before they are committed.
        big = [blk(30000) for _ in range(3)]
        s.stage(big[:1])
        with pytest.raises(StoreFull):
            s.stage(big[1:2] + big[2:])
        assert s.staged == 1


def test_delete_of_a_staged_block_is_not_overtaken(path):
    with BlockStore(path, sync=False, stage=True) as s:
        a = blk(100)
        s.stage([a])
        assert s.delete(a[0], epoch=3)
        assert s.staged == 0 and list(s) == []
    with BlockStore(path, sync=False, stage=True) as s:
        assert list(s) == [] and s.tombstone(a[0]).epoch == 3


OWNER = r"""
import sys, time
from storage.blockstore import BlockStore
s = BlockStore(sys.argv[1], sync=False, stage=True)
print("open", flush=True)
time.sleep(60)
"""


def test_a_second_process_cannot_stage_into_a_store_in_use(path):
    BlockStore(path, sync=False, stage=True).close()
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(path)], stdout=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == b"open"
        with pytest.raises(StorageError, match="in use by another process"):
            BlockStore(path, sync=False, stage=True)
        # A reader (a tool) may open it, and leaves the log to its owner.
        with BlockStore(path, sync=False) as s:
            assert list(s) == []
    finally:
        proc.kill()
        proc.wait()


CHILD = r"""
import hashlib, random, sys
from storage.blockstore import BlockStore
s = BlockStore(sys.argv[1], quota=1 << 30, stage=True)
rng = random.Random(int(sys.argv[2]))
n = 0
while True:
    batch = [rng.randbytes(rng.randrange(1, 9000)) for _ in range(rng.randrange(1, 4))]
    items = [(hashlib.sha256(b).digest(), b) for b in batch]
    s.stage(items, revive=True)
    for g, _ in items:
        print(g.hex(), flush=True)
    n += 1
    if n % 7 == 0:
        s.flush_staged()
"""


def test_kill_9_loses_no_acknowledged_staged_put(path):
    acked: set[bytes] = set()
    for round_ in range(3):
        acked |= kill_9_after(path, CHILD, round_, 60 + 25 * round_)
        check_nothing_acknowledged_lost(path, acked)


async def test_async_store_commits_staged_puts_after_the_delay(path):
    s = BlockStore(path, sync=False, stage=True)
    a = AsyncBlockStore(s, stage_delay=0.05)
    try:
        items = [blk(1000) for _ in range(5)]
        for it in items:
            await a.put_many([it], revive=True)
        assert s.staged == 5
        with trio.fail_after(10):
            while s.staged:
                await trio.sleep(0.02)
        assert (path / STAGE_FILE).stat().st_size == 0
        assert sorted(await a.list_bguids()) == sorted(g for g, _ in items)
        # A large put is not staged.
        await a.put_many([blk(40000), blk(40000)], revive=True)
        assert s.staged == 0
    finally:
        s.close()


def test_entry_encoding_round_trips():
    from storage.blockstore_stage import decode_all
    a, b = blk(10), blk(0)
    buf = encode(3, a[0], a[1], True, 12.5) + encode(3, b[0], b[1], False, 13.0)
    got, used = decode_all(buf, 2, 1 << 20)
    assert used == len(buf)
    assert [(g, e.data, e.revive, e.at) for g, e in got] == [
        (a[0], a[1], True, 12.5), (b[0], b[1], False, 13.0)]
    assert decode_all(buf, 3, 1 << 20) == ([], 0)     # generation 3 is committed
    assert decode_all(buf, 2, 5)[0] == []              # longer than a block may be


# --------------------------------------------------------------------------
# The dict model of test_blockstore, with staging, commits and crashes


class StagedStoreVsModel(StoreVsModel):
    def __init__(self):
        super().__init__()
        self.store.close()
        self.store = BlockStore(self.dir, quota=QUOTA, sync=False, stage=True)

    def _open(self):
        return BlockStore(self.dir, quota=QUOTA, sync=False, stage=True)

    @rule(ix=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=3),
          revive=st.booleans())
    def stage(self, ix, revive):
        self.check_put(self.store.stage, [POOL[i] for i in ix], revive)

    @rule()
    def commit(self):
        self.store.flush_staged()
        assert self.store.staged == 0

    @rule()
    def crash_and_reopen(self):
        crash(self.store)
        self.store = self._open()

    @rule()
    def reopen(self):
        self.store.close()
        self.store = self._open()

    @rule(i=st.integers(0, len(POOL) - 1))
    def corrupt_on_disk(self, i):
        self.store.flush_staged()       # the copy to damage must be in LMDB
        g, d = POOL[i]
        if g not in self.blocks:
            return
        self.store.close()
        raw_put(self.dir, b"blocks", g, d + b"!")
        self.store = self._open()
        with pytest.raises(BlockCorrupt):
            self.store.get(g)
        del self.blocks[g]
        self.quar[g] = len(d) + 1
        self.corruptions += 1


StagedStoreVsModel.TestCase.settings = settings(max_examples=40, stateful_step_count=30,
                                                deadline=None)
test_staged_store_against_model = StagedStoreVsModel.TestCase


def test_a_full_disk_refuses_a_staged_put_whole_and_loses_nothing_acknowledged(tmp_path):
    """A real small disk (a tmpfs) fills up while staging: the put that does
    not fit is refused with StoreFull and leaves no torn entry behind;
    everything acknowledged before it is there after a crash and a restart
    with room again."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "p2pfs-test", str(disk)],
                   check=True, capture_output=True)
    try:
        path = disk / "blocks"
        s = BlockStore(path, quota=64 << 20, min_disk_free=0, sync=False, stage=True,
                       map_size=8 << 20)
        filler = disk / "filler"
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler.write_bytes(b"\0" * (free - (256 << 10)))     # leave 256 KiB
        acked = {}
        with pytest.raises(StoreFull) as refused:
            for i in range(1000):
                b = blk(9000)
                s.stage([b])
                acked[b[0]] = b[1]
        assert "free" in str(refused.value)                  # the disk check said so
        assert 10 < len(acked) < 1000
        log = path / STAGE_FILE
        size = log.stat().st_size
        assert size == len(acked) * (HEAD_BYTES + 9000)      # whole entries only
        # Past the check, the disk fills in the middle of an append (ENOSPC
        # after part of it was written): refused, and the log is as it was.
        with pytest.raises(StoreFull, match="disk full"):
            s._stage_log.append(os.urandom(64 << 10))
        assert log.stat().st_size == size == s._stage_log.size
        crash(s)
        filler.unlink()
        with BlockStore(path, quota=64 << 20, min_disk_free=0, sync=False) as s:
            assert set(s) == set(acked)
            assert all(s.get(g) == d for g, d in acked.items())
            assert s.stats().blocks == len(acked)
    finally:
        subprocess.run(["umount", str(disk)], check=True, capture_output=True)
