"""An inner ring on the simulated network: 3f+1 real ring members (real
PBFT code, real LMDB stores) on ``overlay.wire.simnet``, with crash,
restart and Byzantine members, for tests and virtual-time experiments.

Each member runs under its own cancel scope, so :meth:`SimRing.crash` is a
whole-process crash: its tasks die, the network black-holes it, its store
is closed; :meth:`SimRing.restart` reopens the same store directory and
runs a fresh member on it (recovery from LMDB, then catch-up).
"""

from __future__ import annotations

from pathlib import Path

import trio

from overlay.wire.ids import Identity
from overlay.wire.transport import Dispatcher

from .certificate import RingDescriptor
from .pbft import PbftConfig, Replica
from .ring import RingService
from .ring_byzantine import ByzantineReplica
from .ring_store import RingStore
from .ringclient import RingClient

BASE_TIME = 1_700_000_000.0


class SimRing:
    def __init__(self, net, directory, *, f: int = 1, config: PbftConfig | None = None,
                 byzantine: dict[int, set[str]] | None = None, name: str = "vol",
                 seed: bytes = b"ring"):
        self.net = net
        self.dir = Path(directory)
        self.config = config or PbftConfig()
        self.byzantine = byzantine or {}
        self.owner = Identity.from_seed(seed + b"/owner")
        self.ids = [Identity.from_seed(seed + b"/member%d" % k) for k in range(3 * f + 1)]
        self.transports = [net.add(i) for i in self.ids]
        self.ring = RingDescriptor.create(self.owner, name, [
            (i.public_key, t.address) for i, t in zip(self.ids, self.transports)], f=f)
        self.services: list[RingService | None] = [None] * len(self.ids)
        self._scopes: list[trio.CancelScope | None] = [None] * len(self.ids)
        self._stopped: list[trio.Event | None] = [None] * len(self.ids)
        self._nursery: trio.Nursery | None = None
        self._clients = 0

    @staticmethod
    def clock() -> float:
        # Wall time that follows the (virtual) trio clock, so batch times are
        # deterministic and members agree on them.
        return BASE_TIME + trio.current_time()

    async def start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        for k in range(len(self.ids)):
            await self.start_member(k)

    async def start_member(self, k: int) -> None:
        await self._nursery.start(self._run_member, k)

    async def _run_member(self, k: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        store = RingStore(self.dir / f"member-{self.ids[k].id[:6].hex()}", sync=False,
                          threaded=False)
        kw = {}
        cls = Replica
        if k in self.byzantine:
            cls, kw = ByzantineReplica, {"faults": self.byzantine[k], "seed": k}
        svc = RingService(self.ids[k], self.ring, store, self.transports[k], self.config,
                          self.clock, replica_cls=cls, **kw)
        disp = Dispatcher()
        svc.register(disp)
        self.services[k] = svc
        stopped = self._stopped[k] = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._scopes[k] = scope
                async with trio.open_nursery() as n:
                    await n.start(self.transports[k].serve, disp)
                    await n.start(svc.run)
                    task_status.started()
        finally:
            store.close()
            stopped.set()

    async def crash(self, k: int) -> None:
        """Kill member k (like kill -9) and wait until it is gone."""
        self.net.crash(self.ids[k].id)
        self._scopes[k].cancel()
        await self._stopped[k].wait()
        self.services[k] = None

    async def restart(self, k: int) -> None:
        self.net.restart(self.ids[k].id)
        await self.start_member(k)

    def successor(self, k: int, seed: bytes = b"replacement") -> RingDescriptor:
        """The next epoch's descriptor, owner-signed, with member k replaced
        by a new node (added to the network; start it with start_member(k)
        once the ring has switched). The harness adopts it for new members."""
        ident = Identity.from_seed(seed + b"%d" % self.ring.epoch)
        t = self.net.add(ident)
        new = self.ring.successor(self.ids[k].id, ident.public_key, t.address).signed(self.owner)
        self.ids[k], self.transports[k] = ident, t
        self.old_rings = getattr(self, "old_rings", []) + [self.ring]
        self.ring = new
        return new

    def replica(self, k: int):
        return self.services[k].replica

    def client(self, identity: Identity | None = None, **kw) -> RingClient:
        self._clients += 1
        identity = identity or Identity.from_seed(b"client%d" % self._clients)
        t = self.net.add(identity) if identity.id not in self.net.nodes else \
            self.net.transport(identity.id)
        return RingClient(t, self.ring, identity, **kw)

    def owner_client(self, **kw) -> RingClient:
        return self.client(self.owner, **kw)
