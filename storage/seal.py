"""Sealed blocks: client-side encryption before a block leaves its writer.

DESIGN.md "storage/blocks": the client encrypts with an AEAD from
``cryptography`` before it stores; storage nodes hold and see only
ciphertext. The BGUID is SHA-256 of the *sealed* bytes, so every holder and
reader checks a block against its name without any key (DESIGN.md "What must
always hold": nothing is trusted that was not checked).

Format (version 1), 54 bytes of overhead::

    offset  size  field
    0       4     magic   b"P2FB"
    4       1     version 1
    5       1     kind    storage.blockapi.Kind (DATA, INDIRECT, ROOT, ...)
    6       32    salt    see the key scheme below
    38      n+16  AES-256-GCM ciphertext of the n-byte plaintext, then its tag

The first 38 bytes (magic, version, kind, salt) are the AEAD associated
data, so a block cannot be reinterpreted as another kind or format: changing
the kind byte breaks the tag, and ``open`` also refuses a kind other than the
one the caller expected before it decrypts. Unknown versions are refused with
a clear message; a new scheme gets a new version number, and readers list
the versions they accept (``READABLE_VERSIONS``).

Key scheme: convergent within a volume, one key per distinct block.

* From the volume data key (32 bytes, known to the volume's members only)
  HKDF-SHA256 derives two independent subkeys, separated by their ``info``:
  ``sk`` (salt key) and ``kdk`` (key-derivation key).
* salt = HMAC-SHA256(sk, kind || SHA-256(plaintext)), stored in the header.
* block key = HMAC-SHA256(kdk, salt); the AEAD nonce is all zeros.

So identical plaintext of the same kind in the same volume gives identical
sealed bytes and the same BGUID: blocks deduplicate, and re-putting is
idempotent. A reader needs only the volume key (the salt is in the header),
so references between blocks are bare BGUIDs. The block key alone opens
that one block (``open_with_block_key``), should a single block ever be
shared. Across volumes the subkeys differ, so equal plaintexts give
unrelated ciphertexts and nothing links them.

Trade-off, stated plainly: convergent encryption reveals *equality* of
blocks inside a volume. A storage node sees that two puts carry the same
block, and anyone who holds the volume key can confirm a guess of a block's
content ("does this volume contain this exact 64 KiB?") by sealing the
guess. Outsiders without the volume key learn only sizes and equality.

Why not AES-GCM-SIV with a derived nonce: its misuse resistance is what
matters when a nonce may repeat under one key; here a key is used for one
plaintext only (two different plaintexts share a key only if their 256-bit
salts collide), so plain GCM's nonce rule holds by construction. And on
this machine's OpenSSL, GCM-SIV runs at about 360 MB/s against 3 GB/s for
GCM, which alone would cap reads below DESIGN.md's 750 MB/s budget.

The work here (two SHA-256 passes and the AEAD over up to 64 KiB) is C code;
async callers run it off the trio thread with
``trio.to_thread.run_sync(seal.seal, key, kind, data)``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from functools import lru_cache
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .blockapi import MAX_BLOCK, Kind
from .errors import BadBlock, BlockCorrupt, BlockTooLarge

MAGIC = b"P2FB"
VERSION = 1
READABLE_VERSIONS = frozenset({1})
KEY_BYTES = 32
SALT_BYTES = 32
TAG_BYTES = 16

_PREFIX = struct.Struct(">4sBB")  # magic, version, kind
HEADER_BYTES = _PREFIX.size + SALT_BYTES  # 38: the associated data
OVERHEAD = HEADER_BYTES + TAG_BYTES  # 54
MAX_PLAINTEXT = MAX_BLOCK  # the one limit lives in storage.blockapi
MAX_SEALED = MAX_PLAINTEXT + OVERHEAD

_NONCE = bytes(12)  # each block key encrypts one plaintext only
_INFO_SALT = b"p2pfs seal v1: convergent salt key"
_INFO_KDK = b"p2pfs seal v1: block key derivation key"
_KINDS = frozenset(int(k) for k in Kind)


class Sealed(NamedTuple):
    """A sealed block: its name, its bytes as stored, and the key that
    opens this one block (not needed by volume members)."""

    bguid: bytes
    data: bytes
    block_key: bytes


class Sealer:
    """The derived keys of one volume. Holds no mutable state, so one
    instance may be used from several threads at once."""

    __slots__ = ("_salt_key", "_kdk")

    def __init__(self, volume_key: bytes):
        if type(volume_key) is not bytes or len(volume_key) != KEY_BYTES:
            raise ValueError(f"a volume key is {KEY_BYTES} bytes")
        self._salt_key = _subkey(volume_key, _INFO_SALT)
        self._kdk = _subkey(volume_key, _INFO_KDK)

    def seal(self, kind: Kind | int, plaintext: bytes) -> Sealed:
        """Encrypt ``plaintext`` as a block of ``kind``. Deterministic: the
        same volume, kind and plaintext always give the same result."""
        k = _check_kind(kind)
        if len(plaintext) > MAX_PLAINTEXT:
            raise BlockTooLarge(
                f"plaintext of {len(plaintext)} bytes exceeds the block limit of {MAX_PLAINTEXT}")
        digest = hashlib.sha256(plaintext).digest()
        salt = hmac.digest(self._salt_key, bytes((k,)) + digest, "sha256")
        block_key = hmac.digest(self._kdk, salt, "sha256")
        header = _PREFIX.pack(MAGIC, VERSION, k) + salt
        data = header + AESGCM(block_key).encrypt(_NONCE, plaintext, header)
        return Sealed(hashlib.sha256(data).digest(), data, block_key)

    def open(self, kind_expected: Kind | int, sealed: bytes, bguid: bytes | None = None) -> bytes:
        """The plaintext of a sealed block, after checking (in this order)
        its BGUID if given, its header, its kind and its AEAD tag.

        Raises BlockCorrupt when the bytes do not hash to ``bguid`` or the
        tag fails (altered bytes, or sealed under another volume key), and
        BadBlock when the bytes are not a block of this format and kind."""
        header = _check_header(kind_expected, sealed, bguid)
        return _decrypt(hmac.digest(self._kdk, header[_PREFIX.size:], "sha256"),
                        header, sealed, bguid)


def seal(volume_key: bytes, kind: Kind | int, plaintext: bytes) -> Sealed:
    """Seal one block under a volume key (see :meth:`Sealer.seal`)."""
    return sealer(volume_key).seal(kind, plaintext)


def open(volume_key: bytes, kind_expected: Kind | int, sealed: bytes,  # noqa: A001
         bguid: bytes | None = None) -> bytes:
    """Open one sealed block under a volume key (see :meth:`Sealer.open`)."""
    return sealer(volume_key).open(kind_expected, sealed, bguid)


unseal = open  # for callers that would rather not shadow the builtin


def open_with_block_key(block_key: bytes, kind_expected: Kind | int, sealed: bytes,
                        bguid: bytes | None = None) -> bytes:
    """Open one sealed block with its own block key (``Sealed.block_key``)
    instead of the volume key; same checks and errors as :meth:`Sealer.open`."""
    if type(block_key) is not bytes or len(block_key) != KEY_BYTES:
        raise ValueError(f"a block key is {KEY_BYTES} bytes")
    header = _check_header(kind_expected, sealed, bguid)
    return _decrypt(block_key, header, sealed, bguid)


def kind_of(sealed: bytes) -> Kind:
    """The kind a sealed block's header claims, without any key (for
    ``tools/inspect`` and fsck). Not authenticated until opened."""
    if len(sealed) < OVERHEAD:
        raise BadBlock(f"not a sealed block: {len(sealed)} bytes")
    magic, version, k = _PREFIX.unpack_from(sealed)
    if magic != MAGIC or version not in READABLE_VERSIONS or k not in _KINDS:
        raise BadBlock(f"not a readable sealed block (magic {bytes(magic)!r}, "
                       f"version {version}, kind {k})")
    return Kind(k)


@lru_cache(maxsize=64)
def sealer(volume_key: bytes) -> Sealer:
    """The (cached) Sealer of a volume key: key derivation once per volume."""
    return Sealer(volume_key)


def _check_header(kind_expected: Kind | int, sealed: bytes, bguid: bytes | None) -> bytes:
    """The header of ``sealed`` once it passes every check before decryption."""
    expected = _check_kind(kind_expected)
    if bguid is not None and hashlib.sha256(sealed).digest() != bguid:
        raise BlockCorrupt("block bytes do not hash to their BGUID", bguid)
    if len(sealed) < OVERHEAD:
        raise BadBlock(f"not a sealed block: {len(sealed)} bytes, at least {OVERHEAD} needed",
                       bguid)
    if len(sealed) > MAX_SEALED:
        raise BadBlock(f"sealed block of {len(sealed)} bytes exceeds {MAX_SEALED}", bguid)
    magic, version, k = _PREFIX.unpack_from(sealed)
    if magic != MAGIC:
        raise BadBlock(f"not a sealed block: magic {bytes(magic)!r}, expected {MAGIC!r}", bguid)
    if version not in READABLE_VERSIONS:
        raise BadBlock(f"sealed block format version {version} is not supported "
                       f"(this code reads {sorted(READABLE_VERSIONS)})", bguid)
    if k not in _KINDS:
        raise BadBlock(f"unknown block kind {k}", bguid)
    if k != expected:
        raise BadBlock(f"expected a {Kind(expected).name} block, this is a {Kind(k).name} block",
                       bguid)
    return bytes(sealed[:HEADER_BYTES])


def _decrypt(block_key: bytes, header: bytes, sealed: bytes, bguid: bytes | None) -> bytes:
    try:
        return AESGCM(block_key).decrypt(_NONCE, bytes(sealed[HEADER_BYTES:]), header)
    except InvalidTag:
        raise BlockCorrupt(
            "block failed authentication: its bytes were altered, or it was "
            "sealed under a different volume key", bguid) from None


def _subkey(volume_key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(volume_key)


def _check_kind(kind: Kind | int) -> int:
    if not isinstance(kind, int) or type(kind) is bool or kind not in _KINDS:
        raise ValueError(f"not a block kind: {kind!r}")
    return int(kind)
