"""The routing table and surrogate routing (overlay/routing_table.py).

The property that matters: when every slot is filled exactly when some live
node has its prefix, every node resolves every GUID to the same root, the one a
brute-force computation over the set of live IDs gives."""

import random

import pytest
from hypothesis import given, settings, strategies as st

from overlay.routing_table import (
    NotANeighbour,
    RoutingTable,
    global_root,
    route_path,
)
from overlay.wire.ids import digits
from overlay.wire.transport import Peer


def make_id(ds: list[int], fill: int = 0) -> bytes:
    """A 32-byte ID whose leading hex digits are ``ds``."""
    ds = list(ds) + [fill] * (64 - len(ds))
    return bytes((ds[i] << 4) | ds[i + 1] for i in range(0, 64, 2))


def peer(i: bytes) -> Peer:
    return Peer(i, "sim:" + i.hex())


def naive_root(target: bytes, ids: list[bytes]) -> bytes:
    """Surrogate root by definition: at each level keep the nodes whose digit
    is the first one at or after the target's digit (mod 16) present."""
    alive = list(ids)
    level = 0
    while len(alive) > 1:
        t = digits(target)[level]
        for k in range(16):
            keep = [x for x in alive if digits(x)[level] == (t + k) % 16]
            if keep:
                alive = keep
                break
        level += 1
    return alive[0]


def full_tables(ids: list[bytes], seed: int, slot_size: int = 3) -> dict[bytes, RoutingTable]:
    """Tables that satisfy the invariant: every node is offered every other
    node with a random RTT, in a random order."""
    rnd = random.Random(seed)
    tables = {}
    for me in ids:
        t = RoutingTable(peer(me), slot_size=slot_size)
        others = [x for x in ids if x != me]
        rnd.shuffle(others)
        for o in others:
            t.add(peer(o), rnd.uniform(0.001, 0.2))
        tables[me] = t
    return tables


# IDs drawn so that long shared prefixes and empty slots are common.
clustered_id = st.lists(st.integers(0, 3), min_size=6, max_size=6).map(make_id) | st.binary(
    min_size=32, max_size=32)
id_sets = st.lists(clustered_id, min_size=1, max_size=24, unique=True)


# ---------------------------------------------------------------- unit tests


def test_level_and_slot_placement():
    me = make_id([1, 2, 3])
    t = RoutingTable(peer(me))
    a = make_id([1, 2, 7])
    b = make_id([4])
    t.add(peer(a), 0.05)
    t.add(peer(b), 0.01)
    assert t.level_of(a) == 2 and t.slot(2, 7)[0].peer.id == a
    assert t.level_of(b) == 0 and t.slot(0, 4)[0].peer.id == b
    assert t.depth == 3 and len(t) == 2
    with pytest.raises(NotANeighbour):
        t.add(peer(me), 0.0)


def test_slot_keeps_three_nearest_in_rtt_order():
    me = make_id([0])
    t = RoutingTable(peer(me))
    ids = [make_id([5, i]) for i in range(5)]
    rtts = [0.30, 0.10, 0.20, 0.05, 0.40]
    evicted = []
    for i, r in zip(ids, rtts):
        kept, ev = t.add(peer(i), r)
        if ev:
            evicted.append(ev.id)
    assert [n.rtt for n in t.slot(0, 5)] == [0.05, 0.10, 0.20]
    assert evicted == [ids[0]]          # 0.30 pushed out by 0.05
    assert ids[4] not in t              # 0.40 never kept
    assert not t.would_add(make_id([5, 9]), 0.5)
    assert t.would_add(make_id([5, 9]), 0.01)
    assert t.would_add(make_id([6]))    # fills a hole


def test_suspect_moves_behind_backups_but_keeps_slot_filled():
    me = make_id([0])
    t = RoutingTable(peer(me))
    a, b = make_id([5, 1]), make_id([5, 2])
    t.add(peer(a), 0.01)
    t.add(peer(b), 0.02)
    t.mark_suspect(a, now=1.0)
    assert [n.peer.id for n in t.slot(0, 5)] == [b, a]
    t.remove(b)
    # The slot is still filled by the suspect: the surrogate choice is stable.
    assert t.next_hop(make_id([5]), 0)[1][0].peer.id == a
    # A suspect is the first to go when a slot is full.
    t.add(peer(make_id([5, 3])), 0.5)
    t.add(peer(make_id([5, 4])), 0.6)
    kept, ev = t.add(peer(make_id([5, 5])), 0.7)
    assert kept and ev.id == a
    t.clear_suspect(make_id([5, 3]))


def test_surrogate_skips_empty_slots_and_wraps():
    me = make_id([3, 0])
    t = RoutingTable(peer(me))
    for ds in ([1], [9], [3, 4]):
        t.add(peer(make_id(ds)), 0.01)
    # Target digit 5 at level 0: slots 5..8 empty, 9 filled.
    assert t.next_hop(make_id([5]), 0)[1][0].peer.id == make_id([9])
    # Target digit 0xa: a..f empty, wraps to 0 (empty), then 1.
    assert t.next_hop(make_id([0xA]), 0)[1][0].peer.id == make_id([1])
    # Target digit 2: slot 3 is ours, so level 1: digit 2 empty, 3 empty, 4 filled.
    lv, slot = t.next_hop(make_id([2, 2]), 0)
    assert lv == 1 and slot[0].peer.id == make_id([3, 4])
    # Target 3,0,...: our own slot at every level: we are the root.
    assert t.next_hop(make_id([3, 0]), 0) is None
    assert t.is_root(make_id([3, 0, 5]))


def test_exclude_self_routes_as_if_we_had_left():
    ids = [make_id(ds) for ds in ([3, 0], [3, 0, 1], [3, 4], [9])]
    tables = full_tables(ids, seed=1)
    me = ids[0]
    # The leave protocol first has the others drop the leaving node.
    for other, t in tables.items():
        if other != me:
            t.remove(me)
    for target in (make_id([3, 0]), make_id([3, 0, 0, 7]), make_id([2]), make_id([3, 3])):
        step = tables[me].next_hop(target, 0, exclude_self=True)
        expected = global_root(target, sorted(x for x in ids if x != me))
        # Follow the route from the first hop through the others' tables.
        _, slot = step
        nxt = slot[0].peer.id
        assert route_path(tables, nxt, target)[-1] == expected


def test_backpointers_expire():
    me = make_id([0])
    t = RoutingTable(peer(me))
    a = make_id([0, 0, 5])
    t.note_backpointer(peer(a), now=1.0)
    assert t.backpointer_peers(min_level=2) == [peer(a)]
    assert t.backpointer_peers(min_level=3) == []
    assert t.expire_backpointers(older_than=2.0) == [a]
    assert not t.backpointers


def test_to_dict_lists_rows_and_slots():
    me = make_id([1])
    t = RoutingTable(peer(me))
    t.add(peer(make_id([2])), 0.002)
    d = t.to_dict()
    assert d["id"] == me.hex() and d["size"] == 1
    assert d["rows"][0]["slots"]["2"][0]["id"] == make_id([2]).hex()


# ---------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(ids=id_sets, targets=st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=8),
       seed=st.integers(0, 1000))
def test_every_node_resolves_every_guid_to_the_global_root(ids, targets, seed):
    tables = full_tables(ids, seed)
    order = sorted(ids)
    for target in targets + ids:  # node IDs themselves are targets too
        expected = naive_root(target, ids)
        assert global_root(target, order) == expected
        for start in ids:
            path = route_path(tables, start, target)
            assert path[-1] == expected
            assert len(set(path)) == len(path)       # never revisits a node
            assert len(path) - 1 <= 64


@settings(max_examples=40, deadline=None)
@given(ids=id_sets, target=st.binary(min_size=32, max_size=32), seed=st.integers(0, 1000))
def test_root_does_not_depend_on_rtts_or_insertion_order(ids, target, seed):
    a = full_tables(ids, seed, slot_size=1)
    b = full_tables(ids, seed + 1, slot_size=3)
    for start in ids:
        assert route_path(a, start, target)[-1] == route_path(b, start, target)[-1]


@settings(max_examples=40, deadline=None)
@given(ids=id_sets, seed=st.integers(0, 1000))
def test_full_tables_fill_exactly_the_slots_with_live_prefixes(ids, seed):
    tables = full_tables(ids, seed)
    for me, t in tables.items():
        md = digits(me)
        for level in range(64):
            for d in range(16):
                if d == md[level]:
                    continue
                prefix = md[:level] + [d]
                exists = any(digits(x)[: level + 1] == prefix for x in ids)
                assert t.filled(level, d) == exists
                # Nearest first, never more than 3.
                s = t.slot(level, d)
                assert len(s) <= 3 and [n.rtt for n in s] == sorted(n.rtt for n in s)
            if level >= t.depth:
                break
