"""OceanStore objects (storage/objects.py): AGUIDs, versions as root blocks,
copy-on-write between versions, history by sequence number and time, signed
update requests, and the strict decoders."""

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from overlay.wire.ids import Identity, guid_of
from storage.blockapi import MAX_BLOCK
from storage.blocktree import BlockTree, TreeRef
from storage.objects import (
    BadRootBlock, BadUpdateRequest, BrokenHistory, LocalAuthority, ObjectStore, Root,
    UpdateRequest, VersionNotFound, WrongObject, aguid_of,
)
from storage.ring_errors import Conflict, NotAuthorised, ObjectNotFound
from test_blocktree import DictBlocks

MiB = 1 << 20
OWNER = Identity.from_seed(b"owner")
OTHER = Identity.from_seed(b"other")


class Clock:
    """Milliseconds that move only when the test says so."""

    def __init__(self, t=1_000_000):
        self.t = t

    def __call__(self):
        return self.t


def make_store(**tree_params):
    """A store over in-process blocks; ``tree_params`` shape its block trees."""
    clock = Clock()
    blocks = DictBlocks()
    auth = LocalAuthority(clock=clock)
    tree = BlockTree(blocks, **tree_params)
    return ObjectStore(blocks, auth, tree=tree, clock=clock), blocks, auth, clock


async def write_commit(store, aguid, off, data, writer=OWNER):
    cur = await store.current(aguid)
    v = await store.write(aguid, off, data, cur.vguid)
    await store.commit(v, writer)
    return v


# --------------------------------------------------------------------------
# Objects and versions


async def test_create_names_the_object_by_owner_and_name():
    store, _, auth, clock = make_store()
    aguid = await store.create(OWNER, "notes")
    assert aguid == aguid_of(OWNER.public_key, b"notes") == guid_of(OWNER.public_key, b"notes")
    assert await auth.latest(aguid) == (1, (await store.current(aguid)).vguid)
    first = await store.current(aguid)
    assert (first.seq, first.prev, first.size, first.ctime) == (1, None, 0, clock.t)
    # The very same creation again is a retry (same root, same time): accepted.
    assert await store.create(OWNER, "notes") == aguid
    clock.t += 1
    with pytest.raises(Conflict):
        await store.create(OWNER, "notes")
    assert await store.create(OTHER, "notes") != aguid  # same name, other owner
    with pytest.raises(ObjectNotFound):
        await store.current(aguid_of(OWNER.public_key, "absent"))


async def test_every_past_version_reads_back_by_vguid_seq_and_time():
    store, _, _, clock = make_store(block_size=16, fanout=4, inline_max=0)
    aguid = await store.create(OWNER, "f")
    expected = {1: (clock.t, b"")}
    model = bytearray()
    for seq, (off, data) in enumerate([(0, b"hello world"), (6, b"there"), (100, b"tail"),
                                       (3, b"X" * 60), (0, b"")], start=2):
        clock.t += 10
        v = await write_commit(store, aguid, off, data)
        if data:
            model.extend(bytes(max(0, off + len(data) - len(model))))
            model[off:off + len(data)] = data
        assert v.seq == seq and v.mtime == clock.t
        expected[seq] = (clock.t, bytes(model))
    clock.t += 10
    v = await store.truncate(aguid, 20, (await store.current(aguid)).vguid)
    await store.commit(v, OWNER)
    expected[7] = (clock.t, bytes(model[:20]))

    seen = [r async for r in store.history(aguid)]
    assert [r.seq for r in seen] == [7, 6, 5, 4, 3, 2, 1]
    for r in seen:
        t, content = expected[r.seq]
        assert await store.read(r.vguid, 0, 1000) == content
        assert (await store.version_at(aguid, r.seq)).vguid == r.vguid
        assert (await store.version_at_time(aguid, t)).seq == r.seq
        assert (await store.version_at_time(aguid, t + 5)).seq == r.seq
    reader = await store.reader(seen[1].vguid)
    assert await reader.read(0, 50) + await reader.read(50, 100) == expected[6][1]
    with pytest.raises(VersionNotFound):
        await store.version_at(aguid, 8)
    with pytest.raises(VersionNotFound):
        await store.version_at_time(aguid, expected[1][0] - 1)


async def test_cow_4k_into_100MiB_object_stores_depth_plus_two_blocks():
    store, blocks, _, _ = make_store()
    aguid = await store.create(OWNER, "big")
    data = bytearray(100 * MiB)          # 1,600 distinct leaves, cheap to store
    for i in range(0, len(data), MAX_BLOCK):
        data[i:i + 8] = (i + 1).to_bytes(8, "big")
    big = await write_commit(store, aguid, 0, data)
    assert big.tree.depth == 1 and big.size == 100 * MiB
    before = blocks.puts
    v = await store.write(aguid, 50 * MiB + 123, b"\x5a" * 4096, big.vguid)
    # One DATA block, one INDIRECT block (the path of a depth-1 tree), one root.
    assert blocks.puts - before == v.tree.depth + 2 == 3
    d = await store.tree.diff(big.tree, v.tree)
    assert len(d.added) == 2
    at = 50 * MiB + 120
    assert await store.read(v.vguid, at, 5) == data[at:at + 3] + b"ZZ"
    assert await store.read(big.vguid, at, 5) == data[at:at + 5]


async def test_compare_and_swap_between_two_writers():
    store, _, auth, _ = make_store()
    aguid = await store.create(OWNER, "shared")
    auth.allow(aguid, OTHER.public_key)
    base = await store.current(aguid)
    mine = await store.write(aguid, 0, b"mine", base.vguid)
    theirs = await store.write(aguid, 0, b"theirs", base.vguid)
    cert = await store.commit(theirs, OTHER)
    assert (cert.seq, cert.vguid, cert.prev) == (2, theirs.vguid, base.vguid)
    with pytest.raises(Conflict) as e:
        await store.commit(mine, OWNER)
    assert e.value.current.vguid == theirs.vguid
    # The loser rebases on the winner and retries.
    mine = await store.write(aguid, 6, b"+mine", e.value.current.vguid)
    await store.commit(mine, OWNER)
    assert await store.read((await store.current(aguid)).vguid, 0, 100) == b"theirs+mine"
    # A retried commit of the current version is answered, not refused.
    again = await store.commit(mine, OWNER)
    assert again.vguid == mine.vguid and again.seq == 3


async def test_writers_need_permission():
    store, _, auth, _ = make_store()
    aguid = await store.create(OWNER, "private")
    v = await store.write(aguid, 0, b"intrusion", None)
    with pytest.raises(NotAuthorised):
        await store.commit(v, OTHER)
    assert (await store.current(aguid)).seq == 1


async def test_versions_of_another_object_are_refused():
    store, _, _, _ = make_store()
    a = await store.create(OWNER, "a")
    b = await store.create(OWNER, "b")
    vb = await store.current(b)
    with pytest.raises(WrongObject):
        await store.write(a, 0, b"x", vb.vguid)
    # A forged chain: a version of ``a`` whose prev is a version of ``b``.
    va = await store.current(a)
    forged = Root(a, 2, vb.vguid, va.ctime, va.mtime, va.tree)
    stored = await store._store(forged)
    with pytest.raises(BrokenHistory):
        [r async for r in store.history(a, start=stored.vguid)]


# --------------------------------------------------------------------------
# Root blocks


def sample_root(**kw):
    f = dict(aguid=b"\x01" * 32, seq=3, prev=b"\x02" * 32, ctime=5, mtime=9,
             tree=TreeRef(100, 0, b"\x03" * 32, None, 128, 4), meta={"mode": b"\x01\xa4"})
    f.update(kw)
    return Root(**f)


def test_root_round_trip_and_refusals():
    r = sample_root()
    assert Root.decode(r.encode()) == r
    fields = r.fields()

    def enc(**changes):
        d = dict(fields)
        d.update(changes)
        return msgpack.packb({k: v for k, v in d.items() if v is not ...}, use_bin_type=True)

    cases = {
        "format version 2": enc(v=2),
        "missing": enc(mtime=...),
        "unknown key": enc(extra=1),
        "expected 32 bytes": enc(aguid=b"x"),
        "exactly the first version": enc(seq=1),
        "before ctime": enc(ctime=10),
        "depth": enc(tree={**r.tree.to_dict(), "d": 2}),
        "out of range": enc(seq=0),
    }
    for msg, raw in cases.items():
        with pytest.raises(BadRootBlock, match=msg):
            Root.decode(raw)
    # Same content, another key order: not canonical, refused.
    reordered = msgpack.packb(dict(reversed(list(fields.items()))), use_bin_type=True)
    with pytest.raises(BadRootBlock, match="canonical"):
        Root.decode(reordered)
    with pytest.raises(ValueError):
        sample_root(seq=1).encode()  # we never write what we would refuse


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_root_decoder_fuzz_bytes(raw):
    try:
        Root.decode(raw)
    except BadRootBlock:
        pass


@settings(max_examples=300)
@given(st.data())
def test_root_decoder_fuzz_mutations(data):
    raw = bytearray(sample_root().encode())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    try:
        r = Root.decode(bytes(raw))
    except BadRootBlock:
        return
    assert r.encode() == bytes(raw)


# --------------------------------------------------------------------------
# Update requests


def sample_request(**kw):
    f = dict(aguid=b"\x01" * 32, prev=b"\x02" * 32, seq=5, vguid=b"\x03" * 32, time=1234)
    f.update(kw)
    return UpdateRequest.create(OWNER, **f)


def test_request_signature_and_forgeries():
    req = sample_request()
    req.verify()
    again = UpdateRequest.decode(req.encode())
    assert again == req
    again.verify()
    for change in [dict(vguid=b"\x04" * 32), dict(prev=b"\x04" * 32), dict(seq=6),
                   dict(aguid=b"\x04" * 32), dict(time=1235), dict(writer=OTHER.public_key)]:
        fields = {"aguid": req.aguid, "prev": req.prev, "seq": req.seq, "vguid": req.vguid,
                  "writer": req.writer, "time": req.time, "name": req.name, "sig": req.sig}
        fields.update(change)
        forged = UpdateRequest(**fields)
        with pytest.raises(BadUpdateRequest, match="does not verify"):
            forged.verify()
    # Someone else's signature under the owner's key.
    by_other = UpdateRequest.create(OTHER, aguid=req.aguid, prev=req.prev, seq=5,
                                    vguid=req.vguid, time=1234)
    stolen = UpdateRequest(req.aguid, req.prev, 5, req.vguid, OWNER.public_key, 1234,
                           None, by_other.sig)
    with pytest.raises(BadUpdateRequest):
        stolen.verify()


def test_creation_request_must_come_from_the_owner():
    aguid = aguid_of(OWNER.public_key, "doc")
    ok = UpdateRequest.create(OWNER, aguid=aguid, prev=None, seq=1, vguid=b"\x05" * 32,
                              name="doc")
    ok.verify()
    squatter = UpdateRequest.create(OTHER, aguid=aguid, prev=None, seq=1, vguid=b"\x05" * 32,
                                    name="doc")
    with pytest.raises(BadUpdateRequest, match="writer's key and the name"):
        squatter.verify()
    with pytest.raises(BadUpdateRequest, match="exactly for creation"):
        UpdateRequest.create(OWNER, aguid=aguid, prev=b"\x01" * 32, seq=2,
                             vguid=b"\x05" * 32, name="doc")
    with pytest.raises(BadUpdateRequest, match="only seq 1"):
        UpdateRequest.create(OWNER, aguid=aguid, prev=None, seq=2, vguid=b"\x05" * 32)


async def test_authority_refuses_bad_requests_and_keeps_state():
    store, _, auth, _ = make_store()
    aguid = await store.create(OWNER, "x")
    head = await auth.latest(aguid)
    req = UpdateRequest.create(OWNER, aguid=aguid, prev=head[1], seq=2, vguid=b"\x09" * 32)
    tampered = UpdateRequest(req.aguid, req.prev, req.seq, b"\x0a" * 32, req.writer,
                             req.time, None, req.sig)
    with pytest.raises(BadUpdateRequest):
        await auth.update(tampered)
    with pytest.raises(Conflict):  # skips a sequence number
        await auth.update(UpdateRequest.create(OWNER, aguid=aguid, prev=head[1], seq=3,
                                               vguid=b"\x09" * 32))
    assert await auth.latest(aguid) == head


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_request_decoder_fuzz(raw):
    try:
        UpdateRequest.decode(raw)
    except BadUpdateRequest:
        pass


@settings(max_examples=300)
@given(st.data())
def test_request_mutations_never_verify(data):
    req = sample_request()
    raw = bytearray(req.encode())
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    try:
        UpdateRequest.decode(bytes(raw)).verify()
    except BadUpdateRequest:
        return
    pytest.fail("a modified request verified")  # pragma: no cover


def test_request_refuses_unknown_version_and_non_canonical():
    d = sample_request().to_dict()
    with pytest.raises(BadUpdateRequest, match="format version 9"):
        UpdateRequest.decode(msgpack.packb({**d, "v": 9}, use_bin_type=True))
    with pytest.raises(BadUpdateRequest, match="canonical"):
        UpdateRequest.decode(msgpack.packb(dict(reversed(list(d.items()))), use_bin_type=True))
    unsigned = dict(d)
    del unsigned["sig"]
    with pytest.raises(BadUpdateRequest, match="unsigned"):
        UpdateRequest.decode(msgpack.packb(unsigned, use_bin_type=True))
