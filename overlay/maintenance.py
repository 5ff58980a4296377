"""Soft state and repair (JSAC §III-C2/D; PAPERS.md "Soft state", "Leave and
failure").

Periodic tasks of a running node, each at its own interval with jitter:

* heartbeat: ping every neighbour, saying we list it (it keeps a backpointer
  to us). A neighbour that does not answer is marked suspect (its backups take
  over at once, see ``RoutingTable``); one silent for ``dead_after`` is
  dropped, and if that empties its slot the slot is repaired at once by
  asking the nodes that share the slot's prefix with us;
* repair: ask a few random neighbours for the nodes they know that share our
  prefix with them, and offer them to the table (this, and adopting nodes that
  ping us, is what restores the table invariant after many failures);
* republish: re-send a publish for every object we hold (pointers are soft
  state and expire after ``pointer_ttl``), in batches (``publish_batch.py``:
  one routed message per next hop for up to ``MAX_BATCH`` entries);
* expiry: drop expired pointers, tombstones and stale backpointers.

Hand-over: whenever a node enters our table we may stop being the root of
some GUIDs; the pointers we stored as root for those are sent on toward the
new root (this is how a joining node receives the pointers it now roots), in
one publish batch per holder.
When a neighbour goes, we may have become the root of some pointers we held
on a path; they are marked, so that they are handed over in their turn.

Leave: withdraw our objects, tell every neighbour and backpointer (with
replacements for the slot we vacate), then hand the pointers we root to the
node that becomes root once we are gone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from . import messages as m
from .join import consider_all
from .wire.ids import DIGITS, short, shared_prefix_len
from .wire.transport import Peer, PeerError, RemoteError

if TYPE_CHECKING:
    from .node import TapestryNode

log = logging.getLogger("overlay.maintenance")


def prefix_guid(my_digits: list[int], level: int, d: int) -> bytes:
    """A GUID with our first ``level`` digits, then ``d``, then zeros: a
    representative of the prefix of slot (level, d)."""
    ds = my_digits[:level] + [d] + [0] * (DIGITS - level - 1)
    return bytes((ds[i] << 4) | ds[i + 1] for i in range(0, DIGITS, 2))


class Maintenance:
    def __init__(self, node: "TapestryNode"):
        self.node = node
        self._wake = trio.Event()
        self._scope: trio.CancelScope | None = None

    def restart(self) -> None:
        """Restart the periodic tasks with the node's current config."""
        if self._scope is not None:
            self._scope.cancel()
        self.node.spawn(self.run)

    async def run(self) -> None:
        with trio.CancelScope() as self._scope:
            await self._run()

    async def _run(self) -> None:
        cfg = self.node.config
        async with trio.open_nursery() as n:
            if cfg.heartbeat_interval > 0:
                n.start_soon(self._every, cfg.heartbeat_interval, self.heartbeat)
            if cfg.repair_interval > 0:
                n.start_soon(self._every, cfg.repair_interval, self.repair_round)
            if cfg.republish_interval > 0:
                n.start_soon(self._every, cfg.republish_interval, self.republish)
            if cfg.pointer_ttl > 0:
                n.start_soon(self._every, max(cfg.pointer_ttl / 4, 0.5), self.expire)
            n.start_soon(self._hand_over_loop)

    async def _every(self, interval: float, fn) -> None:
        rng = self.node.rng
        # Random phase, so that nodes started together do not beat in step.
        await trio.sleep(interval * rng.uniform(0.3, 1.0))
        while True:
            try:
                await fn()
            except (PeerError, RemoteError) as e:
                log.info("%s: %s", fn.__name__, e)
            await trio.sleep(interval * rng.uniform(0.9, 1.1))

    # -------------------------------------------------------------- failures

    async def heartbeat(self) -> None:
        node = self.node
        cfg = node.config
        sem = trio.Semaphore(32)

        async def one(p: Peer) -> None:
            async with sem:
                try:
                    rtt = await node.ping(p, listed=not cfg.client_only)
                except (PeerError, RemoteError):
                    node.neighbour_failed(p.id)
                    return
                node.table.clear_suspect(p.id, rtt)

        # A neighbour we heard from lately needs no ping, unless it is time
        # to refresh the backpointer it keeps to us (it expires otherwise).
        now = trio.current_time()
        fresh = now - 0.9 * cfg.heartbeat_interval
        stale_listing = now - cfg.backpointer_ttl / 2
        async with trio.open_nursery() as n:
            for p in node.table.peers():
                if (node.last_heard.get(p.id, -1e18) >= fresh
                        and node.last_listed.get(p.id, -1e18) >= stale_listing):
                    continue
                n.start_soon(one, p)
        now = trio.current_time()
        for s in node.table.suspects():
            if now - s.suspect_since >= cfg.dead_after:
                self.drop(s.id, f"silent for {now - s.suspect_since:.0f}s")
        node.table.expire_backpointers(now - cfg.backpointer_ttl)

    def drop(self, node_id: bytes, why: str) -> None:
        """Remove a dead neighbour; repair its slot if that left it empty."""
        node = self.node
        where = node.table.remove(node_id)
        node.table.drop_backpointer(node_id)
        if where is None:
            return
        node._dead[node_id] = trio.current_time() + node.config.dead_after
        node.stats["dropped"] += 1
        level, d = where
        empty = not node.table.filled(level, d)
        log.info("%s dropped neighbour %s (level %d slot %x%s): %s", short(node.id),
                 short(node_id), level, d, ", slot now empty" if empty else "", why)
        if empty:
            node.spawn(self.repair_slot, level, d)
        self.table_changed()

    async def repair_slot(self, level: int, d: int) -> bool:
        """Look for a live node with the prefix of slot (level, d) among the
        nodes that share our first ``level`` digits (they have that slot too).
        Returns whether the slot is filled afterwards."""
        node = self.node
        pfx = prefix_guid(node.table.my_digits, level, d)
        asked = {n.id: n.peer for n in sorted(node.table.neighbours(level), key=lambda n: n.rtt)
                 if n.suspect_since is None}
        for p in node.table.backpointer_peers(level):
            asked.setdefault(p.id, p)
        found: list[Peer] = []

        async def ask(p: Peer) -> None:
            try:
                r = await node.transport.request(p, m.NODES, {"of": pfx, "min": level + 1},
                                                 timeout=node.config.rpc_timeout)
            except (PeerError, RemoteError):
                return
            found.extend(m.peer_of(x) for x in r["nodes"])

        async with trio.open_nursery() as n:
            for p in list(asked.values())[:6]:
                n.start_soon(ask, p)
        await consider_all(node, found)
        ok = node.table.filled(level, d)
        if ok:
            node.stats["slots_repaired"] += 1
            log.info("%s repaired slot level %d digit %x with %s", short(node.id), level, d,
                     short(node.table.slot(level, d)[0].id))
        return ok

    async def repair_round(self) -> None:
        """Gossip: merge what a few random neighbours know of our prefixes."""
        node = self.node
        live = [n.peer for n in node.table.neighbours() if n.suspect_since is None]
        node.rng.shuffle(live)
        found: list[Peer] = []

        async def ask(p: Peer) -> None:
            try:
                r = await node.transport.request(
                    p, m.NODES, {"of": node.id, "min": shared_prefix_len(node.id, p.id)},
                    timeout=node.config.rpc_timeout)
            except (PeerError, RemoteError):
                node.neighbour_failed(p.id)
                return
            found.extend(m.peer_of(x) for x in r["nodes"])

        async with trio.open_nursery() as n:
            for p in live[:3]:
                n.start_soon(ask, p)
        before = len(node.table)
        await consider_all(node, found, improve=False)
        if len(node.table) > before:
            node.stats["repair_adds"] += len(node.table) - before

    # ------------------------------------------------------------ soft state

    async def republish(self) -> None:
        node = self.node
        items = list(node.published.items())
        per_batch = max(1, m.MAX_BATCH // node.config.salts)
        for i in range(0, len(items), per_batch):
            # Started, not awaited: a first hop that is slow to fail (hop
            # timeouts, alternates) must not delay the next round past the
            # pointers' expiry.
            node.spawn(node._publish_entries, items[i:i + per_batch])

    async def expire(self) -> None:
        node = self.node
        now = trio.current_time()
        node.pointers.expire(now)
        for k in [k for k, t in node._dead.items() if t <= now]:
            del node._dead[k]
        old = now - 2 * node.config.backpointer_ttl
        for d in (node.last_heard, node.last_listed):
            for k in [k for k, t in d.items() if t < old]:
                del d[k]

    def table_changed(self) -> None:
        self._wake.set()

    async def _hand_over_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            # Let a burst of table changes (a join adds many nodes) settle.
            await trio.sleep(0)
            self.hand_over()

    def hand_over(self) -> int:
        """Send on the pointers we rooted for GUIDs we no longer root; mark
        as rooted those whose target we root now (a root died or left)."""
        node = self.node
        moved = 0
        by_holder: dict[bytes, tuple[Peer, list]] = {}
        for p in node.pointers.all():
            root_now = node.table.is_root(p.target)
            if root_now or not p.rooted:
                p.rooted = p.rooted or root_now
                continue
            p.rooted = False
            by_holder.setdefault(p.holder.id, (p.holder, []))[1].append(
                (p.target, p.obj, p.epoch))
            moved += 1
        for holder, entries in by_holder.values():
            node.spawn(node.router.batch.start, holder, entries)
        if moved:
            node.stats["pointers_handed_over"] += moved
            log.info("%s handed over %d pointers to a new root", short(node.id), moved)
        return moved

    # ------------------------------------------------------------------ leave

    async def on_leaving(self, sender: bytes, body: dict) -> dict:
        node = self.node
        where = node.table.remove(sender)
        node.table.drop_backpointer(sender)
        node._dead[sender] = trio.current_time() + node.config.dead_after
        node.stats["neighbours_left"] += 1
        if node.running:
            node.spawn(self._after_leave, where, [m.peer_of(x) for x in body["replacements"]])
        return {}

    async def _after_leave(self, where, replacements: list[Peer]) -> None:
        node = self.node
        await consider_all(node, replacements)
        if where is not None and not node.table.filled(*where):
            await self.repair_slot(*where)
        self.table_changed()

    async def leave(self) -> None:
        node = self.node
        cfg = node.config
        with trio.move_on_after(cfg.route_timeout):
            async with trio.open_nursery() as n:
                for obj in list(node.published):
                    n.start_soon(node.unpublish, obj)
        told = {p.id: p for p in node.table.peers()}
        for p in node.table.backpointer_peers():
            told.setdefault(p.id, p)

        async def tell(p: Peer) -> None:
            level = shared_prefix_len(node.id, p.id)
            repl = [n.peer for n in sorted(node.table.neighbours(level + 1), key=lambda n: n.rtt)
                    if n.id != p.id][:16]
            await node.send_quietly(p, m.LEAVING, {"replacements": [m.peer_body(x) for x in repl]})

        with trio.move_on_after(cfg.rpc_timeout * 2):
            async with trio.open_nursery() as n:
                for p in told.values():
                    n.start_soon(tell, p)

        async def pass_on(p) -> None:
            hop = node.table.next_hop(p.target, 0, exclude_self=True)
            if hop is None:
                return
            level, slot = hop
            msg = node.router.message("publish", p.target, obj=p.obj,
                                      holder=m.peer_body(p.holder), epoch=p.epoch)
            await node.router.forward(msg, level, slot)

        with trio.move_on_after(cfg.route_timeout):
            async with trio.open_nursery() as n:
                for p in node.pointers.rooted():
                    n.start_soon(pass_on, p)
        node.joined = False
        node.stats["left"] += 1
        log.info("%s left the overlay (told %d nodes)", short(node.id), len(told))
