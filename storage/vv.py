"""Version vectors and the one total order of log records (Ivy, OSDI 2002,
section 4.1; DESIGN.md "storage/logs").

Every record carries a version vector: for each writer's log, the newest
record (by per-writer sequence number) its author had seen when writing it,
its own entry being the record's own sequence number. A record's *dot*
``(writer, seq)`` names it; ``vv.sees(dot)`` is "the author had seen that
record", which is all conflict detection needs.

The total order. Ivy orders records by vector dominance and breaks ties
between concurrent vectors by comparing the writers' keys. Taken pairwise,
that rule is not transitive: with x (writer C) dominated by y (writer A),
and z (writer B) concurrent with both, A < B < C gives y < z < x < y, a
cycle, so two readers could sort the same set differently. We use a linear
extension of dominance instead:

    key(record) = (sum of its vector, writer id, seq)

Dominance strictly increases the sum, so ``a < b`` by dominance implies
``key(a) < key(b)``; records of one writer are ordered by seq; everything
else is broken by the fixed byte order of writer ids. The key is a strict
total order on records (dots are unique), consistent with dominance, and it
depends only on the record itself: every reader with the same set of
records sorts them identically.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from enum import Enum
from typing import NamedTuple

MAX_SEQ = 2**63 - 1


class VVError(ValueError):
    """A version vector given to the constructor (or decoded) is malformed:
    a writer id that is not bytes, or a sequence number that is not an int
    in [0, 2**63)."""


class Order(Enum):
    """How two version vectors relate."""

    BEFORE = "before"          # self < other (dominated)
    AFTER = "after"            # self > other (dominates)
    EQUAL = "equal"
    CONCURRENT = "concurrent"


class Dot(NamedTuple):
    """The name of one record: its writer's id and its per-writer seq."""

    writer: bytes
    seq: int


class VV(Mapping):
    """An immutable version vector: writer id -> highest seq seen.

    Writers never seen are absent and read as 0 (``vv[w]`` returns 0 rather
    than raising, which is what every comparison wants). Zero entries are
    dropped, so equal vectors are equal objects and hash alike.
    """

    __slots__ = ("_d", "_sum", "_hash")

    def __init__(self, entries: Mapping | Iterable = ()):
        d = dict(entries)
        for w, s in d.items():
            if type(w) is not bytes:
                raise VVError(f"writer id must be bytes, not {type(w).__name__}")
            if type(s) is not int or not 0 <= s <= MAX_SEQ:
                raise VVError(f"bad seq {s!r} for writer {w[:4].hex()}")
        self._d = {w: s for w, s in d.items() if s}
        self._sum = sum(self._d.values())
        self._hash = None

    @classmethod
    def _of(cls, d: dict) -> "VV":
        """A vector from a dict already known to be well formed (no zeros)."""
        v = cls.__new__(cls)
        v._d = d
        v._sum = sum(d.values())
        v._hash = None
        return v

    # Mapping protocol: missing writers read as 0.
    def __getitem__(self, w: bytes) -> int:
        return self._d.get(w, 0)

    def __contains__(self, w: object) -> bool:
        return w in self._d

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, VV):
            return self._d == other._d
        return NotImplemented

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._d.items()))
        return self._hash

    def __repr__(self) -> str:
        inner = ", ".join(f"{w[:4].hex()}:{s}" for w, s in self.sorted_items())
        return f"VV({inner})"

    @property
    def total(self) -> int:
        """Sum of all entries: strictly grows along dominance."""
        return self._sum

    def sorted_items(self) -> list[tuple[bytes, int]]:
        """Entries in writer-id order (the canonical encoding order)."""
        return sorted(self._d.items())

    def sees(self, dot: Dot | tuple[bytes, int]) -> bool:
        """Whether a record with this vector had seen the record ``dot``."""
        return self._d.get(dot[0], 0) >= dot[1]

    def with_entry(self, writer: bytes, seq: int) -> "VV":
        if type(writer) is not bytes or type(seq) is not int or not 0 <= seq <= MAX_SEQ:
            raise VVError(f"bad entry {writer!r}: {seq!r}")
        d = dict(self._d)
        if seq:
            d[writer] = seq
        else:
            d.pop(writer, None)
        return VV._of(d)

    def merge(self, *others: "VV") -> "VV":
        """Pointwise maximum: what someone who saw all of them has seen."""
        d = dict(self._d)
        for o in others:
            for w, s in o._d.items():
                if s > d.get(w, 0):
                    d[w] = s
        return VV._of(d)

    def meet(self, *others: "VV") -> "VV":
        """Pointwise minimum: what all of them have seen."""
        d = dict(self._d)
        for o in others:
            d = {w: m for w, s in d.items() if (m := min(s, o._d.get(w, 0)))}
        return VV._of(d)

    def __le__(self, other: "VV") -> bool:
        """Dominated by or equal to ``other``."""
        od = other._d
        return all(s <= od.get(w, 0) for w, s in self._d.items())

    def __lt__(self, other: "VV") -> bool:
        return self != other and self <= other

    def __ge__(self, other: "VV") -> bool:
        return other <= self

    def __gt__(self, other: "VV") -> bool:
        return other < self

    def compare(self, other: "VV") -> Order:
        le, ge = self <= other, other <= self
        if le and ge:
            return Order.EQUAL
        if le:
            return Order.BEFORE
        if ge:
            return Order.AFTER
        return Order.CONCURRENT


EMPTY = VV()


def order_key(vv: VV, writer: bytes, seq: int) -> tuple[int, bytes, int]:
    """The sort key of a record in the one total order (module docstring)."""
    return (vv.total, writer, seq)


def merge_all(vvs: Iterable[VV]) -> VV:
    """Pointwise maximum of any number of vectors (EMPTY for none)."""
    return EMPTY.merge(*vvs)


def meet_all(vvs: Iterable[VV]) -> VV:
    """Pointwise minimum of a non-empty collection of vectors."""
    vvs = list(vvs)
    if not vvs:
        raise ValueError("meet of no vectors")
    return vvs[0].meet(*vvs[1:])
