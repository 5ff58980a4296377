"""Latency models for the simulated network.

A topology places each node when it joins the simulated network and answers
``latency(a, b)``: the one-way delay in seconds between two placed nodes. The
simulator (``simnet.py``) delays every message by that much, and benchmarks
use it as the "direct" distance in relative delay penalty (RDP = overlay path
latency / direct latency, Tapestry JSAC 2004 §V).

Invariants every topology keeps:

* symmetric: ``latency(a, b) == latency(b, a)``; ``latency(a, a) == 0``;
* deterministic: placements depend only on the topology's seed and the order
  in which nodes are placed (or on the explicit position given);
* small: a node costs one small tuple; nothing is stored per link, so
  10,000+ nodes fit in one process.

Two models:

* :class:`PlaneTopology`: nodes uniformly on a square of ``size_ms`` per side;
  latency = euclidean distance + both endpoints' access-link latencies. Simple,
  and a metric space, which is what Tapestry's locality analysis assumes.
* :class:`TransitStubTopology`: a simplified GT-ITM transit-stub graph. A few
  transit domains lie far apart on a large plane; stub domains hang off each
  transit domain by an uplink; nodes sit in stub domains. Latency between
  nodes in one stub is small, across stubs of one transit moderate, across
  transit domains large, so locality matters the way it does on the Internet
  (the Tapestry simulations used transit-stub graphs for RDP).
"""

from __future__ import annotations

import abc
import math
import random


def _ms(lo_hi: tuple[float, float]) -> tuple[float, float]:
    lo, hi = lo_hi
    if not 0 <= lo <= hi:
        raise ValueError(f"bad latency range {lo_hi!r}: need 0 <= lo <= hi")
    return float(lo), float(hi)


class Topology(abc.ABC):
    """Where nodes are, and how long a message takes between two of them."""

    @abc.abstractmethod
    def place(self, node_id: bytes, position=None) -> None:
        """Place a new node (at ``position`` if given; its meaning depends on
        the model). Raises ValueError if the node is already placed."""

    @abc.abstractmethod
    def latency(self, a: bytes, b: bytes) -> float:
        """One-way delay in seconds between two placed nodes. KeyError if
        either was never placed."""

    @abc.abstractmethod
    def position(self, node_id: bytes):
        """The node's placement, in the model's terms (for plots and debugging)."""

    def __contains__(self, node_id: bytes) -> bool:
        return node_id in self._where  # type: ignore[attr-defined]


class PlaneTopology(Topology):
    """Nodes on a ``size_ms`` x ``size_ms`` square (units are milliseconds of
    delay); latency(a, b) = |pa - pb| + access(a) + access(b), where each
    node's access latency is drawn uniformly from ``access_ms``.

    ``position=(x, y)`` in :meth:`place` puts a node at an exact point (in
    ms), and ``position=(x, y, access_ms)`` also fixes its access latency.
    """

    def __init__(self, seed: int = 0, *, size_ms: float = 100.0,
                 access_ms: tuple[float, float] = (1.0, 5.0)):
        if size_ms < 0:
            raise ValueError("size_ms must be >= 0")
        self.size_ms = float(size_ms)
        self.access_ms = _ms(access_ms)
        self._rng = random.Random(seed)
        # node id -> (x_ms, y_ms, access_ms): the only per-node state.
        self._where: dict[bytes, tuple[float, float, float]] = {}

    def place(self, node_id: bytes, position=None) -> None:
        if node_id in self._where:
            raise ValueError("node already placed")
        r = self._rng
        if position is None:
            x, y = r.uniform(0, self.size_ms), r.uniform(0, self.size_ms)
            acc = r.uniform(*self.access_ms)
        elif len(position) == 2:
            x, y = position
            acc = r.uniform(*self.access_ms)
        elif len(position) == 3:
            x, y, acc = position
        else:
            raise ValueError("position is (x_ms, y_ms) or (x_ms, y_ms, access_ms)")
        self._where[node_id] = (float(x), float(y), float(acc))

    def latency(self, a: bytes, b: bytes) -> float:
        if a == b:
            return 0.0
        ax, ay, aa = self._where[a]
        bx, by, ba = self._where[b]
        # Pairwise sums first: float addition is not associative, and
        # latency(a, b) must equal latency(b, a) exactly.
        return (math.hypot(ax - bx, ay - by) + (aa + ba)) / 1000.0

    def position(self, node_id: bytes) -> tuple[float, float, float]:
        return self._where[node_id]


class TransitStubTopology(Topology):
    """A simplified transit-stub graph (after GT-ITM).

    ``transits`` transit domains are placed uniformly on a square of
    ``transit_plane_ms``; each has ``stubs_per_transit`` stub domains, each
    joined to its transit domain by an uplink of ``uplink_ms`` (drawn per
    stub). Inside a stub, nodes lie on a small square of ``stub_size_ms`` and
    each has an access latency from ``access_ms``. One-way latency:

    * same stub: |pa - pb| + access(a) + access(b);
    * same transit domain: access(a) + uplink(sa) + ``intra_transit_ms``
      + uplink(sb) + access(b);
    * different transit domains: access(a) + uplink(sa) + |Ta - Tb|
      + ``intra_transit_ms`` + uplink(sb) + access(b).

    Each case is a path through the hierarchy, so the triangle inequality
    holds as long as the widest intra-stub distance (sqrt(2) * stub_size_ms)
    is at most 2 * min(uplink) + intra_transit_ms, as with the defaults.

    A node is put in a random stub, or in stub number
    ``position`` (0 .. transits * stubs_per_transit - 1) if given.
    """

    def __init__(self, seed: int = 0, *, transits: int = 4, stubs_per_transit: int = 8,
                 transit_plane_ms: float = 150.0, intra_transit_ms: float = 5.0,
                 uplink_ms: tuple[float, float] = (5.0, 20.0),
                 stub_size_ms: float = 5.0, access_ms: tuple[float, float] = (0.5, 2.0)):
        if transits < 1 or stubs_per_transit < 1:
            raise ValueError("need at least one transit domain and one stub per transit")
        self.access_ms = _ms(access_ms)
        self.stub_size_ms = float(stub_size_ms)
        self.intra_transit_ms = float(intra_transit_ms)
        self._rng = r = random.Random(seed)
        self._transits = [(r.uniform(0, transit_plane_ms), r.uniform(0, transit_plane_ms))
                          for _ in range(transits)]
        up = _ms(uplink_ms)
        # stub index -> (transit index, uplink ms)
        self._stubs = [(t, r.uniform(*up))
                       for t in range(transits) for _ in range(stubs_per_transit)]
        # node id -> (stub index, x_ms, y_ms, access_ms)
        self._where: dict[bytes, tuple[int, float, float, float]] = {}

    @property
    def stub_count(self) -> int:
        return len(self._stubs)

    def stub_of(self, node_id: bytes) -> int:
        return self._where[node_id][0]

    def transit_of(self, node_id: bytes) -> int:
        return self._stubs[self._where[node_id][0]][0]

    def place(self, node_id: bytes, position=None) -> None:
        if node_id in self._where:
            raise ValueError("node already placed")
        r = self._rng
        if position is None:
            stub = r.randrange(len(self._stubs))
        else:
            stub = int(position)
            if not 0 <= stub < len(self._stubs):
                raise ValueError(f"stub {stub} out of range 0..{len(self._stubs) - 1}")
        s = self.stub_size_ms
        self._where[node_id] = (stub, r.uniform(0, s), r.uniform(0, s), r.uniform(*self.access_ms))

    def latency(self, a: bytes, b: bytes) -> float:
        if a == b:
            return 0.0
        sa, ax, ay, aa = self._where[a]
        sb, bx, by, ba = self._where[b]
        if sa == sb:
            ms = math.hypot(ax - bx, ay - by) + (aa + ba)   # sums pairwise: symmetric
        else:
            ta, ua = self._stubs[sa]
            tb, ub = self._stubs[sb]
            ms = (aa + ba) + (ua + ub) + self.intra_transit_ms
            if ta != tb:
                (px, py), (qx, qy) = self._transits[ta], self._transits[tb]
                ms += math.hypot(px - qx, py - qy)
        return ms / 1000.0

    def position(self, node_id: bytes) -> tuple[int, float, float, float]:
        return self._where[node_id]
