"""PBFT's proofs, checked without a network: prepared certificates,
checkpoint proofs, VIEW-CHANGEs and NEW-VIEWs. A faulty new primary must not
be able to drop or replace a request that may have been decided, and nobody
can cite what others did not sign."""

import copy

import pytest
from hypothesis import given, settings, strategies as st

from overlay.wire import frames
from overlay.wire.ids import Identity, guid
from storage import ring_messages as M
from storage.certificate import RingDescriptor
from storage.ring_messages import BadMessage, Request, RingContext

OWNER = Identity.from_seed(b"o")
IDS = [Identity.from_seed(b"m%d" % i) for i in range(4)]
RING = RingDescriptor.create(OWNER, "r", [(i.public_key, "sim:x") for i in IDS])
CTX = RingContext(RING)
BASE = (0, guid(b"initial state"))
L = 16
CLIENT = Identity.from_seed(b"c")


def batch(k: int) -> bytes:
    op = b"op%d" % k
    r = Request(CLIENT.public_key, k, op,
                CLIENT.sign(Request.signing_bytes(RING.ring_id, CLIENT.public_key, k, op)))
    return M.encode_batch(1000 + k, [r])


def prepared(v: int, n: int, b: bytes, backups=None):
    """A prepared certificate for batch b at (v, n): the primary's
    pre-prepare and prepares from 2f backups."""
    p = CTX.primary(v)
    pp = M.pre_prepare(CTX, IDS[p], p, v, n, b)
    backups = backups if backups is not None else [i for i in range(4) if i != p][:2]
    return pp, [M.prepare(CTX, IDS[i], i, v, n, pp["d"]) for i in backups]


def vc(i: int, v: int, certs=(), h=0, proof=()):
    return M.view_change(CTX, IDS[i], i, v, h, list(proof), list(certs))


def test_prepared_certificate_checks():
    pp, ps = prepared(0, 1, batch(1))
    M.check_prepared(CTX, pp, ps)
    with pytest.raises(BadMessage):                      # only f prepares
        M.check_prepared(CTX, pp, ps[:1])
    with pytest.raises(BadMessage):                      # one member counted twice
        M.check_prepared(CTX, pp, [ps[0], ps[0]])
    with pytest.raises(BadMessage):                      # the primary cannot prepare
        M.check_prepared(CTX, pp, [ps[0], M.prepare(CTX, IDS[0], 0, 0, 1, pp["d"])])
    other = M.pre_prepare(CTX, IDS[0], 0, 0, 1, batch(2))
    with pytest.raises(BadMessage):                      # prepares of another digest
        M.check_prepared(CTX, other, ps)
    forged = dict(pp, b=batch(3))
    with pytest.raises(BadMessage):                      # batch swapped under the digest
        M.check_prepared(CTX, forged, ps)
    not_primary = M.pre_prepare(CTX, IDS[1], 1, 0, 1, batch(1))
    with pytest.raises(BadMessage):
        M.check_prepared(CTX, not_primary, ps)


def test_relayed_votes_are_checked_as_far_as_needed():
    """PREPARED/COMMITTED relay backups' signed votes: a member accepts them
    only for the right (view, seq, digest), from distinct backups, validly
    signed; it checks only as many as it needs, and a signature it already
    knows is trusted only under the very fields it was checked with."""
    pp, _ = prepared(0, 1, batch(1))
    key = (0, 1, pp["d"])
    cs = [M.commit(CTX, IDS[i], i, 0, 1, pp["d"]) for i in (1, 2, 3)]
    assert M.check_votes(CTX, cs, key, 0, 2) == cs[:2]
    with pytest.raises(BadMessage):                      # too few
        M.check_votes(CTX, cs[:1], key, 0, 2)
    with pytest.raises(BadMessage):                      # one backup twice
        M.check_votes(CTX, [cs[0], cs[0]], key, 0, 2)
    with pytest.raises(BadMessage):                      # the primary's is implied, not relayed
        M.check_votes(CTX, [M.commit(CTX, IDS[0], 0, 0, 1, pp["d"])] + cs[:2], key, 0, 2)
    with pytest.raises(BadMessage):                      # for another seq
        M.check_votes(CTX, [M.commit(CTX, IDS[1], 1, 0, 2, pp["d"])] + cs[1:], key, 0, 2)
    forged = dict(cs[1], s=IDS[0].sign(b"x"))
    with pytest.raises(BadMessage):                      # a bad signature, when needed
        M.check_votes(CTX, [cs[0], forged], key, 0, 2)
    assert M.check_votes(CTX, [cs[0], cs[2], forged], key, 0, 2) == [cs[0], cs[2]]
    # Known votes need no check, but "known" means these fields and this
    # signature: member 1's signature moved onto another digest is checked.
    known = {(c["t"], c["v"], c["n"], c["d"], c["i"], c["s"]) for c in cs}

    def is_known(m):
        return (m["t"], m["v"], m["n"], m["d"], m["i"], m["s"]) in known

    moved = dict(cs[0], d=guid(b"another batch"))
    with pytest.raises(BadMessage):
        M.check_votes(CTX, [moved, dict(cs[1], d=moved["d"])], (0, 1, moved["d"]), 0, 2,
                      is_known)


def test_checkpoint_proofs():
    d = guid(b"state at 8")
    proof = [M.checkpoint(CTX, IDS[i], i, 8, d) for i in range(3)]
    assert M.check_checkpoint_proof(CTX, 8, proof, BASE) == d
    assert M.check_checkpoint_proof(CTX, 0, [], BASE) == BASE[1]
    with pytest.raises(BadMessage):
        M.check_checkpoint_proof(CTX, 8, proof[:2], BASE)
    with pytest.raises(BadMessage):
        M.check_checkpoint_proof(CTX, 8, [], BASE)       # only the epoch base needs none
    mixed = proof[:2] + [M.checkpoint(CTX, IDS[3], 3, 8, guid(b"other"))]
    with pytest.raises(BadMessage):
        M.check_checkpoint_proof(CTX, 8, mixed, BASE)
    with pytest.raises(BadMessage):                      # a signature moved to another id
        M.check_checkpoint_proof(CTX, 8, proof[:2] + [dict(proof[2], i=3)], BASE)


def test_new_view_re_proposes_the_highest_prepared_batch():
    """Seq 1 prepared in view 0 (batch A) and, by others, in view 1 (batch
    B): the new view must re-propose B, the most recent; seq 2 prepared
    nowhere becomes a null batch; seq 3 prepared in view 0 is kept."""
    a, b, c = batch(1), batch(2), batch(3)
    vcs = [vc(1, 2, [prepared(0, 1, a), prepared(0, 3, c)]),
           vc(2, 2, [prepared(1, 1, b)]),
           vc(3, 2)]
    for x in vcs:
        M.check_view_change(CTX, x, L, BASE)
    min_s, max_s, chosen, best = M.compute_new_view(vcs)
    assert (min_s, max_s) == (0, 3)
    assert [(n, d) for n, d, _ in chosen] == [(1, guid(b)), (2, M.NULL_DIGEST), (3, guid(c))]
    nv = M.new_view(CTX, IDS[2], 2, 2, vcs,
                    [M.pre_prepare(CTX, IDS[2], 2, 2, n, x) for n, _, x in chosen])
    assert M.check_new_view(CTX, nv, L, BASE)[2] == chosen


def test_faulty_new_primary_cannot_drop_or_replace_a_prepared_request():
    a = batch(1)
    vcs = [vc(0, 2, [prepared(1, 1, a, backups=[0, 2])]), vc(2, 2), vc(3, 2)]
    honest = [M.pre_prepare(CTX, IDS[2], 2, 2, 1, a)]
    M.check_new_view(CTX, M.new_view(CTX, IDS[2], 2, 2, vcs, honest), L, BASE)
    for bad in ([M.pre_prepare(CTX, IDS[2], 2, 2, 1, M.NULL_BATCH)],   # dropped
                [M.pre_prepare(CTX, IDS[2], 2, 2, 1, batch(9))],       # replaced
                []):                                                   # omitted
        with pytest.raises(BadMessage):
            M.check_new_view(CTX, M.new_view(CTX, IDS[2], 2, 2, vcs, bad), L, BASE)
    # Leaving out the view-change that carries the certificate: too few cited.
    with pytest.raises(BadMessage):
        M.check_new_view(CTX, M.new_view(CTX, IDS[2], 2, 2, vcs[1:], []), L, BASE)
    # Citing a view-change twice to make up the numbers.
    with pytest.raises(BadMessage):
        M.check_new_view(CTX, M.new_view(CTX, IDS[2], 2, 2, [vcs[1], vcs[1], vcs[2]], []),
                         L, BASE)
    # Somebody else's NEW-VIEW for view 2.
    with pytest.raises(BadMessage):
        M.check_new_view(CTX, M.new_view(CTX, IDS[1], 1, 2, vcs, honest), L, BASE)


def test_view_change_cannot_be_altered_or_overclaim():
    x = vc(1, 2, [prepared(0, 1, batch(1))])
    M.check_view_change(CTX, x, L, BASE)
    with pytest.raises(BadMessage):          # the new primary strips its prepared set
        M.check_view_change(CTX, dict(x, P=[]), L, BASE)
    with pytest.raises(BadMessage):          # certificate from the view being entered
        M.check_view_change(CTX, vc(1, 2, [prepared(2, 1, batch(1))]), L, BASE)
    with pytest.raises(BadMessage):          # outside the water marks
        M.check_view_change(CTX, vc(1, 2, [prepared(0, L + 1, batch(1))]), L, BASE)
    with pytest.raises(BadMessage):          # a stable checkpoint without its proof
        M.check_view_change(CTX, vc(1, 2, h=8), L, BASE)


def test_signatures_bind_ring_and_epoch():
    """A message signed for epoch 0 of this ring fails in epoch 1 (or in any
    other ring): old messages cannot be replayed across a reconfiguration."""
    p = M.prepare(CTX, IDS[1], 1, 0, 1, guid(b"x"))
    CTX.check_sig(p)
    nxt = RING.successor(IDS[3].id, Identity.from_seed(b"n").public_key, "sim:n")
    with pytest.raises(BadMessage):
        RingContext(nxt).check_sig(p)


def test_shapes_and_batches_refuse_garbage():
    for junk in (None, [], {"t": "zz"}, {"t": "p", "v": -1}, {"t": "pp", "v": 0, "n": 1},
                 {"t": "c", "v": 0, "n": 1, "d": b"short", "i": 0}):
        with pytest.raises(BadMessage):
            M.check_shape(junk)
    for junk in (b"", b"\xc1", M.encode_batch(1, [])[:-1] + b"\x91",
                 M.encode_batch(0, []) + b"x"):
        with pytest.raises(BadMessage):
            M.decode_batch(junk)
    r = M.decode_batch(batch(1))[1][0]
    with pytest.raises(BadMessage):          # one request twice in a batch
        M.decode_batch(M.encode_batch(1, [r, r]))


# The normal case's messages have a fast shape check (ring_messages._FAST):
# it must never accept what the schema refuses.

_ODD = st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64), st.binary(max_size=70),
                 st.text(max_size=6), st.lists(st.integers(), max_size=2),
                 st.dictionaries(st.text(max_size=2), st.integers(), max_size=2))


def _samples() -> list[dict]:
    b = batch(1)
    p1 = M.prepare(CTX, IDS[1], 1, 0, 1, guid(b))
    p2 = M.prepare(CTX, IDS[2], 2, 0, 1, guid(b))
    c1 = M.commit(CTX, IDS[1], 1, 0, 1, guid(b))
    return [M.pre_prepare(CTX, IDS[0], 0, 0, 1, b), p1, c1,
            M.prepared(0, 0, 1, guid(b), [p1, p2]), M.committed(0, 0, 1, guid(b), [c1]),
            M.shares(1, 1, guid(b), [b"s" * 64, b""])]


def _generic_ok(m) -> bool:
    try:
        M.SHAPES[m["t"]].check(m, m["t"])
        return True
    except frames.FrameError:
        return False


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 5), st.data())
def test_fast_shape_check_agrees_with_the_schema(which, data):
    m = copy.deepcopy(_samples()[which])
    assert M._FAST[m["t"]](m) and _generic_ok(m)
    # Damage one field (maybe inside a relayed vote), drop it, or add one.
    target = m
    for key in ("ps", "cs"):
        if key in m and m[key] and data.draw(st.booleans()):
            target = m[key][0]
    action = data.draw(st.sampled_from(["set", "drop", "add"]))
    key = data.draw(st.sampled_from(sorted(target)))
    if action == "set" and key != "t" or target is not m and action == "set":
        target[key] = data.draw(_ODD)
    elif action == "drop" and key != "t":
        del target[key]
    elif action == "add":
        target[data.draw(st.text(min_size=1, max_size=3).filter(lambda k: k not in target))] = 1
    fast = M._FAST[m["t"]](m)
    assert not fast or _generic_ok(m)
    if fast != _generic_ok(m):      # the fast check may only be stricter ...
        assert not fast
    try:
        assert M.check_shape(m) == m["t"]   # ... and check_shape falls back on the schema
        assert _generic_ok(m)
    except BadMessage:
        assert not _generic_ok(m)
