"""Version certificates and ring descriptors (OceanStore/Pond "inner ring";
DESIGN.md "storage/objects"; PAPERS.md "OceanStore / Pond").

A :class:`Certificate` says: in ring ``ring_id`` at configuration ``epoch``,
object ``aguid`` is at sequence number ``seq`` with version ``vguid``, which
replaced ``prev`` (None for the first version), decided at ``time``
(milliseconds since the Unix epoch, chosen by the ring's primary). Pond signed
this with an (f+1)-of-n threshold signature; we carry one Ed25519 signature
per member instead, and a certificate is valid with 2f+1 distinct, valid
member signatures over the same canonical body. With at most f faulty
members, 2f+1 signers include f+1 correct members, who sign only what the
agreement decided: f liars cannot make a certificate on their own, and two
different certificates for the same (aguid, seq) would need a correct member
to sign both, which it never does.

A :class:`RingDescriptor` names the ring: its members' public keys and
addresses, f, its epoch, and the volume owner's key; epoch 0 is signed by the
owner. A later epoch (a member replaced by agreement) is trusted through a
certificate of the previous epoch's ring whose AGUID is the ring id, whose
seq is the new epoch and whose VGUID is the new descriptor's digest
(:meth:`RingDescriptor.verify_successor`).

Canonical encoding. Bodies are msgpack maps with a fixed key order and a
version field ``v``, rebuilt from the decoded fields before any signature is
checked, so two encodings of one logical body can never verify differently.
Signatures cover a context string plus the body, so a certificate signature
can never be replayed as any other kind of signature. Decoding is strict (exact
key set, types, GUID lengths, bounded lists) and raises only
:class:`BadCertificate` / :class:`BadDescriptor`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Mapping

import msgpack

from overlay.wire import frames
from overlay.wire.frames import GUID, PUBKEY, SIG, Bytes, Int, ListOf, Nullable, Str
from overlay.wire.ids import BadSignature, Identity, guid, guid_of, node_id_of, short
from overlay.wire.ids import verify as verify_signature

from .ring_errors import BadCertificate, BadDescriptor

VERSION = 1
CERT_CONTEXT = b"p2pfs certificate v1\x00"
DESCRIPTOR_CONTEXT = b"p2pfs ring descriptor v1\x00"
MAX_SIGNATURES = 256
MAX_CERT_BYTES = 64 * 1024
MAX_MEMBERS = 64
_U64 = Int(0, 2**64 - 1)

_BODY_SCHEMA = frames.spec({
    "v": int, "ring": GUID, "epoch": _U64, "aguid": GUID, "seq": Int(1, 2**64 - 1),
    "vguid": GUID, "prev": Nullable(GUID), "time": _U64,
})
_CERT_SCHEMA = frames.spec({
    "v": int, "ring": GUID, "epoch": _U64, "aguid": GUID, "seq": Int(1, 2**64 - 1),
    "vguid": GUID, "prev": Nullable(GUID), "time": _U64,
    "sigs": ListOf(ListOf(Bytes(max=64), max=2), max=MAX_SIGNATURES),
})


def _unpack(data: bytes, max_len: int, err) -> object:
    """Strict msgpack: no extension types, string or bytes values only as
    msgpack types, bounded sizes. Any failure becomes ``err``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise err(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_len:
        raise err(f"{len(data)} bytes exceeds {max_len}")
    try:
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True,
                               ext_hook=_no_ext, max_bin_len=max_len, max_str_len=max_len,
                               max_array_len=4096, max_map_len=64)
    except Exception as e:  # msgpack raises several unrelated types
        raise err(f"not msgpack: {type(e).__name__}") from None


def _no_ext(code, data):
    raise ValueError("extension types are not allowed")


# --------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True, slots=True)
class CertBody:
    """What a certificate attests; what every member signs."""

    ring_id: bytes
    epoch: int
    aguid: bytes
    seq: int
    vguid: bytes
    prev: bytes | None
    time: int

    def fields(self) -> dict:
        # The key order here *is* the canonical order.
        return {"v": VERSION, "ring": self.ring_id, "epoch": self.epoch,
                "aguid": self.aguid, "seq": self.seq, "vguid": self.vguid,
                "prev": self.prev, "time": self.time}

    def encode(self) -> bytes:
        return msgpack.packb(self.fields(), use_bin_type=True)

    def signing_bytes(self) -> bytes:
        return CERT_CONTEXT + self.encode()

    def sign(self, member: Identity) -> bytes:
        """A member's signature share over this body."""
        return member.sign(self.signing_bytes())

    def check_share(self, public_key: bytes, sig: bytes) -> bool:
        try:
            verify_signature(public_key, sig, self.signing_bytes())
            return True
        except BadSignature:
            return False

    @classmethod
    def decode(cls, data: bytes) -> "CertBody":
        d = _unpack(data, MAX_CERT_BYTES, lambda m: BadCertificate(BadCertificate.MALFORMED, m))
        return cls._from_fields(d, _BODY_SCHEMA)

    @classmethod
    def _from_fields(cls, d, schema) -> "CertBody":
        if isinstance(d, dict) and d.get("v") != VERSION and type(d.get("v")) is int:
            raise BadCertificate(BadCertificate.UNSUPPORTED,
                                 f"version {d['v']} (this code reads {VERSION})")
        try:
            schema.check(d, "certificate")
        except frames.FrameError as e:
            raise BadCertificate(BadCertificate.MALFORMED, str(e)) from None
        return cls(d["ring"], d["epoch"], d["aguid"], d["seq"], d["vguid"], d["prev"], d["time"])

    def describe(self) -> str:
        return (f"{short(self.aguid)}#{self.seq}={short(self.vguid)} "
                f"(ring {short(self.ring_id)}/{self.epoch})")


@dataclass(frozen=True, slots=True)
class Certificate:
    """A :class:`CertBody` with member signatures ``{member NodeID: sig}``."""

    body: CertBody
    signatures: Mapping[bytes, bytes] = field(default_factory=dict)

    # Convenience accessors, so callers write cert.seq rather than cert.body.seq.
    aguid = property(lambda self: self.body.aguid)
    seq = property(lambda self: self.body.seq)
    vguid = property(lambda self: self.body.vguid)
    prev = property(lambda self: self.body.prev)
    time = property(lambda self: self.body.time)
    ring_id = property(lambda self: self.body.ring_id)
    epoch = property(lambda self: self.body.epoch)

    def encode(self) -> bytes:
        d = self.body.fields()
        d["sigs"] = [[k, self.signatures[k]] for k in sorted(self.signatures)]
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "Certificate":
        """Parse an encoded certificate; raises only :class:`BadCertificate`.
        Parsing checks form, not trust: call :func:`verify` before use."""
        d = _unpack(data, MAX_CERT_BYTES, lambda m: BadCertificate(BadCertificate.MALFORMED, m))
        body = CertBody._from_fields(d, _CERT_SCHEMA)
        sigs: dict[bytes, bytes] = {}
        for i, pair in enumerate(d["sigs"]):
            if len(pair) != 2 or len(pair[0]) != 32 or len(pair[1]) != 64:
                raise BadCertificate(BadCertificate.MALFORMED,
                                     f"signature {i} is not a (32-byte id, 64-byte sig) pair")
            if pair[0] in sigs:
                raise BadCertificate(BadCertificate.DUPLICATE,
                                     f"member {short(pair[0])} signs twice")
            sigs[pair[0]] = pair[1]
        return cls(body, sigs)

    def __repr__(self) -> str:
        return f"<Certificate {self.body.describe()} signed by {len(self.signatures)}>"


def verify(cert: Certificate, ring: "RingDescriptor") -> None:
    """Check ``cert`` against ``ring``; raise :class:`BadCertificate` naming
    the first reason it must not be trusted. Every listed signature must be a
    current member's and must verify (a certificate with one bad signature is
    damaged, and we say so rather than silently counting the rest), and at
    least 2f+1 distinct members must have signed."""
    body = cert.body
    if body.ring_id != ring.ring_id:
        raise BadCertificate(BadCertificate.WRONG_RING,
                             f"certified by ring {short(body.ring_id)}, not {short(ring.ring_id)}")
    if body.epoch != ring.epoch:
        raise BadCertificate(BadCertificate.WRONG_RING,
                             f"from epoch {body.epoch} of ring {short(ring.ring_id)}, "
                             f"but the descriptor is epoch {ring.epoch}")
    data = body.signing_bytes()
    for member_id, sig in cert.signatures.items():
        m = ring.member(member_id)
        if m is None:
            raise BadCertificate(BadCertificate.UNKNOWN_SIGNER,
                                 f"{short(member_id)} is not a member of ring "
                                 f"{short(ring.ring_id)}/{ring.epoch}")
        try:
            verify_signature(m.key, sig, data)
        except BadSignature:
            raise BadCertificate(BadCertificate.BAD_SIGNATURE,
                                 f"signature of member {short(member_id)} does not verify "
                                 f"for {body.describe()}") from None
    if len(cert.signatures) < ring.quorum:
        raise BadCertificate(BadCertificate.TOO_FEW,
                             f"{len(cert.signatures)} member signatures, "
                             f"{ring.quorum} (2f+1) needed")


# --------------------------------------------------------------------------
# Ring descriptors


@dataclass(frozen=True, slots=True)
class RingMember:
    """One ring member: its Ed25519 public key (its NodeID is the key's GUID,
    never stated separately, so the two cannot disagree) and its address."""

    key: bytes
    addr: str
    id: bytes = field(init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "id", node_id_of(self.key))

    def __repr__(self) -> str:
        return f"RingMember({short(self.id)}@{self.addr})"


def ring_id_of(owner_key: bytes, name: str) -> bytes:
    """A ring's id: the GUID of its owner's key and its name, so a descriptor
    cannot claim another owner's ring id."""
    return guid_of(b"p2pfs ring", owner_key, name.encode())


_DESC_SCHEMA = frames.spec({
    "v": int, "ring": GUID, "name": Str(256), "epoch": _U64, "f": Int(0, 21),
    "owner": PUBKEY, "members": ListOf(ListOf(frames.AnyValue(), max=2), max=MAX_MEMBERS),
    "creators": ListOf(PUBKEY, max=1024), "sig": Nullable(SIG),
})


@dataclass(frozen=True, slots=True)
class RingDescriptor:
    """Who the inner ring of a volume is (see module docstring)."""

    ring_id: bytes
    name: str
    epoch: int
    f: int
    owner: bytes                       # volume owner's public key
    members: tuple[RingMember, ...]
    creators: tuple[bytes, ...] = ()   # keys allowed to create objects; () = anyone
    sig: bytes | None = None           # owner's signature (epoch 0), else None
    _index: dict = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_index", {m.id: i for i, m in enumerate(self.members)})

    # -- construction ----------------------------------------------------------

    @classmethod
    def create(cls, owner: Identity, name: str, members: list[tuple[bytes, str]], f: int = 1,
               creators: tuple[bytes, ...] = ()) -> "RingDescriptor":
        """A new ring's epoch-0 descriptor, signed by ``owner``.
        ``members`` are (public key, address) pairs, 3f+1 of them."""
        d = cls(ring_id_of(owner.public_key, name), name, 0, f, owner.public_key,
                tuple(RingMember(k, a) for k, a in members), tuple(creators))
        d.check()
        return d.signed(owner)

    def signed(self, owner: Identity) -> "RingDescriptor":
        if owner.public_key != self.owner:
            raise BadDescriptor("only the volume owner signs a ring descriptor")
        return _replace(self, sig=owner.sign(self.signing_bytes()))

    def successor(self, replace: bytes, new_key: bytes, new_addr: str) -> "RingDescriptor":
        """The next epoch's descriptor, with member ``replace`` (a NodeID)
        swapped for a new member. Unsigned: the old ring certifies it."""
        i = self.index_of(replace)
        if i is None:
            raise BadDescriptor(f"{short(replace)} is not a member of this ring")
        members = list(self.members)
        members[i] = RingMember(new_key, new_addr)
        d = _replace(self, epoch=self.epoch + 1, members=tuple(members), sig=None)
        d.check()
        return d

    def with_addresses(self, addrs: Mapping[bytes, str]) -> "RingDescriptor":
        """Same keys, other addresses (for a local view only: addresses are
        signed, so this copy verifies only if nothing changed)."""
        return _replace(self, members=tuple(RingMember(m.key, addrs.get(m.id, m.addr))
                                            for m in self.members))

    # -- queries -----------------------------------------------------------------

    @property
    def n(self) -> int:
        return len(self.members)

    @property
    def quorum(self) -> int:
        return 2 * self.f + 1

    @property
    def ids(self) -> list[bytes]:
        return [m.id for m in self.members]

    def member(self, node_id: bytes) -> RingMember | None:
        i = self._index.get(node_id)
        return None if i is None else self.members[i]

    def index_of(self, node_id: bytes) -> int | None:
        return self._index.get(node_id)

    def primary(self, view: int) -> RingMember:
        return self.members[view % self.n]

    # -- encoding ------------------------------------------------------------------

    def fields(self) -> dict:
        return {"v": VERSION, "ring": self.ring_id, "name": self.name, "epoch": self.epoch,
                "f": self.f, "owner": self.owner,
                "members": [[m.key, m.addr] for m in self.members],
                "creators": list(self.creators)}

    def signing_bytes(self) -> bytes:
        return DESCRIPTOR_CONTEXT + msgpack.packb(self.fields(), use_bin_type=True)

    def digest(self) -> bytes:
        """GUID of the descriptor's body (its signature excluded): the VGUID
        under which the ring certifies its own successor descriptors."""
        return guid(self.signing_bytes())

    def encode(self) -> bytes:
        d = self.fields()
        d["sig"] = self.sig
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> "RingDescriptor":
        d = _unpack(data, 1 << 20, BadDescriptor)
        if isinstance(d, dict) and type(d.get("v")) is int and d["v"] != VERSION:
            raise BadDescriptor(f"descriptor version {d['v']} (this code reads {VERSION})")
        try:
            _DESC_SCHEMA.check(d, "descriptor")
        except frames.FrameError as e:
            raise BadDescriptor(str(e)) from None
        members = []
        for i, m in enumerate(d["members"]):
            if (len(m) != 2 or type(m[0]) is not bytes or len(m[0]) != 32
                    or type(m[1]) is not str or len(m[1]) > 256):
                raise BadDescriptor(f"member {i} is not a (32-byte key, address) pair")
            members.append(RingMember(m[0], m[1]))
        desc = cls(d["ring"], d["name"], d["epoch"], d["f"], d["owner"], tuple(members),
                   tuple(d["creators"]), d["sig"])
        desc.check()
        return desc

    def to_json(self) -> str:
        return json.dumps({
            "v": VERSION, "ring": self.ring_id.hex(), "name": self.name, "epoch": self.epoch,
            "f": self.f, "owner": self.owner.hex(),
            "members": [{"key": m.key.hex(), "addr": m.addr, "id": m.id.hex()}
                        for m in self.members],
            "creators": [c.hex() for c in self.creators],
            "sig": None if self.sig is None else self.sig.hex(),
        }, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RingDescriptor":
        try:
            j = json.loads(text)
            desc = cls(bytes.fromhex(j["ring"]), j["name"], int(j["epoch"]), int(j["f"]),
                       bytes.fromhex(j["owner"]),
                       tuple(RingMember(bytes.fromhex(m["key"]), m["addr"])
                             for m in j["members"]),
                       tuple(bytes.fromhex(c) for c in j.get("creators", ())),
                       None if j.get("sig") is None else bytes.fromhex(j["sig"]))
            raw = desc.encode()
        # OverflowError: Infinity, or an integer past 64 bits (msgpack);
        # RecursionError: nesting deeper than the JSON parser goes.
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError,
                RecursionError) as e:
            raise BadDescriptor(f"not a ring descriptor in JSON: {type(e).__name__}: "
                                f"{e}"[:300]) from None
        return cls.decode(raw)  # one set of checks for both forms

    # -- checks ----------------------------------------------------------------------

    def check(self) -> None:
        """Structural checks; raise :class:`BadDescriptor`."""
        if self.f < 0 or len(self.members) != 3 * self.f + 1:
            raise BadDescriptor(f"a ring with f={self.f} has {3 * self.f + 1} members, "
                                f"not {len(self.members)}")
        if len(self._index) != len(self.members):
            raise BadDescriptor("a member key is listed twice")
        if self.ring_id != ring_id_of(self.owner, self.name):
            raise BadDescriptor("ring id is not the GUID of the owner key and ring name")

    def verify_owner(self) -> None:
        """Check the owner's signature (an epoch-0 descriptor's trust root)."""
        self.check()
        if self.sig is None:
            raise BadDescriptor(f"descriptor of epoch {self.epoch} carries no owner signature")
        try:
            verify_signature(self.owner, self.sig, self.signing_bytes())
        except BadSignature:
            raise BadDescriptor("the owner's signature on the ring descriptor "
                                "does not verify") from None

    def verify_successor(self, new: "RingDescriptor", cert: Certificate) -> None:
        """Check that ``new`` is this ring's next epoch, certified by this
        epoch's members (a reconfiguration agreed by the ring)."""
        new.check()
        if (new.ring_id, new.owner, new.name) != (self.ring_id, self.owner, self.name):
            raise BadDescriptor("successor descriptor names another ring")
        if new.epoch != self.epoch + 1:
            raise BadDescriptor(f"successor of epoch {self.epoch} has epoch {new.epoch}")
        b = cert.body
        if (b.aguid, b.seq, b.vguid, b.prev) != (self.ring_id, new.epoch, new.digest(),
                                                 self.digest()):
            raise BadCertificate(BadCertificate.MISMATCH,
                                 "certificate does not certify this descriptor change")
        verify(cert, self)


def _replace(d: RingDescriptor, **kw) -> RingDescriptor:
    f = {k: getattr(d, k) for k in ("ring_id", "name", "epoch", "f", "owner", "members",
                                    "creators", "sig")}
    f.update(kw)
    return RingDescriptor(**f)
