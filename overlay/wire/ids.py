"""GUIDs and identities (DESIGN.md, section Identifiers).

A GUID is 32 bytes: SHA-256 of what it names. Routing reads it as 64
hexadecimal digits (base 16), most significant first. A NodeID is the GUID of
the node's raw Ed25519 public key, so a node cannot choose where it sits in the
ID space; every peer that claims an ID must prove it holds the matching key.

Keys are stored as unencrypted PKCS#8 PEM files readable by their owner only
(mode 0600 in a directory of mode 0700); a key file that others can read is
refused on load rather than silently used.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

GUID_BYTES = 32
BASE = 16
DIGITS = GUID_BYTES * 2  # 64 hex digits
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class IdentityError(Exception):
    """A key file is missing, unreadable, malformed or too widely readable."""


class BadSignature(Exception):
    """A signature does not verify under the public key it claims."""


def guid(data: bytes) -> bytes:
    """The GUID of a byte string: its SHA-256 digest."""
    return hashlib.sha256(data).digest()


def guid_of(*parts: bytes) -> bytes:
    """The GUID of a tuple of byte strings, each length-prefixed.

    Length prefixes make the encoding injective: ("ab", "c") and ("a", "bc")
    get different GUIDs. Used for AGUID = GUID(owner key, object name).
    """
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.digest()


def is_guid(x: object) -> bool:
    return isinstance(x, bytes) and len(x) == GUID_BYTES


def digit(g: bytes, i: int) -> int:
    """Digit ``i`` (0 = most significant) of ``g`` read in base 16."""
    b = g[i >> 1]
    return (b >> 4) if (i & 1) == 0 else (b & 0x0F)


def digits(g: bytes) -> list[int]:
    """All 64 base-16 digits of ``g``."""
    out = []
    for b in g:
        out.append(b >> 4)
        out.append(b & 0x0F)
    return out


def shared_prefix_len(a: bytes, b: bytes) -> int:
    """How many leading base-16 digits ``a`` and ``b`` have in common."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return 2 * i + (0 if (x >> 4) != (y >> 4) else 1)
    return min(len(a), len(b)) * 2


def hexid(g: bytes) -> str:
    """A GUID as its 64 hex digits."""
    return g.hex()


def short(g: bytes | None) -> str:
    """A GUID abbreviated for logs: its first 8 hex digits."""
    return "-" if g is None else g[:4].hex()


def node_id_of(public_key: bytes) -> bytes:
    """NodeID (or user ID) of a raw 32-byte Ed25519 public key."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return guid(public_key)


def verify(public_key: bytes, signature: bytes, data: bytes) -> None:
    """Check an Ed25519 signature; raise :class:`BadSignature` if it fails."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError) as e:
        raise BadSignature("signature does not verify") from e


class Identity:
    """An Ed25519 key pair and the ID it gives: a node's or a user's."""

    __slots__ = ("private_key", "public_key", "id")

    def __init__(self, private_key: Ed25519PrivateKey):
        self.private_key = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.id: bytes = node_id_of(self.public_key)

    @classmethod
    def generate(cls) -> "Identity":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        """A deterministic identity from 32 seed bytes (tests, simulations)."""
        return cls(Ed25519PrivateKey.from_private_bytes(guid(seed)))

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)

    def private_bytes(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def to_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the private key, owner-readable only, atomically.

        The parent directory is created with mode 0700 if missing; an
        existing file is never overwritten (losing a key loses an identity).
        """
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.exists():
            raise IdentityError(f"{path} exists; refusing to overwrite a key")
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, self.to_pem())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # fails if path appeared meanwhile
        os.unlink(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Identity":
        path = Path(path)
        try:
            st = path.stat()
            data = path.read_bytes()
        except OSError as e:
            raise IdentityError(f"cannot read key file {path}: {e.strerror}") from e
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):o}); run: chmod 600 {path}"
            )
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise IdentityError(f"{path} is not a PEM private key") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path} holds a key that is not Ed25519")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> "Identity":
        if Path(path).exists():
            return cls.load(path)
        ident = cls.generate()
        ident.save(path)
        return ident

    def __repr__(self) -> str:
        return f"<Identity {short(self.id)}>"
