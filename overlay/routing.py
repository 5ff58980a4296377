"""Hop-by-hop routing of Tapestry messages (JSAC §III-A/B; PAPERS.md "Next hop",
"Publish", "Locate").

Every routed message runs :meth:`Router.step` on each node of its path. A hop
does the kind's per-hop work (store a pointer, delete one, look for holders),
asks the routing table for the next hop, and hands the message on with a
``tap.route`` request that the receiver acknowledges at once. When the table
says this node is the root (or a locate found enough holders), the outcome goes
straight back to the origin in a ``tap.result``.

Failures on the way, in the order they are handled (PAPERS.md "Leave and
failure"): a next hop that does not acknowledge is marked suspect and its
slot's backups are tried at once; when the whole slot fails, the message goes
to up to ``alternates`` random other neighbours that share the same prefix,
which route it on from the same level (a different path to the same root);
suspects are tried last. Suspects keep their slot filled, so a transient
failure never changes which node is the root; maintenance drops them later.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from . import messages as m
from .errors import DeliveryError, NoRoute, NotRunning
from .pointers import Pointer
from .publish_batch import BatchPublisher
from .wire import frames
from .wire.ids import short
from .wire.transport import Peer, PeerError, Refused, RemoteError

if TYPE_CHECKING:
    from .node import TapestryNode

log = logging.getLogger(__name__)


@dataclass
class RouteResult:
    """Where a routed message ended and what it brought back."""

    at: Peer                    # the root, or the hop that answered a locate
    hops: int
    found: list[Peer] = field(default_factory=list)
    reply: dict | None = None
    trace: list[bytes] = field(default_factory=list)


class _Waiter:
    __slots__ = ("event", "result")

    def __init__(self):
        self.event = trio.Event()
        self.result: dict | None = None


_REQUIRED = {
    "root": (),
    "deliver": ("app_type", "app_body"),
    "publish": ("obj", "holder", "epoch"),
    "unpublish": ("obj", "holder", "epoch"),
    "locate": ("obj", "want"),
    "result": ("result",),
}


class Router:
    def __init__(self, node: "TapestryNode"):
        self.node = node
        self._pending: dict[bytes, _Waiter] = {}
        self.active = 0        # routed messages (and publish batches) this node is carrying now
        self.batch = BatchPublisher(node)   # tap.publish_batch, tap.pointer_batch

    # ------------------------------------------------------------ origin side

    def message(self, kind: str, target: bytes, *, rid: bytes | None = None,
                trace: bool = False, **fields) -> dict:
        msg = {"rid": rid, "origin": m.peer_body(self.node.peer), "kind": kind,
               "target": target, "level": 0, "hops": 0}
        for k, v in fields.items():
            if v is not None:
                msg[k] = v
        if trace:
            msg["trace"] = []
        return msg

    async def request(self, kind: str, target: bytes, *, via: Peer | None = None,
                      wait: bool = True, timeout: float | None = None,
                      trace: bool = False, **fields) -> RouteResult | None:
        """Route a message of ``kind`` toward ``target``, starting here (or at
        ``via``, a node we are not yet connected to the overlay through: a
        joining node's gateway). With ``wait``, return the outcome or raise
        :class:`NoRoute` / :class:`DeliveryError`."""
        node = self.node
        if not node.running:
            raise NotRunning(f"node {short(node.id)} is not running")
        if not wait:
            msg = self.message(kind, target, trace=trace, **fields)
            node.spawn(self.step, msg, None)
            return None
        rid = os.urandom(16)
        msg = self.message(kind, target, rid=rid, trace=trace, **fields)
        waiter = self._pending[rid] = _Waiter()
        timeout = node.config.route_timeout if timeout is None else timeout
        try:
            with trio.move_on_after(timeout):
                if via is None:
                    await self.step(msg, None)
                else:
                    try:
                        await node.transport.request(via, m.ROUTE, msg,
                                                     timeout=node.config.hop_timeout)
                    except (PeerError, RemoteError) as e:
                        raise NoRoute(f"{short(via.id)} did not take the message: {e}") from e
                await waiter.event.wait()
            if waiter.result is None:
                raise NoRoute(f"no result for {kind} {short(target)} within {timeout:g}s")
            return self._outcome(waiter.result)
        finally:
            del self._pending[rid]

    @staticmethod
    def _outcome(r: dict) -> RouteResult:
        err = r.get("error")
        if err is not None:
            if err["code"] in ("no_route", "hop_limit"):
                raise NoRoute(err["msg"])
            raise DeliveryError(err["code"], err["msg"])
        return RouteResult(m.peer_of(r["at"]), r["hops"], [m.peer_of(p) for p in r["found"]],
                           r.get("reply"), list(r.get("trace", ())))

    async def on_result(self, sender: bytes, body: dict) -> dict:
        waiter = self._pending.get(body["rid"])
        if waiter is not None and waiter.result is None:
            waiter.result = body
            waiter.event.set()
        return {}

    # --------------------------------------------------------------- each hop

    async def on_route(self, sender: bytes, body: dict) -> dict:
        kind = body["kind"]
        need = _REQUIRED.get(kind)
        if need is None:
            raise Refused("bad_request", f"unknown route kind {kind!r}")
        missing = [k for k in need if k not in body]
        if missing:
            raise Refused("bad_request", f"{kind} needs {missing}")
        if kind == "unpublish" and (body["origin"]["id"] != body["holder"]["id"]
                                    or (body["hops"] == 1 and sender != body["holder"]["id"])):
            # Only a holder withdraws its own pointers. (Hops after the first
            # trust the neighbour that passed the message on.)
            raise Refused("bad_request", "unpublish must come from the holder")
        if not self.node.running:
            raise Refused("not_running", "this node is stopping")
        if self.active >= self.node.config.max_route_tasks:
            raise Refused("busy", "too many routed messages in flight")
        self.node.spawn(self.step, body, sender)
        return {}

    async def step(self, msg: dict, sender: bytes | None) -> None:
        """This node's part of a route (see the module docstring)."""
        self.active += 1
        try:
            await self._step(msg, sender)
        except (trio.Cancelled, KeyboardInterrupt):
            raise
        except Exception:
            log.exception("routing %s toward %s failed at %s", msg.get("kind"),
                          short(msg.get("target")), short(self.node.id))
            await self.finish(msg, error=("internal", "routing failed"))
        finally:
            self.active -= 1

    async def _step(self, msg: dict, sender: bytes | None) -> None:
        node = self.node
        now = trio.current_time()
        # A copy: the simulator may pass bodies by reference (encode=False).
        msg = dict(msg)
        kind, target = msg["kind"], msg["target"]
        if "trace" in msg:
            if len(msg["trace"]) >= 256:
                del msg["trace"]
            else:
                msg["trace"] = msg["trace"] + [node.id]
        found: list[Peer] = []
        if sender is not None and sender == msg["origin"]["id"]:
            # The first hop learns the origin's address (a later delete may
            # walk back to it); further hops have the sender as backpointer.
            node.learn(m.peer_of(msg["origin"]))
        if kind == "publish":
            node.learn(m.peer_of(msg["holder"]))
            node.pointers.put(Pointer(msg["obj"], m.peer_of(msg["holder"]), target, msg["epoch"],
                                      now + node.config.pointer_ttl,
                                      prev_hops={sender} if sender else set()), now)
        elif kind == "unpublish":
            self._unpublish_here(msg["obj"], msg["holder"]["id"], msg["epoch"], sender)
        elif kind == "locate":
            found = [m.peer_of(p) for p in msg.get("found", ())]
            skip = set(msg.get("exclude", ())) | {p.id for p in found}
            here = node.pointers.holders(msg["obj"], now, exclude=skip, rtt_of=node.rtt_of)
            found += here[: msg["want"] - len(found)]
            if len(found) >= msg["want"]:
                await self.finish(msg, found=found)
                return
            msg["found"] = [m.peer_body(p) for p in found]
        dead: set[bytes] = set()
        while True:
            hop = node.table.next_hop(target, msg["level"], skip=dead,
                                      exclude_self=node.config.client_only)
            if hop is None:
                await self._at_root(msg, found)
                return
            level, slot = hop
            spread = []
            if kind in ("publish", "unpublish") and msg["hops"] < node.config.spread_hops:
                spread = self._spread(msg, slot)
            took = await self.forward(msg, level, slot)
            if took is not None:
                break
            # Every entry of the slot and the alternates failed: until repair
            # removes them, route as if the slot were empty (surrogate
            # routing among the nodes that are alive).
            newly = {n.id for n in slot} - dead
            if not newly or len(dead) > 64:
                await self.finish(msg, found=found, error=(
                    "no_route", f"{short(node.id)}: no live next hop toward {short(target)} "
                                f"at level {level}"))
                return
            dead |= newly
            node.stats["dead_slot_reroutes"] += 1
        if kind == "publish":
            p = node.pointers.get(msg["obj"], msg["holder"]["id"], target)
            if p is not None and len(p.sent_to) < 8:
                p.sent_to.add(took.id)
                p.sent_to.update(spread)

    async def _at_root(self, msg: dict, found: list[Peer]) -> None:
        node = self.node
        kind = msg["kind"]
        if kind == "publish":
            p = node.pointers.get(msg["obj"], msg["holder"]["id"], msg["target"])
            if p is not None:
                p.rooted = True
        if kind == "result":
            if msg["target"] == node.id:
                try:
                    frames.body_schema(frames.Kind.REQUEST, m.RESULT).check(msg["result"], m.RESULT)
                except frames.FrameError as e:
                    log.warning("dropping a malformed routed result: %s", e)
                    return
                await self.on_result(node.id, msg["result"])
            return
        if kind == "deliver":
            try:
                reply = await node.deliver_local(m.peer_of(msg["origin"]), msg["app_type"],
                                                 msg["app_body"])
            except DeliveryError as e:
                await self.finish(msg, error=(e.code, e.msg))
                return
            await self.finish(msg, reply=reply)
            return
        await self.finish(msg, found=found)

    def _unpublish_here(self, obj: bytes, holder_id: bytes, epoch: int,
                        sender: bytes | None) -> None:
        self._delete_and_walk(obj, holder_id, epoch, {sender, holder_id}, 16)

    def _delete_and_walk(self, obj: bytes, holder_id: bytes, epoch: int,
                         skip: set, ttl: int) -> None:
        """Delete here; send the delete to every other node the deleted
        pointers came from or went to (old paths; copies on backups)."""
        node = self.node
        now = trio.current_time()
        removed = node.pointers.delete(obj, holder_id, epoch, now, now + node.config.pointer_ttl)
        if ttl <= 0:
            return
        walk = set()
        for p in removed:
            walk |= p.prev_hops | p.sent_to
        walk -= skip
        walk.discard(node.id)
        for nid in walk:
            peer = node.known_peer(nid)
            if peer is not None:
                node.spawn(node.send_quietly, peer, m.UNPUBLISH_WALK,
                           {"obj": obj, "holder": holder_id, "epoch": epoch, "ttl": ttl - 1})

    async def on_unpublish_walk(self, sender: bytes, body: dict) -> dict:
        self._delete_and_walk(body["obj"], body["holder"], body["epoch"], {sender}, body["ttl"])
        return {}

    def _spread(self, msg: dict, slot) -> list[bytes]:
        """Pointer caching: a publish also leaves its pointer on the next
        hop's backups, which nearby clients reach first (JSAC §V, Fig. 15);
        an unpublish deletes those copies the same way. Returns who got it."""
        node = self.node
        if msg["kind"] == "publish":
            mtype = m.POINTER
            body = {"obj": msg["obj"], "holder": msg["holder"], "target": msg["target"],
                    "epoch": msg["epoch"]}
        else:
            mtype = m.UNPUBLISH_WALK
            body = {"obj": msg["obj"], "holder": msg["holder"]["id"], "epoch": msg["epoch"],
                    "ttl": 0}
        sent = []
        for n in slot[1:]:
            if n.suspect_since is None:
                node.spawn(node.send_quietly, n.peer, mtype, body)
                sent.append(n.id)
        return sent

    # ---------------------------------------------------------------- forward

    async def forward(self, msg: dict, level: int, slot, *,
                      msg_type: str = m.ROUTE) -> Peer | None:
        """Hand ``msg`` to the chosen slot (primary, then backups), else to
        alternates at the same level, else to suspects. Returns the node that
        took it, or None. ``msg_type``: a ``tap.route``, or another message
        with its ``level``, ``hops`` and ``detours`` (a publish batch)."""
        node = self.node
        hops = msg["hops"] + 1
        if hops > node.config.max_hops:
            log.warning("dropping %s toward %s: hop limit", msg.get("kind", msg_type),
                        short(msg.get("target")))
            return None
        onward = dict(msg, level=level + 1, hops=hops)
        if msg_type == m.ROUTE:     # per kind, to tell publishing from lookups
            node.stats["routed_" + msg["kind"]] += 1
        tried: set[bytes] = set()
        for n in list(slot):
            if n.suspect_since is None:
                tried.add(n.id)
                if await self._send(n.peer, onward, msg_type):
                    return n.peer
        # The whole slot failed: another neighbour sharing our first ``level``
        # digits routes from the same level along a different path.
        detours = msg.get("detours", 0)
        alts = [n.peer for n in node.table.neighbours(level)
                if n.suspect_since is None and n.id not in tried]
        if detours >= node.config.max_detours:
            alts = []   # alternates of alternates would bounce among the same dead slot
        node.rng.shuffle(alts)
        sideways = dict(msg, level=level, hops=hops, detours=detours + 1)
        for peer in alts[: node.config.alternates]:
            tried.add(peer.id)
            node.stats["alternate_routes"] += 1
            if await self._send(peer, sideways, msg_type):
                return peer
        for n in list(slot):
            if n.id not in tried:
                if await self._send(n.peer, onward, msg_type):
                    return n.peer
        return None

    async def _send(self, peer: Peer, body: dict, msg_type: str = m.ROUTE) -> bool:
        node = self.node
        try:
            await node.transport.request(peer, msg_type, body, timeout=node.config.hop_timeout)
        except PeerError:
            node.neighbour_failed(peer.id)
            return False
        except RemoteError as e:
            log.info("%s refused a routed message: %s", short(peer.id), e)
            return False
        node.neighbour_alive(peer.id)
        return True

    async def finish(self, msg: dict, *, found: list[Peer] = (), reply: dict | None = None,
                     error: tuple[str, str] | None = None) -> None:
        """Send the outcome to the origin (nothing if it asked for none)."""
        rid = msg.get("rid")
        if rid is None:
            if error is not None:
                log.debug("%s toward %s ended: %s", msg["kind"], short(msg["target"]), error)
            return
        node = self.node
        body = {"rid": rid, "at": m.peer_body(node.peer), "hops": msg["hops"],
                "found": [m.peer_body(p) for p in found]}
        if reply is not None:
            body["reply"] = reply
        if error is not None:
            body["error"] = {"code": error[0][:64], "msg": error[1][:2048]}
        if "trace" in msg:
            body["trace"] = msg["trace"]
        origin = m.peer_of(msg["origin"])
        if origin.id == node.id:
            await self.on_result(node.id, body)
            return
        try:
            await node.transport.request(origin, m.RESULT, body, timeout=node.config.rpc_timeout)
        except (PeerError, RemoteError) as e:
            if msg["kind"] == "result":
                return
            # No direct way back: send the result through the overlay to the
            # origin, the root of its own ID.
            log.info("result for %s goes through the overlay: %s", short(origin.id), e)
            await self.step(self.message("result", origin.id, result=body), None)


def check_app_body(msg_type: str, body) -> None:
    """Raise DeliveryError unless ``body`` matches ``msg_type``'s request schema."""
    try:
        frames.body_schema(frames.Kind.REQUEST, msg_type).check(body, msg_type)
    except frames.FrameError as e:
        raise DeliveryError("bad_request", str(e)) from None
