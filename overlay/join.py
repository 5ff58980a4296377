"""Dynamic join through any gateway (JSAC §III-C1; PAPERS.md "Join").

1. The new node N routes to its own ID through the gateway and reaches its
   surrogate S; p = the length of the prefix N shares with S.
2. N copies S's table: for every level i < p, S's row i is exactly the set of
   prefixes N needs there, so N's rows below p satisfy the table invariant
   at once; S itself and S's row p seed N's row p.
3. S runs the acknowledged multicast to every node sharing N's first p
   digits. No other node can have a slot that N should fill (a node sharing
   fewer digits with N already has a node with N's next prefix: S or one of
   S's neighbours), so after the multicast the invariant holds everywhere.
   Each node reached adds N if it fills a hole or is closer, hands N the
   object pointers N is now root for (see ``Maintenance.hand_over``) and
   answers with itself and what it reached.
4. N improves its rows p down to 0 by nearest-neighbour search: keep the k
   closest candidates, ask them for their neighbours and backpointers at the
   next level down, ping what comes back; everyone asked may adopt N.

Simultaneous joiners learn of each other through the multicast and, failing
that, through the background repair gossip.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

import trio

from . import messages as m
from .errors import JoinError, NoRoute, NotRunning
from .wire.ids import short, shared_prefix_len
from .wire.transport import Peer, PeerError, RemoteError

if TYPE_CHECKING:
    from .node import TapestryNode

log = logging.getLogger("overlay.join")


async def join(node: "TapestryNode", gateways: list[Peer]) -> None:
    if not node.running:
        raise NotRunning("start node.run before joining")
    errors = []
    for gw in gateways:
        if gw.id == node.id:
            continue
        try:
            await _join_via(node, gw)
            return
        except (NoRoute, PeerError, RemoteError) as e:
            log.warning("join via %s failed: %s", gw, e)
            errors.append(f"{gw}: {e}")
    raise JoinError("no gateway could be used: " + ("; ".join(errors) or "none given"))


async def _join_via(node: "TapestryNode", gw: Peer) -> None:
    cfg = node.config
    t0 = trio.current_time()
    sent0 = node.transport.stats.total_sent()
    r = await node.router.request("root", node.id, via=gw)
    s = r.at
    if s.id == node.id:
        # Others still list us from an earlier run: our own ID routes to us.
        s = gw
    p = shared_prefix_len(node.id, s.id)
    copy = await node.transport.request(s, m.NODES, {"of": node.id, "min": 0, "table_only": True},
                                        timeout=cfg.rpc_timeout)
    await consider_all(node, [s] + [m.peer_of(x) for x in copy["nodes"]])
    reached = 0
    if not cfg.client_only:     # a client is never announced (OverlayConfig.client_only)
        mc = await node.transport.request(
            s, m.MCAST, {"new": m.peer_body(node.peer), "level": p,
                         "budget": cfg.join_timeout * 0.9},
            timeout=cfg.join_timeout)
        await consider_all(node, [m.peer_of(x) for x in mc["nodes"]])
        reached = mc["reached"]
    await nearest_neighbours(node, p)
    node.joined = True
    node.stats["joins"] += 1
    log.info("joined via %s: surrogate %s, shared prefix %d, multicast reached %d, "
             "%d neighbours, %d requests, %.3fs", gw, short(s.id), p, reached,
             len(node.table), node.transport.stats.total_sent() - sent0,
             trio.current_time() - t0)


async def consider_all(node: "TapestryNode", peers: Iterable[Peer], limit: int = 32, *,
                       improve: bool = True) -> None:
    """Offer many candidates at once (see ``TapestryNode.consider``)."""
    todo: dict[bytes, Peer] = {}
    for p in peers:
        if p.id != node.id and p.id not in node.table:
            todo.setdefault(p.id, p)
    if not todo:
        return
    sem = trio.Semaphore(limit)

    async def one(p: Peer) -> None:
        async with sem:
            await node.consider(p, improve=improve)

    async with trio.open_nursery() as n:
        for p in todo.values():
            n.start_soon(one, p)


async def nearest_neighbours(node: "TapestryNode", p: int) -> None:
    """Refine rows p-1 .. 0 with the closest nodes the k closest candidates
    of the level above know (JSAC §III-C1, "nearest neighbour")."""
    k = node.config.nn_k
    # Asking with "requester" makes the answering node consider us.
    me = {} if node.config.client_only else {"requester": m.peer_body(node.peer)}
    for level in range(p, 0, -1):
        cands = sorted((n for n in node.table.neighbours(level) if n.suspect_since is None),
                       key=lambda n: n.rtt)[:k]
        found: list[Peer] = []

        async def ask(peer: Peer) -> None:
            try:
                r = await node.transport.request(
                    peer, m.NODES, {"of": node.id, "min": level - 1, "max": level - 1, **me},
                    timeout=node.config.rpc_timeout)
            except (PeerError, RemoteError):
                node.neighbour_failed(peer.id)
                return
            found.extend(m.peer_of(x) for x in r["nodes"])

        async with trio.open_nursery() as n:
            for c in cands:
                n.start_soon(ask, c.peer)
        await consider_all(node, found)


async def on_mcast(node: "TapestryNode", sender: bytes, body: dict) -> dict:
    """One node of the acknowledged multicast: adopt the new node, pass the
    multicast to one node of each other filled slot at levels >= ``level``
    (each covers the prefix of its slot; we cover our own), and answer with
    every node reached once all children answered."""
    new = m.peer_of(body["new"])
    if new.id == node.id:
        return {"nodes": [], "reached": 0}
    level = body["level"]
    budget = max(min(body["budget"], node.config.join_timeout), 0.1)
    now = trio.current_time()
    nodes: dict[bytes, Peer] = {node.id: node.peer}
    reached = 1
    seen_until = node.mcast_seen.get(new.id)
    first = seen_until is None or seen_until <= now
    if first:
        node.mcast_seen[new.id] = now + node.config.join_timeout
        for k in [k for k, t in node.mcast_seen.items() if t <= now]:
            del node.mcast_seen[k]

    children = []
    if first:
        my = node.table.my_digits
        for lv in range(level, node.table.depth):
            row = node.table.rows[lv]
            if row is None:
                continue
            for d in range(16):
                if d == my[lv]:
                    continue
                entries = [n for n in row[d] if n.id != new.id]
                if entries:
                    children.append((lv, entries))
    child_budget = budget * 0.8

    async def child(lv: int, entries) -> None:
        nonlocal reached
        for n in sorted(entries, key=lambda n: n.sort_key()):
            try:
                r = await node.transport.request(
                    n.peer, m.MCAST, {"new": m.peer_body(new), "level": lv + 1,
                                      "budget": child_budget},
                    timeout=child_budget)
            except PeerError:
                node.neighbour_failed(n.id)
                continue
            except RemoteError as e:
                log.info("multicast for %s refused by %s: %s", short(new.id), short(n.id), e)
                continue
            reached += r["reached"]
            for x in r["nodes"]:
                nodes.setdefault(x["id"], m.peer_of(x))
            return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.consider, new)
        for lv, entries in children:
            nursery.start_soon(child, lv, entries)
    out = list(nodes.values())[: m.MAX_NODES]
    return {"nodes": [m.peer_body(p) for p in out], "reached": reached}
