"""Timers and sizes of a Tapestry node (PAPERS.md "Soft state", "Join").

The defaults are the test-scale values the Tapestry deployments used:
republish every 10 s, pointers expire after 25 s, heartbeats every 10 s and a
neighbour is dropped after about 30 s of silence. Every field can be changed
per node (``p2pfs node`` exposes the timers); simulations that only measure
routing turn the periodic tasks off with ``0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class OverlayConfig:
    # Table and placement.
    slot_size: int = 3              # neighbours per slot: primary + 2 backups (JSAC fn. 2)
    salts: int = 3                  # salted roots per object (publish and locate)

    # Soft state (seconds; 0 disables the periodic task).
    republish_interval: float = 10.0
    pointer_ttl: float = 25.0       # a few republish periods
    heartbeat_interval: float = 10.0
    dead_after: float = 30.0        # a suspect neighbour silent this long is dropped
    repair_interval: float = 20.0   # background gossip of table rows
    backpointer_ttl: float = 35.0   # a backpointer not refreshed by a heartbeat expires

    # Timeouts (seconds).
    hop_timeout: float = 2.0        # a next hop must accept a routed message within this
    rpc_timeout: float = 3.0        # pings, table queries
    route_timeout: float = 15.0     # an origin waits this long for a routed result
    join_timeout: float = 60.0      # the acknowledged multicast of one join

    # Routing.
    max_hops: int = 96              # a message that took more hops is dropped (loop guard)
    alternates: int = 2             # other neighbours tried when a whole slot fails
    max_detours: int = 3            # sideways hops one message may take (no ping-pong)
    max_route_tasks: int = 4096     # routed messages one node carries at once

    # Join: nearest-neighbour search keeps the k closest candidates per level.
    nn_k: int = 12

    # Locality: on the first hops of a publish, also leave pointers on the
    # chosen slot's backups (JSAC §V, "pointer caching"; cuts location RDP).
    spread_hops: int = 2

    # A client-only node (a mount: it stores nothing) keeps a routing table
    # to route its own requests, but never makes itself known: no join
    # multicast, no "requester" in table queries, no "listed" heartbeats. So
    # no other node lists it, routes through it or takes it for a root, and
    # its routes are computed as if it were not there: mounts coming and
    # going move no root, hence no replica placement and no repair pass.
    client_only: bool = False

    def with_(self, **kw) -> "OverlayConfig":
        return replace(self, **kw)

    def check(self) -> "OverlayConfig":
        """Raise ValueError for settings that cannot work."""
        if self.slot_size < 1 or self.salts < 1 or self.nn_k < 1:
            raise ValueError("slot_size, salts and nn_k must be at least 1")
        for name in ("republish_interval", "pointer_ttl", "heartbeat_interval", "dead_after",
                     "repair_interval", "backpointer_ttl"):
            v = getattr(self, name)
            # not (v >= 0) also catches NaN, which every comparison would pass over.
            if not (0 <= v < math.inf):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, not {v}")
        for name in ("hop_timeout", "rpc_timeout", "route_timeout", "join_timeout"):
            if not (0 < getattr(self, name) < math.inf):
                raise ValueError(f"{name} must be positive and finite")
        if self.republish_interval and self.pointer_ttl <= self.republish_interval:
            raise ValueError("pointer_ttl must exceed republish_interval, or pointers "
                             "expire between republishes")
        return self


DEFAULT = OverlayConfig()
