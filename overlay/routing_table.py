"""The Tapestry routing table and surrogate next-hop rule (JSAC 2004, §III-A,
Fig. 3; PAPERS.md "Table" and "Next hop").

Level ``i``, slot ``d`` holds nodes that share the first ``i`` digits with this
node and have digit ``d`` next. Each slot keeps up to ``slot_size`` (3)
neighbours ordered by measured round-trip time: the first is the primary, the
others are backups used at once when it fails. At every level the slot of this
node's own digit conceptually holds the node itself and is never stored.

Next hop toward a GUID ``G`` from level ``n`` (surrogate routing): start at slot
``G[n]``; if empty try ``G[n]+1``, ``+2`` ... (mod 16) up to the first filled
slot; if that is this node's own slot go on to level ``n+1``; past the last
level this node is the root.

**Invariant** (kept by join, leave and repair): a slot is empty only if no live
node has its prefix. Under it, every node resolves every GUID to the same root,
the one :func:`global_root` computes from the set of live IDs, because at each
level every node on the path sees the same set of filled slots.

A neighbour that stopped answering is kept in its slot, marked *suspect*, so
that surrogate choices do not change during a transient failure; routing skips
suspects when it can (backups first) and :mod:`overlay.maintenance` drops them
after a grace period, which is when the slot may really become empty.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Iterator

from .wire.ids import BASE, DIGITS, digit, digits, shared_prefix_len, short
from .wire.transport import Peer

SLOT_SIZE = 3


class NotANeighbour(ValueError):
    """A node cannot be put in its own routing table."""


@dataclass(slots=True)
class Neighbour:
    """One entry of a slot: a peer, its measured RTT (seconds) and, when it
    stopped answering, since when (virtual or real ``trio.current_time``)."""

    peer: Peer
    rtt: float
    suspect_since: float | None = None

    @property
    def id(self) -> bytes:
        return self.peer.id

    def sort_key(self) -> tuple[bool, float, bytes]:
        # Live before suspect, then nearest first; the ID breaks ties so that
        # equal RTTs (common in simulation) give one deterministic order.
        return (self.suspect_since is not None, self.rtt, self.peer.id)


@dataclass(slots=True)
class Backpointer:
    """A node that lists us in its table, at ``level`` = the shared prefix
    length; ``seen`` is when it last told us so (heartbeats refresh it)."""

    peer: Peer
    level: int
    seen: float


class RoutingTable:
    """One node's routing table: 64 levels x 16 slots x up to 3 neighbours,
    plus backpointers. Pure data structure: no I/O, no clock."""

    def __init__(self, me: Peer, slot_size: int = SLOT_SIZE):
        if slot_size < 1:
            raise ValueError("slot_size must be at least 1")
        self.me = me
        self.id = me.id
        self.slot_size = slot_size
        self.my_digits = digits(me.id)
        # Rows are created on first use: past the first few levels almost every
        # row of a large network is empty, and 64 x 16 lists per node would
        # dominate the memory of a 10,000-node simulation.
        self.rows: list[list[list[Neighbour]] | None] = [None] * DIGITS
        self._where: dict[bytes, tuple[int, int]] = {}
        self._depth = 0  # 1 + deepest level with an entry; 0 when empty
        self.backpointers: dict[bytes, Backpointer] = {}

    # ---------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, node_id: bytes) -> bool:
        return node_id in self._where

    @property
    def depth(self) -> int:
        """Levels that hold any entry: rows at or past it are empty."""
        return self._depth

    def level_of(self, node_id: bytes) -> int:
        """The level a node belongs at: the length of the prefix it shares
        with us. Raises :class:`NotANeighbour` for our own ID."""
        level = shared_prefix_len(self.id, node_id)
        if level >= DIGITS:
            raise NotANeighbour("a node is not its own neighbour")
        return level

    def slot(self, level: int, d: int) -> list[Neighbour]:
        """The entries of one slot, primary first (a copy). Our own slot is
        reported empty: it holds only ourselves."""
        row = self.rows[level]
        return [] if row is None else list(row[d])

    def get(self, node_id: bytes) -> Neighbour | None:
        where = self._where.get(node_id)
        if where is None:
            return None
        for n in self.rows[where[0]][where[1]]:
            if n.peer.id == node_id:
                return n
        return None  # pragma: no cover - _where and rows disagree

    def neighbours(self, min_level: int = 0) -> Iterator[Neighbour]:
        """Every entry at ``min_level`` or deeper: the nodes we know that share
        at least ``min_level`` digits with us."""
        for level in range(min_level, self._depth):
            row = self.rows[level]
            if row is not None:
                for s in row:
                    yield from s

    def peers(self, min_level: int = 0) -> list[Peer]:
        return [n.peer for n in self.neighbours(min_level)]

    def row_peers(self, level: int) -> list[Peer]:
        row = self.rows[level] if 0 <= level < DIGITS else None
        return [] if row is None else [n.peer for s in row for n in s]

    def filled(self, level: int, d: int) -> bool:
        row = self.rows[level]
        return row is not None and bool(row[d])

    # ---------------------------------------------------------------- updates

    def would_add(self, node_id: bytes, rtt: float | None = None) -> bool:
        """Whether :meth:`add` would keep this node: it fills a hole or a free
        place, or (given its RTT) beats the worst entry of a full slot."""
        if node_id == self.id or node_id in self._where:
            return False
        level = self.level_of(node_id)
        row = self.rows[level]
        s = [] if row is None else row[digit(node_id, level)]
        if len(s) < self.slot_size:
            return True
        worst = s[-1]
        return worst.suspect_since is not None or (rtt is not None and rtt < worst.rtt)

    def add(self, peer: Peer, rtt: float) -> tuple[bool, Peer | None]:
        """Offer a neighbour with its measured RTT. Returns ``(kept, evicted)``:
        whether it is now in the table, and the entry it pushed out of a full
        slot (the slowest, or a suspect), if any. A known neighbour gets its
        RTT and address refreshed and its suspicion cleared."""
        level = self.level_of(peer.id)
        d = digit(peer.id, level)
        row = self.rows[level]
        if row is None:
            row = self.rows[level] = [[] for _ in range(BASE)]
        s = row[d]
        for n in s:
            if n.peer.id == peer.id:
                n.peer, n.rtt, n.suspect_since = peer, rtt, None
                s.sort(key=Neighbour.sort_key)
                return True, None
        new = Neighbour(peer, rtt)
        evicted = None
        if len(s) >= self.slot_size:
            worst = s[-1]
            if worst.suspect_since is None and worst.sort_key() <= new.sort_key():
                return False, None
            s.pop()
            del self._where[worst.peer.id]
            evicted = worst.peer
        s.append(new)
        s.sort(key=Neighbour.sort_key)
        self._where[peer.id] = (level, d)
        self._depth = max(self._depth, level + 1)
        return True, evicted

    def remove(self, node_id: bytes) -> tuple[int, int] | None:
        """Drop a neighbour. Returns the (level, digit) of the slot it left,
        or None if it was not in the table."""
        where = self._where.pop(node_id, None)
        if where is None:
            return None
        level, d = where
        s = self.rows[level][d]
        s[:] = [n for n in s if n.peer.id != node_id]
        if level + 1 == self._depth:
            self._recompute_depth()
        return where

    def mark_suspect(self, node_id: bytes, now: float) -> bool:
        """Mark a neighbour as not answering (its backups move ahead of it).
        Returns False if it is not in the table."""
        n = self.get(node_id)
        if n is None:
            return False
        if n.suspect_since is None:
            n.suspect_since = now
            level, d = self._where[node_id]
            self.rows[level][d].sort(key=Neighbour.sort_key)
        return True

    def clear_suspect(self, node_id: bytes, rtt: float | None = None) -> None:
        n = self.get(node_id)
        if n is not None:
            n.suspect_since = None
            if rtt is not None:
                n.rtt = rtt
            level, d = self._where[node_id]
            self.rows[level][d].sort(key=Neighbour.sort_key)

    def update_addr(self, node_id: bytes, addr: str) -> bool:
        """A neighbour proved its ID from a new address (it restarted on
        another port): route to it there. Returns whether anything changed."""
        n = self.get(node_id)
        if n is None or n.peer.addr == addr:
            return False
        n.peer = Peer(node_id, addr)
        return True

    def suspects(self) -> list[Neighbour]:
        return [n for n in self.neighbours() if n.suspect_since is not None]

    def _recompute_depth(self) -> None:
        depth = 0
        for level in range(DIGITS - 1, -1, -1):
            row = self.rows[level]
            if row is not None and any(row):
                depth = level + 1
                break
        self._depth = depth

    # ------------------------------------------------------------ backpointers

    def note_backpointer(self, peer: Peer, now: float) -> None:
        if peer.id == self.id:
            return
        self.backpointers[peer.id] = Backpointer(peer, self.level_of(peer.id), now)

    def drop_backpointer(self, node_id: bytes) -> None:
        self.backpointers.pop(node_id, None)

    def expire_backpointers(self, older_than: float) -> list[bytes]:
        old = [k for k, b in self.backpointers.items() if b.seen < older_than]
        for k in old:
            del self.backpointers[k]
        return old

    def backpointer_peers(self, min_level: int = 0) -> list[Peer]:
        return [b.peer for b in self.backpointers.values() if b.level >= min_level]

    # ----------------------------------------------------------------- routing

    def next_hop(self, target: bytes, level: int = 0, *, exclude_self: bool = False,
                 skip: frozenset | set = frozenset()) -> tuple[int, list[Neighbour]] | None:
        """Surrogate routing (JSAC Fig. 3) from ``level``: returns ``(l,
        slot)``, the level at which the message leaves this node and the
        entries of the chosen slot (primary first; the receiver continues at
        level ``l + 1``), or None when this node is the root of ``target``.

        ``exclude_self`` computes the route as if this node had left: its own
        slot counts as filled only when some other node shares that deeper
        prefix. A leaving node uses it to hand over the pointers it roots.

        ``skip``: NodeIDs that just failed to take a message; a slot holding
        only those counts as empty, so the route goes on by surrogate routing
        among live nodes before repair has removed the dead ones."""
        my = self.my_digits
        for lv in range(level, DIGITS):
            if lv >= self._depth:
                return None
            row = self.rows[lv]
            if row is None:
                # Only our own slot is filled at this level.
                continue
            d0 = digit(target, lv)
            mine = my[lv]
            for k in range(BASE):
                d = (d0 + k) % BASE
                if d == mine:
                    if not exclude_self or self._depth > lv + 1:
                        break  # our own slot: descend a level
                    continue
                if row[d] and (not skip or any(n.id not in skip for n in row[d])):
                    return lv, row[d]
        return None

    def is_root(self, target: bytes) -> bool:
        """Whether this node is the root of ``target`` by its own table."""
        return self.next_hop(target, 0) is None

    # ------------------------------------------------------------------- views

    def to_dict(self) -> dict:
        """A plain view for the control interface and ``tools/inspect``."""
        rows = []
        for level in range(self._depth):
            row = self.rows[level]
            if row is None or not any(row):
                continue
            slots = {}
            for d in range(BASE):
                if row[d]:
                    slots[f"{d:x}"] = [
                        {"id": n.peer.id.hex(), "addr": n.peer.addr,
                         "rtt_ms": round(n.rtt * 1000, 3), "suspect": n.suspect_since is not None}
                        for n in row[d]
                    ]
            rows.append({"level": level, "own_digit": f"{self.my_digits[level]:x}", "slots": slots})
        return {
            "id": self.id.hex(),
            "addr": self.me.addr,
            "size": len(self),
            "depth": self._depth,
            "rows": rows,
            "backpointers": [
                {"id": b.peer.id.hex(), "addr": b.peer.addr, "level": b.level}
                for b in sorted(self.backpointers.values(), key=lambda b: (b.level, b.peer.id))
            ],
        }

    def __repr__(self) -> str:
        return f"<RoutingTable {short(self.id)} {len(self)} entries, depth {self._depth}>"


# ---------------------------------------------------------------------------
# Reference computations over a global view (tests, benchmarks, fast path)


def global_root(target: bytes, sorted_ids: list[bytes]) -> bytes:
    """The unique surrogate root of ``target`` among live IDs (sorted list):
    the result every node's table must give when the invariant holds.

    Level by level, keep the nodes whose next digit is the first one at or
    after the target's digit (mod 16) that any remaining node has. Nodes that
    share a prefix are a contiguous range of the sorted list, so each level is
    a few bisections."""
    if not sorted_ids:
        raise ValueError("no live nodes")
    lo, hi = 0, len(sorted_ids)
    prefix = b""
    for level in range(DIGITS):
        if hi - lo == 1:
            return sorted_ids[lo]
        d0 = digit(target, level)
        for k in range(BASE):
            d = (d0 + k) % BASE
            a, b = _prefix_range(sorted_ids, lo, hi, level, d)
            if a < b:
                lo, hi = a, b
                break
    return sorted_ids[lo]


def _prefix_range(ids: list[bytes], lo: int, hi: int, level: int, d: int) -> tuple[int, int]:
    """Within ids[lo:hi] (all sharing ``level`` digits), the range whose digit
    at ``level`` is ``d``."""
    if lo >= hi:
        return lo, lo
    base = ids[lo]
    byte_i = level >> 1
    head = base[:byte_i]
    if level & 1 == 0:
        first = head + bytes([d << 4])
        last = head + bytes([(d << 4) | 0x0F]) + b"\xff" * (len(base) - byte_i - 1)
    else:
        b0 = (base[byte_i] & 0xF0) | d
        first = head + bytes([b0])
        last = head + bytes([b0]) + b"\xff" * (len(base) - byte_i - 1)
    a = bisect.bisect_left(ids, first, lo, hi)
    b = bisect.bisect_right(ids, last, lo, hi)
    return a, b


def route_path(tables: dict[bytes, RoutingTable], start: bytes, target: bytes) -> list[bytes]:
    """The IDs visited routing ``target`` from ``start`` through a set of
    tables, primaries only (a check of table consistency, no messages)."""
    path = [start]
    node, level = start, 0
    while True:
        step = tables[node].next_hop(target, level)
        if step is None:
            return path
        level, slot = step
        node = slot[0].peer.id
        level += 1
        path.append(node)
        if len(path) > DIGITS + 1:  # pragma: no cover - impossible by construction
            raise RuntimeError("routing loop")

