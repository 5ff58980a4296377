"""Log records and log blocks (storage/records.py): round trips of every
record type, standalone and in blocks; strict refusals, field by field; and
hypothesis garbage that must raise RecordError and nothing else."""

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from storage.blockapi import MAX_BLOCK
from storage.records import (Cancel, End, FileType, Link, MkInode, Prepare, RecordError, Rename,
                             SetAttr, SetXattr, SnapshotMark, Unlink, Write, decode_block,
                             decode_record, encode_block, encode_block_prefix, encode_record,
                             make_record)
from storage.vv import VV

W = b"\x01" * 32
X = b"\x02" * 32
VOL = b"\x07" * 32
G = b"\x09" * 32

BODIES = [
    End(VOL),
    MkInode(5, FileType.REG, 0o644, 1000, 100),
    MkInode(6, FileType.DIR, 0o755, 0, 0),
    MkInode(7, FileType.LNK, 0o777, 0, 0, b"../target"),
    Write(5, 0, data=b"hello"),
    Write(5, 1 << 20, blocks=((G, 65536), (G, 10))),
    Link(1, b"name", 5),
    Unlink(1, b"name", 5),
    Rename(1, b"a", 5, 6, b"b"),
    Rename(1, b"a", 5, 6, b"b", 9, True),
    SetAttr(5, mode=0o600, size=10, mtime=-5),
    SetAttr(5),
    SetXattr(5, b"user.k", b"v"),
    SetXattr(5, b"user.k", None),
    Prepare(1, b"x"),
    Cancel(1, b"x"),
    SnapshotMark(G, VV({W: 3, X: 4})),
]


def rec(seq, body, vv=None):
    return make_record(W, seq, vv or VV({X: 2}), 1234567 + seq, body)


@pytest.mark.parametrize("body", BODIES, ids=lambda b: type(b).__name__)
def test_standalone_round_trip(body):
    r = rec(1 if isinstance(body, End) else 3, body)
    raw = encode_record(r)
    assert decode_record(raw) == r
    assert encode_record(decode_record(raw)) == raw  # canonical


def test_block_round_trip_with_vector_deltas():
    recs = [make_record(W, 1, VV(), 10, End(VOL))]
    vv = VV()
    for i, body in enumerate(BODIES[1:], start=2):
        if i % 3 == 0:
            vv = vv.with_entry(X, i)
        recs.append(make_record(W, i, vv.merge(recs[-1].vv), 10 + i, body))
    raw = encode_block(VOL, W, None, recs)
    blk = decode_block(raw)
    assert blk.records == tuple(recs) and blk.prev is None
    assert (blk.first, blk.last, blk.writer, blk.volume) == (1, len(recs), W, VOL)
    # a later block names its predecessor
    more = [make_record(W, len(recs) + 1, recs[-1].vv, 99, Link(1, b"z", 5))]
    blk2 = decode_block(encode_block(VOL, W, G, more))
    assert blk2.prev == G and blk2.records == tuple(more)


def test_encoder_refuses_bad_blocks():
    r1 = rec(2, Link(1, b"a", 5))
    r3 = rec(4, Link(1, b"b", 5))
    with pytest.raises(ValueError):
        encode_block(VOL, W, G, [r1, r3])  # not consecutive
    with pytest.raises(ValueError):
        encode_block(VOL, X, G, [r1])  # another writer's record
    with pytest.raises(ValueError):
        encode_block(VOL, W, G, [])
    big = [rec(i, Write(5, 0, data=bytes(16384))) for i in range(2, 8)]
    with pytest.raises(ValueError):
        encode_block(VOL, W, G, big)


def test_make_record_refuses_nonsense():
    with pytest.raises(ValueError):
        make_record(W, 1, VV(), 0, Write(5, 0))  # neither data nor blocks
    with pytest.raises(ValueError):
        make_record(W, 2, VV(), 0, End(VOL))  # End is seq 1
    with pytest.raises(ValueError):
        make_record(W, 2, VV(), 0, MkInode(5, FileType.LNK, 0o777, 0, 0))  # symlink w/o target
    with pytest.raises(ValueError):
        make_record(W, 2, VV(), 0, Link(1, b"a/b", 5))
    with pytest.raises(ValueError):
        make_record(W, 2, VV(), 0, Link(1, b"..", 5))


def _std(**over):
    d = msgpack.unpackb(encode_record(rec(3, Link(1, b"n", 5))), raw=False)
    d.update(over)
    return msgpack.packb(d, use_bin_type=True)


def _blk(**over):
    d = msgpack.unpackb(encode_block(VOL, W, G, [rec(3, Link(1, b"n", 5)),
                                                 rec(4, Link(1, b"m", 5), VV({X: 3}))]),
                        raw=False)
    d.update(over)
    return msgpack.packb(d, use_bin_type=True)


@pytest.mark.parametrize("raw, reason", [
    (b"", "msgpack"),
    (b"\xc1", "msgpack"),
    (msgpack.packb([1, 2]), "map"),
    (_std(v=2), "version"),
    (_std(v="1"), "version"),
    (_std(o=99), "unknown record type"),
    (_std(w=b"short"), "writer"),
    (_std(s=0), "seq"),
    (_std(t=1.5), "time"),
    (_std(vv=[[W, 3]]), "implicit"),
    (_std(vv=[[X, 2], [X, 3]]), "increasing"),
    (_std(vv=[[X, 0]]), "vector entry"),
    (_std(n=b"a/b"), "name"),
    (_std(n=b"x" * 256), "exceeds"),
    (_std(extra=1), "unknown key"),
    (_std(i=0), "out of range"),
    (_blk(v=3), "version"),
    (_blk(prev=None), "prev"),
    (_blk(first=0), "first"),
    (_blk(recs=[]), "1..4096"),
    (_blk(extra=1), "exactly the keys"),
    (_blk(w=b"x"), "32 bytes"),
])
def test_strict_refusals(raw, reason):
    with pytest.raises(RecordError, match=reason):
        if b"recs" in raw:
            decode_block(raw)
        else:
            decode_record(raw)


def test_block_vector_may_not_go_backwards():
    d = msgpack.unpackb(_blk(), raw=False)
    d["recs"][1]["vv"] = [[X, 1]]  # first record saw X:2
    with pytest.raises(RecordError, match="backwards"):
        decode_block(msgpack.packb(d, use_bin_type=True))
    d["recs"][1]["vv"] = [[W, 9]]
    with pytest.raises(RecordError, match="implicit"):
        decode_block(msgpack.packb(d, use_bin_type=True))


@settings(max_examples=400)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_record_error(raw):
    for dec in (decode_record, decode_block):
        try:
            dec(raw)
        except RecordError:
            pass


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.binary(max_size=40)
    | st.text(max_size=5) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=4) | st.binary(max_size=4), inner, max_size=4),
    max_leaves=10)


@settings(max_examples=400)
@given(st.sampled_from(BODIES[1:]), st.data())
def test_mutated_fields_raise_only_record_error(body, data):
    """Replace one field of a valid encoding by an arbitrary value: the
    decoder either accepts a valid record or raises RecordError."""
    d = msgpack.unpackb(encode_record(rec(3, body)), raw=False)
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(_values)
    raw = msgpack.packb(d, use_bin_type=True)
    try:
        r = decode_record(raw)
    except RecordError:
        return
    assert decode_record(encode_record(r)) == r


@settings(max_examples=200)
@given(st.data())
def test_mutated_blocks_raise_only_record_error(data):
    d = msgpack.unpackb(_blk(), raw=False)
    target = data.draw(st.sampled_from(["top", "rec0", "rec1"]))
    m = d if target == "top" else d["recs"][int(target[-1])]
    key = data.draw(st.sampled_from(sorted(m)))
    m[key] = data.draw(_values)
    try:
        decode_block(msgpack.packb(d, use_bin_type=True))
    except RecordError:
        pass


def test_group_commit_packs_blocks_up_to_the_limit():
    recs = [rec(i, Write(5, i, data=bytes(1000))) for i in range(2, 200)]
    raw, n = encode_block_prefix(VOL, W, G, recs)
    assert 50 < n < len(recs) and len(raw) <= MAX_BLOCK
    assert decode_block(raw).records == tuple(recs[:n])
    raw2, n2 = encode_block_prefix(VOL, W, G, recs[n:])
    assert decode_block(raw2).first == recs[n].seq
