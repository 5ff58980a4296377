"""Sealed blocks (storage/seal.py): round trip, convergence inside a volume
only, and every way a sealed block can be wrong is refused with a named error."""

import hashlib
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import seal
from storage.blockapi import MAX_BLOCK, Kind
from storage.errors import BadBlock, BlockCorrupt, BlockTooLarge

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))


def test_round_trip_and_bguid_names_sealed_bytes():
    s = seal.seal(KEY_A, Kind.DATA, b"hello, blocks")
    assert s.bguid == hashlib.sha256(s.data).digest()
    assert b"hello, blocks" not in s.data
    assert len(s.data) == len(b"hello, blocks") + seal.OVERHEAD
    assert seal.open(KEY_A, Kind.DATA, s.data) == b"hello, blocks"
    assert seal.open(KEY_A, Kind.DATA, s.data, s.bguid) == b"hello, blocks"
    assert seal.kind_of(s.data) is Kind.DATA


def test_empty_and_maximal_plaintexts():
    for p in (b"", os.urandom(MAX_BLOCK)):
        s = seal.seal(KEY_A, Kind.INDIRECT, p)
        assert seal.open(KEY_A, Kind.INDIRECT, s.data) == p
    assert len(s.data) == seal.MAX_SEALED


def test_plaintext_over_the_limit_refused():
    with pytest.raises(BlockTooLarge, match="exceeds"):
        seal.seal(KEY_A, Kind.DATA, bytes(MAX_BLOCK + 1))


def test_convergent_within_a_volume():
    p = os.urandom(5000)
    a1, a2 = seal.seal(KEY_A, Kind.DATA, p), seal.seal(KEY_A, Kind.DATA, p)
    assert a1 == a2  # same BGUID, same bytes: the store deduplicates


def test_no_equality_across_volumes_or_kinds():
    p = os.urandom(5000)
    a, b = seal.seal(KEY_A, Kind.DATA, p), seal.seal(KEY_B, Kind.DATA, p)
    assert a.bguid != b.bguid
    assert a.data[seal.HEADER_BYTES:] != b.data[seal.HEADER_BYTES:]
    assert a.data[6:seal.HEADER_BYTES] != b.data[6:seal.HEADER_BYTES]  # salts unrelated
    assert seal.seal(KEY_A, Kind.ROOT, p).bguid != a.bguid


def test_different_plaintexts_get_different_salts_and_keys():
    a, b = seal.seal(KEY_A, Kind.DATA, b"one"), seal.seal(KEY_A, Kind.DATA, b"two")
    assert a.data[6:38] != b.data[6:38]
    assert a.block_key != b.block_key


def test_kind_mismatch_refused_before_decryption():
    s = seal.seal(KEY_A, Kind.DATA, b"file data")
    with pytest.raises(BadBlock, match="expected a ROOT block, this is a DATA block"):
        seal.open(KEY_A, Kind.ROOT, s.data)


def test_rewritten_kind_byte_fails_authentication():
    s = seal.seal(KEY_A, Kind.DATA, b"file data")
    forged = s.data[:5] + bytes((Kind.ROOT,)) + s.data[6:]
    with pytest.raises(BlockCorrupt, match="authentication"):
        seal.open(KEY_A, Kind.ROOT, forged)


@pytest.mark.parametrize("offset", [6, 20, 37, 38, 50, -1])
def test_any_tampered_byte_refused(offset):
    s = seal.seal(KEY_A, Kind.DATA, os.urandom(100))
    b = bytearray(s.data)
    b[offset] ^= 0x01
    with pytest.raises(BlockCorrupt):
        seal.open(KEY_A, Kind.DATA, bytes(b))
    with pytest.raises(BlockCorrupt, match="do not hash"):
        seal.open(KEY_A, Kind.DATA, bytes(b), s.bguid)


def test_truncated_block_refused():
    s = seal.seal(KEY_A, Kind.DATA, os.urandom(100))
    with pytest.raises(BlockCorrupt):
        seal.open(KEY_A, Kind.DATA, s.data[:-1])
    with pytest.raises(BadBlock, match="at least"):
        seal.open(KEY_A, Kind.DATA, s.data[:seal.OVERHEAD - 1])


def test_wrong_key_refused():
    s = seal.seal(KEY_A, Kind.DATA, b"secret")
    with pytest.raises(BlockCorrupt, match="different volume key"):
        seal.open(KEY_B, Kind.DATA, s.data)


def test_block_key_opens_only_its_block():
    a, b = seal.seal(KEY_A, Kind.DATA, b"a"), seal.seal(KEY_A, Kind.DATA, b"b")
    assert seal.open_with_block_key(a.block_key, Kind.DATA, a.data) == b"a"
    with pytest.raises(BlockCorrupt):
        seal.open_with_block_key(a.block_key, Kind.DATA, b.data)


def test_unknown_version_refused():
    s = seal.seal(KEY_A, Kind.DATA, b"x")
    v2 = s.data[:4] + b"\x02" + s.data[5:]
    with pytest.raises(BadBlock, match="version 2 is not supported"):
        seal.open(KEY_A, Kind.DATA, v2)
    with pytest.raises(BadBlock):
        seal.kind_of(v2)


def test_bad_magic_and_unknown_kind_refused():
    s = seal.seal(KEY_A, Kind.DATA, b"x")
    with pytest.raises(BadBlock, match="magic"):
        seal.open(KEY_A, Kind.DATA, b"XXXX" + s.data[4:])
    with pytest.raises(BadBlock, match="unknown block kind 200"):
        seal.open(KEY_A, Kind.DATA, s.data[:5] + b"\xc8" + s.data[6:])


def test_oversized_sealed_block_refused():
    s = seal.seal(KEY_A, Kind.DATA, bytes(MAX_BLOCK))
    with pytest.raises(BadBlock, match="exceeds"):
        seal.open(KEY_A, Kind.DATA, s.data + b"\0")


def test_bad_keys_and_kinds_are_caller_errors():
    with pytest.raises(ValueError):
        seal.seal(b"short", Kind.DATA, b"")
    with pytest.raises(ValueError):
        seal.seal(KEY_A, 99, b"")
    with pytest.raises(ValueError):
        seal.seal(KEY_A, True, b"")


def test_header_layout_is_the_documented_one():
    s = seal.seal(KEY_A, Kind.RECORD, b"r")
    magic, version, kind = struct.unpack_from(">4sBB", s.data)
    assert (magic, version) == (b"P2FB", 1)
    assert kind == seal.kind_of(s.data)
    assert seal.HEADER_BYTES == 38 and seal.OVERHEAD == 54


@settings(max_examples=60, deadline=None)
@given(key=st.binary(min_size=32, max_size=32), kind=st.sampled_from(list(Kind)),
       plaintext=st.binary(max_size=3000))
def test_property_round_trip_and_determinism(key, kind, plaintext):
    s = seal.seal(key, kind, plaintext)
    assert seal.open(key, kind, s.data, s.bguid) == plaintext
    assert seal.seal(key, kind, plaintext) == s


@settings(max_examples=60, deadline=None)
@given(plaintext=st.binary(max_size=500), data=st.data())
def test_property_any_single_byte_change_refused(plaintext, data):
    s = seal.seal(KEY_A, Kind.DATA, plaintext)
    i = data.draw(st.integers(0, len(s.data) - 1))
    x = data.draw(st.integers(1, 255))
    b = bytearray(s.data)
    b[i] ^= x
    with pytest.raises((BlockCorrupt, BadBlock)):
        seal.open(KEY_A, Kind.DATA, bytes(b))


@settings(max_examples=100, deadline=None)
@given(junk=st.binary(max_size=200))
def test_property_random_bytes_raise_only_declared_errors(junk):
    with pytest.raises((BlockCorrupt, BadBlock)):
        seal.open(KEY_A, Kind.DATA, junk)
