"""Hypothesis fuzzing of every decoder that reads untrusted bytes (issue 10;
DESIGN.md "What must always hold": bad input anywhere gets a clear error and
leaves stored data intact; "Nothing is trusted that was not checked").

One property for every decoder: arbitrary bytes, and mutations of valid
encodings, either decode to something consistent or raise the module's named
error (a StorageError / FrameError / BadMessage / PeerError subclass), never
any other exception type. "Consistent" means: what decodes re-encodes and
decodes to the same value, and for signed formats, a mutated encoding that
still verifies says exactly what the signer signed.

Mutations (``mutations``): bit flips, byte changes, truncation, extension,
deletion and insertion of byte runs; and, for msgpack formats, structural
ones: one value anywhere in the decoded tree replaced (by values of the
shapes decoders expect: 32- and 64-byte strings, boundary integers, nested
lists and maps), a map key or list item dropped, added or duplicated, then
re-packed, so the damage reaches the checks behind the msgpack parser.

Decoders covered: wire frames for every registered message type (schema-
driven valid bodies, then mutated envelopes), the stream splitter, the
handshake proof and the peer certificate; log records and blocks; log-heads;
certificates, certificate bodies, ring descriptors (msgpack and JSON);
views; root blocks, update requests, tree references, INDIRECT blocks;
snapshots (root, index, pages, read through the real in-memory block
access); PBFT batches, message shapes and signed proofs from a Byzantine
member; sealed blocks; the block store's on-disk entries; the names of past
versions. Examples per test are kept modest for the shared CI machine;
``HYPOTHESIS_PROFILE=thorough`` runs many more.
"""

from __future__ import annotations

import copy
import importlib
import json
import pkgutil
import struct

import lmdb
import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import overlay
import storage
from overlay.wire import certs, frames, handshake
from overlay.wire.frames import FrameError, Kind as FrameKind
from overlay.wire.ids import Identity, guid
from overlay.wire.transport import PeerAuthError, PeerProtocolError
from storage import ring_messages as rm
from storage import seal
from storage.blockapi import MAX_BLOCK, Kind
from storage.blockstore import BlockStore
from storage.blocktree import BadTree, TreeRef, decode_node
from storage.certificate import CertBody, Certificate, RingDescriptor, verify
from storage.errors import BadBlock, BlockCorrupt, BlockError, StorageError
from storage.fsapply import apply as fs_apply
from storage.fsstate import ROOT_INO, FsState
from storage.localblocks import MemoryBlockAccess
from storage.logs import BadLogHead, LogHead, decode_head
from storage.objects import BadRootBlock, BadUpdateRequest, Root, UpdateRequest
from storage.records import (Cancel, End, FileType, Link, MkInode, Prepare, RecordError, Rename,
                             SetAttr, SetXattr, SnapshotMark, Unlink, Write, decode_block,
                             decode_record, encode_block, encode_record, make_record)
from storage.ring_errors import BadCertificate, BadDescriptor
from storage.snapshots import SnapshotError, SnapshotWriter, load_info, load_state
from storage.timenames import parse_time
from storage.volume import BadView, View, create_volume
from storage.vv import VV

# Every module that registers message types, so the registry is complete.
for _pkg in (overlay, storage):
    for _m in pkgutil.walk_packages(_pkg.__path__, _pkg.__name__ + "."):
        if not _m.name.endswith("__main__"):
            importlib.import_module(_m.name)


def _examples(n: int) -> int:
    """``n`` examples under the default profile, proportionally more under
    ``HYPOTHESIS_PROFILE=thorough`` (conftest.py)."""
    return max(n, settings().max_examples * n // 100)


_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
FUZZ = settings(max_examples=_examples(120), suppress_health_check=_QUIET)
FEW = settings(max_examples=_examples(40), suppress_health_check=_QUIET)

# --------------------------------------------------------------------------
# Mutation machinery

_INTS = st.one_of(st.integers(-3, 70), st.sampled_from(
    [-2**63, -1, 0, 1, 2, 255, 256, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1]))
LEAVES = st.one_of(
    st.none(), st.booleans(), _INTS, st.floats(allow_nan=False, width=64),
    st.binary(max_size=40), st.binary(min_size=32, max_size=32),
    st.binary(min_size=64, max_size=64), st.text(max_size=10),
    st.sampled_from(["v", "t", "pp", "vc", "i", "s", "n", "d"]),
)
VALUES = st.recursive(LEAVES, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)


@st.composite
def byte_mutation(draw, base: bytes) -> bytes:
    b = bytearray(base)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(("flip", "byte", "cut", "extend", "drop", "insert")))
        n = len(b)
        if op in ("flip", "byte", "drop") and n == 0:
            op = "extend"
        if op == "flip":
            i = draw(st.integers(0, n - 1))
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            b[draw(st.integers(0, n - 1))] = draw(st.integers(0, 255))
        elif op == "cut":
            del b[draw(st.integers(0, n)):]
        elif op == "extend":
            b += draw(st.binary(min_size=1, max_size=24))
        elif op == "drop":
            i = draw(st.integers(0, n - 1))
            del b[i:i + draw(st.integers(1, 8))]
        else:
            i = draw(st.integers(0, n))
            b[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(b)


def _paths(obj, path=()):
    yield path
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, path + (i,))


def _edit(draw, obj):
    path = draw(st.sampled_from(list(_paths(obj))))
    op = draw(st.sampled_from(("replace", "replace", "drop", "add", "dup")))
    if not path:
        return draw(VALUES) if op == "replace" else obj
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    last = path[-1]
    if op == "replace":
        parent[last] = draw(VALUES)
    elif op == "drop":
        del parent[last]
    elif op == "add":
        target = parent[last]
        if isinstance(target, dict):
            target[draw(st.text(max_size=6))] = draw(VALUES)
        elif isinstance(target, list):
            target.insert(draw(st.integers(0, len(target))), draw(VALUES))
        else:
            parent[last] = [target, draw(VALUES)]
    elif op == "dup" and isinstance(parent, list):
        parent.insert(last, copy.deepcopy(parent[last]))
    return obj


@st.composite
def tree_mutation(draw, base: bytes) -> bytes:
    """Decode ``base`` (msgpack), damage the value tree, pack again."""
    obj = msgpack.unpackb(base, raw=False, strict_map_key=False)
    for _ in range(draw(st.integers(1, 2))):
        obj = _edit(draw, obj)
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return base   # e.g. an int past 64 bits: not representable in msgpack at all


def mutations(base: bytes, *, packed: bool = True):
    """Arbitrary bytes, the valid encoding itself, or a mutation of it."""
    options = [st.just(base), byte_mutation(base), st.binary(max_size=200)]
    if packed:
        options += [tree_mutation(base), tree_mutation(base)]
    return st.one_of(*options)


def refused(fn, *args, errors):
    """``fn(*args)``, or None when it raised one of ``errors`` (anything
    else propagates: that is the failure this file looks for)."""
    try:
        return fn(*args)
    except errors:
        return None


# --------------------------------------------------------------------------
# Wire frames: every registered message type


def value_for(spec: frames.Spec):
    """A strategy of values that ``spec`` accepts."""
    if isinstance(spec, frames.Struct):
        req = {k: value_for(s) for k, s in spec.fields.items() if k in spec.required}
        opt = {k: value_for(s) for k, s in spec.fields.items() if k not in spec.required}
        return st.fixed_dictionaries(req, optional=opt)
    if isinstance(spec, frames.Optional):
        return value_for(spec.inner)
    if isinstance(spec, frames.Nullable):
        return st.none() | value_for(spec.inner)
    if isinstance(spec, frames.Bytes):
        if spec.exact is not None:
            return st.binary(min_size=spec.exact, max_size=spec.exact)
        return st.binary(max_size=min(spec.max, 48))
    if isinstance(spec, frames.Str):
        return st.text(max_size=min(spec.max, 12))
    if isinstance(spec, frames.Int):
        lo = -2**63 if spec.min is None else max(spec.min, -2**63)
        hi = 2**64 - 1 if spec.max is None else min(spec.max, 2**64 - 1)
        return st.integers(lo, hi)
    if isinstance(spec, frames.ListOf):
        return st.lists(value_for(spec.item), max_size=min(spec.max, 3))
    if isinstance(spec, frames.MapOf):
        return st.dictionaries(value_for(spec.key), value_for(spec.value),
                               max_size=min(spec.max, 3))
    if isinstance(spec, frames.AnyValue):
        return VALUES
    if spec.name == "bool":
        return st.booleans()
    return st.floats(allow_nan=False) | st.integers(-2**63, 2**63 - 1)


TYPES = sorted(frames.REGISTRY)


@st.composite
def valid_frames(draw):
    name = draw(st.sampled_from(TYPES))
    kind = draw(st.sampled_from(list(FrameKind)))
    body = draw(value_for(frames.body_schema(kind, name)))
    rid = draw(st.integers(0, frames.MAX_REQUEST_ID))
    return kind, name, rid, body


def test_registry_is_populated():
    # The walk above imported the layers' message modules; a short registry
    # would make the frame fuzzing below vacuous.
    assert len(TYPES) >= 30 and "blk.fetch" in TYPES and "pbft.msgs" in TYPES


@FUZZ
@given(valid_frames())
def test_every_message_type_round_trips(frame):
    kind, name, rid, body = frame
    data = frames.encode(kind, name, rid, body)
    f = frames.decode(data[frames.HEADER_BYTES:])
    assert (f.kind, f.type, f.id, f.body) == (kind, name, rid, body)


@FUZZ
@given(valid_frames(), st.data())
def test_mutated_frames_raise_only_frame_error(frame, data):
    payload = frames.encode(*frame)[frames.HEADER_BYTES:]
    raw = data.draw(mutations(payload))
    f = refused(frames.decode, raw, errors=FrameError)
    if f is not None:   # whatever decodes is a frame we could have sent
        again = frames.encode(f.kind, f.type, f.id, f.body)
        assert frames.decode(again[frames.HEADER_BYTES:]) == f


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=12))
def test_any_stream_splits_into_payloads_or_frame_error(stream, cuts):
    buf = frames.FrameBuffer(max_frame=4096)
    pos = 0
    try:
        for c in cuts + [len(stream)]:
            for p in buf.feed(stream[pos:pos + c]):
                refused(frames.decode, p, errors=FrameError)
            pos += c
    except FrameError:
        pass


SERVER = Identity.from_seed(b"fuzz server")
CLIENT = Identity.from_seed(b"fuzz client")
NONCE = b"\x07" * handshake.NONCE_BYTES


@FUZZ
@given(st.data())
def test_handshake_proofs_are_accepted_only_when_genuine(data):
    body = handshake.proof_body(CLIENT, SERVER.id, NONCE)
    raw = frames.encode(FrameKind.REQUEST, handshake.PROOF, 0, body)[frames.HEADER_BYTES:]
    f = refused(frames.decode, data.draw(mutations(raw)), errors=FrameError)
    if f is None:
        return
    got = refused(handshake.check_proof, f, SERVER.id, NONCE,
                  errors=(PeerAuthError, PeerProtocolError))
    assert got in (None, CLIENT.id)   # only the genuine client's proof verifies
    refused(handshake.read_hello, f, SERVER.id, errors=(PeerAuthError, PeerProtocolError))
    refused(handshake.read_verdict, f, CLIENT.id, SERVER.id,
            errors=(PeerAuthError, PeerProtocolError))


def _der_of(identity: Identity) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    pem = certs.self_signed_certificate(identity)
    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


DER = _der_of(SERVER)


def test_peer_certificate_of_the_server_checks():
    certs.check_server_certificate(DER, SERVER.id)
    with pytest.raises(PeerAuthError):
        certs.check_server_certificate(DER, CLIENT.id)


@FUZZ
@given(st.data())
def test_peer_certificates_raise_only_peer_auth_error(data):
    raw = data.draw(mutations(DER, packed=False))
    key = refused(certs.certificate_key, raw, errors=PeerAuthError)
    if key is not None:
        assert len(key) == 32
    refused(certs.check_server_certificate, raw, SERVER.id, errors=PeerAuthError)


# --------------------------------------------------------------------------
# Log records and log blocks

VOL = b"\x05" * 32
W = Identity.from_seed(b"fuzz writer")
OTHERS = sorted(Identity.from_seed(b"other%d" % i).id for i in range(3))

_ino = st.integers(2, 2**20)
_name = st.binary(min_size=1, max_size=12).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
BODIES = st.one_of(
    st.builds(MkInode, _ino, st.sampled_from([FileType.REG, FileType.DIR]), st.integers(0, 0o777),
              st.integers(0, 9), st.integers(0, 9)),
    st.builds(MkInode, _ino, st.just(FileType.LNK), st.just(0o777), st.just(0), st.just(0),
              st.binary(min_size=1, max_size=20)),
    st.builds(Write, _ino, st.integers(0, 2**40), data=st.binary(max_size=40)),
    st.builds(Write, _ino, st.integers(0, 2**40), blocks=st.lists(st.tuples(
        st.binary(min_size=32, max_size=32), st.integers(1, MAX_BLOCK)), min_size=1,
        max_size=3).map(tuple)),
    st.builds(Link, _ino, _name, _ino), st.builds(Unlink, _ino, _name, _ino),
    st.builds(Rename, _ino, _name, _ino, _ino, _name, st.none() | _ino),
    st.builds(SetAttr, _ino, size=st.none() | st.integers(0, 2**40)),
    st.builds(SetXattr, _ino, st.binary(min_size=1, max_size=8), st.none() | st.binary(max_size=8)),
    st.builds(Prepare, _ino, _name), st.builds(Cancel, _ino, _name),
    st.builds(SnapshotMark, st.binary(min_size=32, max_size=32),
              st.dictionaries(st.sampled_from(OTHERS), st.integers(1, 50)).map(VV)),
)


@st.composite
def valid_log_blocks(draw):
    first = draw(st.integers(1, 40))
    bodies = draw(st.lists(BODIES, min_size=1, max_size=4))
    if first == 1:
        bodies = [End(VOL)] + bodies
    recs, seen = [], {}
    for i, b in enumerate(bodies):
        for w in draw(st.lists(st.sampled_from(OTHERS), max_size=2)):
            seen[w] = seen.get(w, 0) + draw(st.integers(1, 3))
        recs.append(make_record(W.id, first + i, VV(seen), draw(st.integers(-2**40, 2**62)), b))
    prev = None if first == 1 else draw(st.binary(min_size=32, max_size=32))
    return encode_block(VOL, W.id, prev, recs), recs


@FUZZ
@given(valid_log_blocks(), st.data())
def test_log_blocks_decode_consistently_or_raise_record_error(block, data):
    raw, recs = block
    assert decode_block(raw).records == tuple(recs)
    b = refused(decode_block, data.draw(mutations(raw)), errors=RecordError)
    if b is not None:
        assert decode_block(encode_block(b.volume, b.writer, b.prev, b.records)) == b


@FUZZ
@given(valid_log_blocks(), st.data())
def test_standalone_records_decode_consistently_or_raise_record_error(block, data):
    rec = block[1][-1]
    raw = encode_record(rec)
    assert decode_record(raw) == rec
    r = refused(decode_record, data.draw(mutations(raw)), errors=RecordError)
    if r is not None:
        assert decode_record(encode_record(r)) == r


# --------------------------------------------------------------------------
# Log-heads


@st.composite
def valid_heads(draw):
    seq = draw(st.integers(0, 2**40))
    vv = {w: draw(st.integers(1, 2**40)) for w in draw(st.sets(st.sampled_from(OTHERS)))}
    if seq:
        vv[W.id] = seq
    return LogHead.make(W, VOL, seq, draw(st.binary(min_size=32, max_size=32)) if seq else None,
                        VV(vv), draw(st.integers(1, 2**40)), time_ns=draw(st.integers(0, 2**62)),
                        snap=draw(st.none() | st.binary(min_size=32, max_size=32)))


@FUZZ
@given(valid_heads(), st.data())
def test_log_heads_verify_only_as_signed(head, data):
    raw = data.draw(mutations(head.encode()))
    h = refused(decode_head, raw, errors=BadLogHead)
    refused(LogHead.decode, raw, errors=(BadLogHead, FrameError))
    if h is None:
        return
    assert decode_head(h.encode()) == h
    try:
        h.verify(W.public_key, VOL)
    except BadLogHead:
        return
    assert h == head, "a mutated log-head verified with other contents"


# --------------------------------------------------------------------------
# Certificates and ring descriptors

OWNER = Identity.from_seed(b"fuzz owner")
MEMBERS = [Identity.from_seed(b"fuzz member%d" % i) for i in range(4)]
RING = RingDescriptor.create(OWNER, "fuzz", [(m.public_key, f"10.9.0.{i}:7000")
                                             for i, m in enumerate(MEMBERS)])


@st.composite
def valid_certs(draw):
    body = CertBody(RING.ring_id, 0, draw(st.binary(min_size=32, max_size=32)),
                    draw(st.integers(1, 2**40)), draw(st.binary(min_size=32, max_size=32)),
                    draw(st.none() | st.binary(min_size=32, max_size=32)),
                    draw(st.integers(0, 2**45)))
    signers = draw(st.lists(st.sampled_from(MEMBERS), min_size=3, max_size=4, unique=True))
    return Certificate(body, {m.id: body.sign(m) for m in signers})


@FUZZ
@given(valid_certs(), st.data())
def test_certificates_verify_only_as_signed(cert, data):
    verify(cert, RING)
    raw = data.draw(mutations(cert.encode()))
    c = refused(Certificate.decode, raw, errors=BadCertificate)
    refused(CertBody.decode, raw, errors=BadCertificate)
    if c is None:
        return
    assert Certificate.decode(c.encode()) == c
    try:
        verify(c, RING)
    except BadCertificate:
        return
    assert c.body == cert.body, "a mutated certificate verified for another body"


@FUZZ
@given(st.data())
def test_ring_descriptors_verify_only_as_signed(data):
    raw = data.draw(mutations(RING.encode()))
    d = refused(RingDescriptor.decode, raw, errors=BadDescriptor)
    if d is None:
        return
    assert RingDescriptor.decode(d.encode()) == d
    try:
        d.verify_owner()
    except BadDescriptor:
        return
    assert d.fields() == RING.fields()


JSON_LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(), st.text(max_size=70))
JSON = st.recursive(JSON_LEAVES, lambda c: st.lists(c, max_size=3)
                    | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=10)


@st.composite
def descriptor_json(draw):
    """The JSON form with one field replaced by any JSON value (floats
    include Infinity and NaN, which Python's json module reads), or text
    that is hardly JSON at all."""
    j = json.loads(RING.to_json())
    how = draw(st.sampled_from(("field", "member", "text", "deep")))
    if how == "field":
        j[draw(st.sampled_from(sorted(j)))] = draw(JSON)
    elif how == "member":
        m = j["members"][draw(st.integers(0, 3))]
        m[draw(st.sampled_from(sorted(m)))] = draw(JSON)
    elif how == "text":
        return draw(byte_mutation(RING.to_json().encode())).decode("utf-8", "replace")
    else:
        n = draw(st.integers(1, 100_000))
        return "[" * n + "]" * n
    return json.dumps(j)


@FUZZ
@given(descriptor_json())
def test_ring_descriptor_json_raises_only_bad_descriptor(text):
    d = refused(RingDescriptor.from_json, text, errors=BadDescriptor)
    if d is not None:
        assert RingDescriptor.from_json(d.to_json()) == d


def test_ring_descriptor_json_with_infinite_or_huge_numbers_is_refused():
    # Found by the test above: int(Infinity) raised OverflowError, and an
    # epoch past 64 bits failed in msgpack, both escaping as tracebacks from
    # `python -m storage.ringnode --ring FILE`.
    for bad in ("Infinity", "1e30", str(2**70), "NaN"):
        text = RING.to_json().replace('"epoch": 0', f'"epoch": {bad}')
        with pytest.raises(BadDescriptor):
            RingDescriptor.from_json(text)
    with pytest.raises(BadDescriptor):
        RingDescriptor.from_json("[" * 100_000 + "]" * 100_000)


# --------------------------------------------------------------------------
# Views

VIEW_OWNER = Identity.from_seed(b"fuzz view owner")
VIEW, VKEY = create_volume(VIEW_OWNER, "fuzzvol", ring=[m.id for m in MEMBERS],
                           volume_key=b"\x09" * 32)
VIEW = VIEW.add_writer(VIEW_OWNER, VKEY, W.public_key, VV({VIEW_OWNER.id: 4}))


@FUZZ
@given(st.data())
def test_views_decode_only_as_signed(data):
    raw = data.draw(mutations(VIEW.encode()))
    v = refused(View.decode, raw, errors=BadView)
    if v is not None:   # View.decode verifies the owner's signature
        assert v == VIEW, "a mutated view verified with other contents"


def test_a_volume_name_too_long_for_a_view_is_refused_at_creation():
    # Found by the CLI tests: `p2pfs mkfs DIR --name <300 chars>` made a
    # volume whose view no reader can decode (names are at most 255).
    with pytest.raises(BadView):
        create_volume(VIEW_OWNER, "x" * 256)
    view, _ = create_volume(VIEW_OWNER, "y" * 255)
    assert View.decode(view.encode()) == view


# --------------------------------------------------------------------------
# Objects: root blocks, update requests, trees


@st.composite
def valid_roots(draw):
    size = draw(st.integers(0, 2**40))
    if size <= 64 and draw(st.booleans()):
        tree = TreeRef(size, 0, None, draw(st.binary(min_size=size, max_size=size)))
    else:
        bs, fan = draw(st.sampled_from([(MAX_BLOCK, MAX_BLOCK // 32), (128, 4), (1, 2)]))
        from storage.blocktree import depth_for
        tree = TreeRef(size, depth_for(size, bs, fan),
                       draw(st.none() | st.binary(min_size=32, max_size=32)), None, bs, fan)
    seq = draw(st.integers(1, 2**40))
    ctime = draw(st.integers(0, 2**50))
    return Root(draw(st.binary(min_size=32, max_size=32)), seq,
                None if seq == 1 else draw(st.binary(min_size=32, max_size=32)),
                ctime, ctime + draw(st.integers(0, 2**20)), tree,
                draw(st.dictionaries(st.text(max_size=8), st.binary(max_size=16), max_size=3)))


@FUZZ
@given(valid_roots(), st.data())
def test_root_blocks_are_canonical_or_refused(root, data):
    raw = data.draw(mutations(root.encode()))
    r = refused(Root.decode, raw, errors=BadRootBlock)
    if r is not None:
        assert r.encode() == raw


@FUZZ
@given(st.data())
def test_update_requests_verify_only_as_signed(data):
    seq = data.draw(st.integers(1, 2**40))
    req = UpdateRequest.create(W, aguid=b"\x01" * 32, prev=None if seq == 1 else b"\x02" * 32,
                               seq=seq, vguid=b"\x03" * 32, time=5,
                               name="obj" if seq == 1 else None)
    raw = data.draw(mutations(req.encode()))
    r = refused(UpdateRequest.decode, raw, errors=BadUpdateRequest)
    if r is None:
        return
    assert r.encode() == raw
    try:
        r.verify()
    except BadUpdateRequest:
        return
    assert r == req


@FUZZ
@given(VALUES)
def test_tree_refs_raise_only_bad_tree(value):
    ref = refused(TreeRef.from_dict, value, errors=BadTree)
    if ref is not None:
        assert TreeRef.from_dict(ref.to_dict()) == ref


@FUZZ
@given(st.binary(max_size=300), st.integers(2, 8))
def test_indirect_blocks_raise_only_bad_tree(raw, fanout):
    kids = refused(decode_node, raw, fanout, errors=BadTree)
    if kids is not None:
        assert 1 <= len(kids) <= fanout and kids[-1] is not None


# --------------------------------------------------------------------------
# Snapshots, read through the real in-memory block access


def _snapshot_fixture():
    """A snapshot of a small file system (a file with inline data packed into
    a DATA block, a directory, a symlink, an xattr) in a MemoryBlockAccess."""
    blocks = MemoryBlockAccess(b"\x0b" * 32)
    st_ = FsState()
    bodies = [End(VOL), MkInode(2, FileType.REG, 0o644, 1, 1), Link(ROOT_INO, b"f", 2),
              Write(2, 0, data=b"q" * 3000), Write(2, 9000, data=b"z" * 100),
              MkInode(3, FileType.DIR, 0o755, 0, 0), Link(ROOT_INO, b"d", 3),
              MkInode(4, FileType.LNK, 0o777, 0, 0, b"target"), Link(3, b"l", 4),
              SetXattr(3, b"user.k", b"v")]
    for i, b in enumerate(bodies, 1):
        fs_apply(st_, make_record(W.id, i, VV(), 1000 + i, b))
    writer = SnapshotWriter(blocks, VOL, W.id)
    knowledge = VV({W.id: len(bodies)})
    root = trio.run(lambda: writer.write(st_, knowledge, None, {}, time_ns=5))
    info = trio.run(load_info, blocks, root, VOL)
    return blocks, root, info


SNAP = _snapshot_fixture()


def _load(blocks, root):
    async def go():
        info = await load_info(blocks, root, VOL)
        return await load_state(blocks, info)
    return trio.run(go)


def _snap_plain(g: bytes) -> bytes:
    blocks = SNAP[0]
    return seal.sealer(b"\x0b" * 32).open(Kind.SNAPSHOT, blocks.blocks[g], g)


def _put(plain: bytes) -> bytes:
    return trio.run(SNAP[0].put, Kind.SNAPSHOT, plain)


def test_the_snapshot_fixture_loads():
    state = _load(SNAP[0], SNAP[1])
    assert sorted(state.inodes) == [1, 2, 3, 4] and state.inodes[2].size == 9100


@FUZZ
@given(st.data())
def test_snapshot_roots_raise_only_snapshot_errors(data):
    blocks, root, _ = SNAP
    g = _put(data.draw(mutations(_snap_plain(root))))
    refused(_load, blocks, g, errors=(SnapshotError, BlockError))


@FUZZ
@given(st.data())
def test_snapshot_pages_and_index_raise_only_snapshot_errors(data):
    blocks, root, info = SNAP
    root_d = msgpack.unpackb(_snap_plain(root), raw=False)
    index = msgpack.unpackb(_snap_plain(info.index[0]), raw=False)
    which = data.draw(st.sampled_from(["index"] + [p for p, _ in index["l"]]))
    if which == "index":
        new_index = data.draw(mutations(msgpack.packb(index, use_bin_type=True)))
    else:
        at = [p for p, _ in index["l"]].index(which)
        page = data.draw(mutations(_snap_plain(index["l"][at][1])))
        index["l"][at][1] = _put(page)
        new_index = msgpack.packb(index, use_bin_type=True)
    root_d["idx"] = [_put(new_index)]
    g = _put(msgpack.packb(root_d, use_bin_type=True))
    refused(_load, blocks, g, errors=(SnapshotError, BlockError))


# --------------------------------------------------------------------------
# PBFT messages

CTX = rm.RingContext(RING)
BASE = (0, b"\x00" * 32)


def _req(i: int, r: int) -> rm.Request:
    c = MEMBERS[i % 4]
    op = b"op%d" % r
    return rm.Request(c.public_key, r, op, c.sign(rm.Request.signing_bytes(
        RING.ring_id, c.public_key, r, op)))


@FUZZ
@given(st.data())
def test_batches_raise_only_bad_message(data):
    batch = rm.encode_batch(data.draw(st.integers(0, 2**62)),
                            [_req(i, r) for i, r in enumerate(
                                data.draw(st.lists(st.integers(0, 9), max_size=3, unique=True)))])
    raw = data.draw(mutations(batch))
    out = refused(rm.decode_batch, raw, errors=rm.BadMessage)
    if out is not None:
        assert rm.decode_batch(rm.encode_batch(out[0], list(out[1]))) == out


@FUZZ
@given(VALUES)
def test_message_shapes_raise_only_bad_message(value):
    refused(rm.check_shape, value, errors=rm.BadMessage)


# A Byzantine member signs whatever it likes: messages of valid shape with
# arbitrary field values, correctly signed by member i (or badly signed,
# or naming a member the ring does not have).
_small = st.integers(0, 6)
_digest = st.sampled_from([rm.NULL_DIGEST, b"\x01" * 32, guid(b"x")])


def _sign(m: dict, draw) -> dict:
    if m["i"] < 4 and draw(st.booleans()):
        return CTX.sign(MEMBERS[m["i"]], m)
    m["s"] = draw(st.binary(min_size=64, max_size=64))
    return m


@st.composite
def pre_prepares(draw):
    batch = draw(st.sampled_from([rm.NULL_BATCH, rm.encode_batch(1, [_req(0, 1)]), b"\x93"]))
    d = guid(batch) if draw(st.booleans()) else draw(_digest)
    return _sign({"t": "pp", "v": draw(_small), "n": draw(_small), "d": d,
                  "i": draw(st.integers(0, 5)), "s": b"", "b": batch}, draw)


@st.composite
def prepares(draw, pp):
    same = draw(st.booleans())
    return _sign({"t": "p", "v": pp["v"] if same else draw(_small),
                  "n": pp["n"] if same else draw(_small), "d": pp["d"],
                  "i": draw(st.integers(0, 5)), "s": b""}, draw)


@st.composite
def checkpoints(draw):
    return _sign({"t": "ck", "n": draw(_small), "d": draw(_digest),
                  "i": draw(st.integers(0, 5)), "s": b""}, draw)


@st.composite
def view_changes(draw, v=None):
    pps = draw(st.lists(pre_prepares(), max_size=2))
    prepared = [{"pp": pp, "ps": draw(st.lists(prepares(pp), max_size=3))} for pp in pps]
    return _sign({"t": "vc", "v": draw(_small) if v is None else v, "h": draw(st.integers(0, 3)),
                  "C": draw(st.lists(checkpoints(), max_size=3)), "P": prepared,
                  "i": draw(st.integers(0, 5)), "s": b""}, draw)


@st.composite
def new_views(draw):
    v = draw(_small)
    return _sign({"t": "nv", "v": v, "V": draw(st.lists(view_changes(v), max_size=4)),
                  "O": draw(st.lists(pre_prepares(), max_size=2)),
                  "i": draw(st.integers(0, 5)), "s": b""}, draw)


@FEW
@given(pre_prepares(), st.data())
def test_signed_pre_prepares_and_prepared_certificates(pp, data):
    assert rm.check_shape(pp) == "pp"
    refused(rm.check_pre_prepare, CTX, pp, errors=rm.BadMessage)
    ps = data.draw(st.lists(prepares(pp), max_size=3))
    refused(rm.check_prepared, CTX, pp, ps, errors=rm.BadMessage)


@FEW
@given(view_changes())
def test_signed_view_changes_raise_only_bad_message(vc):
    assert rm.check_shape(vc) == "vc"
    refused(rm.check_view_change, CTX, vc, 8, BASE, errors=rm.BadMessage)


@FEW
@given(new_views())
def test_signed_new_views_raise_only_bad_message(nv):
    assert rm.check_shape(nv) == "nv"
    refused(rm.check_new_view, CTX, nv, 8, BASE, errors=rm.BadMessage)


# --------------------------------------------------------------------------
# Sealed blocks

SEALED = seal.seal(b"\x0c" * 32, Kind.DATA, b"some file data" * 10)


@FUZZ
@given(st.data())
def test_sealed_blocks_open_only_when_intact(data):
    raw = data.draw(mutations(SEALED.data, packed=False))
    for g in (None, SEALED.bguid):
        out = refused(seal.open, b"\x0c" * 32, Kind.DATA, raw, g, errors=(BadBlock, BlockCorrupt))
        assert out in (None, b"some file data" * 10)
    refused(seal.kind_of, raw, errors=BadBlock)


# --------------------------------------------------------------------------
# Names of past versions (``.snapshots/<name>``: typed by users)


@FUZZ
@given(st.text(max_size=40) | st.from_regex(r"\A[0-9T:.\-Z@+~]{0,32}\Z"))
def test_version_names_parse_or_are_none(text):
    out = parse_time(text)
    assert out is None or (type(out[0]) is int and (out[1] is None or type(out[1]) is int))


# --------------------------------------------------------------------------
# Block store on-disk entries

def _poke(path, db: bytes, key: bytes, value: bytes) -> None:
    """Overwrite one entry of the store's LMDB behind its back (disk damage:
    LMDB has no checksums). The store must be closed."""
    env = lmdb.open(str(path), max_dbs=8, sync=False)
    try:
        with env.begin(write=True) as txn:
            txn.put(key, value, db=env.open_db(db, txn=txn))
    finally:
        env.close()


def _damaged_store(tmp_path, db: bytes, key: bytes, value: bytes):
    """A block store holding a block, a tombstone and a quarantined copy,
    with one entry of ``db`` then overwritten with ``value``."""
    d = tmp_path / "store"
    a, b = seal.seal(b"\x0d" * 32, Kind.DATA, b"a"), seal.seal(b"\x0d" * 32, Kind.DATA, b"b")
    with BlockStore(d, quota=1 << 20, sync=False) as s:
        s.put_many([(a.bguid, a.data), (b.bguid, b.data)])
        s.delete(b.bguid, epoch=7)
    _poke(d, b"blocks", a.bguid, a.data[:-1] + b"!")
    with BlockStore(d, quota=1 << 20, sync=False) as s:
        with pytest.raises(BlockCorrupt):
            s.get(a.bguid)                      # quarantined now
        s.put(a.bguid, a.data)
    target = {b"stamps": a.bguid, b"tombstones": b.bguid, b"quarantine": a.bguid}.get(db, key)
    _poke(d, db, target, value)
    return BlockStore(d, quota=1 << 20, sync=False), a.bguid, b.bguid


def _exercise(store, a, b):
    calls = [lambda: store.get(a), lambda: store.states([a, b]), lambda: store.stored_at(a),
             lambda: store.tombstone(b), lambda: store.tombstones(), lambda: store.quarantined(),
             lambda: store.stats(), lambda: store.list_bguids(),
             lambda: store.purge_tombstones(before_epoch=100),
             lambda: store.delete_many([a], epoch=9)]
    for call in calls:
        refused(call, errors=StorageError)
    _still_usable(store)


def _still_usable(store):
    """Damage to one entry leaves the store working: new blocks go in and
    come out, and after a repair the counters are what the entries say
    (a second repair finds nothing left to fix)."""
    c = seal.seal(b"\x0d" * 32, Kind.DATA, b"c")
    assert store.put(c.bguid, c.data, revive=True)
    assert store.get(c.bguid) == c.data
    store.repair()
    again = store.repair()
    assert not again.counters_fixed and again.stamps_rewritten == again.quarantined == 0
    s = store.stats()
    assert s.used >= s.bytes + s.quarantined_bytes


ENTRIES = [(b"stamps", b""), (b"tombstones", b""), (b"quarantine", b""),
           (b"meta", b"used"), (b"meta", b"bytes"), (b"meta", b"corruptions"),
           (b"meta", b"sums")]


@pytest.mark.parametrize("db, key", ENTRIES)
def test_damaged_store_entries_raise_only_storage_errors(tmp_path, db, key):
    store, a, b = _damaged_store(tmp_path, db, key, b"\x00\x01\x02")
    try:
        _exercise(store, a, b)
    finally:
        store.close()


@pytest.mark.parametrize("db, key, value", [
    (b"stamps", b"", struct.pack(">dI", 1.0, 10**6)),
    (b"meta", b"bytes", bytes(8)),
    (b"meta", b"used", bytes(8)),
], ids=["stamp-length", "bytes-counter", "used-counter"])
def test_damaged_store_counters_raise_only_storage_errors(tmp_path, db, key, value):
    store, a, b = _damaged_store(tmp_path, db, key, value)
    try:
        refused(store.delete_many, [a], errors=StorageError)
        _still_usable(store)
    finally:
        store.close()


@st.composite
def same_length_damage(draw):
    """Damage that keeps a value's length and the lengths the store counts
    with (the tests above change those): a stamp's time (NaN, negative,
    huge), a tombstone's epoch and time, a quarantine entry, the corruption
    count."""
    db, key = draw(st.sampled_from([(b"stamps", b""), (b"tombstones", b""),
                                    (b"quarantine", b""), (b"meta", b"corruptions")]))
    if db == b"stamps":
        length = struct.pack(">I", seal.OVERHEAD + len(b"a"))   # the block's true length
        return db, key, draw(st.binary(min_size=8, max_size=8)) + length
    if db == b"tombstones":
        return db, key, draw(st.binary(min_size=16, max_size=16))
    if db == b"quarantine":
        return db, key, draw(st.binary(min_size=8, max_size=80))
    return db, key, draw(st.binary(min_size=8, max_size=8))


@settings(max_examples=_examples(25), suppress_health_check=[HealthCheck.too_slow])
@given(same_length_damage())
def test_damaged_store_entries_of_the_right_length(tmp_path_factory, damage):
    store, a, b = _damaged_store(tmp_path_factory.mktemp("s"), *damage)
    try:
        _exercise(store, a, b)
    finally:
        store.close()


# --------------------------------------------------------------------------
# Publish batches (overlay/publish_batch.py): bounded lists of entries, the
# frames a hop decodes before it stores pointers for a whole burst

from overlay import messages as tap  # noqa: E402
from overlay.node import TapestryNode  # noqa: E402
from overlay.wire.simnet import SimNetwork  # noqa: E402
from overlay.wire.transport import Refused  # noqa: E402

_ENTRY = st.fixed_dictionaries({"target": st.binary(min_size=32, max_size=32),
                                "obj": st.binary(min_size=32, max_size=32),
                                "epoch": st.integers(0, 2**64 - 1)})
_PEER = st.fixed_dictionaries({"id": st.binary(min_size=32, max_size=32),
                               "addr": st.text(max_size=20)})


@st.composite
def batch_frames(draw):
    entries = draw(st.lists(_ENTRY, max_size=40))
    if draw(st.booleans()):
        body = {"origin": draw(_PEER), "holder": draw(_PEER), "level": draw(st.integers(0, 64)),
                "hops": draw(st.integers(0, 255)), "entries": entries}
        if draw(st.booleans()):
            body["detours"] = draw(st.integers(0, 255))
        return tap.PUBLISH_BATCH, body
    return tap.POINTER_BATCH, {"holder": draw(_PEER), "entries": entries}


def _check_batch_body(body: dict) -> None:
    assert len(body["entries"]) <= tap.MAX_BATCH
    for e in body["entries"]:
        assert set(e) == {"target", "obj", "epoch"}
        assert len(e["target"]) == len(e["obj"]) == 32 and 0 <= e["epoch"]


@FUZZ
@given(batch_frames(), st.data())
def test_publish_batches_decode_within_bounds_or_raise_frame_error(frame, data):
    msg_type, body = frame
    payload = frames.encode(FrameKind.REQUEST, msg_type, 1, body)[frames.HEADER_BYTES:]
    raw = data.draw(mutations(payload))
    f = refused(frames.decode, raw, errors=FrameError)
    if f is not None and f.kind == FrameKind.REQUEST and f.type in (tap.PUBLISH_BATCH,
                                                                     tap.POINTER_BATCH):
        _check_batch_body(f.body)
        again = frames.encode(f.kind, f.type, f.id, f.body)
        assert frames.decode(again[frames.HEADER_BYTES:]) == f


@FEW
@given(st.integers(1, 3), st.sampled_from([tap.PUBLISH_BATCH, tap.POINTER_BATCH]))
def test_a_batch_over_the_bound_is_a_frame_error(extra, msg_type):
    entry = {"target": b"\x01" * 32, "obj": b"\x02" * 32, "epoch": 1}
    peer = {"id": b"\x03" * 32, "addr": "sim:x"}
    body = {"holder": peer, "entries": [entry] * (tap.MAX_BATCH + extra)}
    if msg_type == tap.PUBLISH_BATCH:
        body.update(origin=peer, level=0, hops=0)
    payload = msgpack.packb({"v": frames.PROTOCOL_VERSION, "k": 0, "t": msg_type, "i": 1,
                             "b": body}, use_bin_type=True)
    with pytest.raises(FrameError):
        frames.decode(payload)
    with pytest.raises(ValueError):      # and we never send one
        frames.encode(FrameKind.REQUEST, msg_type, 1, body)


@FEW
@given(batch_frames(), st.data())
def test_decoded_batches_reach_the_handlers_without_surprises(frame, data):
    """Whatever decodes, the handlers take it or refuse it with a code: a
    pointer batch stores one pointer per distinct (object, holder, target),
    a publish batch at a node not running is refused."""
    msg_type, body = frame
    payload = frames.encode(FrameKind.REQUEST, msg_type, 1, body)[frames.HEADER_BYTES:]
    f = refused(frames.decode, data.draw(mutations(payload)), errors=FrameError)
    if f is None or f.kind != FrameKind.REQUEST or f.type not in (tap.PUBLISH_BATCH,
                                                                   tap.POINTER_BATCH):
        return
    node = TapestryNode(SimNetwork(seed=1).add(Identity.from_seed(b"fuzz batch")))
    sender = b"\x09" * 32

    async def main():
        if f.type == tap.POINTER_BATCH:
            assert await node.router.batch.on_pointers(sender, f.body) == {}
            stored = {(p.obj, p.target) for p in node.pointers.all()}
            assert stored == {(e["obj"], e["target"]) for e in f.body["entries"]}
        else:
            with pytest.raises(Refused) as e:
                await node.router.batch.on_batch(sender, f.body)
            assert e.value.code in ("bad_request", "not_running")

    trio.run(main)
