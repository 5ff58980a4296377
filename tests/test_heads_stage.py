"""The head board's staging log (``storage.heads_stage``): a staged head is
read back at once, committed to LMDB after its delay, by ``flush`` and by
``close``; what a killed process left staged is committed at the next open;
a torn tail loses only itself; staleness is refused as before; one process
stages at a time; fsync(2) through a session commits what is staged."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import lmdb
import msgpack
import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from overlay.wire.ids import Identity
from storage.errors import StorageError, StoreFull
from storage.fsstate import ROOT_INO
from storage.heads_stage import AHEAD_FILE, AheadLog, decode_entries, encode_entry
from storage.localblocks import MemoryBlockAccess
from storage.localstore import LocalHeadBoard, StaleHead
from storage.logs import LogHead, decode_head
from storage.namespace import Namespace
from storage.volume import create_volume
from storage.vv import VV

ROOT = Path(__file__).resolve().parent.parent
WRITERS = [Identity.from_seed(b"heads stage %d" % i) for i in range(2)]


def _head(ident, n, seq=None):
    seq = n if seq is None else seq
    return LogHead.make(ident, bytes(32), seq, bytes([n % 256]) * 32, VV({ident.id: seq}), n,
                        time_ns=n)


OPEN: dict[Path, LocalHeadBoard] = {}     # boards open in this process, by path


def committed(path: Path) -> dict[bytes, tuple[int, list | None]]:
    """What the board's LMDB holds, read directly (not through the staged
    heads): writer -> (n, journal). An environment open in this process
    must be read through its own handle (LMDB allows one per process)."""
    board = OPEN.get(path)
    own = board is None or board._env is None
    env = lmdb.open(str(path), max_dbs=4, readonly=True, lock=False) if own else board._env
    try:
        with env.begin() as txn:
            heads = env.open_db(b"heads", txn=txn, create=False)
            journal = env.open_db(b"journal", txn=txn, create=False)
            out = {}
            for w, raw in txn.cursor(db=heads):
                j = txn.get(w, db=journal)
                out[bytes(w)] = (decode_head(bytes(raw)).n,
                                 None if j is None else msgpack.unpackb(bytes(j)))
            return out
    finally:
        if own:
            env.close()


def Board(path: Path, **kw) -> LocalHeadBoard:
    b = OPEN[path] = LocalHeadBoard(path, **kw)
    return b


def log_size(path: Path) -> int:
    return (path / AHEAD_FILE).stat().st_size


async def test_a_staged_head_is_read_back_at_once_and_committed_after_its_delay(tmp_path):
    a = WRITERS[0]
    board = Board(tmp_path, stage=True, stage_delay=0.2)
    h = _head(a, 1)
    await board.publish_ahead(h, [(1, b"record")])
    assert decode_head((await board.fetch([a.id]))[a.id]) == h
    assert await board.journal(a.id) == [(1, b"record")]
    assert committed(tmp_path) == {} and log_size(tmp_path) > 0
    await trio.sleep(0.6)
    assert committed(tmp_path) == {a.id: (1, [[1, b"record"]])}
    assert log_size(tmp_path) == 0                  # the log keeps only what is staged
    assert await board.journal(a.id) == [(1, b"record")]
    board.close()


async def test_flush_commits_at_once_and_close_commits_the_rest(tmp_path):
    a, b = WRITERS
    board = Board(tmp_path, stage=True, stage_delay=60)
    await board.publish_ahead(_head(a, 1), [(1, b"x")])
    await board.flush()
    assert committed(tmp_path) == {a.id: (1, [[1, b"x"]])}
    await board.publish(_head(a, 2))                # a plain publish clears the journal
    await board.publish_ahead(_head(b, 7), [])
    assert await board.journal(a.id) == []
    board.close()
    assert committed(tmp_path) == {a.id: (2, None), b.id: (7, None)}
    assert log_size(tmp_path) == 0


async def test_stale_heads_are_refused_while_staged_as_when_stored(tmp_path):
    a = WRITERS[0]
    board = Board(tmp_path, stage=True, stage_delay=60)
    h2 = _head(a, 2)
    await board.publish(h2)
    await board.publish(h2)                         # the same head again: fine
    with pytest.raises(StaleHead):
        await board.publish(_head(a, 1))
    with pytest.raises(StaleHead):
        await board.publish(_head(a, 2, seq=3))     # same counter, other contents
    board.close()
    board = Board(tmp_path, stage=True, stage_delay=60)
    with pytest.raises(StaleHead):                  # against the committed head too
        await board.publish(_head(a, 2, seq=3))
    await board.publish(_head(a, 3))
    board.close()
    assert committed(tmp_path)[a.id][0] == 3


def crash(board: LocalHeadBoard) -> None:
    """What a killed process leaves: the log as written, nothing committed."""
    board._ahead.close()
    board._env.close()
    board._env = board._ahead = None


async def test_what_a_crash_left_staged_is_committed_at_the_next_open(tmp_path):
    a, b = WRITERS
    board = Board(tmp_path, stage=True, stage_delay=60)
    await board.publish(_head(a, 1))
    await board.flush()
    await board.publish_ahead(_head(a, 2), [(1, b"r2")])
    await board.publish_ahead(_head(a, 3), [(1, b"r3"), (2, b"d3")])
    await board.publish_ahead(_head(b, 5), [])
    crash(board)
    assert committed(tmp_path) == {a.id: (1, None)}
    # A tool opening it (no staging) replays, as the mount would.
    board = Board(tmp_path)
    assert committed(tmp_path) == {a.id: (3, [[1, b"r3"], [2, b"d3"]]), b.id: (5, None)}
    assert await board.journal(a.id) == [(1, b"r3"), (2, b"d3")]
    board.close()
    assert log_size(tmp_path) == 0


async def test_a_torn_or_damaged_tail_loses_only_itself(tmp_path):
    a, b = WRITERS
    board = Board(tmp_path, stage=True, stage_delay=60)
    await board.publish_ahead(_head(a, 1), [(1, b"one")])
    await board.publish_ahead(_head(b, 1), [])
    whole = log_size(tmp_path)
    await board.publish_ahead(_head(a, 2), [(1, b"two")])
    crash(board)
    log_path = tmp_path / AHEAD_FILE
    data = log_path.read_bytes()
    for damaged in (data[:-3],                                   # torn in the middle
                    data[:whole + 10],                           # torn in the header
                    data[:-1] + bytes([data[-1] ^ 1]),           # a flipped bit
                    data[:whole] + b"\0" * 100):                 # zeros a crash left
        log_path.write_bytes(damaged)
        Board(tmp_path, stage=True).close()
        assert committed(tmp_path) == {a.id: (1, [[1, b"one"]]), b.id: (1, None)}
        assert log_size(tmp_path) == 0


async def test_old_and_repeated_entries_replay_to_the_newest_head(tmp_path):
    """A commit rewrites the log; a crash in the middle may leave entries
    already committed, in any order: the newest head per writer wins."""
    a = WRITERS[0]
    heads = [_head(a, n) for n in (1, 2, 3)]
    board = Board(tmp_path, stage=True, stage_delay=60)
    await board.publish(heads[1])
    board.close()
    (tmp_path / AHEAD_FILE).write_bytes(b"".join(encode_entry(h.encode(), None)
                                                 for h in (heads[2], heads[0], heads[2])))
    Board(tmp_path).close()
    assert committed(tmp_path)[a.id][0] == 3
    (tmp_path / AHEAD_FILE).write_bytes(encode_entry(heads[0].encode(), msgpack.packb([])))
    Board(tmp_path).close()
    assert committed(tmp_path)[a.id] == (3, None)   # an old entry does not roll it back


async def test_a_second_process_cannot_stage_and_a_tool_reads_what_is_committed(tmp_path):
    a = WRITERS[0]
    board = Board(tmp_path, stage=True, stage_delay=60)
    await board.publish(_head(a, 1))
    await board.flush()
    await board.publish(_head(a, 2))
    code = ("import sys; from storage.localstore import LocalHeadBoard\n"
            "LocalHeadBoard(sys.argv[1], stage=True)\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0 and "in use by another process" in r.stderr
    # A tool (no staging) leaves the owner's log alone and sees what is committed.
    code = ("import sys, trio; from storage.localstore import LocalHeadBoard\n"
            "from storage.logs import decode_head\n"
            "b = LocalHeadBoard(sys.argv[1])\n"
            "print(decode_head(trio.run(b.fetch, [bytes.fromhex(sys.argv[2])])[\n"
            "    bytes.fromhex(sys.argv[2])]).n)\n"
            "b.close()\n")
    size = log_size(tmp_path)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path), a.id.hex()],
                       capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1"] and log_size(tmp_path) == size > 0
    board.close()
    assert committed(tmp_path)[a.id][0] == 2


def test_a_full_disk_refuses_the_publish_and_keeps_the_log_whole(tmp_path):
    log_ = AheadLog(tmp_path, own=True)
    log_.append(b"abc")
    fd = log_.fd
    log_.fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(StoreFull):
            log_.append(b"more")
    finally:
        os.close(log_.fd)
        log_.fd = fd
    assert log_.size == 3 and log_.read() == b"abc"
    log_.close()


CHILD = r"""
import sys, trio
from overlay.wire.ids import Identity
from storage.localstore import LocalHeadBoard
from storage.logs import LogHead
from storage.vv import VV

ident = Identity.from_seed(bytes.fromhex(sys.argv[2]))

async def main():
    board = LocalHeadBoard(sys.argv[1], stage=True, stage_delay=float(sys.argv[3]))
    n = 0
    while True:
        n += 1
        h = LogHead.make(ident, bytes(32), n, bytes(32), VV({ident.id: n}), n, time_ns=n)
        await board.publish_ahead(h, [(1, b"r%d" % n)])
        print(n, flush=True)
        await trio.sleep(0.002)

trio.run(main)
"""


@pytest.mark.parametrize("delay", [0.05, 60])
def test_kill_9_loses_no_acknowledged_head(tmp_path, delay):
    a = WRITERS[0]
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), b"heads stage 0".hex(), str(delay)],
        stdout=subprocess.PIPE, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    last = 0
    try:
        for _ in range(150):
            line = proc.stdout.readline()
            assert line, "child exited early"
            last = int(line)
        os.kill(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
        last = max([last] + [int(x) for x in rest.split()])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    Board(tmp_path).close()
    n, journal = committed(tmp_path)[a.id]
    assert n >= last and journal == [[1, b"r%d" % n]]


async def test_fsync_through_a_session_commits_what_is_staged(tmp_path):
    ident = WRITERS[0]
    view, key = create_volume(ident, "v")
    blocks = MemoryBlockAccess(key)
    board = Board(tmp_path, stage=True, stage_delay=60)
    ns = await Namespace.mount(view, ident, blocks, board)
    a = await ns.create(ROOT_INO, "f", 0o644, 0, 0)
    await ns.write(a.ino, 0, b"data")
    await ns.sync()                                 # a close: staged
    staged_n = decode_head((await board.fetch([ident.id]))[ident.id]).n
    assert committed(tmp_path).get(ident.id, (0,))[0] < staged_n
    await ns.fsync(a.ino)                           # fsync(2): committed
    assert committed(tmp_path)[ident.id][0] == staged_n
    board.close()


# --------------------------------------------------------------------------
# Property test: a staging board against a dict model, with crashes


class BoardVsModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="heads-stage-"))
        self.board = Board(self.dir, stage=True, stage_delay=3600)
        self.model: dict[bytes, tuple[int, list]] = {}      # writer -> (n, journal)
        self.durable: dict[bytes, tuple[int, list]] = {}    # what a power loss keeps

    def teardown(self):
        if self.board is not None and self.board._env is not None:
            self.board.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self, fn, *args):
        return trio.run(fn, *args)

    @rule(w=st.sampled_from([0, 1]), step=st.integers(-1, 2),
          journal=st.lists(st.binary(max_size=20), max_size=3))
    def publish(self, w, step, journal):
        ident = WRITERS[w]
        cur = self.model.get(ident.id, (0, []))[0]
        n = cur + step
        if n < 1:
            return
        items = [(1, j) for j in journal]
        if step <= 0:
            with pytest.raises(StaleHead):
                self._run(self.board.publish_ahead, _head(ident, n, seq=n + 1000), items)
            return
        self._run(self.board.publish_ahead, _head(ident, n), items)
        self.model[ident.id] = (n, items)

    @rule()
    def flush(self):
        self._run(self.board.flush)
        self.durable = dict(self.model)

    @rule()
    def crash_and_reopen(self):
        crash(self.board)
        self.board = Board(self.dir, stage=True, stage_delay=3600)
        self.durable = dict(self.model)         # a killed process loses nothing

    @rule()
    def close_and_reopen(self):
        self.board.close()
        self.board = Board(self.dir, stage=True, stage_delay=3600)
        self.durable = dict(self.model)

    @invariant()
    def reads_match_the_model(self):
        async def check():
            got = await self.board.fetch([w.id for w in WRITERS])
            assert {w: decode_head(raw).n for w, raw in got.items()} == {
                w: n for w, (n, _) in self.model.items()}
            for w, (_, items) in self.model.items():
                assert await self.board.journal(w) == items
        self._run(check)

    @invariant()
    def committed_is_at_least_what_was_made_durable(self):
        c = committed(self.dir)
        for w, (n, _) in self.durable.items():
            assert c[w][0] == n
        assert decode_entries((self.dir / AHEAD_FILE).read_bytes())[1] == log_size(self.dir)


BoardVsModel.TestCase.settings = settings(max_examples=30, stateful_step_count=25,
                                          deadline=None)
TestBoardVsModel = BoardVsModel.TestCase


def test_the_log_rejects_what_is_not_an_entry():
    good = encode_entry(b"head", None)
    assert decode_entries(good) == ([(b"head", None)], len(good))
    assert decode_entries(b"") == ([], 0)
    assert decode_entries(b"XXXX" + good[4:]) == ([], 0)
    bad_payload = msgpack.packb({"not": "a list"})
    forged = struct.pack(">4sI", b"P2HA", len(bad_payload)) + hashlib.sha256(
        bad_payload).digest() + bad_payload
    assert decode_entries(forged + good) == ([], 0)
    with pytest.raises(StorageError):
        AheadLog(Path("/nonexistent/dir"), own=True)
