"""A Tapestry node and the DOLR API the layers above use (JSAC 2004; DESIGN.md
"overlay/").

``TapestryNode(transport)`` runs on any :class:`~overlay.wire.transport.Transport`
(TLS over TCP, or the simulated network): the same code in both.

Life cycle::

    node = TapestryNode(transport, config=OverlayConfig())
    async with trio.open_nursery() as n:
        await n.start(node.run)          # serving, maintenance running
        await node.join([gateway])       # or nothing: the first node
        await node.publish(guid)
        holders = await node.locate(guid, n=2)
        ...
        await node.leave()               # run() returns

DOLR API (``dolr.py``): :meth:`publish`, :meth:`unpublish`, :meth:`locate`,
:meth:`send_to_object` (nearest replicas first), :meth:`route_to_node`
(delivered at the root), :meth:`roots` (roots of salted GUIDs, for placement).
This module holds the node's state, its life cycle and neighbour care.

Application upcall: ``node.serve_app(msg_type, fn)`` registers
``async fn(sender_id, body) -> reply`` for a message type the application has
registered with ``frames.message``. The same function answers the type when it
arrives directly (``send_to_object`` sends to holders directly) and when a
``route_to_node`` ends here (``sender_id`` is then the route's origin). Bodies
are checked against the type's schema in both cases.

Concurrency: one nursery (``run``) holds the transport's server, the
maintenance tasks (heartbeats, repair, republish, pointer expiry, hand-over)
and every routed message this node carries on; leaving or ``stop()`` cancels
it. Table and pointer updates are synchronous, so no await splits one.
"""

from __future__ import annotations

import functools
import logging
import random
from collections import Counter
from typing import Awaitable, Callable

import trio

from . import join as join_mod
from . import messages as m
from .config import DEFAULT, OverlayConfig
from .dolr import DolrAPI
from .errors import DeliveryError
from .maintenance import Maintenance
from .pointers import Pointer, PointerStore
from .routing import Router, check_app_body
from .routing_table import RoutingTable
from .wire import frames
from .wire.ids import shared_prefix_len, short
from .wire.transport import (
    Dispatcher,
    Peer,
    PeerError,
    Refused,
    RemoteError,
    Transport,
)

log = logging.getLogger("overlay.node")

AppHandler = Callable[[bytes, dict], Awaitable[dict]]


class TapestryNode(DolrAPI):
    def __init__(self, transport: Transport, *, config: OverlayConfig = DEFAULT,
                 rng: random.Random | None = None):
        self.transport = transport
        self.config = config.check()
        self.id = transport.id
        # Seeded from the NodeID so a simulation replays identically.
        self.rng = rng if rng is not None else random.Random(self.id)
        self.table = RoutingTable(Peer(self.id, transport.address or ""), config.slot_size)
        self.pointers = PointerStore()
        self.published: dict[bytes, int] = {}      # objects we hold -> their epoch
        self._next_epoch: dict[bytes, int] = {}
        self.rtts: dict[bytes, float] = {}         # measured RTTs (EWMA), seconds
        self.stats: Counter = Counter()            # joins, repairs, drops, ... (for status)
        self.joined = False
        self.router = Router(self)
        self.maint = Maintenance(self)
        self.dispatcher = Dispatcher()
        self._app: dict[str, AppHandler] = {}
        self._nursery: trio.Nursery | None = None
        self._considering: set[bytes] = set()
        self._dead: dict[bytes, float] = {}        # recently dropped -> until when not re-added
        self.mcast_seen: dict[bytes, float] = {}   # joiners whose multicast passed here -> until
        self.addrs: dict[bytes, str] = {}          # addresses seen lately (bounded), for known_peer
        self.last_heard: dict[bytes, float] = {}   # last exchange that proved a node alive
        self.last_listed: dict[bytes, float] = {}  # last time a node learnt we list it
        self._register()

    # ----------------------------------------------------------------- basics

    @property
    def peer(self) -> Peer:
        return self.table.me

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def __repr__(self) -> str:
        return f"<TapestryNode {short(self.id)} {len(self.table)} neighbours>"

    def _register(self) -> None:
        d = self.dispatcher
        d.on(m.PING, self._on_ping)
        d.on(m.NODES, self._on_nodes)
        d.on(m.LEAVING, self.maint.on_leaving)
        d.on(m.MCAST, self._on_mcast)
        d.on(m.HOLDS, self._on_holds)
        d.on(m.POINTER, self._on_pointer)
        d.on(m.UNPUBLISH_WALK, self.router.on_unpublish_walk)
        d.on(m.ROUTE, self.router.on_route)
        d.on(m.PUBLISH_BATCH, self.router.batch.on_batch)
        d.on(m.POINTER_BATCH, self.router.batch.on_pointers)
        d.on(m.RESULT, self.router.on_result)

    async def _handle(self, sender: bytes, msg_type: str, body: dict) -> dict:
        # Any request from a node shows it is alive: heartbeats can skip it,
        # and if we suspected it, it is back.
        self.neighbour_alive(sender)
        return await self.dispatcher(sender, msg_type, body)

    def serve_app(self, msg_type: str, fn: AppHandler) -> None:
        """Register the application's handler for ``msg_type`` (see module
        docstring). ValueError if the type has no schema or a handler."""
        if msg_type.startswith("tap."):
            raise ValueError("tap.* message types belong to the overlay")
        # Direct requests reach ``fn`` through the dispatcher, their bodies
        # already checked by the transport; routed ones through deliver_local.
        self.dispatcher.on(msg_type, fn)
        self._app[msg_type] = fn

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve and maintain until :meth:`leave` or :meth:`stop`. Started
        with ``nursery.start(node.run)``, which returns this node's Peer."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                addr = await nursery.start(functools.partial(
                    self.transport.serve, self._handle, inline=self.dispatcher.quick))
                self.table.me = Peer(self.id, addr)
                nursery.start_soon(self.maint.run)
                task_status.started(self.peer)
        finally:
            self._nursery = None

    def reconfigure(self, config: OverlayConfig) -> None:
        """Change timers and sizes of a running node (the periodic tasks
        restart with the new intervals; the table keeps its entries)."""
        self.config = config.check()
        if self.running:
            self.maint.restart()

    def stop(self) -> None:
        """Stop at once, telling no one (a crash, as seen by the others)."""
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def spawn(self, fn, *args) -> bool:
        """Run ``fn(*args)`` in the node's nursery (it dies with the node).
        A node that is not running drops the task (returns False): background
        work of a stopped node has no one to serve."""
        if self._nursery is None:
            log.debug("%s not running: dropped %s", short(self.id), getattr(fn, "__name__", fn))
            return False
        self._nursery.start_soon(fn, *args)
        return True

    async def join(self, gateways: Peer | list[Peer]) -> None:
        """Join the overlay through the first gateway that works (JSAC §III-C1)."""
        if isinstance(gateways, Peer):
            gateways = [gateways]
        await join_mod.join(self, list(gateways))

    async def leave(self) -> None:
        """Leave voluntarily: unpublish, tell neighbours, hand over the
        pointers we root, then stop."""
        await self.maint.leave()
        self.stop()

    # -------------------------------------------------------- neighbour care

    def rtt_of(self, node_id: bytes) -> float | None:
        return 0.0 if node_id == self.id else self.rtts.get(node_id)

    def known_peer(self, node_id: bytes) -> Peer | None:
        """How to reach a node we know of (table, backpointers, or an
        address seen lately), or None."""
        n = self.table.get(node_id)
        if n is not None:
            return n.peer
        b = self.table.backpointers.get(node_id)
        if b is not None:
            return b.peer
        addr = self.addrs.get(node_id)
        return Peer(node_id, addr) if addr is not None else None

    def learn(self, peer: Peer) -> None:
        """Remember a node's address (a claim: the transport checks the ID)."""
        if peer.id == self.id or self.addrs.get(peer.id) == peer.addr:
            return
        self.addrs.pop(peer.id, None)
        self.addrs[peer.id] = peer.addr
        if len(self.addrs) > 4096:
            del self.addrs[next(iter(self.addrs))]

    async def ping(self, peer: Peer, *, listed: bool = False) -> float:
        """Round-trip time to ``peer`` in seconds (raises PeerError/RemoteError)."""
        t0 = trio.current_time()
        body = {"addr": self.peer.addr, "listed": listed}
        if self.config.client_only:
            body["client"] = True
        await self.transport.request(peer, m.PING, body, timeout=self.config.rpc_timeout)
        now = trio.current_time()
        rtt = now - t0
        self.last_heard[peer.id] = now
        if listed:
            self.last_listed[peer.id] = now
        old = self.rtts.get(peer.id)
        # Smoothed, but a lower sample wins at once: queueing only adds delay.
        self.rtts[peer.id] = rtt if old is None or rtt < old else 0.7 * old + 0.3 * rtt
        return self.rtts[peer.id]

    async def consider(self, peer: Peer, *, improve: bool = True) -> bool:
        """Add ``peer`` to the table if it fills a hole or is closer than what
        a full slot holds (pinging it when its RTT is unknown). With
        ``improve=False`` only holes and free places are filled: a full slot
        is not worth a ping (background gossip, where most candidates land in
        full slots). Returns whether it is in the table afterwards."""
        if peer.id == self.id:
            return False
        if peer.id in self.table:
            return True
        until = self._dead.get(peer.id)
        if until is not None:
            if until > trio.current_time():
                return False
            del self._dead[peer.id]
        rtt = self.rtts.get(peer.id)
        if (rtt is not None or not improve) and not self.table.would_add(peer.id, rtt):
            return False
        if peer.id in self._considering:
            return False
        self._considering.add(peer.id)
        try:
            try:
                rtt = await self.ping(peer)
            except (PeerError, RemoteError):
                self._dead[peer.id] = trio.current_time() + self.config.dead_after
                return False
        finally:
            self._considering.discard(peer.id)
        return self.adopt(peer, rtt)

    def adopt(self, peer: Peer, rtt: float) -> bool:
        """Offer a measured neighbour to the table, and look again at the
        pointers we root if it got in. (It learns that we list it, and keeps
        a backpointer, from our next heartbeat.)"""
        if peer.id == self.id:
            return False
        known = peer.id in self.table
        kept, _evicted = self.table.add(peer, rtt)
        if kept and not known:
            self.stats["neighbours_added"] += 1
            self.maint.table_changed()
        return kept

    def neighbour_failed(self, node_id: bytes) -> None:
        """A request to a neighbour got no answer: backups go first from now."""
        if self.table.mark_suspect(node_id, trio.current_time()):
            self.stats["suspected"] += 1

    def neighbour_alive(self, node_id: bytes) -> None:
        self.last_heard[node_id] = trio.current_time()
        n = self.table.get(node_id)
        if n is not None and n.suspect_since is not None:
            self.table.clear_suspect(node_id)

    async def send_quietly(self, peer: Peer, msg_type: str, body: dict) -> None:
        """A best-effort request whose failure only matters to soft state."""
        try:
            await self.transport.request(peer, msg_type, body, timeout=self.config.rpc_timeout)
        except (PeerError, RemoteError) as e:
            log.debug("%s to %s failed: %s", msg_type, short(peer.id), e)

    # --------------------------------------------------------------- handlers

    async def _on_ping(self, sender: bytes, body: dict) -> dict:
        peer = Peer(sender, body["addr"])
        self.learn(peer)
        # The transport proved the sender's ID; the address is its own claim,
        # so a node restarted on another port is found there from now on.
        self.table.update_addr(sender, peer.addr)
        if body["listed"]:
            self.table.note_backpointer(peer, trio.current_time())
        # Everyone a node contacts may adopt it (JSAC §III-C1): a node that
        # pings us fills a hole or a free place of ours after one ping back.
        # This is also what lets the table invariant heal after failures.
        if (sender not in self.table and sender not in self._considering
                and not body.get("client") and self.table.would_add(sender) and self.running):
            self.spawn(self.consider, peer)
        return {}

    def nodes_sharing(self, of: bytes, lo: int, hi: int = 64, *,
                      backpointers: bool = True) -> list[Peer]:
        """Known nodes (table, backpointers, ourselves) sharing lo..hi digits
        with ``of``, nearest first, at most MAX_NODES."""
        seen: dict[bytes, Peer] = {}
        known = [self.peer] + self.table.peers()
        if backpointers:
            known += [b.peer for b in self.table.backpointers.values()]
        for p in known:
            if p.id not in seen and lo <= shared_prefix_len(of, p.id) <= hi:
                seen[p.id] = p
        out = sorted(seen.values(), key=lambda p: (self.rtt_of(p.id) is None,
                                                   self.rtt_of(p.id) or 0.0, p.id))
        return out[: m.MAX_NODES]

    async def _on_nodes(self, sender: bytes, body: dict) -> dict:
        req = body.get("requester")
        if req is not None and req["id"] == sender and self.running:
            self.spawn(self.consider, m.peer_of(req))
        nodes = self.nodes_sharing(body["of"], body["min"], body.get("max", 64),
                                   backpointers=not body.get("table_only", False))
        return {"nodes": [m.peer_body(p) for p in nodes]}

    async def _on_mcast(self, sender: bytes, body: dict) -> dict:
        return await join_mod.on_mcast(self, sender, body)

    async def _on_holds(self, sender: bytes, body: dict) -> dict:
        return {"holds": body["obj"] in self.published}

    async def _on_pointer(self, sender: bytes, body: dict) -> dict:
        now = trio.current_time()
        self.pointers.put(Pointer(body["obj"], m.peer_of(body["holder"]), body["target"],
                                  body["epoch"], now + self.config.pointer_ttl,
                                  prev_hops={sender}), now)
        return {}

    async def deliver_local(self, origin: Peer, msg_type: str, body) -> dict:
        """Run the application's handler for a message whose route ended here."""
        fn = self._app.get(msg_type)
        if fn is None:
            raise DeliveryError("unsupported", f"no application handler for {msg_type}")
        check_app_body(msg_type, body)
        try:
            reply = await fn(origin.id, body)
        except Refused as e:
            raise DeliveryError(e.code, e.msg) from None
        try:
            frames.body_schema(frames.Kind.REPLY, msg_type).check(reply, msg_type)
        except frames.FrameError as e:
            log.error("application reply to %s does not match its schema: %s", msg_type, e)
            raise DeliveryError("internal", "bad application reply") from None
        return reply

    # ----------------------------------------------------------------- views

    def status(self) -> dict:
        return {
            "id": self.id.hex(),
            "addr": self.peer.addr,
            "joined": self.joined,
            "client_only": self.config.client_only,
            "neighbours": len(self.table),
            "depth": self.table.depth,
            "backpointers": len(self.table.backpointers),
            "suspects": len(self.table.suspects()),
            "pointers": len(self.pointers),
            "published": len(self.published),
            "routing": self.router.active,
            "events": dict(self.stats),
            "sent": dict(self.transport.stats.sent),
        }
