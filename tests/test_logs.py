"""Logs, heads, merging and snapshots end to end (storage/logs.py,
replica.py, snapshots.py through storage/namespace.py), over the in-process
block store (real sealing) and an in-process head board."""

import trio
import pytest

from overlay.wire.ids import Identity
from storage.blockapi import Kind
from storage.errors import BlockCorrupt, BlockNotFound
from storage.fs_errors import Exists, ReadOnly
from storage.localblocks import MemoryBlockAccess
from storage.logs import (BadLogHead, Log, LogCorrupt, LogForked, LogHead, LogReader,
                          LogRolledBack, MemoryHeadBoard, decode_head)
from storage.namespace import Namespace
from storage.records import Link, MkInode, FileType, encode_block, make_record
from storage.volume import create_volume
from storage.vv import VV

ROOT = 1


class Net:
    """One volume, its writers, one block store and one head board."""

    def __init__(self, nwriters=2):
        self.ids = [Identity.from_seed(b"writer %d" % i) for i in range(nwriters)]
        self.view, self.key = create_volume(self.ids[0], "test")
        for ident in self.ids[1:]:
            self.view = self.view.add_writer(self.ids[0], self.key, ident.public_key)
        self.blocks = MemoryBlockAccess(self.key)
        self.board = MemoryHeadBoard()

    async def mount(self, i, blocks=None, board=None, **kw):
        ident = self.ids[i] if isinstance(i, int) else i
        return await Namespace.mount(self.view, ident, blocks or self.blocks,
                                     board or self.board, **kw)


async def tree(ns, ino=ROOT, prefix=b""):
    """Path -> (mode, size, content or target) of everything below ino."""
    out = {}
    for name, a in await ns.readdir(ino):
        p = prefix + b"/" + name
        if a.is_dir:
            out[p] = (a.mode, None)
            out.update(await tree(ns, a.ino, p))
        elif a.mode & 0o170000 == 0o120000:
            out[p] = (a.mode, await ns.readlink(a.ino))
        else:
            out[p] = (a.mode, await ns.read(a.ino, 0, a.size + 10))
    return out


async def test_two_writers_see_each_other_after_refresh():
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    fa = await a.create(ROOT, b"from-a", 0o644, 0, 0)
    await a.write(fa.ino, 0, b"A" * 100)
    d = await b.mkdir(ROOT, b"dir-b", 0o755, 0, 0)
    fb = await b.create(d.ino, b"f", 0o600, 0, 0)
    await b.write(fb.ino, 0, b"B" * 70000)   # goes to a DATA block
    assert set(await tree(a)) == {b"/from-a"}        # nothing published yet
    await a.sync()
    await b.sync()
    await a.refresh()
    await b.refresh()
    ta, tb = await tree(a), await tree(b)
    assert ta == tb and set(ta) == {b"/from-a", b"/dir-b", b"/dir-b/f"}
    assert ta[b"/dir-b/f"][1] == b"B" * 70000
    assert a._st.canonical() == b._st.canonical()
    assert not a.problems and not b.problems


async def test_group_commit_one_block_and_one_head_per_sync():
    net = Net(1)
    a = await net.mount(0)
    before = net.board.publishes
    for i in range(50):
        f = await a.create(ROOT, b"f%d" % i, 0o644, 0, 0)
        await a.write(f.ino, 0, b"x" * 100)
    puts = net.blocks.puts
    await a.sync()
    assert net.blocks.puts - puts == 1          # 150 records, one RECORD block
    assert net.board.publishes - before == 1    # one head
    c = await net.mount(0, use_snapshots=False)
    assert c.reader.blocks_fetched <= 3 and len(await c.readdir(ROOT)) == 50


async def test_partitioned_writers_edit_one_file_and_both_versions_survive():
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    f = await a.create(ROOT, b"doc", 0o644, 0, 0)
    await a.write(f.ino, 0, b"original text")
    await a.sync()
    await b.refresh()
    await a.refresh()
    # Split: each side gets its own copy of the stores.
    blocks_b, board_b = MemoryBlockAccess(net.key), MemoryHeadBoard()
    blocks_b.absorb(net.blocks)
    board_b.absorb(net.board)
    b.blocks, b.board = blocks_b, board_b
    b.reader.blocks = blocks_b
    b.log.blocks = blocks_b
    await a.write(f.ino, 0, b"ORIGINAL")           # side A
    await a.sync()
    await b.setattr(f.ino, size=0)                 # side B rewrites the file
    await b.write(f.ino, 0, b"rewritten by b")
    await b.sync()
    await a.refresh()
    await b.refresh()
    assert (await a.read(f.ino, 0, 100)) == b"ORIGINAL text"
    assert (await b.read(f.ino, 0, 100)) == b"rewritten by b"
    assert not a.conflicts() and not b.conflicts()
    # Heal.
    net.blocks.absorb(blocks_b)
    blocks_b.absorb(net.blocks)
    net.board.absorb(board_b)
    board_b.absorb(net.board)
    await a.refresh()
    await b.refresh()
    await a.refresh()
    for ns in (a, b):
        (c,) = ns.conflicts()
        assert c.kind == "data" and c.name == b"doc"
        versions = {await ns.read(f.ino, 0, 100), await ns.read(c.copy_ino, 0, 100)}
        assert versions == {b"ORIGINAL text", b"rewritten by b"}
        assert (await ns.lookup(ROOT, c.copy_name)).ino == c.copy_ino
    assert await tree(a) == await tree(b)
    assert a._st.canonical() == b._st.canonical()


async def test_rolled_back_head_is_detected():
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    await a.create(ROOT, b"one", 0o644, 0, 0)
    await a.sync()
    old = net.board.heads[net.ids[0].id]
    await a.create(ROOT, b"two", 0o644, 0, 0)
    await a.sync()
    await b.refresh()
    assert [n for n, _ in await b.readdir(ROOT)] == [b"one", b"two"]
    net.board.heads[net.ids[0].id] = old          # storage serves a stale head
    await b.refresh()
    assert isinstance(b.problems[net.ids[0].id], LogRolledBack)
    assert [n for n, _ in await b.readdir(ROOT)] == [b"one", b"two"]   # nothing undone


async def test_forked_heads_are_detected():
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    await a.create(ROOT, b"base", 0o644, 0, 0)
    await a.sync()
    head = decode_head(net.board.heads[net.ids[0].id])
    await b.refresh()
    # The writer (or a thief of its key) builds two different continuations
    # from the same head.
    other = Log(net.view.volume, net.ids[0], net.blocks, head=head)
    rec = other.append(head.vv, MkInode((1 << 40) | 99, FileType.REG, 0o644, 0, 0))
    other.append(rec.vv, Link(ROOT, b"evil", (1 << 40) | 99))
    await other.commit()
    evil = other.make_head(head.vv)
    await a.create(ROOT, b"good", 0o644, 0, 0)
    await a.sync()
    good = a._published
    assert evil.n == good.n and evil.seq == good.seq and evil.block != good.block
    reader = LogReader(net.view.volume, net.blocks)
    reader.accept_head(good.encode(), net.ids[0].public_key)
    with pytest.raises(LogForked):
        reader.accept_head(evil.encode(), net.ids[0].public_key)
    # A longer forked history is caught where it leaves the chain already read.
    await b.refresh()
    for _ in range(3):
        rec = other.append(rec.vv, Link(ROOT, b"e%d" % other.seq, (1 << 40) | 99))
    await other.commit()
    net.board.heads[net.ids[0].id] = other.make_head(head.vv).encode()
    await b.refresh()
    assert isinstance(b.problems[net.ids[0].id], LogForked)
    assert b"evil" not in [n for n, _ in await b.readdir(ROOT)]


async def test_bad_heads_are_refused():
    net = Net(2)
    a = await net.mount(0)
    await a.sync()
    raw = net.board.heads[net.ids[0].id]
    reader = LogReader(net.view.volume, net.blocks)
    with pytest.raises(BadLogHead):                   # someone else's key
        reader.accept_head(raw, net.ids[1].public_key)
    flipped = bytearray(raw)
    flipped[-1] ^= 1
    with pytest.raises(BadLogHead):                   # signature broken
        reader.accept_head(bytes(flipped), net.ids[0].public_key)
    with pytest.raises(BadLogHead):
        reader.accept_head(b"\x93garbage", net.ids[0].public_key)
    other_vol = LogReader(b"\x00" * 32, net.blocks)
    with pytest.raises(BadLogHead):
        other_vol.accept_head(raw, net.ids[0].public_key)


async def test_corrupt_or_missing_log_blocks():
    net = Net(2)
    a = await net.mount(0)
    await a.create(ROOT, b"x", 0o644, 0, 0)
    await a.sync()
    head = decode_head(net.board.heads[net.ids[0].id])
    sealed = net.blocks.blocks[head.block]
    net.blocks.blocks[head.block] = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(BlockCorrupt):
        await LogReader(net.view.volume, net.blocks).read_new(head)
    del net.blocks.blocks[head.block]
    with pytest.raises(BlockNotFound):
        await LogReader(net.view.volume, net.blocks).read_new(head)
    # A block of another writer spliced in: refused as corrupt.
    w2 = net.ids[1].id
    raw = encode_block(net.view.volume, w2, None,
                       [make_record(w2, 1, VV(), 0, __import__("storage.records").records.End(
                           net.view.volume))])
    g = await net.blocks.put(Kind.RECORD, raw)
    fake = LogHead.make(net.ids[0], net.view.volume, 1, g, VV({net.ids[0].id: 1}), 9,
                        time_ns=0)
    with pytest.raises(LogCorrupt):
        await LogReader(net.view.volume, net.blocks).read_new(fake)


async def test_mount_from_snapshot_replays_only_newer_records():
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    d = await a.mkdir(ROOT, b"d", 0o755, 0, 0)
    for i in range(60):
        f = await a.create(d.ino, b"f%02d" % i, 0o644, 0, 0)
        await a.write(f.ino, 0, b"%d" % i * 1000)
        if i % 20 == 19:
            await a.sync()
    await b.refresh()        # b has seen everything: a's records settle
    await a.refresh()
    root = await a.snapshot()
    assert root is not None
    for i in range(5):
        await a.create(ROOT, b"late%d" % i, 0o644, 0, 0)
    await a.sync()
    full = await net.mount(1, use_snapshots=False)
    snap = await net.mount(1)
    assert snap.snapshot_used is not None and snap.snapshot_used.root == root
    assert full.reader.records_fetched > 180
    assert snap.reader.records_fetched <= 12     # 5 creates (10 records) + the mark
    assert await tree(snap) == await tree(full)
    # The mounted client keeps working from there.
    await snap.write((await snap.lookup(ROOT, b"late0")).ino, 0, b"after")
    await snap.sync()
    await a.refresh()
    assert await a.read((await a.lookup(ROOT, b"late0")).ino, 0, 10) == b"after"


async def test_snapshots_are_incremental_and_convergent():
    net = Net(1)
    a = await net.mount(0)
    for i in range(300):
        await a.create(ROOT, b"n%03d" % i, 0o644, 0, 0)
    await a.sync()
    await a.snapshot()
    first_pages = dict(a.snapshots.page_refs)
    puts = a.snapshots.blocks_put
    f = await a.lookup(ROOT, b"n007")
    await a.setattr(f.ino, mode=0o600)
    await a.sync()
    await a.snapshot()
    changed = {p for p in first_pages if first_pages[p] != a.snapshots.page_refs[p]}
    # the file's page and the root directory's page; plus index and conflict lists
    assert len(changed) <= 2 and a.snapshots.blocks_put - puts <= 5
    # A writer snapshotting the same state from scratch stores the same pages.
    other = await net.mount(0, use_snapshots=False)
    await other.snapshot()
    assert other.snapshots.page_refs == a.snapshots.page_refs


async def test_removed_writer_is_ignored_after_its_last_counted_record():
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    await b.create(ROOT, b"kept", 0o644, 0, 0)
    await b.sync()
    last = b.log.seq
    await b.create(ROOT, b"dropped", 0o644, 0, 0)
    await b.sync()
    net.view = net.view.remove_writer(net.ids[0], net.ids[1].id, last)
    c = await net.mount(0)
    assert [n for n, _ in await c.readdir(ROOT)] == [b"kept"]
    gone = await net.mount(1)
    with pytest.raises(ReadOnly):
        await gone.create(ROOT, b"x", 0o644, 0, 0)


async def test_a_reader_that_is_not_a_participant():
    net = Net(1)
    a = await net.mount(0)
    f = await a.create(ROOT, b"f", 0o644, 0, 0)
    await a.write(f.ino, 0, b"data")
    await a.sync()
    r = await net.mount(Identity.from_seed(b"outsider"))
    assert await r.read(f.ino, 0, 10) == b"data"
    with pytest.raises(ReadOnly):
        await r.mkdir(ROOT, b"d", 0o755, 0, 0)


async def test_exclusive_create_race_has_one_winner(autojump_clock):
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    results = {}

    async def go(ns, tag):
        try:
            results[tag] = await ns.create(ROOT, b"lock", 0o644, 0, 0, exclusive=True)
        except Exists:
            results[tag] = None

    async with trio.open_nursery() as n:
        n.start_soon(go, a, "a")
        n.start_soon(go, b, "b")
    await a.sync()
    await b.sync()
    await a.refresh()
    await b.refresh()
    winners = [t for t, r in results.items() if r is not None]
    assert len(winners) == 1
    assert [n for n, _ in await a.readdir(ROOT)] == [b"lock"] == \
        [n for n, _ in await b.readdir(ROOT)]
    assert not a.conflicts()


async def test_a_broken_promise_rebuilds_from_the_logs():
    """A writer publishes a head promising it saw the other's records, then
    writes a record that did not see them. Readers that settled on the
    promise rebuild from the logs and still agree with a fresh replay."""
    net = Net(2)
    a, b = await net.mount(0), await net.mount(1)
    for i in range(3):
        await a.create(ROOT, b"a%d" % i, 0o644, 0, 0)
    await a.sync()
    await b.refresh()          # b's head promises a's records
    await a.refresh()          # a settles them
    assert a.replica.settled > 0
    head = decode_head(net.board.heads[net.ids[1].id])
    assert head.vv[net.ids[0].id] > b.log.last_vv[net.ids[0].id]
    bad = Log(net.view.volume, net.ids[1], net.blocks, head=head)
    bad.last_vv = b.log.last_vv        # its records only: not what its head promised
    ino = (2 << 40) | 77
    r = bad.append(VV(), MkInode(ino, FileType.REG, 0o644, 0, 0))
    bad.append(r.vv, Link(ROOT, b"late", ino))
    await bad.commit()
    net.board.heads[net.ids[1].id] = LogHead.make(
        net.ids[1], net.view.volume, bad.committed, bad.block,
        head.vv.with_entry(net.ids[1].id, bad.committed), bad.n + 1, time_ns=0).encode()
    await a.refresh()
    assert not a.problems and a.rebuilds == 1
    fresh = await net.mount(0, use_snapshots=False)
    assert await tree(a) == await tree(fresh)
    assert b"/late" in await tree(a) or any(c.name == b"late" for c in a.conflicts())


async def test_local_cache_serves_a_remount_and_remembers_heads(tmp_path):
    from storage.logcache import LogCache
    net = Net(2)
    a = await net.mount(0)
    for i in range(20):
        f = await a.create(ROOT, b"f%d" % i, 0o644, 0, 0)
        await a.write(f.ino, 0, b"y" * 20000)
    await a.sync()
    stale = net.board.heads[net.ids[0].id]
    await a.create(ROOT, b"newest", 0o644, 0, 0)
    await a.sync()
    cache = LogCache(tmp_path / "cache")
    try:
        b = await net.mount(1, cache=cache)
        want = await tree(b)
        gets = net.blocks.gets
        again = await net.mount(1, cache=cache)
        assert await tree(again) == want
        assert net.blocks.gets == gets            # everything came from the cache
        assert again.blocks.hits > 0
        # After a restart, a head older than one accepted before is refused.
        net.board.heads[net.ids[0].id] = stale
        later = await net.mount(1, cache=cache)
        assert isinstance(later.problems[net.ids[0].id], LogRolledBack)
        assert await tree(later) == want          # read from the head it had accepted
    finally:
        cache.close()


async def test_view_changes_reach_a_mounted_client():
    net = Net(1)
    a = await net.mount(0)
    newcomer = Identity.from_seed(b"newcomer")
    await a.create(ROOT, b"before", 0o644, 0, 0)
    await a.sync()
    net.view = net.view.add_writer(net.ids[0], net.key, newcomer.public_key,
                                   a.replica.knowledge)
    await a.update_view(net.view)
    c = await net.mount(newcomer)
    await c.create(ROOT, b"from-c", 0o644, 0, 0)
    await c.create(ROOT, b"too-late", 0o644, 0, 0)
    await c.sync()
    await a.refresh()
    assert [n for n, _ in await a.readdir(ROOT)] == [b"before", b"from-c", b"too-late"]
    net.view = net.view.remove_writer(net.ids[0], newcomer.id, c.log.seq - 2)
    await a.update_view(net.view)
    assert [n for n, _ in await a.readdir(ROOT)] == [b"before", b"from-c"]
    await c.update_view(net.view)
    with pytest.raises(ReadOnly):
        await c.mkdir(ROOT, b"x", 0o755, 0, 0)


async def test_snapshots_are_taken_automatically():
    net = Net(1)
    a = await net.mount(0, snapshot_every=40)
    for i in range(30):
        await a.create(ROOT, b"f%d" % i, 0o644, 0, 0)   # 60 records
    assert decode_head(net.board.heads[net.ids[0].id]).snap is None
    await a.sync()
    snap = decode_head(net.board.heads[net.ids[0].id]).snap
    assert snap is not None
    again = await net.mount(0)
    assert again.snapshot_used.root == snap and again.reader.records_fetched <= 2
    assert len(await again.readdir(ROOT)) == 30


async def test_a_writer_whose_own_log_is_unreadable_stays_read_only():
    net = Net(1)
    a = await net.mount(0)
    await a.create(ROOT, b"x", 0o644, 0, 0)
    await a.sync()
    head = decode_head(net.board.heads[net.ids[0].id])
    del net.blocks.blocks[head.block]            # storage lost our newest block
    again = await net.mount(0)
    assert isinstance(again.problems[net.ids[0].id], BlockNotFound)
    with pytest.raises(ReadOnly):                # starting over would fork the log
        await again.mkdir(ROOT, b"d", 0o755, 0, 0)


# --------------------------------------------------------------------------
# Views and the volume key (storage/volume.py)


def test_volume_key_is_wrapped_for_each_participant_only():
    from storage.volume import (BadView, KeyUnwrapError, View, x25519_private,
                                x25519_public)
    owner, w, stranger = (Identity.from_seed(b"v%d" % i) for i in range(3))
    for ident in (owner, w, stranger):   # the Ed25519 -> X25519 map matches both halves
        assert x25519_private(ident).public_key().public_bytes_raw() == \
            x25519_public(ident.public_key)
    view, key = create_volume(owner, "home")
    view2 = view.add_writer(owner, key, w.public_key, VV({owner.id: 3}))
    decoded = View.decode(view2.encode())
    assert decoded == view2 and decoded.volume_key(w) == key == decoded.volume_key(owner)
    assert decoded.participant(w.id).index == 1 and decoded.participant(w.id).joined[owner.id] == 3
    view2.check_successor(view)
    with pytest.raises(KeyUnwrapError):
        decoded.volume_key(stranger)
    with pytest.raises(BadView):
        view.add_writer(stranger, key, stranger.public_key)       # only the owner
    tampered = bytearray(view2.encode())
    tampered[tampered.index(b"home")] ^= 1
    with pytest.raises(BadView):
        View.decode(bytes(tampered))
    with pytest.raises(BadView):
        View.decode(b"\xc1not a view")
    removed = view2.remove_writer(owner, w.id, 7)
    removed.check_successor(view2)
    assert removed.active_ids() == {owner.id}
    with pytest.raises(BadView):
        view.check_successor(removed)                              # versions only go up
    with pytest.raises(BadView):
        removed.remove_writer(owner, w.id, 9)                      # removal is final


async def test_a_bad_snapshot_is_skipped_for_the_logs():
    from storage.fsstate import Entry, FsState
    from storage.snapshots import SnapshotWriter
    net = Net(1)
    a = await net.mount(0)
    await a.create(ROOT, b"real", 0o644, 0, 0)
    await a.sync()
    # A snapshot whose root directory names an inode that is not there.
    broken = FsState()
    broken.inodes[ROOT].entries[b"ghost"] = Entry(12345, None)
    w = SnapshotWriter(net.blocks, net.view.volume, net.ids[0].id)
    bad = await w.write(broken, a.replica.knowledge, None, {}, time_ns=0)
    await net.board.publish(a.log.make_head(a.replica.knowledge, snap=bad))
    m = await net.mount(0)
    assert m.snapshot_used is None and m.bad_snapshots
    assert [n for n, _ in await m.readdir(ROOT)] == [b"real"]
    # And one whose root block is corrupt.
    sealed = net.blocks.blocks[bad]
    net.blocks.blocks[bad] = sealed[:-1] + bytes([sealed[-1] ^ 1])
    m2 = await net.mount(0)
    assert isinstance(m2.bad_snapshots[0][1], BlockCorrupt)
    assert [n for n, _ in await m2.readdir(ROOT)] == [b"real"]


async def test_mutated_snapshot_pages_raise_only_snapshot_errors():
    """Field-by-field damage to a snapshot page (re-sealed, so it passes the
    block checks) is refused with SnapshotError, never a crash."""
    import random
    import msgpack
    from storage.snapshots import SnapshotError, load_info, load_state
    net = Net(1)
    a = await net.mount(0)
    f = await a.create(ROOT, b"f", 0o644, 0, 0)
    await a.write(f.ino, 0, b"q" * 5000)
    await a.symlink(ROOT, b"l", b"target", 0, 0)
    d = await a.mkdir(ROOT, b"d", 0o755, 0, 0)
    await a.setxattr(d.ino, b"user.k", b"v")
    await a.sync()
    root = await a.snapshot()
    info = await load_info(net.blocks, root, net.view.volume)
    await load_state(net.blocks, info)
    pages = dict(info.pages)
    rnd = random.Random(5)
    junk = [None, -1, 2**40, b"", b"x" * 33, "s", [], {}, [1, 2], 1.5, True]
    for trial in range(150):
        p, g = rnd.choice(sorted(pages.items()))
        page = msgpack.unpackb(await net.blocks.get(g, Kind.SNAPSHOT), raw=False)
        node = rnd.choice(page["n"])
        key = rnd.choice(sorted(node))
        node[key] = rnd.choice(junk)
        g2 = await net.blocks.put(Kind.SNAPSHOT, msgpack.packb(page, use_bin_type=True))
        info2 = await load_info(net.blocks, root, net.view.volume)
        info2.index = list(info.index)
        saved = dict(pages)
        saved[p] = g2
        idx = await net.blocks.put(Kind.SNAPSHOT, msgpack.packb(
            {"v": 1, "l": [[k, v] for k, v in sorted(saved.items())]}, use_bin_type=True))
        info2.index = [idx]
        try:
            await load_state(net.blocks, info2)
        except SnapshotError:
            pass
