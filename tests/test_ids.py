"""Identities and GUID helpers (overlay/wire/ids.py)."""

import os
import stat

import pytest
from hypothesis import given, strategies as st

from overlay.wire import ids
from overlay.wire.ids import Identity, IdentityError, BadSignature


def test_identity_round_trip_and_permissions(tmp_path):
    path = tmp_path / "keys" / "node.key"
    ident = Identity.generate()
    ident.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = Identity.load(path)
    assert again.id == ident.id == ids.guid(ident.public_key)
    assert again.public_key == ident.public_key
    sig = again.sign(b"hello")
    ids.verify(ident.public_key, sig, b"hello")


def test_save_refuses_to_overwrite(tmp_path):
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    before = path.read_bytes()
    with pytest.raises(IdentityError, match="refusing to overwrite"):
        Identity.generate().save(path)
    assert path.read_bytes() == before


def test_load_refuses_key_readable_by_others(tmp_path):
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load(path)


@pytest.mark.parametrize("content", [b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
def test_load_refuses_garbage(tmp_path, content):
    path = tmp_path / "node.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError):
        Identity.load(path)


def test_load_refuses_missing_file(tmp_path):
    with pytest.raises(IdentityError, match="cannot read"):
        Identity.load(tmp_path / "absent.key")


def test_load_or_create_is_stable(tmp_path):
    a = Identity.load_or_create(tmp_path / "k")
    b = Identity.load_or_create(tmp_path / "k")
    assert a.id == b.id


def test_signature_checks():
    a, b = Identity.generate(), Identity.generate()
    sig = a.sign(b"msg")
    with pytest.raises(BadSignature):
        ids.verify(b.public_key, sig, b"msg")
    with pytest.raises(BadSignature):
        ids.verify(a.public_key, sig, b"msh")
    with pytest.raises(BadSignature):
        ids.verify(a.public_key, sig[:-1] + bytes([sig[-1] ^ 1]), b"msg")
    with pytest.raises(BadSignature):
        ids.verify(b"\x00" * 31, sig, b"msg")


def test_from_seed_is_deterministic():
    assert Identity.from_seed(b"x").id == Identity.from_seed(b"x").id
    assert Identity.from_seed(b"x").id != Identity.from_seed(b"y").id


def test_guid_of_is_injective_on_boundaries():
    assert ids.guid_of(b"ab", b"c") != ids.guid_of(b"a", b"bc")
    assert ids.guid_of(b"abc") != ids.guid_of(b"abc", b"")


guids = st.binary(min_size=32, max_size=32)


@given(guids)
def test_digits_match_hex(g):
    d = ids.digits(g)
    assert len(d) == ids.DIGITS == 64
    assert "".join("0123456789abcdef"[x] for x in d) == ids.hexid(g)
    assert all(ids.digit(g, i) == d[i] for i in range(64))


@given(guids, guids)
def test_shared_prefix_len_matches_hex(a, b):
    ha, hb = a.hex(), b.hex()
    n = 0
    while n < 64 and ha[n] == hb[n]:
        n += 1
    assert ids.shared_prefix_len(a, b) == n
    assert ids.shared_prefix_len(a, a) == 64
