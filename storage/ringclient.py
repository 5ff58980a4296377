"""The inner ring's client: signed update requests in, verified
certificates out (DESIGN.md "storage/objects"; OceanStore/Pond inner ring).

A request is (client key, request id, operation, signature). Each member that
gets it answers only once the request has executed, with its result and,
when the result names a version, its signature of that version's
certificate body. The client accepts an outcome in one of two ways:

* a certificate alone: the primary answers with 2f+1 members' signatures of
  one body (``ring_requests``). The client takes it only where the
  certificate itself proves the outcome: an update expecting seq s that
  succeeded shows our VGUID at exactly seq s+1, and one that lost shows
  someone else's VGUID there; a create shows our VGUID as version 1.
  Versions are unique per (AGUID, seq) (2f+1 signers include f+1 correct
  ones, who sign one version per seq), so a faulty primary cannot mislead
  us with such a certificate; it can only withhold it;
* agreement of members: 2f+1 distinct members return the same certificate
  body, each with a valid signature of it (a version: "ok", "conflict",
  "current"), or f+1 return the same refusal ("not_authorised",
  "not_found", "bad_request", "stale"; at least one correct member says so,
  and execution is deterministic). With at most f faulty members, no two
  clients can ever assemble different certificates for one (AGUID, seq).

So a request whose outcome a certificate can prove goes to the primary
first (one round trip instead of 3f+1), and to every member if the primary
gives no usable answer within ``primary_timeout``; any other request (reads,
updates without ``expect_seq``, writer lists) goes to every member at once.
The client learns which member is primary from the views members report
(the (f+1)-th highest, so a liar cannot pick it) or from who last answered
with a whole certificate.

Members that have not answered are asked again, with the same request, each
``attempt_timeout``; members remember executed request ids, so a request
retried (by us, or later through :meth:`RingClient.resubmit`) is applied at
most once. If no outcome is reached within ``deadline`` the client raises
:class:`RingUnavailable` naming what each member did; the request may still
be applied later (it is pending at the members that have it).
"""

from __future__ import annotations

import logging
import re
import time

import msgpack
import trio

from overlay.wire.ids import Identity, short
from overlay.wire.transport import Peer, PeerError, RemoteError

from .certificate import CertBody, Certificate, RingDescriptor, verify
from .pbft import REQ
from .ring import (
    BAD_REQUEST, CONFLICT, CURRENT, DESCRIPTOR, LATEST, NOT_AUTHORISED, NOT_FOUND, OK, PUT_CERT,
    STALE, VERSION_STATUSES, aguid_of,
)
from .ring_errors import (
    BadCertificate, BadDescriptor, BadRequest, Conflict, NotAuthorised, ObjectNotFound,
    RingUnavailable, StaleRequest,
)
from .ring_messages import Request
from .ring_requests import kth_highest

log = logging.getLogger(__name__)
_NEWEST = re.compile(r"newest (\d+)")

ERRORS = {NOT_AUTHORISED: NotAuthorised, NOT_FOUND: ObjectNotFound, BAD_REQUEST: BadRequest,
          STALE: StaleRequest}


class RingClient:
    """Talks to one ring on behalf of one user identity."""

    def __init__(self, transport, ring: RingDescriptor, identity: Identity, *,
                 attempt_timeout: float = 2.0, deadline: float = 10.0,
                 primary_timeout: float = 1.0):
        self.transport = transport
        self.ring = ring
        self.me = identity
        self.attempt_timeout = attempt_timeout
        self.deadline = deadline
        self.primary_timeout = primary_timeout
        self._last_rid = 0
        self._verified: set[tuple[bytes, bytes]] = set()     # (member id, share) checked
        self._views: dict[int, int] = {}      # member index -> view it last reported
        self._primary: int | None = None      # who last answered with a certificate

    # ---- high-level operations ----------------------------------------------------

    def aguid(self, name: bytes) -> bytes:
        """The AGUID of an object this identity owns under ``name``."""
        return aguid_of(self.me.public_key, name)

    async def create(self, name: bytes, vguid: bytes, writers=()) -> Certificate:
        """Create an object owned by us; its certificate of seq 1. Raises
        :class:`Conflict` if it exists."""
        def alone(status, b):
            return status == OK and (b.seq, b.vguid, b.prev) == (1, vguid, None)
        return await self._version(self.request({"op": "create", "aguid": self.aguid(name),
                                                 "name": name, "vguid": vguid,
                                                 "writers": list(writers)}), vguid, alone)

    async def update(self, aguid: bytes, vguid: bytes, *, expect_seq: int | None = None,
                     expect_vguid: bytes | None = None) -> Certificate:
        """Replace the current version by ``vguid`` if the predicate holds;
        raises :class:`Conflict` (with the current certificate) if not."""
        op = {"op": "update", "aguid": aguid, "vguid": vguid}
        if expect_seq is not None:
            op["expect_seq"] = expect_seq
        if expect_vguid is not None:
            op["expect_vguid"] = expect_vguid
        alone = None
        if expect_seq is not None:
            def alone(status, b):
                # The version right after the one we expected: ours (we won)
                # or another (we lost). See the module docstring. (A VGUID
                # alone does not name a position: versions may repeat one.)
                if b.aguid != aguid or status not in (OK, CONFLICT):
                    return False
                if b.seq != expect_seq + 1:
                    return False
                if expect_vguid is not None and b.prev != expect_vguid:
                    return False
                return (b.vguid == vguid) == (status == OK)
        return await self._version(self.request(op), vguid, alone)

    async def set_writers(self, aguid: bytes, writers) -> Certificate:
        return await self._version(self.request({"op": "writers", "aguid": aguid,
                                                 "writers": list(writers)}))

    async def read(self, aguid: bytes) -> Certificate:
        """The current version, ordered by the ring: definitely the latest."""
        return await self._version(self.request({"op": "read", "aguid": aguid}))

    async def reconfigure(self, new: RingDescriptor) -> Certificate:
        """Replace the ring by its successor ``new`` (owner-signed, epoch+1):
        the ring orders the change like any update. Returns the old ring's
        certificate of the change, checked with ``verify_successor``; this
        client then talks to the new ring."""
        old = self.ring
        cert = await self._version(self.request({"op": "reconfig", "desc": new.encode()}),
                                   new.digest())
        old.verify_successor(new, cert)
        self.ring = new
        return cert

    async def refresh_ring(self) -> bool:
        """Ask the members for the ring's current descriptor and adopt a
        newer epoch whose owner signature verifies. True if it changed."""
        found: list[RingDescriptor] = []

        async def ask(m):
            try:
                r = await self.transport.request(Peer(m.id, m.addr), DESCRIPTOR, {},
                                                 timeout=self.attempt_timeout)
                d = RingDescriptor.decode(r["desc"])
                d.verify_owner()
            except (PeerError, RemoteError, BadDescriptor):
                return
            if (d.ring_id, d.owner) == (self.ring.ring_id, self.ring.owner):
                found.append(d)

        async with trio.open_nursery() as n:
            for m in self.ring.members:
                n.start_soon(ask, m)
        newest = max(found, key=lambda d: d.epoch, default=None)
        if newest is None or newest.epoch <= self.ring.epoch:
            return False
        log.info("ring %s moved to epoch %d", short(self.ring.ring_id), newest.epoch)
        self.ring = newest
        return True

    async def resubmit(self, req: Request) -> Certificate:
        """Send a request again (after RingUnavailable); applied at most once."""
        return await self._version(req)

    async def _version(self, req: Request, want_vguid: bytes | None = None,
                       alone=None) -> Certificate:
        try:
            status, cert, detail = await self.submit(req, alone=alone)
        except RingUnavailable:
            # Maybe the ring was reconfigured under us (members answer with
            # certificates of an epoch we do not know): follow it once.
            if not await self.refresh_ring():
                raise
            status, cert, detail = await self.submit(req, alone=alone)
        if status == STALE and req.r < self._last_rid:
            # Our ids resume past the ring's (_resume_after): once more, anew.
            req = self.request(msgpack.unpackb(req.op, raw=False))
            status, cert, detail = await self.submit(req, alone=alone)
        if status == CONFLICT:
            raise Conflict(cert)
        if status in ERRORS:
            raise ERRORS[status](f"ring refused the request: {status}: {detail}")
        if status == OK and want_vguid is not None and cert.vguid != want_vguid:
            raise BadCertificate(BadCertificate.MISMATCH, "the ring certified another VGUID")
        return cert

    # ---- requests --------------------------------------------------------------------

    def _resume_after(self, details: list) -> None:
        """Refused as stale: our clock is behind the ids the ring remembers
        for us (a clock stepped back, or the volume moved to another
        machine). Continue above the (f+1)-th highest newest id the members
        name: at least one correct member remembers an id that high, and no
        f liars can push our ids further."""
        ids = []
        for d in details:
            m = _NEWEST.search(d) if type(d) is str else None
            if m and len(m.group(1)) <= 20:
                ids.append(int(m.group(1)))
        v = kth_highest(ids, self.ring.f + 1)
        if v > self._last_rid and v < 2**63:
            log.warning("ring request ids resume after %d (this clock is %.0f s behind the "
                        "ids the ring remembers)", v, (v - time.time_ns()) / 1e9)
            self._last_rid = v

    def request(self, op: dict) -> Request:
        """A signed request with a fresh id (ids grow: a nanosecond clock,
        bumped past the last one)."""
        rid = max(self._last_rid + 1, time.time_ns())
        self._last_rid = rid
        opb = msgpack.packb(op, use_bin_type=True)
        c = self.me.public_key
        return Request(c, rid, opb, self.me.sign(Request.signing_bytes(self.ring.ring_id, c,
                                                                       rid, opb)))

    def primary_guess(self) -> int:
        """The member we think is primary: the last one that answered with a
        certificate, else the primary of the (f+1)-th highest view members
        reported (at least one correct member is that far)."""
        if self._primary is not None and self._primary < self.ring.n:
            return self._primary
        return max(kth_highest(self._views.values(), self.ring.f + 1), 0) % self.ring.n

    async def submit(self, req: Request, *, alone=None) -> tuple[str, Certificate | None, str]:
        """(status, certificate or None, detail) once members agree; see
        module docstring. ``alone(status, body)`` says whether a certificate
        of ``body`` proves the outcome ``status`` by itself; with it the
        request goes to the primary first. Raises RingUnavailable."""
        ring = self.ring
        replies: dict[int, tuple] = {}
        reached: set[int] = set()         # members that answered anything at all
        asking: set[int] = set()
        errors: dict[bytes, str] = {}
        outcome = None
        deadline = trio.current_time() + self.deadline
        body = {"c": req.c, "r": req.r, "op": req.op, "s": req.s}
        top = None        # the asking below, cancelled as soon as there is an outcome

        async def ask(j: int, timeout: float):
            nonlocal outcome
            m = ring.members[j]
            asking.add(j)
            try:
                r = await self.transport.request(Peer(m.id, m.addr), REQ,
                                                 {**body, "wait": max(timeout - 0.1, 0.0) * 0.9},
                                                 timeout=timeout)
                reached.add(j)
                rep = msgpack.unpackb(r["res"], raw=False)
                if type(rep) is not list or len(rep) != 4 or type(rep[0]) is not str:
                    raise ValueError("malformed reply")
                if "view" in r:
                    self._views[j] = r["view"]
                if r.get("sigs") and alone is not None:
                    whole = self._whole(j, rep, r["sigs"], alone)
                    if whole is not None:
                        if outcome is None:
                            outcome = whole
                            self._primary = j
                        if top is not None:
                            top.cancel()
                        return
                replies[j] = tuple(rep)
                errors.pop(m.id, None)
            except RemoteError as e:
                reached.add(j)
                if e.code == BAD_REQUEST:
                    replies[j] = (BAD_REQUEST, None, e.msg, None)
                else:
                    errors[m.id] = f"{e.code}: {e.msg}"
                    return
            except PeerError as e:
                errors[m.id] = f"{type(e).__name__}: {e}"
                return
            except (ValueError, TypeError, msgpack.UnpackException) as e:
                errors[m.id] = f"unreadable reply: {e}"
                return
            finally:
                asking.discard(j)
            # Another ask may have found the outcome already (its reply came
            # in the same batch: this task was past its last checkpoint when
            # the cancel came). Never overwrite it with "not yet".
            if outcome is None:
                outcome = self._evaluate(replies)
                if outcome is not None:
                    self._primary = None          # found by agreement: go by the views
            if outcome is not None and top is not None:
                top.cancel()

        if alone is not None:
            # The primary first, from this task (the common case is this one
            # request); everybody once it is late (asked again if need be:
            # members answer a repeated request id from what they have).
            with trio.move_on_after(min(self.primary_timeout, self.deadline)):
                await ask(self.primary_guess(), min(self.attempt_timeout, self.deadline))
            if outcome is not None:
                return outcome
        async with trio.open_nursery() as nursery:
            top = nursery.cancel_scope
            while outcome is None:
                now = trio.current_time()
                if now >= deadline or len(replies) == ring.n:
                    break
                timeout = min(self.attempt_timeout, deadline - now)
                async with trio.open_nursery() as n:
                    for j in range(ring.n):
                        if j not in replies and j not in asking:
                            n.start_soon(ask, j, timeout)
                if outcome is None:
                    await trio.sleep_until(min(now + timeout, deadline))
            top.cancel()
        if outcome is not None:
            return outcome
        answered = len(replies)
        detail = "; ".join(f"member {short(k)}: {v}" for k, v in errors.items())
        if answered >= ring.quorum:
            why = f"{answered} of {ring.n} members answered but no {ring.quorum} agree"
        else:
            why = (f"only {len(reached)} of {ring.n} members reachable and {answered} "
                   f"answered within {self.deadline:g} s; {ring.quorum} (2f+1) must agree")
        raise RingUnavailable(
            f"inner ring {short(ring.ring_id)} unavailable: {why}"
            f"{'; ' + detail if detail else ''}. The request may still be applied once "
            f"enough members are back: retry it with RingClient.resubmit(err.request) "
            f"(it is applied at most once).", request=req, errors=dict(errors))

    def _whole(self, j: int, rep: list, sigs: list, alone):
        """The outcome a member's answer with a whole certificate proves by
        itself (module docstring), or None."""
        ring = self.ring
        status, body, detail, share = rep
        if type(body) is not bytes or type(share) is not bytes:
            return None
        try:
            cb = CertBody.decode(body)
            if not alone(status, cb):
                return None
            signatures = {ring.members[k].id: s for k, s in enumerate(sigs[:ring.n]) if s}
            signatures[ring.members[j].id] = share
            cert = Certificate(cb, signatures)
            verify(cert, ring)
        except BadCertificate as e:
            log.warning("member %s answered with a bad certificate: %s",
                        short(ring.members[j].id), e)
            return None
        return status, cert, detail or ""

    def _evaluate(self, replies: dict[int, tuple]):
        ring = self.ring
        groups: dict[tuple, list[int]] = {}
        for j, (status, body, detail, share) in replies.items():
            groups.setdefault((status, body), []).append(j)
        for (status, body), js in groups.items():
            if status in VERSION_STATUSES and type(body) is bytes:
                if len(js) < ring.quorum:
                    continue
                try:
                    cb = CertBody.decode(body)
                except BadCertificate:
                    continue
                if (cb.ring_id, cb.epoch) != (ring.ring_id, ring.epoch):
                    continue
                sigs = {}
                for j in js:
                    if len(sigs) >= ring.quorum:
                        break                   # 2f+1 checked signatures are enough
                    m = ring.members[j]
                    share = replies[j][3]
                    if type(share) is not bytes:
                        continue
                    if (m.id, share) in self._verified or cb.check_share(m.key, share):
                        self._verified.add((m.id, share))
                        sigs[m.id] = share
                if len(sigs) >= ring.quorum:
                    if len(self._verified) > 4096:
                        self._verified.clear()
                    return status, Certificate(cb, sigs), replies[js[0]][2]
            elif status in ERRORS and len(js) >= ring.f + 1:
                if status == STALE:
                    self._resume_after([replies[j][2] for j in js])
                return status, None, replies[js[0]][2] or ""
        return None

    # ---- readers -----------------------------------------------------------------------

    async def latest(self, aguid: bytes, *, timeout: float | None = None) -> Certificate | None:
        """The newest verified certificate the members hand out (without an
        agreement: "newest since", cheap). Waits for 2f+1 answers or the
        timeout; None if the object has no version; RingUnavailable if no
        member answered."""
        ring = self.ring
        timeout = self.attempt_timeout if timeout is None else timeout
        best: list[Certificate | None] = [None]
        answered = [0]
        errors: dict[bytes, str] = {}

        async def ask(m, cancel):
            try:
                r = await self.transport.request(Peer(m.id, m.addr), LATEST, {"aguid": aguid},
                                                 timeout=timeout)
            except (PeerError, RemoteError) as e:
                errors[m.id] = str(e)
                return
            answered[0] += 1
            if r["cert"] is not None:
                try:
                    c = Certificate.decode(r["cert"])
                    verify(c, ring)
                    if c.aguid != aguid:
                        raise BadCertificate(BadCertificate.MISMATCH, "another object")
                except BadCertificate as e:
                    log.warning("member %s served a bad certificate: %s", short(m.id), e)
                    errors[m.id] = str(e)
                    return
                if best[0] is None or c.seq > best[0].seq:
                    best[0] = c
            if answered[0] >= ring.quorum:
                cancel.cancel()

        async with trio.open_nursery() as n:
            for m in ring.members:
                n.start_soon(ask, m, n.cancel_scope)
        if answered[0] == 0:
            raise RingUnavailable(f"no member of ring {short(ring.ring_id)} answered: "
                                  + "; ".join(f"{short(k)}: {v}" for k, v in errors.items()),
                                  errors=errors)
        return best[0]

    async def publish(self, cert: Certificate, *, timeout: float = 1.0) -> int:
        """Leave a copy of an assembled certificate with every member (so
        readers get it without an assembly); returns how many took it."""
        took = [0]

        async def put(m):
            try:
                await self.transport.request(Peer(m.id, m.addr), PUT_CERT,
                                             {"cert": cert.encode()}, timeout=timeout)
                took[0] += 1
            except (PeerError, RemoteError):
                pass

        async with trio.open_nursery() as n:
            for m in self.ring.members:
                n.start_soon(put, m)
        return took[0]


__all__ = ["RingClient", "Conflict", "RingUnavailable", "CURRENT", "OK"]
