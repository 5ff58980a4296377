"""The DOLR API of a Tapestry node (JSAC 2004 §III-B; DESIGN.md "overlay/"):
what the layers above call.

* ``publish(obj)`` routes toward each salted root of ``obj`` leaving pointers
  on every hop, and keeps republishing (soft state, ``maintenance.py``);
* ``publish_many(objs)`` does the same for many objects in one routed batch
  per next hop (``publish_batch.py``): the pointers single publishes would
  leave, for a fraction of the messages;
* ``unpublish(obj)`` deletes them along the same paths (and old ones);
* ``locate(obj, n)`` routes toward the salted roots in turn, diverting at the
  first hop that has pointers, and returns live holders nearest first;
* ``send_to_object(type, body, obj, n)`` sends an application message to the
  nearest holders, falling back to further replicas;
* ``route_to_node(type, body, guid)`` delivers at the root of ``guid``;
* ``roots(guid, k)`` names the roots of k salted GUIDs (replica placement).

A mixin of :class:`overlay.node.TapestryNode`, which holds the state it uses.
"""

from __future__ import annotations

import logging
import time

import trio

from . import messages as m
from .errors import DeliveryError, NoRoute, NotRunning, ObjectNotFound
from .routing import RouteResult, check_app_body
from .wire import frames
from .wire.ids import short
from .wire.transport import Peer, PeerError, RemoteError

log = logging.getLogger("overlay.dolr")


class DolrAPI:
    def _epoch(self, obj: bytes) -> int:
        # Wall-clock milliseconds: a restarted holder still publishes above
        # the epochs its earlier run left in tombstones.
        return max(self._next_epoch.get(obj, 0), time.time_ns() // 1_000_000)

    async def publish(self, obj: bytes, *, confirm: bool = True) -> list[Peer]:
        """Publish that we hold ``obj``: route toward each salted root, leaving
        pointers on the way. Returns the roots that acknowledged (the object
        stays published, and is republished, even if some did not).

        ``confirm=False`` is ``publish_many([obj])``: it returns once the
        first hop of each salted route has taken the message, and asks for no
        result from the roots: half the messages of a publish in a small
        network (a hop, not a hop and a result), fewer when salted routes
        share a next hop. Nothing then reports a route that fails further
        on; the periodic republish (soft state) repairs it. Returns []."""
        epoch = self.published.get(obj)
        if epoch is None:
            epoch = self.published[obj] = self._epoch(obj)
        if not confirm:
            await self._publish_entries([(obj, epoch)])
            return []
        return await self._publish_all(obj, epoch, wait=True)

    async def publish_many(self, objs, *, confirm: bool = False) -> dict[bytes, list[Peer]]:
        """Publish that we hold every object of ``objs`` (GUIDs, 32 bytes).

        Unconfirmed (the default): the (salted target, object, epoch) entries
        travel in batches, one routed message per next hop, each node on the
        way leaving the pointers single publishes would leave
        (``overlay/publish_batch.py``). Returns {} once the first hop of
        every batch took it; routes lost further on are repaired by the
        periodic republish, as for ``publish(confirm=False)``.

        ``confirm=True`` publishes each object as ``publish`` does (a result
        from every root; a few at a time) and returns, per object, the roots
        that acknowledged. ValueError for a GUID that is not 32 bytes."""
        objs = list(dict.fromkeys(objs))
        for obj in objs:
            if type(obj) is not bytes or len(obj) != 32:
                raise ValueError("objects are published by their 32-byte GUIDs")
        if not self.running:
            raise NotRunning(f"node {short(self.id)} is not running")
        pairs = []
        for obj in objs:
            epoch = self.published.get(obj)
            if epoch is None:
                epoch = self.published[obj] = self._epoch(obj)
            pairs.append((obj, epoch))
        if not confirm:
            await self._publish_entries(pairs)
            return {}
        out: dict[bytes, list[Peer]] = {}
        sem = trio.Semaphore(16)

        async def one(obj: bytes, epoch: int) -> None:
            async with sem:
                out[obj] = await self._publish_all(obj, epoch, wait=True)

        async with trio.open_nursery() as n:
            for obj, epoch in pairs:
                n.start_soon(one, obj, epoch)
        return out

    async def _publish_entries(self, pairs) -> None:
        """Unconfirmed publishes of our (object, epoch) pairs under every
        salt, batched. The first step runs here rather than in a spawned
        task, so a caller publishing many objects is paced by its next hops."""
        salts = range(self.config.salts)
        await self.router.batch.start(
            self.peer, [(m.salted(obj, i), obj, epoch) for obj, epoch in pairs for i in salts])

    async def _publish_all(self, obj: bytes, epoch: int, *, wait: bool) -> list[Peer]:
        roots: list[Peer] = []

        async def one(i: int) -> None:
            try:
                r = await self.router.request("publish", m.salted(obj, i), wait=wait, obj=obj,
                                              holder=m.peer_body(self.peer), epoch=epoch)
            except NoRoute as e:
                log.info("publish of %s under salt %d: %s", short(obj), i, e)
                return
            if r is not None:
                roots.append(r.at)

        async with trio.open_nursery() as n:
            for i in range(self.config.salts):
                n.start_soon(one, i)
        return roots

    async def unpublish(self, obj: bytes) -> None:
        """Withdraw ``obj``: delete our pointers along each salted path."""
        epoch = self.published.pop(obj, None)
        if epoch is None:
            return
        self._next_epoch[obj] = epoch + 1

        async def one(i: int) -> None:
            try:
                await self.router.request("unpublish", m.salted(obj, i), obj=obj,
                                          holder=m.peer_body(self.peer), epoch=epoch)
            except NoRoute as e:
                log.info("unpublish of %s under salt %d: %s", short(obj), i, e)

        async with trio.open_nursery() as n:
            for i in range(self.config.salts):
                n.start_soon(one, i)

    async def locate(self, obj: bytes, n: int = 1, *, exclude=()) -> list[Peer]:
        """Up to ``n`` live holders of ``obj``, nearest first (by our RTT).
        Routes toward each salted root in turn, diverting at the first hop
        with pointers; holders that do not answer or no longer hold the object
        are skipped and the search goes on. Empty list: none found."""
        if not 1 <= n <= 64:
            raise ValueError("n must be in 1..64")
        good: dict[bytes, Peer] = {}
        bad: set[bytes] = set(exclude)
        for i in range(self.config.salts):
            for _round in range(4):
                want = n - len(good)
                if want <= 0:
                    break
                skip = list(bad | set(good))[:64]
                try:
                    r = await self.router.request("locate", m.salted(obj, i), obj=obj,
                                                  want=want, exclude=skip)
                except NoRoute as e:
                    log.info("locate of %s under salt %d: %s", short(obj), i, e)
                    break
                fresh = [p for p in r.found if p.id not in good and p.id not in bad]
                if not fresh:
                    break
                ok = await self._check_holders(obj, fresh)
                for p in fresh:
                    if p.id in ok:
                        good[p.id] = p
                    else:
                        bad.add(p.id)
                if len(ok) == len(fresh) and len(r.found) < want:
                    break  # the route reached the root: nothing more under this salt
            if len(good) >= n:
                break
        out = sorted(good.values(), key=lambda p: (self.rtt_of(p.id) or 0.0, p.id))
        return out[:n]

    async def _check_holders(self, obj: bytes, peers: list[Peer]) -> set[bytes]:
        """Which of ``peers`` answer that they hold ``obj`` (measuring RTT)."""
        ok: set[bytes] = set()

        async def check(p: Peer) -> None:
            if p.id == self.id:
                if obj in self.published:
                    ok.add(p.id)
                return
            t0 = trio.current_time()
            try:
                r = await self.transport.request(p, m.HOLDS, {"obj": obj},
                                                 timeout=self.config.rpc_timeout)
            except (PeerError, RemoteError):
                return
            rtt = trio.current_time() - t0
            old = self.rtts.get(p.id)
            self.rtts[p.id] = rtt if old is None else min(old, rtt)
            if r["holds"]:
                ok.add(p.id)
            else:
                self.pointers.drop_holder(obj, p.id)

        async with trio.open_nursery() as nursery:
            for p in peers:
                nursery.start_soon(check, p)
        return ok

    async def send_to_object(self, msg_type: str, body: dict, obj: bytes,
                             n: int = 1) -> list[tuple[Peer, dict]]:
        """Send an application message to up to ``n`` holders of ``obj``,
        nearest first, falling back to further replicas when one fails.
        Returns (holder, reply) pairs; raises ObjectNotFound if no holder
        answered at all."""
        if msg_type not in self._app and msg_type not in frames.REGISTRY:
            raise ValueError(f"unknown message type {msg_type}")
        replies: list[tuple[Peer, dict]] = []
        tried: set[bytes] = set()
        last_error: Exception | None = None
        for _attempt in range(3):
            holders = await self.locate(obj, n - len(replies), exclude=tried)
            if not holders:
                break
            for h in holders:
                tried.add(h.id)
                try:
                    if h.id == self.id:
                        reply = await self.deliver_local(self.peer, msg_type, body)
                    else:
                        reply = await self.transport.request(h, msg_type, body,
                                                             timeout=self.config.rpc_timeout)
                except (PeerError, RemoteError, DeliveryError) as e:
                    last_error = e
                    continue
                replies.append((h, reply))
            if len(replies) >= n:
                break
        if not replies:
            raise ObjectNotFound(f"no holder of {short(obj)} answered"
                                 + (f" (last error: {last_error})" if last_error else ""))
        return replies

    async def route_to_node(self, msg_type: str, body: dict, guid: bytes) -> dict:
        """Deliver an application message at the root of ``guid`` and return
        the reply of the application there (DeliveryError if it refused)."""
        if msg_type not in frames.REGISTRY:
            raise ValueError(f"unknown message type {msg_type}")
        check_app_body(msg_type, body)
        r = await self.router.request("deliver", guid, app_type=msg_type, app_body=body)
        return r.reply or {}

    async def find_root(self, guid: bytes, *, trace: bool = False) -> RouteResult:
        """Route to the root of ``guid``; the result names it and the hops."""
        return await self.router.request("root", guid, trace=trace)

    async def roots(self, guid: bytes, k: int) -> list[Peer]:
        """The roots of the first ``k`` salted GUIDs of ``guid`` (salt 0 is
        ``guid`` itself), in salt order. Small networks may repeat a node;
        callers that need k distinct nodes ask for more salts."""
        if not 1 <= k <= 64:
            raise ValueError("k must be in 1..64")
        out: list[Peer | None] = [None] * k

        async def one(i: int) -> None:
            out[i] = (await self.find_root(m.salted(guid, i))).at

        async with trio.open_nursery() as n:
            for i in range(k):
                n.start_soon(one, i)
        return out  # type: ignore[return-value]
