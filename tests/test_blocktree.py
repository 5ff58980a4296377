"""Copy-on-write block trees (storage/blocktree.py): reads and writes against
a plain byte-array model, holes, truncation, sharing between versions, the
walks used by GC, and strict decoding of refs and INDIRECT blocks."""

import random

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from overlay.wire.ids import guid
from storage.blockapi import MAX_BLOCK, BlockAccess, Kind
from storage.blocktree import (
    DEFAULT_FANOUT, BadTree, BlockTree, TreeRef, decode_node, depth_for, encode_node,
)
from storage.errors import BadBlock, BlockNotFound, BlockTooLarge

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


class DictBlocks(BlockAccess):
    """An in-process BlockAccess for unit tests: plaintext in a dict under
    SHA-256(kind, plaintext), so equal blocks of one kind share a BGUID as
    with convergent sealing, and a block of one kind cannot be read as
    another. Counts calls, so tests can assert how many blocks were stored."""

    def __init__(self):
        self.blocks: dict[bytes, tuple[Kind, bytes]] = {}
        self.puts = 0          # blocks offered
        self.put_batches = 0
        self.gets = 0
        self.get_batches = 0
        self.data_get_batches = 0  # batches that fetched at least one DATA block

    async def put(self, kind, plaintext):
        return (await self.put_many([(kind, plaintext)]))[0]

    async def put_many(self, items):
        self.put_batches += 1
        out = []
        for kind, pt in items:
            if len(pt) > MAX_BLOCK:
                raise BlockTooLarge(f"{len(pt)} bytes")
            g = guid(bytes([kind]) + pt)
            self.blocks[g] = (Kind(kind), bytes(pt))
            self.puts += 1
            out.append(g)
        await trio.lowlevel.checkpoint()
        return out

    async def get(self, bguid, kind):
        return (await self.get_many([(bguid, kind)]))[0]

    async def get_many(self, items):
        self.get_batches += 1
        self.data_get_batches += any(k == Kind.DATA for _, k in items)
        out = []
        for g, kind in items:
            if g not in self.blocks:
                raise BlockNotFound("no such block", g)
            k, pt = self.blocks[g]
            if k != kind:
                raise BadBlock(f"a {k.name} block read as {Kind(kind).name}", g)
            self.gets += 1
            out.append(pt)
        await trio.lowlevel.checkpoint()
        return out


def small_tree(blocks=None, **kw):
    kw.setdefault("block_size", 8)
    kw.setdefault("fanout", 3)
    kw.setdefault("inline_max", 0)
    return BlockTree(blocks or DictBlocks(), **kw)


async def check_invariants(tree: BlockTree, ref: TreeRef):
    """Module invariants: minimal depth, nothing stored past the end, no
    stored all-zero leaf, no INDIRECT block ending in a hole."""
    ref.check()
    if ref.inline is not None or ref.root is None:
        return
    bs, fan = ref.block_size, ref.fanout
    level = {0: ref.root}
    for lv in range(ref.depth, -1, -1):
        span = bs * fan ** lv
        for idx, p in level.items():
            assert idx * span < ref.size, f"subtree {lv}/{idx} lies past the end"
            if lv == 0:
                raw = tree.access.blocks[p][1]
                assert raw and raw[-1] != 0 and len(raw) <= bs
                assert idx * bs + len(raw) <= ref.size
        if lv:
            nxt = {}
            for idx, p in level.items():
                kind, raw = tree.access.blocks[p]
                assert kind == Kind.INDIRECT
                for j, c in enumerate(decode_node(raw, fan)):
                    if c is not None:
                        nxt[idx * fan + j] = c
            level = nxt


# --------------------------------------------------------------------------


def test_depths_documented():
    assert depth_for(64 * KiB, MAX_BLOCK, DEFAULT_FANOUT) == 0
    assert depth_for(100 * MiB, MAX_BLOCK, DEFAULT_FANOUT) == 1
    assert depth_for(128 * MiB + 1, MAX_BLOCK, DEFAULT_FANOUT) == 2
    assert depth_for(TiB, MAX_BLOCK, DEFAULT_FANOUT) == 3
    # A full INDIRECT block fits in a block.
    assert len(encode_node([b"\x01" * 32] * DEFAULT_FANOUT)) == MAX_BLOCK


async def test_inline_then_spill_then_back():
    blocks = DictBlocks()
    tree = BlockTree(blocks, inline_max=16)
    ref = await tree.write(tree.empty(), 0, b"hello")
    assert ref.inline == b"hello" and blocks.puts == 0
    ref = await tree.write(ref, 10, b"world")
    assert ref.inline == b"hello\0\0\0\0\0world"
    ref = await tree.write(ref, 20, b"!")          # 21 bytes > 16: now blocks
    assert ref.inline is None and ref.root is not None and blocks.puts == 1
    assert await tree.read(ref, 0, 100) == b"hello\0\0\0\0\0world" + bytes(5) + b"!"
    ref = await tree.truncate(ref, 5)
    assert ref.inline == b"hello"


async def test_cow_4k_into_100MiB_stores_depth_plus_one_blocks():
    blocks = DictBlocks()
    tree = BlockTree(blocks)
    size = 100 * MiB
    data = bytearray(size)
    for i in range(0, size, MAX_BLOCK):        # every leaf distinct and non-zero
        data[i:i + 8] = i.to_bytes(8, "big")
        data[i + MAX_BLOCK - 1] = 0xFF
    v1 = await tree.write(tree.empty(), 0, data)
    assert v1.depth == 1 and v1.size == size
    assert blocks.puts == 1600 + 1            # leaves + one INDIRECT
    before = blocks.puts

    off = 37 * MiB + 1000                       # 4 KiB inside one leaf, not aligned
    v2 = await tree.write(v1, off, b"\xab" * 4096)
    assert blocks.puts - before == v2.depth + 1 == 2

    d = await tree.diff(v1, v2)
    assert len(d.added) == 2 and len(d.removed) == 2
    assert {k for _, k in d.added} == {Kind.DATA, Kind.INDIRECT}
    # The old version is untouched and the new one reads back exactly.
    assert await tree.read(v1, off - 10, 4116) == bytes(data[off - 10:off + 4106])
    data[off:off + 4096] = b"\xab" * 4096
    assert await tree.read(v2, off - 10, 4116) == bytes(data[off - 10:off + 4106])
    assert await tree.read(v2, 0, size) == bytes(data)


async def test_cow_in_a_sparse_1TiB_object():
    blocks = DictBlocks()
    tree = BlockTree(blocks)
    ref = await tree.truncate(tree.empty(), TiB)
    assert ref.depth == 3 and ref.root is None and blocks.puts == 0
    ref = await tree.write(ref, 700 * GiB, b"x" * 4096)
    assert blocks.puts == ref.depth + 1 == 4
    before = blocks.puts
    ref2 = await tree.write(ref, 3 * GiB + 5, b"y" * 4096)  # another subtree of the root
    assert blocks.puts - before == 4
    assert await tree.read(ref2, 700 * GiB - 2, 4) == b"\0\0xx"
    assert await tree.read(ref2, 3 * GiB + 4, 3) == b"\0yy"
    assert await tree.read(ref2, 500 * GiB, 10) == bytes(10)
    assert await tree.read(ref, 3 * GiB + 4, 3) == bytes(3)


async def test_holes_cost_no_blocks_and_read_as_zeros():
    tree = small_tree()
    ref = await tree.write(tree.empty(), 1000, b"abc")
    assert ref.size == 1003
    await check_invariants(tree, ref)
    # 1 leaf and its ancestors only, not 126 leaves.
    assert tree.access.puts == ref.depth + 1
    assert await tree.read(ref, 0, 1003) == bytes(1000) + b"abc"
    # Writing zeros over data makes a hole again.
    ref = await tree.write(ref, 1000, bytes(3))
    assert ref.root is None and await tree.read(ref, 990, 100) == bytes(13)


async def test_truncate_shrink_then_extend_reads_zeros():
    tree = small_tree()
    ref = await tree.write(tree.empty(), 0, bytes(range(1, 201)))
    d0 = ref.depth
    short = await tree.truncate(ref, 13)                 # mid-leaf
    assert short.depth < d0
    await check_invariants(tree, short)
    assert await tree.read(short, 0, 100) == bytes(range(1, 14))
    longer = await tree.truncate(short, 150)
    await check_invariants(tree, longer)
    assert await tree.read(longer, 0, 150) == bytes(range(1, 14)) + bytes(137)
    # The original version still reads the old bytes.
    assert await tree.read(ref, 0, 200) == bytes(range(1, 201))


async def test_truncate_unchanged_subtrees_are_shared():
    tree = small_tree(block_size=4, fanout=4)
    ref = await tree.write(tree.empty(), 0, b"\x01" * 256)  # 64 leaves, depth 3
    assert ref.depth == 3
    before = tree.access.puts
    cut = await tree.truncate(ref, 64)                     # exactly the first subtree
    assert tree.access.puts == before                      # nothing new: a child is the root
    assert cut.depth == 2 and await tree.read(cut, 0, 100) == b"\x01" * 64
    d = await tree.diff(ref, cut)
    assert not d.added
    half = await tree.truncate(ref, 128)                   # two of the root's four subtrees
    assert tree.access.puts == before + 1 and half.depth == 3


async def test_reader_prefetches_sequential_reads():
    blocks = DictBlocks()
    tree = BlockTree(blocks, block_size=16, fanout=4, inline_max=0)
    payload = bytes(random.Random(1).randbytes(16 * 200))
    ref = await tree.write(tree.empty(), 0, payload)
    batches = blocks.data_get_batches
    reader = tree.reader(ref, max_ahead=16)
    got = bytearray()
    for off in range(0, len(payload), 16):
        got += await reader.read(off, 16)
    assert got == payload
    # 200 sequential one-leaf reads; read-ahead fetches half a window or more
    # at a time once the window has grown (1, 2, 4, 8, 16, then >= 8 leaves).
    assert blocks.data_get_batches - batches <= 5 + 200 // 8
    # A random access resets the window and still reads correctly.
    assert await reader.read(5, 40) == payload[5:45]
    assert await reader.read(3000, 500) == payload[3000:3200]


async def test_blocks_of_and_exact_diff_with_duplicated_content():
    tree = small_tree(block_size=4, fanout=2)
    ref1 = await tree.write(tree.empty(), 0, b"AAAABBBBAAAACCCC")
    ref2 = await tree.write(ref1, 4, b"AAAA")   # leaf 1 now equals leaves 0 and 2
    all1 = {x async for x in tree.blocks_of(ref1)}
    all2 = {x async for x in tree.blocks_of(ref2)}
    d = await tree.diff(ref1, ref2)
    assert d.added == all2 - all1 and d.removed == all1 - all2
    # Leaf BBBB is garbage; leaf AAAA (shared at another offset) is not.
    bbbb = guid(bytes([Kind.DATA]) + b"BBBB")
    aaaa = guid(bytes([Kind.DATA]) + b"AAAA")
    assert (bbbb, Kind.DATA) in d.removed and (aaaa, Kind.DATA) not in d.removed
    assert len(all1) == len({g for g, _ in all1})  # each block once


async def test_wrong_kind_and_malformed_indirect_are_refused():
    blocks = DictBlocks()
    tree = small_tree(blocks)
    data_ref = await tree.write(tree.empty(), 0, b"12345678")   # depth 0: a DATA root
    lie = TreeRef(20, 1, data_ref.root, None, 8, 3)            # claims an INDIRECT root
    with pytest.raises(BadBlock):
        await tree.read(lie, 0, 20)
    # An INDIRECT block with more children than the ref's fanout.
    [g] = await blocks.put_many([(Kind.INDIRECT, data_ref.root * 5)])
    with pytest.raises(BadTree, match="fanout"):
        await tree.read(TreeRef(20, 1, g, None, 8, 3), 0, 20)
    # A DATA block longer than the ref's block size.
    [g] = await blocks.put_many([(Kind.DATA, b"x" * 9)])
    with pytest.raises(BadTree, match="exceeds block size"):
        await tree.read(TreeRef(8, 0, g, None, 8, 3), 0, 8)


def test_ref_round_trip_and_checks():
    ref = TreeRef(100, 2, b"\x07" * 32, None, 8, 4)
    assert TreeRef.from_dict(ref.to_dict()) == ref
    inline = TreeRef(3, 0, None, b"abc", 8, 4)
    assert TreeRef.from_dict(inline.to_dict()) == inline
    bad = [
        {**ref.to_dict(), "d": 3},                        # depth not minimal
        {**ref.to_dict(), "d": 1},                        # depth too small
        {**ref.to_dict(), "i": b""},                      # both root and inline
        {"s": 1, "d": 0, "b": 8, "f": 4},                 # neither
        {**inline.to_dict(), "s": 4},                     # inline length != size
        {**ref.to_dict(), "r": b"short"},
        {**ref.to_dict(), "f": 1},
        {**ref.to_dict(), "b": 0},
        {**ref.to_dict(), "x": 1},
        {**ref.to_dict(), "s": -1},
        {**inline.to_dict(), "i": b"x" * 5000, "s": 5000},
        [1, 2],
    ]
    for d in bad:
        with pytest.raises(BadTree):
            TreeRef.from_dict(d)


@given(st.binary(max_size=200), st.integers(2, 8))
def test_decode_node_fuzz(raw, fanout):
    try:
        kids = decode_node(raw, fanout)
    except BadTree:
        return
    assert 1 <= len(kids) <= fanout and kids[-1] is not None
    assert encode_node(list(kids)) == raw


_values = st.one_of(st.integers(-2, 2**64), st.binary(max_size=40), st.none(), st.text(max_size=3))


@given(st.dictionaries(st.sampled_from(["s", "d", "b", "f", "r", "i", "z"]), _values))
def test_ref_decoder_fuzz(d):
    try:
        ref = TreeRef.from_dict(d)
    except BadTree:
        return
    assert TreeRef.from_dict(ref.to_dict()) == ref


# --------------------------------------------------------------------------
# The model test: random writes and truncates against a bytearray.

_op = st.one_of(
    st.tuples(st.just("w"), st.integers(0, 300), st.binary(min_size=1, max_size=70)),
    st.tuples(st.just("z"), st.integers(0, 300), st.integers(1, 70)),       # zeros
    st.tuples(st.just("t"), st.integers(0, 400), st.just(b"")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([1, 3, 8]), st.sampled_from([2, 3, 5]), st.sampled_from([0, 10]),
       st.lists(_op, min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_random_operations_match_a_bytearray(bs, fan, inline_max, ops, rnd):
    async def run():
        tree = BlockTree(DictBlocks(), block_size=bs, fanout=fan, inline_max=inline_max,
                         cache_nodes=4)
        ref, model = tree.empty(), bytearray()
        versions = [(ref, bytes(model))]
        for kind, a, b in ops:
            if kind == "w" or kind == "z":
                data = b if kind == "w" else bytes(b)
                ref = await tree.write(ref, a, data)
                if len(model) < a + len(data):
                    model.extend(bytes(a + len(data) - len(model)))
                model[a:a + len(data)] = data
            else:
                ref = await tree.truncate(ref, a)
                del model[a:]
                model.extend(bytes(a - len(model)))
            assert ref.size == len(model)
            await check_invariants(tree, ref)
            versions.append((ref, bytes(model)))
            off = rnd.randrange(0, len(model) + 5)
            n = rnd.randrange(0, 60)
            assert await tree.read(ref, off, n) == bytes(model[off:off + n])
        # Every past version still reads as it was (nothing was overwritten).
        for r, m in versions:
            assert await tree.read(r, 0, len(m) + 3) == m
        # Walking and diffing agree with each other.
        first, last = versions[0][0], versions[-1][0]
        d = await tree.diff(first, last)
        assert d.added == {x async for x in tree.blocks_of(last)}

    trio.run(run)
