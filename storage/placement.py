"""Replica placement: a block's holders are the roots of its salted BGUIDs
(DESIGN.md "storage/blocks": r replicas on distinct nodes chosen by the
overlay, the roots of salted BGUIDs; PAPERS.md "Salted roots").

The rule, followed alike by writers, readers and the repair::

    candidates(B) = root(salt_0(B)), root(salt_1(B)), ..., root(salt_{S-1}(B))
                    in salt order (``overlay.messages.salted``; salt 0 is B),
                    dropping repeats, nodes that do not store blocks, and
                    salts whose root cannot be reached now
    holders(B)    = the first r candidates that accept the block

So when two salts have the same root (frequent in small networks) the next
salt is taken, and a candidate that is full or dead is passed over for the
next one. ``max_salts`` (S = 32) bounds the search; a network with fewer than
r storing nodes cannot place r copies and the writer is told so.

Finding roots cheaply. Resolving one root is a routed message (O(log N)
hops), and a 256 MiB stream has 4,096 blocks times r salts. So a lookup is a
``blk.where`` message delivered at the root (``route_to_node``), which
answers with its NodeID, its address, whether it stores blocks, and d = the
depth of its routing table (1 + its deepest non-empty level). The root R of
a GUID G is then the root of every GUID sharing G's first d digits: at each
level below d, R's table sends G through R's own slot (that is what makes R
the root), any such GUID takes the same slots, and past level d R's table
holds no one else. Under the table invariant every node resolves a GUID as
R's own table does (``overlay.routing_table``), so the answer is cached
under that d-digit prefix. On a small network d is 1 or 2: a whole stream
costs a few dozen lookups instead of 12,000.

Fallback. A failed node keeps its slots (as a suspect) until its neighbours
drop it, about ``dead_after`` (30 s) later, and until then the salts in its
part of the ID space cannot be routed. So that writes and repairs still
reach r copies meanwhile, a caller short of candidates may add the other
nodes it knows closest to the BGUID (:meth:`Placement.fallback`); they publish what they
take, readers find them through the DOLR, and the repair completes the
copies at the salted roots once routes recover (the fallback copy stays, as
an extra).

Staleness. Entries expire after ``ttl`` seconds and are dropped at once
(:meth:`Placement.forget`) when their node fails a request. A join can make
an entry wrong before it expires; the cost is a replica placed at the old
root, which the DOLR still finds and the repair completes at the new one.
A salt whose lookup fails is skipped, and the failure is remembered for
``negative_ttl`` under the longest prefix length seen, so that a dead root
does not cost one failing route per block. A lookup that arrives at a node
that is not the root by its own table (the route went around a suspect
root, answered with depth 64) counts as failed too: otherwise each block's
salts in the dead root's part of the space cost a lookup of their own, each
routed around the dead slot (a storm of thousands of routes after a holder
died, which slowed its repair several times).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable

import trio

from overlay.errors import DeliveryError, NoRoute, NotRunning
from overlay.messages import salted
from overlay.node import TapestryNode
from overlay.wire import frames
from overlay.wire.frames import GUID, Int, Str
from overlay.wire.ids import short
from overlay.wire.transport import Peer, PeerError

log = logging.getLogger(__name__)

WHERE = frames.message(
    "blk.where",
    request={"g": GUID},
    reply={"id": GUID, "addr": Str(256), "depth": Int(0, 64), "stores": bool},
)

DEFAULT_TTL = 30.0
NEGATIVE_TTL = 5.0
MAX_SALTS = 32
LOOKUPS = 8          # root lookups in flight at once


@functools.lru_cache(maxsize=1 << 16)
def salted_target(g: bytes, i: int) -> bytes:
    """``overlay.messages.salted``, memoised: the repair recomputes the
    salts of every block it holds on each pass."""
    return salted(g, i)


@dataclass(frozen=True, slots=True)
class Root:
    """A cached answer: the root (None when its salt could not be resolved
    just now) and whether it stores blocks."""

    peer: Peer | None
    stores: bool


_UNREACHABLE = Root(None, False)


class Placement:
    """Root lookups with a prefix cache, and the candidate order above.
    ``stores``: whether this node itself stores blocks (it answers
    ``blk.where`` for the GUIDs it roots once :meth:`register` ran)."""

    def __init__(self, node: TapestryNode, *, stores: bool = True, ttl: float = DEFAULT_TTL,
                 negative_ttl: float = NEGATIVE_TTL, max_salts: int = MAX_SALTS,
                 lookups: int = LOOKUPS):
        if max_salts < 1 or lookups < 1:
            raise ValueError("max_salts and lookups must be at least 1")
        self.node = node
        self.stores = stores
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_salts = max_salts
        self.lookups = lookups
        self._cache: dict[str, tuple[Root, float]] = {}   # hex prefix -> (root, expires)
        self._lengths: Counter = Counter()                  # prefix length -> entries
        self._order: list[int] = []                         # those lengths, longest first
        self.nonstoring: set[bytes] = set()   # nodes that said they store no blocks
        self.stats: Counter = Counter()

    def register(self) -> None:
        self.node.serve_app(WHERE, self._on_where)

    async def _on_where(self, sender: bytes, body: dict) -> dict:
        table = self.node.table
        # The prefix argument holds only if our own table makes us the root;
        # if a route ended here while it does not (it went around a suspect
        # root), say so with 64: the asker counts that root unreachable.
        depth = table.depth if table.is_root(body["g"]) else 64
        return {"id": self.node.id, "addr": self.node.peer.addr, "depth": depth,
                "stores": self.stores}

    # ------------------------------------------------------------- the cache

    def cached(self, target: bytes, now: float | None = None) -> Root | None:
        """The cached root of ``target`` (most specific prefix first), or None."""
        if not self._order:
            return None
        if now is None:
            now = trio.current_time()
        hx = target.hex()
        for n in self._order:
            key = hx[:n]
            e = self._cache.get(key)
            if e is None:
                continue
            if e[1] <= now:
                self._drop(key)
                continue
            return e[0]
        return None

    def _put(self, key: str, root: Root, ttl: float) -> None:
        if key not in self._cache:
            self._lengths[len(key)] += 1
            if self._lengths[len(key)] == 1:
                self._order = sorted(self._lengths, reverse=True)
        self._cache[key] = (root, trio.current_time() + ttl)

    def _drop(self, key: str) -> None:
        if self._cache.pop(key, None) is not None:
            self._lengths[len(key)] -= 1
            if not self._lengths[len(key)]:
                del self._lengths[len(key)]
                self._order = sorted(self._lengths, reverse=True)

    def forget(self, node_id: bytes) -> None:
        """Drop every entry naming ``node_id`` (it failed a request)."""
        doomed = [k for k, (r, _) in self._cache.items() if r.peer is not None and r.peer.id == node_id]
        for k in doomed:
            self._drop(k)
        if doomed:
            self.stats["forgotten"] += len(doomed)

    def note_failure(self, node_id: bytes, e: BaseException) -> None:
        """A request to ``node_id`` failed with ``e``: forget its entries if
        it is unreachable; remember it if it runs no block service."""
        if isinstance(e, PeerError):
            self.forget(node_id)
        elif getattr(e, "code", None) == "unsupported":
            self.nonstoring.add(node_id)

    def clear(self) -> None:
        self._cache.clear()
        self._lengths.clear()
        self._order = []

    # ------------------------------------------------------------- lookups

    async def _lookup(self, target: bytes) -> Root:
        node = self.node
        if node.table.is_root(target):
            root, depth = Root(node.peer, self.stores), node.table.depth
        else:
            self.stats["lookups"] += 1
            try:
                rep = await node.route_to_node(WHERE, {"g": target}, target)
            except (NoRoute, NotRunning, DeliveryError) as e:
                # NoRoute: the root is down (not yet dropped by its neighbours)
                # or unreachable. DeliveryError: the root runs no block
                # service ("unsupported"): it will never store, skip its salt.
                self.stats["lookup_failures"] += 1
                log.debug("no root for %s: %s", short(target), e)
                return self._unreachable(target)
            if rep["depth"] >= 64:
                # The route ended at a node that is not the root by its own
                # table: it went around the root's slot, whose node is
                # suspect (dead, not dropped yet). The root is unreachable,
                # as if the route had failed; taking the detour's end instead
                # would cost one lookup per block in that part of the space
                # (nothing to cache it under) and place copies off the rule.
                self.stats["detour_answers"] += 1
                return self._unreachable(target)
            root, depth = Root(Peer(rep["id"], rep["addr"]), rep["stores"]), rep["depth"]
            if not root.stores:
                self.nonstoring.add(root.peer.id)
        self._put(target.hex()[:depth], root, self.ttl)
        return root

    def _unreachable(self, target: bytes) -> Root:
        """Remember for ``negative_ttl`` that ``target``'s root cannot be
        reached, under the prefix of the part of the space our own table
        sends to a suspect node, when it does (all of it is cut off alike);
        else under the prefix length the positive answers use (a single-GUID
        answer, 64, is no guide to the shape of the space)."""
        hop = self.node.table.next_hop(target, 0)
        if hop is not None and all(n.suspect_since is not None for n in hop[1]):
            length = hop[0] + 1
        else:
            length = max((n for n in self._lengths if n < 64), default=1) or 1
        self._put(target.hex()[:length], _UNREACHABLE, self.negative_ttl)
        return _UNREACHABLE

    async def roots(self, targets: Iterable[bytes]) -> dict[bytes, Root]:
        """The root of each target GUID (``Root(None, False)`` when it cannot
        be reached now). Cache misses are looked up ``lookups`` at a time,
        one per distinct prefix, and the rest re-checked after each round."""
        out: dict[bytes, Root] = {}
        pending = []
        now = trio.current_time()
        for t in dict.fromkeys(targets):
            r = self.cached(t, now)
            if r is None:
                pending.append(t)
            else:
                out[t] = r
        self.stats["cache_hits"] += len(out)
        while pending:
            n = max(self._lengths, default=1) or 1
            batch: list[bytes] = []
            seen: set[str] = set()
            for t in pending:
                k = t.hex()[:n]
                if k not in seen:
                    seen.add(k)
                    batch.append(t)
                    if len(batch) >= self.lookups:
                        break

            async def one(t: bytes) -> None:
                out[t] = await self._lookup(t)

            async with trio.open_nursery() as nursery:
                for t in batch:
                    nursery.start_soon(one, t)
            rest = []
            for t in pending:
                if t in out:
                    continue
                r = self.cached(t)
                if r is None:
                    rest.append(t)
                else:
                    out[t] = r
            pending = rest
        return out

    def fallback(self, g: bytes, n: int, exclude) -> list[Peer]:
        """Up to ``n`` other nodes from the routing table, not suspected and
        not in ``exclude``, closest to ``g`` by XOR distance, so that
        writers, readers and repairs with similar tables pick the same ones
        (module docstring, Fallback). Whether they store blocks is learnt by
        asking them."""
        key = int.from_bytes(g, "big")
        live = [nb.peer for nb in self.node.table.neighbours()
                if nb.suspect_since is None and nb.id not in exclude
                and nb.id not in self.nonstoring]
        live.sort(key=lambda p: int.from_bytes(p.id, "big") ^ key)
        return live[:n]

    async def candidates(self, bguids: Iterable[bytes], n: int, *,
                         skip: Callable[[bytes, bytes], bool] | None = None
                         ) -> dict[bytes, list[Peer]]:
        """For each BGUID its first ``n`` candidates in salt order (module
        docstring), leaving out nodes for which ``skip(bguid, node_id)`` is
        true. Fewer than ``n`` when ``max_salts`` salts do not yield them."""
        out: dict[bytes, list[Peer]] = {g: [] for g in bguids}
        seen: dict[bytes, set[bytes]] = {g: set() for g in out}
        short_of = list(out)
        for i in range(self.max_salts):
            if not short_of:
                break
            targets = {g: salted_target(g, i) for g in short_of}
            found = await self.roots(targets.values())
            still = []
            for g in short_of:
                root = found.get(targets[g], _UNREACHABLE)
                p = root.peer
                if p is not None and root.stores and p.id not in seen[g]:
                    seen[g].add(p.id)
                    if skip is None or not skip(g, p.id):
                        out[g].append(p)
                if len(out[g]) < n:
                    still.append(g)
            short_of = still
        return out
