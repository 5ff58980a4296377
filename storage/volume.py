"""A volume's view: its inner ring, its writers, the volume key wrapped for
each (Ivy, OSDI 2002, section 3.2 "views"; DESIGN.md "storage/logs").

A :class:`View` names one file system: the volume id (an AGUID: GUID of the
owner's key and the volume's name), the NodeIDs of its inner ring, and its
participants. A participant is an Ed25519 public key with its own log, an
index (fixed for life, it numbers the writer's inodes), the vector of what
the volume had when it joined (its promise until it publishes a head of its
own: ``storage.replica``), and, once removed, the seq of its last record
that counts. The view is signed by the volume's owner and versioned; the
ring stores it as an object, so changing it (``add_writer``,
``remove_writer``) is an update of that object through the ring.

The volume key (32 bytes; it seals every block: ``storage.seal``) is
wrapped for each participant with its Ed25519 key: the key is mapped to its
X25519 twin (the birational map of RFC 7748 section 4.1, the same
conversion libsodium uses), an ephemeral X25519 exchange plus HKDF-SHA256
gives a key-encryption key, and ChaCha20-Poly1305 seals the volume key with
the volume id and recipient key as associated data. Only members can open
blocks; storage nodes never see the key.

Removing a writer stops readers from accepting its later records; it does
not un-share the key it already had (that needs a key rotation, which new
blocks would use).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace

import msgpack
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from overlay.wire import frames
from overlay.wire.frames import FrameError
from overlay.wire.ids import BadSignature, Identity, guid_of, node_id_of, verify

from .errors import StorageError
from .fsstate import MAX_WRITER_INDEX
from .vv import EMPTY, MAX_SEQ, VV

VIEW_VERSION = 1
VIEW_CONTEXT = b"p2pfs view v1\0"
KEY_BYTES = 32
WRAPPED_BYTES = 32 + KEY_BYTES + 16
MAX_VOLUME_NAME = 255
_P = 2**255 - 19
_WRAP_INFO = b"p2pfs volume key wrap v1"


class VolumeError(StorageError):
    """Base of the errors about volumes and views."""


class BadView(VolumeError):
    """A view is malformed, not signed by its owner, or not a valid
    successor of the view it claims to replace."""


class KeyUnwrapError(VolumeError):
    """The volume key could not be unwrapped: this identity is not a
    participant, or its wrapped key fails authentication."""


class NotAParticipant(VolumeError):
    """An identity or writer id that the view does not list."""


# --------------------------------------------------------------------------
# Ed25519 -> X25519 and key wrapping


def x25519_public(ed_public: bytes) -> bytes:
    """The X25519 public key of an Ed25519 public key (u = (1+y)/(1-y))."""
    if len(ed_public) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    y = int.from_bytes(ed_public, "little") & ((1 << 255) - 1)
    if y >= _P or (1 - y) % _P == 0:
        raise ValueError("not a usable Ed25519 public key")
    u = (1 + y) * pow((1 - y) % _P, _P - 2, _P) % _P
    return u.to_bytes(32, "little")


def x25519_private(identity: Identity) -> X25519PrivateKey:
    """The X25519 private key matching ``x25519_public(identity.public_key)``."""
    h = hashlib.sha512(identity.private_bytes()).digest()[:32]
    return X25519PrivateKey.from_private_bytes(h)


def wrap_key(volume_key: bytes, recipient: bytes, volume: bytes) -> bytes:
    """Seal ``volume_key`` for the Ed25519 public key ``recipient``."""
    eph = X25519PrivateKey.generate()
    eph_pub = eph.public_key().public_bytes_raw()
    shared = eph.exchange(X25519PublicKey.from_public_bytes(x25519_public(recipient)))
    kek = _kek(shared, volume, recipient, eph_pub)
    return eph_pub + ChaCha20Poly1305(kek).encrypt(bytes(12), volume_key, volume + recipient)


def unwrap_key(wrapped: bytes, identity: Identity, volume: bytes) -> bytes:
    if len(wrapped) != WRAPPED_BYTES:
        raise KeyUnwrapError("a wrapped key is 80 bytes")
    eph_pub, ct = wrapped[:32], wrapped[32:]
    try:
        shared = x25519_private(identity).exchange(X25519PublicKey.from_public_bytes(eph_pub))
        kek = _kek(shared, volume, identity.public_key, eph_pub)
        return ChaCha20Poly1305(kek).decrypt(bytes(12), ct, volume + identity.public_key)
    except (InvalidTag, ValueError):
        raise KeyUnwrapError("the wrapped volume key does not open with this identity") from None


def _kek(shared: bytes, volume: bytes, recipient: bytes, eph_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=_WRAP_INFO + volume + recipient + eph_pub).derive(shared)


# --------------------------------------------------------------------------
# Views


@dataclass(frozen=True, slots=True)
class Participant:
    public_key: bytes
    index: int
    wrapped_key: bytes
    joined: VV = EMPTY
    removed_at: int | None = None   # last seq that counts, once removed

    @property
    def id(self) -> bytes:
        return node_id_of(self.public_key)

    @property
    def active(self) -> bool:
        return self.removed_at is None


_PART = frames.Struct({
    "pk": frames.PUBKEY, "i": frames.Int(0, MAX_WRITER_INDEX),
    "key": frames.Bytes(exact=WRAPPED_BYTES),
    "j": frames.ListOf(frames.ListOf(frames.AnyValue(), max=2), max=4096),
    "rm": frames.Nullable(frames.Int(0, MAX_SEQ)),
})
_VIEW = frames.Struct({
    "v": frames.Int(VIEW_VERSION, VIEW_VERSION), "vol": frames.GUID,
    "name": frames.Str(MAX_VOLUME_NAME),
    "owner": frames.PUBKEY, "ver": frames.Int(1, MAX_SEQ),
    "ring": frames.ListOf(frames.GUID, max=64), "parts": frames.ListOf(_PART, max=4096),
    "sig": frames.SIG,
})


@dataclass(frozen=True, slots=True)
class View:
    volume: bytes
    name: str
    owner: bytes                     # the owner's Ed25519 public key
    version: int
    ring: tuple[bytes, ...]
    participants: tuple[Participant, ...]
    sig: bytes = b""

    # -- queries ---------------------------------------------------------

    def participant(self, writer_id: bytes) -> Participant:
        for p in self.participants:
            if p.id == writer_id:
                return p
        raise NotAParticipant(f"writer {writer_id[:4].hex()} is not in the view")

    def writers(self) -> list[Participant]:
        """Participants whose logs are read (removed ones up to removed_at)."""
        return list(self.participants)

    def active_ids(self) -> set[bytes]:
        return {p.id for p in self.participants if p.active}

    def volume_key(self, identity: Identity) -> bytes:
        """Unwrap the volume key with a participant's identity."""
        try:
            p = self.participant(identity.id)
        except NotAParticipant:
            raise KeyUnwrapError("this identity is not a participant of the volume") from None
        return unwrap_key(p.wrapped_key, identity, self.volume)

    # -- changes (each a new version signed by the owner) ------------------

    def add_writer(self, owner: Identity, volume_key: bytes, public_key: bytes,
                   joined: VV = EMPTY) -> "View":
        """A new view with ``public_key`` as a writer; ``joined`` is what the
        volume held when it was added (its promise until it publishes)."""
        if any(p.public_key == public_key for p in self.participants):
            raise BadView("already a participant")
        idx = len(self.participants)
        p = Participant(public_key, idx, wrap_key(volume_key, public_key, self.volume), joined)
        return self._next(owner, participants=self.participants + (p,))

    def remove_writer(self, owner: Identity, writer_id: bytes, last_seq: int) -> "View":
        """A new view in which ``writer_id``'s records after ``last_seq`` are ignored."""
        p = self.participant(writer_id)
        if not p.active:
            raise BadView("already removed")
        parts = tuple(replace(q, removed_at=last_seq) if q.id == writer_id else q
                      for q in self.participants)
        return self._next(owner, participants=parts)

    def with_ring(self, owner: Identity, ring: list[bytes]) -> "View":
        return self._next(owner, ring=tuple(ring))

    def _next(self, owner: Identity, **changes) -> "View":
        if owner.public_key != self.owner:
            raise BadView("only the volume's owner changes its view")
        return replace(self, version=self.version + 1, sig=b"", **changes).signed(owner)

    def check_successor(self, old: "View") -> None:
        """Raise BadView unless this view may replace ``old`` (the ring's
        predicate): same volume and owner, next version, participants only
        appended or removed, never re-added or re-indexed."""
        if (self.volume, self.owner, self.name) != (old.volume, old.owner, old.name):
            raise BadView("a view cannot change its volume, owner or name")
        if self.version != old.version + 1:
            raise BadView("a view's version goes up by one")
        if len(self.participants) < len(old.participants):
            raise BadView("participants are never dropped from a view")
        for a, b in zip(old.participants, self.participants):
            if (a.public_key, a.index, a.joined) != (b.public_key, b.index, b.joined):
                raise BadView("participants keep their key, index and join point")
            if a.removed_at is not None and b.removed_at != a.removed_at:
                raise BadView("a removal is final")
        self.verify()

    # -- encoding and signature -----------------------------------------

    def _fields(self) -> dict:
        return {
            "v": VIEW_VERSION, "vol": self.volume, "name": self.name, "owner": self.owner,
            "ver": self.version, "ring": list(self.ring),
            "parts": [{"pk": p.public_key, "i": p.index, "key": p.wrapped_key,
                       "j": [[w, s] for w, s in p.joined.sorted_items()], "rm": p.removed_at}
                      for p in self.participants],
        }

    def signed_bytes(self) -> bytes:
        return VIEW_CONTEXT + msgpack.packb(self._fields(), use_bin_type=True)

    def signed(self, owner: Identity) -> "View":
        return replace(self, sig=owner.sign(self.signed_bytes()))

    def encode(self) -> bytes:
        d = self._fields()
        d["sig"] = self.sig
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def decode(cls, raw: bytes) -> "View":
        """Parse and verify a view (owner's signature, volume id, indices)."""
        try:
            d = msgpack.unpackb(raw, raw=False, strict_map_key=True)
            _VIEW.check(d, "view")
            parts = []
            for p in d["parts"]:
                j = {}
                for e in p["j"]:
                    if len(e) != 2 or type(e[0]) is not bytes or type(e[1]) is not int:
                        raise BadView("bad join vector")
                    j[e[0]] = e[1]
                parts.append(Participant(p["pk"], p["i"], p["key"], VV(j), p["rm"]))
        except (BadView, FrameError) as e:
            raise BadView(f"malformed view: {e}") from None
        except Exception as e:
            raise BadView(f"view is not msgpack: {type(e).__name__}") from None
        view = cls(d["vol"], d["name"], d["owner"], d["ver"], tuple(d["ring"]), tuple(parts),
                   d["sig"])
        view.verify()
        return view

    def verify(self) -> None:
        if self.volume != volume_id(self.owner, self.name):
            raise BadView("volume id is not the GUID of its owner and name")
        if [p.index for p in self.participants] != list(range(len(self.participants))):
            raise BadView("participant indices are 0, 1, 2, ... in order")
        if len({p.public_key for p in self.participants}) != len(self.participants):
            raise BadView("a participant is listed twice")
        try:
            verify(self.owner, self.sig, self.signed_bytes())
        except BadSignature:
            raise BadView("view signature does not verify under its owner's key") from None


def volume_id(owner_public_key: bytes, name: str) -> bytes:
    """The volume's AGUID: GUID of its owner's key and its name."""
    return guid_of(owner_public_key, b"p2pfs volume", name.encode())


def create_volume(owner: Identity, name: str, *, ring: list[bytes] = (),
                  volume_key: bytes | None = None) -> tuple[View, bytes]:
    """A new volume with ``owner`` as its first writer; returns (view, key)."""
    if len(name) > MAX_VOLUME_NAME:   # else no reader could decode the view (_VIEW)
        raise BadView(f"a volume name is at most {MAX_VOLUME_NAME} characters")
    key = volume_key if volume_key is not None else os.urandom(KEY_BYTES)
    if len(key) != KEY_BYTES:
        raise ValueError("a volume key is 32 bytes")
    vol = volume_id(owner.public_key, name)
    me = Participant(owner.public_key, 0, wrap_key(key, owner.public_key, vol))
    view = View(vol, name, owner.public_key, 1, tuple(ring), (me,)).signed(owner)
    return view, key
