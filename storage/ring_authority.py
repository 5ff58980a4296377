"""The inner ring as the objects layer's ``VersionAuthority``
(``storage.objects``): a writer's signed compare-and-swap request
("make ``vguid`` version ``seq``, provided ``prev`` is version ``seq - 1``")
becomes a ring request, and the answer is the ring's verified certificate.

Mapping: seq 1 (with the object's name) is a ``create``; any later seq is an
``update`` expecting seq - 1 and VGUID ``prev``. A request whose effect is
already the current version (a retry after a lost answer) returns that
version's certificate, as ``LocalAuthority`` does.
"""

from __future__ import annotations

from overlay.wire.ids import short

from .certificate import Certificate
from .ring_errors import Conflict, NotAuthorised, ObjectNotFound
from .ringclient import RingClient


class RingAuthority:
    """Decides current versions through the inner ring, signing ring
    requests with the client's identity (which must be the writer's)."""

    def __init__(self, client: RingClient, *, fresh_reads: bool = False):
        self.client = client
        self.fresh_reads = fresh_reads

    async def latest(self, aguid: bytes) -> tuple[int, bytes]:
        """(seq, VGUID) of the newest certified version; with
        ``fresh_reads`` an ordered read (definitely the latest, costs an
        agreement), else the newest certificate the members hand out."""
        if self.fresh_reads:
            cert = await self.client.read(aguid)
        else:
            cert = await self.client.latest(aguid)
            if cert is None:
                raise ObjectNotFound(f"no object {short(aguid)}")
        return cert.seq, cert.vguid

    async def update(self, request) -> Certificate:
        if request.writer != self.client.me.public_key:
            raise NotAuthorised(f"this ring client signs as {short(self.client.me.id)}, "
                                f"not as the request's writer")
        try:
            if request.seq == 1:
                return await self.client.create(request.name, request.vguid)
            return await self.client.update(request.aguid, request.vguid,
                                            expect_seq=request.seq - 1,
                                            expect_vguid=request.prev)
        except Conflict as e:
            cur = e.current
            if (cur.aguid, cur.seq, cur.vguid, cur.prev) == (
                    request.aguid, request.seq, request.vguid, request.prev):
                return cur          # our own update, applied by an earlier attempt
            raise

    async def set_writers(self, aguid: bytes, writer_keys) -> Certificate:
        """Replace the object's writers (the owner only)."""
        return await self.client.set_writers(aguid, writer_keys)
