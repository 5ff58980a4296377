"""Version vectors and the total order of records (storage/vv.py): the order
is a strict total order consistent with dominance; merging is independent of
order; Ivy's pairwise tie-break would not be transitive."""

import itertools

import pytest
from hypothesis import given, settings, strategies as st

from storage.vv import EMPTY, VV, Dot, Order, VVError, merge_all, meet_all, order_key

WRITERS = [bytes([i]) * 32 for i in range(4)]

vvs = st.dictionaries(st.sampled_from(WRITERS), st.integers(0, 6), max_size=4).map(VV)


@st.composite
def records(draw):
    """A record-like (vv, writer, seq): the vv's own entry is seq."""
    w = draw(st.sampled_from(WRITERS))
    v = draw(vvs)
    seq = draw(st.integers(1, 6))
    return (v.with_entry(w, seq), w, seq)


def test_basics():
    a = VV({WRITERS[0]: 2, WRITERS[1]: 0})
    assert a[WRITERS[1]] == 0 and a[WRITERS[2]] == 0
    assert len(a) == 1 and a == VV({WRITERS[0]: 2}) and hash(a) == hash(VV({WRITERS[0]: 2}))
    b = VV({WRITERS[0]: 3, WRITERS[1]: 1})
    assert a.compare(b) == Order.BEFORE and b.compare(a) == Order.AFTER
    assert a.compare(a) == Order.EQUAL
    c = VV({WRITERS[1]: 5})
    assert a.compare(c) == Order.CONCURRENT
    assert a.sees(Dot(WRITERS[0], 2)) and not a.sees(Dot(WRITERS[0], 3))
    assert a.merge(c) == VV({WRITERS[0]: 2, WRITERS[1]: 5})
    assert a.meet(b) == a and b.total == 4
    assert merge_all([]) == EMPTY
    with pytest.raises(ValueError):
        meet_all([])


@pytest.mark.parametrize("bad", [{"w": 1}, {b"w": -1}, {b"w": 1.5}, {b"w": True}, {b"w": 2**63}])
def test_malformed_vectors_refused(bad):
    with pytest.raises(VVError):
        VV(bad)


@settings(max_examples=300)
@given(vvs, vvs, vvs)
def test_merge_is_order_independent(a, b, c):
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c)) == merge_all([c, a, b])
    assert a.merge(a) == a
    assert a <= a.merge(b) and b <= a.merge(b)
    assert a.meet(b) <= a and a.meet(b) <= b


@settings(max_examples=300)
@given(vvs, vvs)
def test_compare_matches_dominance(a, b):
    o = a.compare(b)
    le = all(a[w] <= b[w] for w in WRITERS)
    ge = all(a[w] >= b[w] for w in WRITERS)
    assert o == {(True, True): Order.EQUAL, (True, False): Order.BEFORE,
                 (False, True): Order.AFTER, (False, False): Order.CONCURRENT}[(le, ge)]


@settings(max_examples=300)
@given(records(), records(), records())
def test_order_is_strict_total_and_consistent_with_dominance(x, y, z):
    kx, ky, kz = (order_key(*r) for r in (x, y, z))
    distinct = (x[1], x[2]) != (y[1], y[2])
    # total and strict: distinct records get distinct keys, exactly one is smaller
    if distinct:
        assert (kx < ky) != (ky < kx)
    # consistent with dominance
    if x[0] < y[0]:
        assert kx < ky
    # transitive (tuples are, but the point is that no pairwise rule is involved)
    if kx < ky and ky < kz:
        assert kx < kz


@settings(max_examples=200)
@given(st.lists(records(), min_size=1, max_size=8, unique_by=lambda r: (r[1], r[2])),
       st.randoms())
def test_every_reader_sorts_the_same(recs, rnd):
    shuffled = list(recs)
    rnd.shuffle(shuffled)
    assert sorted(recs, key=lambda r: order_key(*r)) == \
        sorted(shuffled, key=lambda r: order_key(*r))


def test_ivys_pairwise_rule_is_not_transitive():
    """Why order_key is a linear extension and not Ivy's pairwise rule:
    x (writer C) < y (writer A) by dominance, z (writer B) concurrent with
    both; comparing concurrent pairs by writer key (A < B < C) gives a cycle."""
    A, B, C = WRITERS[0], WRITERS[1], WRITERS[2]
    x = (VV({C: 1}), C, 1)
    y = (VV({A: 1, C: 1}), A, 1)
    z = (VV({B: 1}), B, 1)

    def ivy_less(p, q):
        o = p[0].compare(q[0])
        if o == Order.BEFORE:
            return True
        if o == Order.AFTER:
            return False
        return p[1] < q[1]

    assert ivy_less(x, y) and ivy_less(y, z) and ivy_less(z, x)  # a cycle
    keys = [order_key(*r) for r in (x, y, z)]
    ranked = sorted(range(3), key=lambda i: keys[i])
    assert ranked.index(0) < ranked.index(1)  # x before y, as dominance says
    for p, q in itertools.permutations(range(3), 2):
        assert (keys[p] < keys[q]) != (keys[q] < keys[p])
