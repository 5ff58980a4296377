"""The inner ring as the objects layer's VersionAuthority: the writer's
compare-and-swap requests from ``storage.objects`` decided by real PBFT
members on the simulated network."""

import pytest

from overlay.wire.simnet import SimNetwork
from storage.certificate import verify
from storage.objects import UpdateRequest, aguid_of
from storage.ring_authority import RingAuthority
from storage.ring_errors import Conflict, NotAuthorised, ObjectNotFound
from storage.ring_sim import SimRing


def v(k: int) -> bytes:
    return k.to_bytes(32, "big")


async def test_objects_requests_through_the_ring(nursery, tmp_path, autojump_clock):
    ring = SimRing(SimNetwork(seed=3), tmp_path)
    await ring.start(nursery)
    owner = ring.owner_client()
    auth = RingAuthority(owner)
    me = ring.owner
    a = aguid_of(me.public_key, "notes")
    with pytest.raises(ObjectNotFound):
        await auth.latest(a)
    c1 = await auth.update(UpdateRequest.create(me, aguid=a, prev=None, seq=1, vguid=v(1),
                                                name="notes"))
    verify(c1, ring.ring)
    assert await auth.latest(a) == (1, v(1))
    req2 = UpdateRequest.create(me, aguid=a, prev=v(1), seq=2, vguid=v(2))
    c2 = await auth.update(req2)
    assert (c2.seq, c2.prev) == (2, v(1))
    assert (await auth.update(req2)).vguid == v(2)       # a retry: same certificate
    with pytest.raises(Conflict) as e:                   # a stale predicate
        await auth.update(UpdateRequest.create(me, aguid=a, prev=v(1), seq=2, vguid=v(9)))
    assert e.value.current.vguid == v(2)
    assert await RingAuthority(owner, fresh_reads=True).latest(a) == (2, v(2))
    other = ring.client()
    with pytest.raises(NotAuthorised):                   # signing for someone else
        await RingAuthority(other).update(req2)
