"""The object pointer store (overlay/pointers.py): soft state with expiry,
epochs and tombstones, holders nearest first."""

from overlay.pointers import Pointer, PointerStore
from overlay.wire.transport import Peer

OBJ = b"\x01" * 32
T0, T1 = b"\x10" * 32, b"\x11" * 32


def peer(n: int) -> Peer:
    return Peer(bytes([n]) * 32, f"sim:{n}")


def ptr(holder: int, *, target=T0, epoch=1, expires=100.0, rooted=False) -> Pointer:
    return Pointer(OBJ, peer(holder), target, epoch, expires, rooted=rooted)


def test_holders_are_unique_live_and_nearest_first():
    s = PointerStore()
    s.put(ptr(1), now=0)
    s.put(ptr(1, target=T1), now=0)       # same holder under another salt
    s.put(ptr(2), now=0)
    s.put(ptr(3, expires=5.0), now=0)
    rtt = {peer(1).id: 0.09, peer(2).id: 0.01}
    assert s.holders(OBJ, now=1.0, rtt_of=rtt.get) == [peer(2), peer(1), peer(3)]
    assert s.holders(OBJ, now=6.0, rtt_of=rtt.get) == [peer(2), peer(1)]   # 3 expired
    assert s.holders(OBJ, now=1.0, exclude=[peer(2).id], rtt_of=rtt.get) == [peer(1), peer(3)]
    assert len(s) == 4
    assert s.expire(now=6.0) == 1 and len(s) == 3


def test_delete_leaves_a_tombstone_against_late_republishes():
    s = PointerStore()
    s.put(ptr(1, epoch=5), now=0)
    s.put(ptr(1, epoch=5, target=T1), now=0)
    removed = s.delete(OBJ, peer(1).id, epoch=5, now=1.0, tomb_until=30.0)
    assert len(removed) == 2 and s.holders(OBJ, now=1.0) == []
    # A republish of the deleted epoch, still in flight, is refused ...
    assert not s.put(ptr(1, epoch=5), now=2.0)
    # ... a new publish (next epoch) is not, nor is another holder.
    assert s.put(ptr(1, epoch=6), now=2.0)
    assert s.put(ptr(2, epoch=1), now=2.0)
    # The tombstone goes when it expires.
    s.expire(now=31.0)
    assert s.put(ptr(1, epoch=4), now=31.0) is False   # older than the stored epoch 6


def test_older_epoch_never_replaces_a_newer_pointer():
    s = PointerStore()
    assert s.put(ptr(1, epoch=7, expires=50), now=0)
    assert not s.put(ptr(1, epoch=6, expires=90), now=0)
    assert s.get(OBJ, peer(1).id, T0).expires == 50


def test_refresh_keeps_root_mark_and_path_memory():
    s = PointerStore()
    p = ptr(1, rooted=True)
    p.prev_hops.add(b"a" * 32)
    p.sent_to.add(b"b" * 32)
    s.put(p, now=0)
    q = ptr(1, expires=200)
    q.prev_hops.add(b"c" * 32)
    s.put(q, now=10)
    got = s.get(OBJ, peer(1).id, T0)
    assert got.rooted and got.expires == 200
    assert got.prev_hops == {b"a" * 32, b"c" * 32} and got.sent_to == {b"b" * 32}
    assert s.rooted() == [got]


def test_drop_holder_forgets_without_tombstone():
    s = PointerStore()
    s.put(ptr(1), now=0)
    s.drop_holder(OBJ, peer(1).id)
    assert s.objects() == []
    assert s.put(ptr(1), now=0)
