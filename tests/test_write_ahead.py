"""Write-ahead log-heads (storage/session.py ``sync``, storage/logs.py
``HeadBoard.publish_ahead``): a close makes its head durable locally while
the record blocks it names are being stored. What must hold (DESIGN.md
"What must always hold"): whatever a close returned for survives a crash of
the client, and no head is released (shown to others, certified) before
the blocks it names are stored."""

from __future__ import annotations

import pytest

from overlay.wire.ids import Identity
from storage.blockapi import Kind
from storage.errors import StorageError, TooFewHolders
from storage.localblocks import MemoryBlockAccess
from storage.localstore import LocalHeadBoard
from storage.logs import LogHead, decode_head
from storage.namespace import INLINE_MAX, Namespace
from storage.volume import create_volume

ROOT = 1


class FlakyBlocks(MemoryBlockAccess):
    """In-process blocks whose puts fail while ``down`` is set (a network
    that cannot reach r holders)."""

    def __init__(self, key: bytes):
        super().__init__(key)
        self.down = False

    async def put(self, kind: Kind, plaintext: bytes) -> bytes:
        if self.down:
            raise TooFewHolders("no holders reachable (test)")
        return await super().put(kind, plaintext)


class WatchedBoard(LocalHeadBoard):
    """A local board that checks, at every release, that the blocks the
    head names are stored."""

    def __init__(self, path, blocks: MemoryBlockAccess):
        super().__init__(path)
        self.blocks = blocks
        self.released: list[int] = []

    async def release(self, head) -> None:
        assert head.block in self.blocks.blocks, "a head released before its blocks"
        self.released.append(head.n)


@pytest.fixture
def volume():
    ident = Identity.from_seed(b"write-ahead tests")
    view, key = create_volume(ident, "wa")
    return ident, view, key


async def test_closes_write_their_head_ahead_and_release_it_once_stored(tmp_path, volume):
    ident, view, key = volume
    blocks = FlakyBlocks(key)
    board = WatchedBoard(tmp_path / "heads", blocks)
    ns = await Namespace.mount(view, ident, blocks, board)
    for i in range(3):
        a = await ns.create(ROOT, f"f{i}", 0o644, 0, 0)
        await ns.write(a.ino, 0, b"x" * (i + 1))
        await ns.sync()
    assert len(board.released) >= 3
    # The journal kept with the newest head is the block that head names.
    journal = await board.journal(ident.id)
    own = decode_head((await board.fetch([ident.id]))[ident.id])
    assert [blocks.name_of(Kind(k), raw) for k, raw in journal][-1] == own.block
    assert {k for k, _ in journal} == {Kind.RECORD}     # small writes go inline
    board.close()


async def test_a_crash_before_the_blocks_are_stored_is_repaired_at_the_next_mount(
        tmp_path, volume):
    ident, view, key = volume
    blocks = FlakyBlocks(key)
    board = WatchedBoard(tmp_path / "heads", blocks)
    ns = await Namespace.mount(view, ident, blocks, board)
    a = await ns.create(ROOT, "kept", 0o644, 0, 0)
    await ns.write(a.ino, 0, b"acknowledged")
    await ns.sync()
    b = await ns.create(ROOT, "late", 0o644, 0, 0)
    await ns.write(b.ino, 0, b"written while the holders were gone")
    blocks.down = True
    released = list(board.released)
    with pytest.raises(TooFewHolders):
        await ns.sync()
    # The head went ahead (durable, with its journal) but was not released.
    own = decode_head((await board.fetch([ident.id]))[ident.id])
    assert own.block not in blocks.blocks
    assert board.released == released
    board.close()
    # The client "crashes" here: the next mount finds the journal, stores
    # its blocks, releases the head, and sees both files.
    blocks.down = False
    board = WatchedBoard(tmp_path / "heads", blocks)
    ns2 = await Namespace.mount(view, ident, blocks, board)
    assert own.block in blocks.blocks and own.n in board.released
    for name, data in ((b"kept", b"acknowledged"), (b"late", b"written while the holders were gone")):
        attr = await ns2.lookup(ROOT, name)
        assert await ns2.read(attr.ino, 0, 100) == data
    board.close()


async def test_the_next_sync_stores_what_a_failed_one_could_not(tmp_path, volume):
    ident, view, key = volume
    blocks = FlakyBlocks(key)
    board = WatchedBoard(tmp_path / "heads", blocks)
    ns = await Namespace.mount(view, ident, blocks, board)
    a = await ns.create(ROOT, "f", 0o644, 0, 0)
    blocks.down = True
    with pytest.raises(StorageError):
        await ns.sync()
    blocks.down = False
    await ns.sync()             # nothing new queued: stores the journal, releases
    own = decode_head((await board.fetch([ident.id]))[ident.id])
    assert own.block in blocks.blocks and board.released[-1] == own.n
    await ns.write(a.ino, 0, b"more")
    await ns.sync()
    # A reader of the blocks and the board alone sees everything.
    other = await Namespace.mount(view, ident, blocks, board)
    attr = await other.lookup(ROOT, "f")
    assert await other.read(attr.ino, 0, 10) == b"more"
    board.close()


async def test_a_plain_publish_clears_the_journal_and_it_survives_reopening(tmp_path, volume):
    ident, view, key = volume
    blocks = MemoryBlockAccess(key)
    board = LocalHeadBoard(tmp_path / "heads")
    ns = await Namespace.mount(view, ident, blocks, board)
    await ns.create(ROOT, "f", 0o644, 0, 0)
    await ns.sync()
    journal = await board.journal(ident.id)
    assert journal
    board.close()
    board = LocalHeadBoard(tmp_path / "heads")
    assert await board.journal(ident.id) == journal
    head = decode_head((await board.fetch([ident.id]))[ident.id])
    newer = LogHead.make(ident, view.volume, head.seq, head.block, head.vv, head.n + 1,
                         time_ns=head.time + 1, snap=head.snap)
    await board.publish(newer)
    assert await board.journal(ident.id) == []
    board.close()


async def test_small_files_data_is_stored_with_its_records_and_readable_before(
        tmp_path, volume):
    """File data written in pieces is named ahead, read back from memory
    before the sync, stored in the same batch as the records (one round
    trip per close) and journaled with the head: a crash before it is
    stored loses nothing the next mount cannot restore."""
    ident, view, key = volume
    blocks = FlakyBlocks(key)
    board = WatchedBoard(tmp_path / "heads", blocks)
    ns = await Namespace.mount(view, ident, blocks, board)
    body = bytes(range(256)) * 300                      # 76,800 bytes: two DATA blocks
    assert len(body) > INLINE_MAX
    a = await ns.create(ROOT, "obj.o", 0o644, 0, 0)
    blocks.down = True                                  # nothing can be stored now
    await ns.write(a.ino, 0, body)
    assert await ns.read(a.ino, 0, len(body)) == body   # from the deferred blocks
    with pytest.raises(StorageError):
        await ns.sync()
    kinds = [k for k, _ in await board.journal(ident.id)]
    assert kinds.count(Kind.DATA) == 2 and kinds[-1] == Kind.RECORD
    board.close()
    blocks.down = False                                 # the client crashed; back up
    board = WatchedBoard(tmp_path / "heads", blocks)
    ns2 = await Namespace.mount(view, ident, blocks, board)
    attr = await ns2.lookup(ROOT, "obj.o")
    assert await ns2.read(attr.ino, 0, len(body) + 1) == body
    # And without a failure, one sync stores data and records together.
    before = blocks.puts
    b = await ns2.create(ROOT, "next.o", 0o644, 0, 0)
    await ns2.write(b.ino, 0, body)
    assert blocks.puts == before                        # nothing stored by the write
    await ns2.sync()
    assert blocks.puts > before and not ns2._deferred
    board.close()
