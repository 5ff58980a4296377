"""Batched publishing: many publishes of one holder in one routed message per
next hop (JSAC §III-B "Publish"; PAPERS.md "Publish", "Soft state").

A holder that stores a burst of objects publishes each under every salt: one
routed ``publish`` per (object, salt), handled hop by hop, so a burst of N
objects costs N x salts x hops routed messages. A batch carries the entries
(salted target, object, epoch) of one holder together for as long as their
routes agree: every node on the way

1. stores, for each entry, exactly the pointer a single publish of it would
   store here (same record: object, holder, target, epoch, expiry
   ``pointer_ttl`` from now, the sender as previous hop);
2. computes each entry's next hop with the same surrogate routing
   (``RoutingTable.next_hop`` from the batch's level); entries with none
   are rooted here (their pointer is marked, as at the end of a route);
3. groups the rest by the slot they leave through and hands each group on
   as one ``tap.publish_batch``, with ``Router.forward``'s order of trial:
   primary, backups, alternates sharing our prefix, suspects. A group that
   no node took is routed again as if its slot were empty (``skip=``, per
   entry, as a single message does), until no live next hop is left;
4. on the first ``spread_hops`` hops, leaves copies of the group's pointers
   on the slot's live backups, one ``tap.pointer_batch`` per backup
   (pointer caching, as ``Router._spread`` does per message), and records
   the next hop and the backups in each pointer's ``sent_to``.

Invariant (tested against single publishes on the same network): after a
batch has travelled, every node holds the same pointer records, rooted the
same way, with the same path memory, as the single publishes of its entries
would have left. Entries of one batch have taken the same number of hops and
resolved the same digits (a batch is only ever split, never merged), which is
why ``level``, ``hops`` and ``detours`` are per batch.

Batches are unconfirmed, like ``publish(confirm=False)``: each hop
acknowledges at once and nothing comes back from the roots; a route lost on
the way is repaired by the periodic republish (soft state). Size: at most
``MAX_BATCH`` entries per message (``overlay.messages``); longer lists are
cut into several batches at the origin.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

import trio

from . import messages as m
from .errors import NotRunning
from .pointers import Pointer
from .wire.ids import digit, short
from .wire.transport import Peer, Refused

if TYPE_CHECKING:
    from .node import TapestryNode

log = logging.getLogger(__name__)

Entry = tuple[bytes, bytes, int]   # (salted target, object, epoch)


class BatchPublisher:
    """One node's part in batched publishes (module docstring)."""

    def __init__(self, node: "TapestryNode"):
        self.node = node

    # ------------------------------------------------------------ origin side

    async def start(self, holder: Peer, entries: Iterable[Entry]) -> None:
        """Publish ``entries`` of ``holder`` from this node: this node's step
        of each batch of at most MAX_BATCH entries, one batch after the other
        (so the caller is paced by its next hops). Returns once the first
        hop of every group took its batch, or was found to have none."""
        node = self.node
        if not node.running:
            raise NotRunning(f"node {short(node.id)} is not running")
        entries = list(entries)
        origin, hb = m.peer_body(node.peer), m.peer_body(holder)
        for i in range(0, len(entries), m.MAX_BATCH):
            body = {"origin": origin, "holder": hb, "level": 0, "hops": 0,
                    "entries": [{"target": t, "obj": o, "epoch": e}
                                for t, o, e in entries[i:i + m.MAX_BATCH]]}
            await self.step(body, None)

    # --------------------------------------------------------------- handlers

    async def on_batch(self, sender: bytes, body: dict) -> dict:
        """``tap.publish_batch``: acknowledge at once, carry on in the
        background (like ``Router.on_route``)."""
        node = self.node
        if not body["entries"]:
            raise Refused("bad_request", "an empty publish batch")
        if not node.running:
            raise Refused("not_running", "this node is stopping")
        if node.router.active >= node.config.max_route_tasks:
            raise Refused("busy", "too many routed messages in flight")
        node.spawn(self.step, body, sender)
        return {}

    async def on_pointers(self, sender: bytes, body: dict) -> dict:
        """``tap.pointer_batch``: store the pointers, route nothing (the
        batched ``tap.pointer``)."""
        node = self.node
        now = trio.current_time()
        holder = m.peer_of(body["holder"])
        expires = now + node.config.pointer_ttl
        for e in body["entries"]:
            node.pointers.put(Pointer(e["obj"], holder, e["target"], e["epoch"], expires,
                                      prev_hops={sender}), now)
        return {}

    # --------------------------------------------------------------- each hop

    async def step(self, body: dict, sender: bytes | None) -> None:
        """This node's part of a batch's route (see the module docstring)."""
        router = self.node.router
        router.active += 1
        try:
            await self._step(body, sender)
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("publish batch of %d entries failed at %s", len(body["entries"]),
                          short(self.node.id))
        finally:
            router.active -= 1

    async def _step(self, body: dict, sender: bytes | None) -> None:
        node = self.node
        now = trio.current_time()
        holder = m.peer_of(body["holder"])
        if sender is not None and sender == body["origin"]["id"]:
            node.learn(m.peer_of(body["origin"]))
        node.learn(holder)
        expires = now + node.config.pointer_ttl
        for e in body["entries"]:
            # Received bodies are never mutated (the simulator may share them).
            node.pointers.put(Pointer(e["obj"], holder, e["target"], e["epoch"], expires,
                                      prev_hops={sender} if sender else set()), now)
        level0 = body["level"]
        # Each entry carries the next hops that failed for it, as a single
        # message's ``dead`` set: a slot of only those counts as empty.
        pending: list[tuple[dict, frozenset]] = [(e, frozenset()) for e in body["entries"]]
        while pending:
            groups: dict[tuple[int, int], tuple[int, list, list]] = {}
            for e, dead in pending:
                hop = node.table.next_hop(e["target"], level0, skip=dead,
                                          exclude_self=node.config.client_only)
                if hop is None:
                    p = node.pointers.get(e["obj"], holder.id, e["target"])
                    if p is not None:
                        p.rooted = True
                    continue
                level, slot = hop
                key = (level, digit(slot[0].id, level))
                g = groups.get(key)
                if g is None:
                    g = groups[key] = (level, slot, [])
                g[2].append((e, dead))
            failed: list[tuple[list, list]] = []
            async with trio.open_nursery() as n:
                for level, slot, es in groups.values():
                    n.start_soon(self._forward, body, holder.id, level, slot, es, failed)
            pending = []
            for slot, es in failed:
                # Every entry of the slot and the alternates failed: until
                # repair removes them, route as if the slot were empty.
                ids = {nb.id for nb in slot}
                again = 0
                for e, dead in es:
                    newly = ids - dead
                    if not newly or len(dead) > 64:
                        log.debug("publish batch entry toward %s: no live next hop at %s",
                                  short(e["target"]), short(node.id))
                        continue
                    pending.append((e, dead | newly))
                    again += 1
                if again:
                    node.stats["dead_slot_reroutes"] += 1

    async def _forward(self, body: dict, holder_id: bytes, level: int, slot,
                       es: list[tuple[dict, frozenset]], failed: list) -> None:
        node = self.node
        entries = [e for e, _dead in es]
        spread: list[bytes] = []
        if body["hops"] < node.config.spread_hops:
            spread = self._spread(body["holder"], entries, slot)
        msg = {"origin": body["origin"], "holder": body["holder"], "level": body["level"],
               "hops": body["hops"], "entries": entries}
        if "detours" in body:
            msg["detours"] = body["detours"]
        took = await node.router.forward(msg, level, slot, msg_type=m.PUBLISH_BATCH)
        if took is None:
            failed.append((list(slot), es))
            return
        for e in entries:
            p = node.pointers.get(e["obj"], holder_id, e["target"])
            if p is not None and len(p.sent_to) < 8:
                p.sent_to.add(took.id)
                p.sent_to.update(spread)

    def _spread(self, holder: dict, entries: list[dict], slot) -> list[bytes]:
        """Pointer caching on the slot's live backups; returns who got it."""
        node = self.node
        sent = []
        for nb in slot[1:]:
            if nb.suspect_since is None:
                node.spawn(node.send_quietly, nb.peer, m.POINTER_BATCH,
                           {"holder": holder, "entries": entries})
                sent.append(nb.id)
        return sent
