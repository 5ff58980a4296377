"""OceanStore objects: permanent names, immutable versions, signed updates
(Pond, FAST 2003; DESIGN.md "Identifiers" and "storage/objects"; PAPERS.md
"OceanStore / Pond").

* **AGUID** = GUID(owner public key, object name) (:func:`aguid_of`): the
  object's permanent name, which no one but the owner's key can claim.
* A **version** is a ROOT block (:class:`Root`): the AGUID, its sequence
  number, the VGUID of the version it replaced, creation and modification
  times, a metadata map and a :class:`~storage.blocktree.TreeRef` to the
  data. **VGUID** = BGUID of that block. Versions are immutable and chained
  by ``prev``, so an object's history is a list ending at ``seq`` 1 (the
  empty version written by :meth:`ObjectStore.create`).
* A new version shares every block it did not change with its predecessor
  (copy-on-write, ``storage.blocktree``): writing 4 KiB into a 100 MiB
  object stores 3 blocks: a DATA block, an INDIRECT block and the root.
* Which version is *current* is not a property of the blocks: it is decided
  by a :class:`VersionAuthority`, to which writers send a signed
  :class:`UpdateRequest` (compare-and-swap: "replace version ``prev`` at
  ``seq - 1`` by ``vguid``"). For a volume that is the inner ring (PBFT,
  certificates with 2f+1 member signatures, ``storage.certificate``);
  :class:`LocalAuthority` is the single-node case.

Formats (canonical msgpack: fixed key order, smallest encodings; decoders
re-encode what they parsed and refuse any byte string that is not exactly
that, so one logical value has exactly one encoding):

ROOT block, format ``v`` = 1::

    {"v": 1, "aguid": 32B, "seq": int >= 1, "prev": 32B | nil (nil iff seq 1),
     "ctime": ms, "mtime": ms (>= ctime), "tree": TreeRef, "meta": {str: bytes}}

Update request, format ``v`` = 1, signed by the writer's Ed25519 key over
``REQUEST_CONTEXT + encode(body)``::

    {"v": 1, "aguid": 32B, "prev": 32B | nil, "seq": int >= 1, "vguid": 32B,
     "writer": 32B public key, "time": ms, "name": bytes | nil}

``seq`` is the number the new version takes (the ring's certificate
carries the same ``aguid, seq, vguid, prev``). ``name`` is present exactly
for creation (seq 1): it lets any checker confirm that the creator owns the
AGUID, i.e. ``aguid == aguid_of(writer, name)``.

Times are milliseconds since the Unix epoch, as in certificates.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Mapping, Protocol

import msgpack

from overlay.wire import frames
from overlay.wire.frames import GUID, PUBKEY, SIG, Bytes, Int, MapOf, Nullable, Str
from overlay.wire.ids import BadSignature, Identity, guid_of, short
from overlay.wire.ids import verify as verify_signature

from .blockapi import MAX_BLOCK, BlockAccess, Kind
from .blocktree import BadTree, BlockTree, TreeReader, TreeRef
from .errors import StorageError
from .ring_errors import Conflict, NotAuthorised, ObjectNotFound

ROOT_VERSION = 1
REQUEST_VERSION = 1
REQUEST_CONTEXT = b"p2pfs update request v1\x00"
MAX_NAME = 1024
MAX_META_ENTRIES = 32
MAX_META_VALUE = 1024
MAX_REQUEST_BYTES = 4096
_U63 = Int(0, 2**63 - 1)
_SEQ = Int(1, 2**64 - 1)


class BadRootBlock(StorageError):
    """A ROOT block's plaintext is not a version this code can trust: not
    canonical msgpack, an unknown format version, a missing, unknown or
    ill-typed field, or fields that contradict each other (seq 1 with a
    predecessor, mtime before ctime, a malformed tree). The block verified
    against its BGUID, so its writer produced it."""


class BadUpdateRequest(StorageError):
    """An update request is malformed (not canonical msgpack, unknown
    version, a field out of range, ``name`` present other than for
    creation), its signature does not verify under the writer key it names,
    or a creation names an AGUID that is not GUID(writer key, name). Refused
    before anything is decided; the sender's fault."""


class WrongObject(StorageError):
    """A VGUID given as a version of one object names a version of another
    (or a history link points outside the object): a caller's mix-up."""


class VersionNotFound(StorageError):
    """No version of the object matches: a sequence number beyond the
    current one, or a time before the object was created."""


class BrokenHistory(StorageError):
    """Walking ``prev`` links found a version that cannot precede the one
    that names it: another object's version, a sequence number that does not
    decrease by exactly one, or times that run backwards."""


def aguid_of(owner_key: bytes, name: str | bytes) -> bytes:
    """AGUID = GUID(owner public key, object name) (DESIGN.md Identifiers)."""
    return guid_of(owner_key, _name_bytes(name))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _name_bytes(name: str | bytes) -> bytes:
    nb = name.encode() if isinstance(name, str) else bytes(name)
    if not 0 < len(nb) <= MAX_NAME:
        raise ValueError(f"an object name is 1..{MAX_NAME} bytes")
    return nb


# --------------------------------------------------------------------------
# Canonical msgpack


def _pack(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def _unpack(raw: bytes, max_len: int, err: type[Exception], what: str) -> object:
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise err(f"{what}: expected bytes, got {type(raw).__name__}")
    if len(raw) > max_len:
        raise err(f"{what}: {len(raw)} bytes exceeds {max_len}")
    try:
        return msgpack.unpackb(bytes(raw), raw=False, strict_map_key=True, ext_hook=_no_ext,
                               max_bin_len=max_len, max_str_len=max_len,
                               max_array_len=64, max_map_len=64)
    except Exception as e:  # msgpack raises several unrelated types
        raise err(f"{what}: not msgpack ({type(e).__name__})") from None


def _no_ext(code, data):
    raise ValueError("extension types are not allowed")


def _check(schema: frames.Spec, d: object, version: int, err: type[Exception], what: str) -> None:
    if isinstance(d, dict) and type(d.get("v")) is int and d["v"] != version:
        raise err(f"{what}: format version {d['v']} (this code reads {version})")
    try:
        schema.check(d, what)
    except frames.FrameError as e:
        raise err(str(e)) from None


# --------------------------------------------------------------------------
# Versions


_ROOT_SCHEMA = frames.spec({
    "v": int, "aguid": GUID, "seq": _SEQ, "prev": Nullable(GUID), "ctime": _U63,
    "mtime": _U63, "tree": frames.AnyValue(),
    "meta": MapOf(Str(64), Bytes(max=MAX_META_VALUE), max=MAX_META_ENTRIES),
})


@dataclass(frozen=True, slots=True)
class Root:
    """One version of an object (module docstring). ``vguid`` is known once
    the block is stored or was fetched; it is not part of the encoding."""

    aguid: bytes
    seq: int
    prev: bytes | None
    ctime: int
    mtime: int
    tree: TreeRef
    meta: Mapping[str, bytes] = field(default_factory=dict)
    vguid: bytes | None = field(default=None, compare=False)

    @property
    def size(self) -> int:
        return self.tree.size

    def fields(self) -> dict:
        # The key order here is the canonical order.
        return {"v": ROOT_VERSION, "aguid": self.aguid, "seq": self.seq, "prev": self.prev,
                "ctime": self.ctime, "mtime": self.mtime, "tree": self.tree.to_dict(),
                "meta": {k: self.meta[k] for k in sorted(self.meta)}}

    def encode(self) -> bytes:
        """The ROOT block's plaintext; ValueError if it is not a valid root
        (a bug in the caller: we never store what we would refuse to read)."""
        raw = _pack(self.fields())
        try:
            Root.decode(raw)
        except BadRootBlock as e:
            raise ValueError(f"refusing to encode an invalid root: {e}") from None
        return raw

    @classmethod
    def decode(cls, raw: bytes, vguid: bytes | None = None) -> "Root":
        """Parse and check a ROOT block; raises only :class:`BadRootBlock`."""
        what = f"root {short(vguid)}" if vguid else "root"
        d = _unpack(raw, MAX_BLOCK, BadRootBlock, what)
        _check(_ROOT_SCHEMA, d, ROOT_VERSION, BadRootBlock, what)
        try:
            tree = TreeRef.from_dict(d["tree"])
        except BadTree as e:
            raise BadRootBlock(f"{what}: {e}") from None
        root = cls(d["aguid"], d["seq"], d["prev"], d["ctime"], d["mtime"], tree,
                   d["meta"], vguid)
        if (root.seq == 1) != (root.prev is None):
            raise BadRootBlock(f"{what}: seq {root.seq} with prev {short(root.prev)} "
                               "(exactly the first version has no predecessor)")
        if root.mtime < root.ctime:
            raise BadRootBlock(f"{what}: mtime {root.mtime} before ctime {root.ctime}")
        if _pack(root.fields()) != bytes(raw):
            raise BadRootBlock(f"{what}: not in canonical form")
        return root


# --------------------------------------------------------------------------
# Update requests


_REQUEST_SCHEMA = frames.spec({
    "v": int, "aguid": GUID, "prev": Nullable(GUID), "seq": _SEQ, "vguid": GUID,
    "writer": PUBKEY, "time": _U63, "name": Nullable(Bytes(max=MAX_NAME)),
    "sig": frames.Optional(SIG),
})


@dataclass(frozen=True, slots=True)
class UpdateRequest:
    """A writer's signed compare-and-swap: make ``vguid`` version ``seq`` of
    ``aguid``, provided the current version is ``prev`` at ``seq - 1`` (or,
    for ``seq`` 1, that the object does not exist yet)."""

    aguid: bytes
    prev: bytes | None
    seq: int
    vguid: bytes
    writer: bytes
    time: int
    name: bytes | None = None
    sig: bytes | None = None

    @classmethod
    def create(cls, writer: Identity, *, aguid: bytes, prev: bytes | None, seq: int,
               vguid: bytes, time: int | None = None,
               name: str | bytes | None = None) -> "UpdateRequest":
        """A request signed by ``writer``."""
        req = cls(aguid, prev, seq, vguid, writer.public_key,
                  now_ms() if time is None else time,
                  None if name is None else _name_bytes(name))
        req._check_form()
        return replace(req, sig=writer.sign(req.signing_bytes()))

    def body(self) -> dict:
        return {"v": REQUEST_VERSION, "aguid": self.aguid, "prev": self.prev, "seq": self.seq,
                "vguid": self.vguid, "writer": self.writer, "time": self.time,
                "name": self.name}

    def signing_bytes(self) -> bytes:
        return REQUEST_CONTEXT + _pack(self.body())

    def to_dict(self) -> dict:
        """The request as a msgpack-ready map (body and ``sig``), for frames."""
        d = self.body()
        d["sig"] = self.sig
        return d

    def encode(self) -> bytes:
        return _pack(self.to_dict())

    @classmethod
    def from_dict(cls, d: object) -> "UpdateRequest":
        """Check the form of a decoded request (not its signature: call
        :meth:`verify`); raises only :class:`BadUpdateRequest`."""
        _check(_REQUEST_SCHEMA, d, REQUEST_VERSION, BadUpdateRequest, "update request")
        if "sig" not in d:
            raise BadUpdateRequest("update request: unsigned")
        req = cls(d["aguid"], d["prev"], d["seq"], d["vguid"], d["writer"], d["time"],
                  d["name"], d["sig"])
        req._check_form()
        return req

    @classmethod
    def decode(cls, raw: bytes) -> "UpdateRequest":
        d = _unpack(raw, MAX_REQUEST_BYTES, BadUpdateRequest, "update request")
        req = cls.from_dict(d)
        if req.encode() != bytes(raw):
            raise BadUpdateRequest("update request: not in canonical form")
        return req

    def _check_form(self) -> None:
        if (self.seq == 1) != (self.prev is None):
            raise BadUpdateRequest(f"update request: seq {self.seq} with prev "
                                   f"{short(self.prev)} (only seq 1 has no predecessor)")
        if (self.seq == 1) != (self.name is not None):
            raise BadUpdateRequest("update request: a name is given exactly for creation (seq 1)")

    def verify(self) -> None:
        """Check form, the writer's signature and, for a creation, that the
        writer owns the AGUID. Raises :class:`BadUpdateRequest`. Whether the
        writer may write this object is the authority's question."""
        self._check_form()
        if self.sig is None:
            raise BadUpdateRequest("update request: unsigned")
        try:
            verify_signature(self.writer, self.sig, self.signing_bytes())
        except BadSignature:
            raise BadUpdateRequest(f"update request for {short(self.aguid)}#{self.seq}: "
                                   f"signature of writer {short(self.writer)} does not "
                                   "verify") from None
        if self.name is not None and aguid_of(self.writer, self.name) != self.aguid:
            raise BadUpdateRequest(f"creation of {short(self.aguid)}: not the GUID of the "
                                   "writer's key and the name")


# --------------------------------------------------------------------------
# Who decides which version is current


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """The fact a certificate attests (``storage.certificate.CertBody``
    without ring, epoch and signatures): what :class:`LocalAuthority` returns."""

    aguid: bytes
    seq: int
    vguid: bytes
    prev: bytes | None
    time: int


class VersionAuthority(Protocol):
    """Decides an object's current version. The inner ring's client
    implements it (returning ``storage.certificate.Certificate``);
    :class:`LocalAuthority` is the single-node case. ``update`` raises
    ``ring_errors.Conflict`` when ``prev``/``seq`` is not current,
    ``NotAuthorised`` for a writer without rights, ``ObjectNotFound`` for an
    AGUID never created and :class:`BadUpdateRequest` for a bad request."""

    async def latest(self, aguid: bytes) -> tuple[int, bytes]:
        """(seq, VGUID) of the object's current version."""

    async def update(self, request: UpdateRequest):
        """Apply a verified request; return its certificate (attributes
        ``aguid, seq, vguid, prev, time``)."""


class LocalAuthority:
    """The single-node case: this process alone decides, in memory, which
    version of each object is current. There is no agreement and no
    signature but the writer's, so it is only correct where one node owns
    the volume outright (and tests of this module); it is not a stand-in for
    the inner ring. Creation makes the creator (who must own the AGUID) its
    only writer; :meth:`allow` adds more. A retried request that was already
    applied returns the same record (updates are idempotent)."""

    def __init__(self, clock=now_ms):
        self.clock = clock
        self._heads: dict[bytes, VersionRecord] = {}
        self._writers: dict[bytes, set[bytes]] = {}

    async def latest(self, aguid: bytes) -> tuple[int, bytes]:
        head = self._heads.get(aguid)
        if head is None:
            raise ObjectNotFound(f"no object {short(aguid)}")
        return head.seq, head.vguid

    async def update(self, request: UpdateRequest) -> VersionRecord:
        request.verify()
        head = self._heads.get(request.aguid)
        if head is not None and (head.seq, head.vguid, head.prev) == (
                request.seq, request.vguid, request.prev):
            return head  # a retry of the update that made the current version
        if request.seq == 1:
            if head is not None:
                raise Conflict(head, f"object {short(request.aguid)} exists")
            self._writers[request.aguid] = {request.writer}
        else:
            if head is None:
                raise ObjectNotFound(f"no object {short(request.aguid)}")
            if request.writer not in self._writers[request.aguid]:
                raise NotAuthorised(f"{short(request.writer)} may not write "
                                    f"{short(request.aguid)}")
            if (request.seq - 1, request.prev) != (head.seq, head.vguid):
                raise Conflict(head)
        rec = VersionRecord(request.aguid, request.seq, request.vguid, request.prev,
                            max(self.clock(), head.time if head else 0))
        self._heads[request.aguid] = rec
        return rec

    def allow(self, aguid: bytes, writer_key: bytes) -> None:
        """Let ``writer_key`` write ``aguid`` (the owner's local decision)."""
        if aguid not in self._writers:
            raise ObjectNotFound(f"no object {short(aguid)}")
        self._writers[aguid].add(writer_key)


# --------------------------------------------------------------------------
# The object API


class ObjectStore:
    """Objects over a :class:`BlockAccess` and a :class:`VersionAuthority`.

    Writing is two steps, so that many changes can make one version and
    certification can be moved off the data path: :meth:`write`,
    :meth:`truncate` or :meth:`new_version` store a new ROOT block derived
    from a given version (not yet current), and :meth:`commit` asks the
    authority to make it current."""

    def __init__(self, access: BlockAccess, authority: VersionAuthority, *,
                 tree: BlockTree | None = None, clock=now_ms, cache_roots: int = 1024):
        self.access = access
        self.authority = authority
        self.tree = tree or BlockTree(access)
        self.clock = clock
        self._roots: OrderedDict[bytes, Root] = OrderedDict()
        self._cache_roots = cache_roots

    async def create(self, owner: Identity, name: str | bytes, *,
                     meta: Mapping[str, bytes] | None = None) -> bytes:
        """Create an empty object (version 1) owned by ``owner``; return its
        AGUID. ``Conflict`` if it exists already."""
        aguid = aguid_of(owner.public_key, name)
        now = self.clock()
        first = await self._store(Root(aguid, 1, None, now, now, self.tree.empty(),
                                       dict(meta or {})))
        await self.authority.update(UpdateRequest.create(
            owner, aguid=aguid, prev=None, seq=1, vguid=first.vguid, time=now, name=name))
        return aguid

    async def root(self, vguid: bytes) -> Root:
        """The version named ``vguid`` (cached; versions are immutable)."""
        r = self._roots.get(vguid)
        if r is None:
            r = Root.decode(await self.access.get(vguid, Kind.ROOT), vguid)
            self._remember(r)
        return r

    async def current(self, aguid: bytes) -> Root:
        """The version the authority says is current."""
        seq, vguid = await self.authority.latest(aguid)
        r = await self.root(vguid)
        if r.aguid != aguid or r.seq != seq:
            raise WrongObject(f"authority names {short(vguid)} as {short(aguid)}#{seq}, "
                              f"but it is {short(r.aguid)}#{r.seq}")
        return r

    async def new_version(self, base: Root, tree: TreeRef, *,
                          meta: Mapping[str, bytes] | None = None) -> Root:
        """Store the version after ``base`` with ``tree`` (and ``meta``, or
        ``base``'s); not current until committed. Times never run backwards."""
        if base.vguid is None:
            raise ValueError("base version has no VGUID (store it first)")
        return await self._store(Root(
            base.aguid, base.seq + 1, base.vguid, base.ctime, max(self.clock(), base.mtime),
            tree, dict(base.meta if meta is None else meta)))

    async def _base(self, aguid: bytes, expected_vguid: bytes | None) -> Root:
        if expected_vguid is None:
            return await self.current(aguid)
        base = await self.root(expected_vguid)
        if base.aguid != aguid:
            raise WrongObject(f"{short(expected_vguid)} is a version of {short(base.aguid)}, "
                              f"not of {short(aguid)}")
        return base

    async def write(self, aguid: bytes, off: int, data, expected_vguid: bytes | None) -> Root:
        """Store the version with ``data`` written at ``off`` over version
        ``expected_vguid`` (None: the current one). Not yet committed."""
        base = await self._base(aguid, expected_vguid)
        return await self.new_version(base, await self.tree.write(base.tree, off, data))

    async def truncate(self, aguid: bytes, size: int, expected_vguid: bytes | None) -> Root:
        base = await self._base(aguid, expected_vguid)
        return await self.new_version(base, await self.tree.truncate(base.tree, size))

    async def commit(self, version: Root, writer: Identity):
        """Ask the authority to make ``version`` current (compare-and-swap on
        its ``prev``); return the certificate, or raise ``Conflict``."""
        return await self.authority.update(UpdateRequest.create(
            writer, aguid=version.aguid, prev=version.prev, seq=version.seq,
            vguid=version.vguid, time=self.clock()))

    async def read(self, vguid: bytes, off: int, n: int) -> bytes:
        return await self.tree.read((await self.root(vguid)).tree, off, n)

    async def reader(self, vguid: bytes) -> TreeReader:
        """A reader with read-ahead over one version."""
        return self.tree.reader((await self.root(vguid)).tree)

    async def history(self, aguid: bytes, *, start: bytes | None = None) -> AsyncIterator[Root]:
        """Versions newest first, from ``start`` (default: the current one)
        back to version 1, checking every ``prev`` link."""
        r = await (self.current(aguid) if start is None else self._base(aguid, start))
        while True:
            yield r
            if r.prev is None:
                return
            p = await self.root(r.prev)
            if (p.aguid, p.seq, p.ctime) != (r.aguid, r.seq - 1, r.ctime) or p.mtime > r.mtime:
                raise BrokenHistory(f"{short(aguid)}#{r.seq} names {short(r.prev)} as its "
                                    f"predecessor, which is {short(p.aguid)}#{p.seq}")
            r = p

    async def version_at(self, aguid: bytes, seq: int) -> Root:
        """Version number ``seq`` (a walk back from the current version)."""
        async for r in self.history(aguid):
            if r.seq == seq:
                return r
            if r.seq < seq:
                break
        raise VersionNotFound(f"{short(aguid)} has no version {seq}")

    async def version_at_time(self, aguid: bytes, t_ms: int) -> Root:
        """The version that was newest at time ``t_ms`` (by the versions'
        mtimes, which never decrease along the history)."""
        async for r in self.history(aguid):
            if r.mtime <= t_ms:
                return r
        raise VersionNotFound(f"{short(aguid)} did not exist at {t_ms}")

    async def _store(self, root: Root) -> Root:
        stored = replace(root, vguid=await self.access.put(Kind.ROOT, root.encode()))
        self._remember(stored)
        return stored

    def _remember(self, r: Root) -> None:
        self._roots[r.vguid] = r
        self._roots.move_to_end(r.vguid)
        while len(self._roots) > self._cache_roots:
            self._roots.popitem(last=False)
