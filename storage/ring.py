"""The inner ring's object-update state machine and member service
(OceanStore/Pond inner ring; DESIGN.md "storage/objects"; PAPERS.md
"OceanStore / Pond": updates are conditional, a version predicate is
compare-and-swap).

State per AGUID: the current version (seq, VGUID, previous VGUID, time),
the owner's key and the writers' keys. Operations, each a signed client
request ordered by PBFT (``pbft.Replica``) and executed deterministically:

    create   {aguid, name, vguid, writers}   by the owner: AGUID must be
             GUID(owner key, name); first version is seq 1, prev None;
             an existing object answers "conflict" with its current version
    update   {aguid, vguid, expect_seq?, expect_vguid?}   by a writer: the
             predicate (each given expectation equals the current version;
             none given = always true) decides between "ok" (seq + 1) and
             "conflict" (current version); at most one of several updates
             with the same predicate can win
    writers  {aguid, writers}   by the owner: replace the ACL ("current")
    read     {aguid}   an ordered read: "current", definitely the latest
    reconfig {desc}    by the ring's owner: the next epoch's descriptor,
             signed by the owner (a member replaced). Takes effect after
             the batch that orders it; the answer certifies the change
             (AGUID = ring id, seq = new epoch, VGUID = descriptor digest,
             prev = old descriptor digest), signed by the old epoch's ring

Every answer that names a version carries the certificate body of that
version and this member's signature of it, so a client assembles a
certificate of 2f+1 signatures from members' replies alone (``ringclient``),
or gets it whole from the primary, which gathers the backups' shares
(``ring_requests``). A certificate is signed under the ring's current epoch.
Operations run tentatively once prepared (``ring_execution``) except
``reconfig``, which runs only once decided.

The service also serves readers: ``ring.latest`` returns the newest full
certificate the member has (assembling it on demand from the other
members' ``ring.share`` signatures), ``ring.put_cert`` lets a client that
assembled a certificate leave a copy.
"""

from __future__ import annotations

import logging
import time as _time
from collections import OrderedDict
from dataclasses import dataclass

import msgpack
import trio

from overlay.wire import frames
from overlay.wire.frames import GUID, PUBKEY, SIG, Bytes, Int, ListOf, Nullable, Optional, Str
from overlay.wire.ids import BadSignature, Identity, guid_of, short
from overlay.wire.ids import verify as verify_signature
from overlay.wire.transport import Peer, PeerError, Refused, RemoteError

from .certificate import CERT_CONTEXT, CertBody, Certificate, RingDescriptor, verify
from .ring_errors import BadCertificate, BadDescriptor
from .pbft import PbftConfig, Replica
from .ring_messages import BadMessage
from .ring_store import RingStore, u64

log = logging.getLogger(__name__)

OK, CONFLICT, CURRENT = "ok", "conflict", "current"
NOT_FOUND, NOT_AUTHORISED, BAD_REQUEST, STALE = "not_found", "not_authorised", \
    "bad_request", "stale"
VERSION_STATUSES = (OK, CONFLICT, CURRENT)
MAX_WRITERS = 256
U64 = Int(0, 2**63 - 1)

_OPS = {
    "create": frames.spec({"op": Str(16), "aguid": GUID, "name": Bytes(max=1024),
                           "vguid": GUID, "writers": ListOf(PUBKEY, max=MAX_WRITERS)}),
    "update": frames.spec({"op": Str(16), "aguid": GUID, "vguid": GUID,
                           "expect_seq": Optional(U64), "expect_vguid": Optional(GUID)}),
    "writers": frames.spec({"op": Str(16), "aguid": GUID,
                            "writers": ListOf(PUBKEY, max=MAX_WRITERS)}),
    "read": frames.spec({"op": Str(16), "aguid": GUID}),
    "reconfig": frames.spec({"op": Str(16), "desc": Bytes(max=4096)}),
}

LATEST = frames.message("ring.latest", {"aguid": GUID}, {"cert": Nullable(Bytes(max=64 * 1024))})
SHARE = frames.message("ring.share", {"aguid": GUID, "seq": U64}, {"body": Bytes(max=4096),
                                                                  "sig": SIG})
PUT_CERT = frames.message("ring.put_cert", {"cert": Bytes(max=64 * 1024)}, {})
DESCRIPTOR = frames.message("ring.descriptor", {}, {"desc": Bytes(max=64 * 1024)})
STATUS = frames.message("ring.status", {}, {
    "ring": GUID, "epoch": U64, "index": Int(-1, 63), "view": U64, "active": bool, "exec": U64,
    "h": U64, "objects": U64, "stats": frames.MapOf(Str(32), U64, max=32)})


def aguid_of(owner_key: bytes, name: bytes) -> bytes:
    """AGUID = GUID(owner public key, object name) (DESIGN.md Identifiers)."""
    return guid_of(owner_key, name)


def decode_op(op: bytes) -> dict:
    try:
        d = msgpack.unpackb(op, raw=False, strict_map_key=True, max_map_len=16,
                            max_array_len=MAX_WRITERS, max_bin_len=4096, max_str_len=64)
    except Exception as e:
        raise BadMessage(f"operation is not msgpack: {type(e).__name__}") from None
    if type(d) is not dict or d.get("op") not in _OPS:
        raise BadMessage("unknown operation")
    try:
        _OPS[d["op"]].check(d, d["op"])
    except frames.FrameError as e:
        raise BadMessage(str(e)) from None
    return d


def encode_result(status: str, body: bytes | None = None, detail: str = "") -> bytes:
    return msgpack.packb([status, body, detail], use_bin_type=True)


@dataclass
class ObjectState:
    seq: int
    vguid: bytes
    prev: bytes | None
    time: int
    owner: bytes
    writers: tuple[bytes, ...]

    def pack(self) -> list:
        return [self.seq, self.vguid, self.prev, self.time, self.owner, list(self.writers)]

    @classmethod
    def unpack(cls, x) -> "ObjectState":
        return cls(x[0], x[1], x[2], x[3], x[4], tuple(x[5]))


class ObjectRing:
    """The application ``pbft.Replica`` replicates (see module docstring)."""

    def __init__(self, identity: Identity, ring: RingDescriptor, store: RingStore):
        self.me = identity
        self.ring = ring
        self.store = store
        self.objects: dict[bytes, ObjectState] = {}
        self._next_ring: RingDescriptor | None = None           # set by a reconfig
        self._sigs: OrderedDict[bytes, bytes] = OrderedDict()   # body -> our signature
        for k, v in store.items("objects"):
            self.objects[k] = ObjectState.unpack(msgpack.unpackb(v, raw=False))

    # ---- App interface ------------------------------------------------------

    def check_op(self, client: bytes, op: bytes) -> None:
        decode_op(op)

    def stale_result(self, newest: int = 0) -> bytes:
        """The refusal of a request id below every id remembered for its
        client; ``newest`` (the highest remembered) tells a client whose
        clock stepped back where its ids must resume (``RingClient``)."""
        return encode_result(STALE, None, f"request id older than the ring remembers; "
                                          f"newest {newest}")

    def body_of(self, aguid: bytes, obj: ObjectState) -> CertBody:
        return CertBody(self.ring.ring_id, self.ring.epoch, aguid, obj.seq, obj.vguid,
                        obj.prev, obj.time)

    def _current(self, status: str, aguid: bytes, obj: ObjectState, detail: str = "") -> bytes:
        return encode_result(status, self.body_of(aguid, obj).encode(), detail)

    def _save(self, aguid: bytes, obj: ObjectState, new_version: bool) -> None:
        self.objects[aguid] = obj
        self.store.put("objects", aguid, msgpack.packb(obj.pack(), use_bin_type=True))
        if new_version:
            self.store.put("versions", aguid + u64(obj.seq),
                           msgpack.packb([obj.vguid, obj.prev, obj.time], use_bin_type=True))

    def execute(self, client: bytes, rid: int, op: bytes, time_ms: int, seq: int) -> bytes:
        try:
            d = decode_op(op)
        except BadMessage as e:
            return encode_result(BAD_REQUEST, None, str(e))
        kind = d["op"]
        if kind == "reconfig":
            return self._reconfig(client, d["desc"], time_ms)
        aguid = d["aguid"]
        obj = self.objects.get(aguid)
        if kind == "create":
            if aguid != aguid_of(client, d["name"]):
                return encode_result(BAD_REQUEST, None,
                                     "AGUID is not GUID(owner key, name) for the signer's key")
            if self.ring.creators and client not in self.ring.creators:
                return encode_result(NOT_AUTHORISED, None, "not allowed to create objects here")
            if obj is not None:
                return self._current(CONFLICT, aguid, obj, "object exists")
            obj = ObjectState(1, d["vguid"], None, time_ms, client,
                              tuple(sorted(set(d["writers"]) | {client})))
            self._save(aguid, obj, True)
            return self._current(OK, aguid, obj)
        if obj is None:
            return encode_result(NOT_FOUND, None, f"no object {aguid.hex()}")
        if kind == "read":
            return self._current(CURRENT, aguid, obj)
        if kind == "writers":
            if client != obj.owner:
                return encode_result(NOT_AUTHORISED, None, "only the owner changes writers")
            obj = ObjectState(obj.seq, obj.vguid, obj.prev, obj.time, obj.owner,
                              tuple(sorted(set(d["writers"]) | {obj.owner})))
            self._save(aguid, obj, False)
            return self._current(CURRENT, aguid, obj)
        # update
        if client not in obj.writers:
            return encode_result(NOT_AUTHORISED, None, "signer is not a writer of this object")
        if "expect_seq" in d and d["expect_seq"] != obj.seq:
            return self._current(CONFLICT, aguid, obj, f"expected seq {d['expect_seq']}")
        if "expect_vguid" in d and d["expect_vguid"] != obj.vguid:
            return self._current(CONFLICT, aguid, obj, "expected another VGUID")
        obj = ObjectState(obj.seq + 1, d["vguid"], obj.vguid, time_ms, obj.owner, obj.writers)
        self._save(aguid, obj, True)
        return self._current(OK, aguid, obj)

    def _reconfig(self, client: bytes, desc: bytes, time_ms: int) -> bytes:
        ring = self.ring
        if client != ring.owner:
            return encode_result(NOT_AUTHORISED, None, "only the ring's owner reconfigures it")
        if self._next_ring is not None:
            return encode_result(BAD_REQUEST, None, "a reconfiguration is already pending")
        try:
            new = RingDescriptor.decode(desc)
            new.verify_owner()
        except BadDescriptor as e:
            return encode_result(BAD_REQUEST, None, str(e))
        if (new.ring_id, new.owner, new.f) != (ring.ring_id, ring.owner, ring.f):
            return encode_result(BAD_REQUEST, None, "a successor keeps ring id, owner and f")
        if new.epoch != ring.epoch + 1:
            return encode_result(BAD_REQUEST, None, f"the next epoch is {ring.epoch + 1}")
        self._next_ring = new
        body = CertBody(ring.ring_id, ring.epoch, ring.ring_id, new.epoch, new.digest(),
                        ring.digest(), time_ms)
        return encode_result(OK, body.encode())

    def take_config(self) -> RingDescriptor | None:
        new, self._next_ring = self._next_ring, None
        if new is not None:
            self.ring = new
        return new

    def snapshot(self):
        return [self.ring.encode(), [[a] + o.pack() for a, o in sorted(self.objects.items())]]

    def restore(self, snap) -> None:
        ring = RingDescriptor.decode(snap[0])
        if ring.ring_id != self.ring.ring_id or ring.epoch < self.ring.epoch:
            raise ValueError("snapshot of another ring, or of an older epoch")
        self.ring = ring
        self.objects = {x[0]: ObjectState.unpack(x[1:]) for x in snap[1]}
        self.store.clear("objects")
        for a, o in self.objects.items():
            self._save(a, o, False)

    def sign_body(self, body: bytes) -> bytes:
        sig = self._sigs.get(body)
        if sig is None:
            # ``body`` is our own canonical encoding: sign it as CertBody would.
            sig = self._sigs[body] = self.me.sign(CERT_CONTEXT + body)
            if len(self._sigs) > 4096:
                self._sigs.popitem(last=False)
        return sig

    def reply(self, client: bytes, rid: int, result: bytes) -> bytes:
        status, body, detail = msgpack.unpackb(result, raw=False)
        share = self.sign_body(body) if body is not None else None
        return msgpack.packb([status, body, detail, share], use_bin_type=True)

    def tentative_ok(self, op: bytes) -> bool:
        # A reconfiguration switches rings when it executes: decided only.
        try:
            return msgpack.unpackb(op, raw=False).get("op") != "reconfig"
        except Exception:
            return False

    def reloaded(self, db: str, key: bytes) -> None:
        if db == "objects":
            raw = self.store.get("objects", key)
            if raw is None:
                self.objects.pop(key, None)
            else:
                self.objects[key] = ObjectState.unpack(msgpack.unpackb(raw, raw=False))

    def share(self, result: bytes) -> tuple[bytes, bytes] | None:
        body = msgpack.unpackb(result, raw=False)[1]
        return None if body is None else (body, self.sign_body(body))

    def share_ok(self, member_key: bytes, body: bytes, sig: bytes) -> bool:
        try:
            verify_signature(member_key, sig, CERT_CONTEXT + body)
            return True
        except BadSignature:
            return False


def newest_ring(store: RingStore, ring: RingDescriptor) -> RingDescriptor:
    """The newer of ``ring`` and the descriptor this member stored when it
    last switched epochs (a member restarted with an old descriptor file
    resumes in the epoch it had reached)."""
    raw = store.get("meta", b"ring")
    if raw is None:
        return ring
    stored = RingDescriptor.decode(raw)
    if stored.ring_id != ring.ring_id:
        raise BadDescriptor(f"this store belongs to ring {short(stored.ring_id)}, "
                            f"not {short(ring.ring_id)}")
    return stored if stored.epoch > ring.epoch else ring


class RingService:
    """One inner ring member: the PBFT replica, its object state machine,
    and the reader-facing handlers."""

    def __init__(self, identity: Identity, ring: RingDescriptor, store: RingStore, transport,
                 config: PbftConfig | None = None, clock=_time.time, replica_cls=Replica,
                 **replica_kw):
        self.me = identity
        self.store = store
        self.transport = transport
        ring = newest_ring(store, ring)
        self.app = ObjectRing(identity, ring, store)
        self.replica = replica_cls(identity, ring, self.app, store, transport, config, clock,
                                   **replica_kw)
        self._gathering: dict[bytes, trio.Lock] = {}

    @property
    def ring(self) -> RingDescriptor:
        """The current descriptor (it changes when the ring is reconfigured)."""
        return self.replica.ring

    def register(self, dispatcher) -> None:
        self.replica.register(dispatcher)
        dispatcher.on(DESCRIPTOR, self._on_descriptor)
        dispatcher.on(LATEST, self._on_latest)
        dispatcher.on(SHARE, self._on_share)
        dispatcher.on(PUT_CERT, self._on_put_cert)
        dispatcher.on(STATUS, self._on_status)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.replica.run(task_status=task_status)

    def status(self) -> dict:
        """This member's progress, for operators, tools and tests."""
        r = self.replica
        return {"ring": self.ring.ring_id, "epoch": self.ring.epoch, "index": r.i,
                "view": r.view, "active": not r.in_vc, "exec": r.committed_seq, "h": r.h,
                "objects": len(self.app.objects), "stats": {**r.stats, **r.traffic()}}

    async def _on_status(self, sender: bytes, body: dict) -> dict:
        return self.status()

    async def _on_descriptor(self, sender: bytes, body: dict) -> dict:
        return {"desc": self.ring.encode()}

    # ---- readers ------------------------------------------------------------------

    def stored_cert(self, aguid: bytes) -> Certificate | None:
        raw = self.store.get("certs", aguid)
        return None if raw is None else Certificate.decode(raw)

    async def _on_share(self, sender: bytes, body: dict) -> dict:
        obj = self.app.objects.get(body["aguid"])
        if obj is None or obj.seq != body["seq"]:
            raise Refused("not_current", f"this member is at seq {obj.seq if obj else 0}")
        b = self.app.body_of(body["aguid"], obj).encode()
        return {"body": b, "sig": self.app.sign_body(b)}

    async def _on_put_cert(self, sender: bytes, body: dict) -> dict:
        try:
            cert = Certificate.decode(body["cert"])
            verify(cert, self.ring)
        except BadCertificate as e:
            raise Refused("bad_certificate", str(e)) from None
        self._keep(cert)
        return {}

    def _keep(self, cert: Certificate) -> None:
        old = self.stored_cert(cert.aguid)
        if old is None or (old.epoch, old.seq) < (cert.epoch, cert.seq):
            self.store.put("certs", cert.aguid, cert.encode())
            self.replica._kick()

    async def _on_latest(self, sender: bytes, body: dict) -> dict:
        aguid = body["aguid"]
        obj = self.app.objects.get(aguid)
        have = self.stored_cert(aguid)
        if obj is None:
            return {"cert": None if have is None else have.encode()}
        if have is not None and have.seq >= obj.seq and have.epoch == self.ring.epoch:
            return {"cert": have.encode()}
        lock = self._gathering.setdefault(aguid, trio.Lock())
        async with lock:
            cert = await self._assemble(aguid, obj)
        if cert is not None:
            self._keep(cert)
            return {"cert": cert.encode()}
        return {"cert": None if have is None else have.encode()}

    async def _assemble(self, aguid: bytes, obj: ObjectState) -> Certificate | None:
        """A certificate of our current version from 2f+1 members' shares."""
        body = self.app.body_of(aguid, obj)
        enc = body.encode()
        sigs = {self.me.id: self.app.sign_body(enc)}

        async def ask(m):
            try:
                r = await self.transport.request(Peer(m.id, m.addr), SHARE,
                                                 {"aguid": aguid, "seq": obj.seq}, timeout=2.0)
            except (PeerError, RemoteError):
                return
            if r["body"] == enc and body.check_share(m.key, r["sig"]):
                sigs[m.id] = r["sig"]
                if len(sigs) >= self.ring.quorum:
                    nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for m in self.ring.members:
                if m.id != self.me.id:
                    nursery.start_soon(ask, m)
        if len(sigs) < self.ring.quorum:
            return None
        return Certificate(body, sigs)
