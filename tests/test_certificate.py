"""Certificates and ring descriptors: only 2f+1 distinct valid member
signatures over the same canonical body make a certificate valid; every
other shape (forged, under-signed, duplicated, mixed, wrong ring, damaged
field by field, random bytes) is refused with a precise BadCertificate."""

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlay.wire.ids import Identity
from storage.certificate import (
    CertBody,
    Certificate,
    RingDescriptor,
    RingMember,
    ring_id_of,
    verify,
)
from storage.ring_errors import BadCertificate, BadDescriptor

OWNER = Identity.from_seed(b"owner")
MEMBERS = [Identity.from_seed(b"member%d" % i) for i in range(4)]
OUTSIDER = Identity.from_seed(b"outsider")
RING = RingDescriptor.create(OWNER, "vol", [(m.public_key, f"sim:{i}") for i, m in
                                            enumerate(MEMBERS)])
BODY = CertBody(RING.ring_id, 0, b"\x01" * 32, 7, b"\x02" * 32, b"\x03" * 32, 1_700_000_000_000)


def cert_by(body, signers):
    return Certificate(body, {m.id: body.sign(m) for m in signers})


def reason(fn):
    with pytest.raises(BadCertificate) as e:
        fn()
    return e.value.reason


def test_valid_certificate_round_trips_and_verifies():
    c = cert_by(BODY, MEMBERS[:3])
    verify(c, RING)
    c2 = Certificate.decode(c.encode())
    assert c2 == c
    verify(c2, RING)
    verify(cert_by(BODY, MEMBERS), RING)    # all four is fine too


def test_under_signed_is_too_few():
    for k in range(3):
        assert reason(lambda: verify(cert_by(BODY, MEMBERS[:k]), RING)) == BadCertificate.TOO_FEW


def test_outsider_signature_is_unknown_signer():
    c = cert_by(BODY, MEMBERS[:3] + [OUTSIDER])
    assert reason(lambda: verify(c, RING)) == BadCertificate.UNKNOWN_SIGNER
    # An outsider cannot stand in for a missing member either.
    c = cert_by(BODY, MEMBERS[:2] + [OUTSIDER])
    assert reason(lambda: verify(c, RING)) == BadCertificate.UNKNOWN_SIGNER


def test_signature_under_wrong_member_id_is_bad_signature():
    sigs = {m.id: BODY.sign(m) for m in MEMBERS[:3]}
    sigs[MEMBERS[3].id] = sigs.pop(MEMBERS[0].id)   # m0's signature claimed as m3's
    assert reason(lambda: verify(Certificate(BODY, sigs), RING)) == BadCertificate.BAD_SIGNATURE


def test_duplicate_signer_refused_at_decode():
    c = cert_by(BODY, MEMBERS[:2])
    d = msgpack.unpackb(c.encode(), raw=False)
    d["sigs"].append(list(d["sigs"][0]))             # member 0 counted twice = "3 signatures"
    data = msgpack.packb(d, use_bin_type=True)
    assert reason(lambda: Certificate.decode(data)) == BadCertificate.DUPLICATE


def test_mixed_bodies_do_not_combine():
    """Two members sign version A, one signs version B: no certificate for
    either. (An equivocating member cannot lend its signature across bodies.)"""
    other = CertBody(*[getattr(BODY, f) for f in ("ring_id", "epoch", "aguid", "seq")],
                     b"\x09" * 32, BODY.prev, BODY.time)
    sigs = {m.id: BODY.sign(m) for m in MEMBERS[:2]}
    sigs[MEMBERS[2].id] = other.sign(MEMBERS[2])
    assert reason(lambda: verify(Certificate(BODY, sigs), RING)) == BadCertificate.BAD_SIGNATURE
    assert reason(lambda: verify(Certificate(other, sigs), RING)) == BadCertificate.BAD_SIGNATURE


def test_wrong_ring_and_wrong_epoch():
    other_ring = RingDescriptor.create(OWNER, "other", [(m.public_key, "sim:x") for m in MEMBERS])
    c = cert_by(BODY, MEMBERS[:3])
    assert reason(lambda: verify(c, other_ring)) == BadCertificate.WRONG_RING
    b = CertBody(RING.ring_id, 1, *[getattr(BODY, f) for f in
                                    ("aguid", "seq", "vguid", "prev", "time")])
    assert reason(lambda: verify(cert_by(b, MEMBERS[:3]), RING)) == BadCertificate.WRONG_RING


FIELDS = {
    "aguid": b"\x11" * 32, "seq": 8, "vguid": b"\x12" * 32, "prev": None,
    "time": 1_700_000_000_001, "epoch": 5, "ring_id": b"\x13" * 32,
}


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_each_field_is_covered_by_the_signatures(name):
    """The corruptor, field by field: changing any one field of a valid
    certificate makes it fail (wrong ring for ring and epoch, bad signature
    for the rest)."""
    kw = {f: getattr(BODY, f) for f in ("ring_id", "epoch", "aguid", "seq", "vguid", "prev",
                                        "time")}
    kw[name] = FIELDS[name]
    c = Certificate(CertBody(**kw), cert_by(BODY, MEMBERS[:3]).signatures)
    want = BadCertificate.WRONG_RING if name in ("ring_id", "epoch") else \
        BadCertificate.BAD_SIGNATURE
    assert reason(lambda: verify(c, RING)) == want


def test_unknown_version_is_named():
    d = msgpack.unpackb(cert_by(BODY, MEMBERS[:3]).encode(), raw=False)
    d["v"] = 2
    data = msgpack.packb(d, use_bin_type=True)
    assert reason(lambda: Certificate.decode(data)) == BadCertificate.UNSUPPORTED


def test_extra_or_missing_keys_are_malformed():
    d = msgpack.unpackb(cert_by(BODY, MEMBERS[:3]).encode(), raw=False)
    assert reason(lambda: Certificate.decode(msgpack.packb({**d, "x": 1}))) == \
        BadCertificate.MALFORMED
    del d["vguid"]
    assert reason(lambda: Certificate.decode(msgpack.packb(d))) == BadCertificate.MALFORMED


# ---- properties -------------------------------------------------------------

bodies = st.builds(
    CertBody,
    ring_id=st.just(RING.ring_id), epoch=st.just(0),
    aguid=st.binary(min_size=32, max_size=32), seq=st.integers(1, 2**64 - 1),
    vguid=st.binary(min_size=32, max_size=32),
    prev=st.none() | st.binary(min_size=32, max_size=32),
    time=st.integers(0, 2**64 - 1),
)
slow = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@slow
@given(body=bodies, signers=st.sets(st.sampled_from(range(4))),
       outsider=st.booleans(), forge=st.sets(st.sampled_from(range(4))))
def test_valid_iff_quorum_of_honest_signatures(body, signers, outsider, forge):
    """A certificate verifies exactly when every signature is a member's
    valid signature of this body and there are at least 2f+1 of them."""
    sigs = {MEMBERS[i].id: body.sign(MEMBERS[i]) for i in signers}
    for i in forge & signers:   # damage some: flip a bit
        s = bytearray(sigs[MEMBERS[i].id])
        s[i] ^= 1
        sigs[MEMBERS[i].id] = bytes(s)
    if outsider:
        sigs[OUTSIDER.id] = body.sign(OUTSIDER)
    cert = Certificate.decode(Certificate(body, sigs).encode())
    ok = len(signers) >= 3 and not (forge & signers) and not outsider
    if ok:
        verify(cert, RING)
    else:
        with pytest.raises(BadCertificate):
            verify(cert, RING)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_decoder_fuzz_random_bytes(data):
    try:
        Certificate.decode(data)
    except BadCertificate:
        pass


VALID = cert_by(BODY, MEMBERS[:3]).encode()


@settings(max_examples=300, deadline=None)
@given(st.integers(0, len(VALID) - 1), st.integers(1, 255), st.integers(0, 3))
def test_decoder_fuzz_mutated_valid_encoding(pos, xor, cut):
    """Damage a valid encoding (one byte changed, maybe truncated): decoding
    and verifying raise only BadCertificate, and anything that still
    verifies is the very certificate we signed."""
    data = bytearray(VALID)
    data[pos] ^= xor
    data = bytes(data[:len(data) - cut])
    try:
        c = Certificate.decode(data)
        verify(c, RING)
    except BadCertificate:
        return
    assert c.body == BODY


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
                    | st.binary(max_size=40)
                    | st.text(max_size=10),
                    lambda c: st.lists(c, max_size=4)
                    | st.dictionaries(st.sampled_from(["v", "ring", "epoch", "aguid", "seq",
                                                       "vguid", "prev", "time", "sigs"]), c),
                    max_leaves=20))
def test_decoder_fuzz_structured(value):
    try:
        Certificate.decode(msgpack.packb(value, use_bin_type=True))
    except BadCertificate:
        pass


# ---- ring descriptors -----------------------------------------------------------


def test_descriptor_round_trips_and_owner_signature():
    RING.verify_owner()
    assert RingDescriptor.decode(RING.encode()) == RING
    assert RingDescriptor.from_json(RING.to_json()) == RING
    assert RING.quorum == 3 and RING.n == 4
    assert RING.primary(5).id == MEMBERS[1].id


def test_descriptor_tampering_detected():
    moved = RING.with_addresses({MEMBERS[0].id: "sim:elsewhere"})
    with pytest.raises(BadDescriptor):
        moved.verify_owner()
    with pytest.raises(BadDescriptor):
        RingDescriptor(RING.ring_id, RING.name, 0, 1, RING.owner, RING.members).verify_owner()
    forged = RingDescriptor(RING.ring_id, RING.name, 0, 1, RING.owner, RING.members,
                            sig=OUTSIDER.sign(RING.signing_bytes()))
    with pytest.raises(BadDescriptor):
        forged.verify_owner()


def test_descriptor_structure_checked():
    with pytest.raises(BadDescriptor):      # 3 members is not 3f+1 for f=1
        RingDescriptor.create(OWNER, "v", [(m.public_key, "a") for m in MEMBERS[:3]])
    with pytest.raises(BadDescriptor):      # one key twice
        RingDescriptor.create(OWNER, "v", [(MEMBERS[0].public_key, "a")] * 4)
    with pytest.raises(BadDescriptor):      # ring id of another owner
        RingDescriptor(ring_id_of(OUTSIDER.public_key, "vol"), "vol", 0, 1, OWNER.public_key,
                       RING.members).check()
    with pytest.raises(BadDescriptor):
        RingDescriptor.decode(b"\x93garbage")
    with pytest.raises(BadDescriptor):
        RingDescriptor.from_json("{}")


def test_successor_needs_the_old_rings_certificate():
    new_member = Identity.from_seed(b"new")
    nxt = RING.successor(MEMBERS[3].id, new_member.public_key, "sim:new")
    assert nxt.epoch == 1 and nxt.member(new_member.id) and not nxt.member(MEMBERS[3].id)
    body = CertBody(RING.ring_id, 0, RING.ring_id, 1, nxt.digest(), RING.digest(), 5)
    RING.verify_successor(nxt, cert_by(body, MEMBERS[:3]))
    with pytest.raises(BadCertificate):     # the new member cannot vouch for itself
        RING.verify_successor(nxt, cert_by(body, MEMBERS[:2] + [new_member]))
    with pytest.raises(BadCertificate):     # certificate of some other descriptor
        other = RING.successor(MEMBERS[2].id, new_member.public_key, "sim:new")
        RING.verify_successor(other, cert_by(body, MEMBERS[:3]))
    skip = RingDescriptor(RING.ring_id, RING.name, 2, 1, RING.owner, nxt.members)
    with pytest.raises(BadDescriptor):
        RING.verify_successor(skip, cert_by(body, MEMBERS[:3]))


def test_member_ids_derive_from_keys():
    m = RingMember(MEMBERS[0].public_key, "x")
    assert m.id == MEMBERS[0].id
