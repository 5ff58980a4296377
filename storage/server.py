"""A storage node: overlay routing, a block store and replica maintenance in
one node (DESIGN.md "Process model"; issue 4). The inner ring member will be
added here.

:class:`StorageNode` composes the roles on any transport, so the same class
runs on the simulated network (tests) and in the node process::

    TapestryNode          routing, DOLR publish/locate (overlay/)
    Placement             answers blk.where for the GUIDs it roots
    HolderService         blk.* RPCs over this node's BlockStore (LMDB)
    ReplicaKeeper         publishes what is held, restores r copies
    ReplicatedBlocks      per volume key, on demand (``blocks(key)``)

A node without a store (``store=None``, ``--no-store``) routes and places
but holds nothing; placement passes it over (``blk.where`` says so).

The process, ``python -m storage`` (what ``p2pfs node`` runs)::

    python -m storage --data DIR [--listen HOST:PORT] [--bootstrap HOST:PORT#NODEID ...]
                      [--quota 1G] [--r 3] [--repair-interval 300] [--no-fsync] [--no-stage]
                      [--collector NODEID ...] [--no-store] [overlay timers ...]

Overlay timers default as ``python -m overlay`` except the soft state of
published objects: a storage node publishes every block it holds, so it
republishes every 600 s (pointers live 1500 s) instead of 10 s / 25 s.

It keeps its identity in ``DIR/node.key`` and its blocks in ``DIR/blocks``,
prints one JSON ready line on stdout like ``python -m overlay``
(``{"event": "ready", "id", "addr", "bootstrap", "control"}``) once serving,
joined and past its first repair pass, and serves ``DIR/control.sock``: the
overlay's ``tap.ctl.*`` commands plus the ``blk.ctl.*`` commands below (for
tests, benchmarks and tools; whoever can open the 0600 socket may use them,
so a volume key sent there never leaves the machine):

* ``blk.ctl.status`` -> node, store, repair and placement counters;
* ``blk.ctl.put {key, kind, data, r?}`` -> ``{bguid, holders}``: seal and
  store one block with r replicas; refusals ``store_full``,
  ``too_few_holders``;
* ``blk.ctl.get {key, kind, bguid, prefer?}`` -> ``{data, source,
  rejected}``: fetch, verify and open one block, trying ``prefer`` first;
  ``rejected`` names holders whose copy failed verification;
* ``blk.ctl.repair`` -> the report of one repair pass run now.

SIGINT/SIGTERM: leave the overlay (bounded in time; held blocks are not
unpublished one by one, their pointers expire), close the store, exit 0.
Exit codes as ``python -m overlay`` (``overlay/run.py``): 0, 2 usage, 3 no
bootstrap node could be joined, 4 identity, data directory or store unusable.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from typing import Sequence

import trio

from overlay import messages as m
from overlay import run as overlay_run
from overlay.config import OverlayConfig
from overlay.control import SOCKET_NAME, ControlError, ControlServer
from overlay.errors import JoinError
from overlay.node import TapestryNode
from overlay.wire import frames
from overlay.wire.frames import GUID, AnyValue, Bytes, Int, ListOf, Optional
from overlay.wire.ids import Identity, IdentityError
from overlay.wire.transport import Peer, Refused, Transport

from . import gc, seal
from .blockapi import MAX_BLOCK, Kind
from .blockstore import AsyncBlockStore, BlockStore
from .errors import BlockCorrupt, BlockNotFound, StorageError, StoreFull, TooFewHolders
from .maintenance import DEFAULT_INTERVAL, HolderService, ReplicaKeeper
from .placement import Placement
from .replication import ReplicatedBlocks

log = logging.getLogger("storage.server")

STORE_DIR = "blocks"
STORAGE_REPUBLISH = 600.0     # seconds between republishes of held blocks
STORAGE_POINTER_TTL = 1500.0  # pointer lifetime, a few republish periods


class StorageNode:
    """One node's roles on ``transport`` (module docstring). ``inline``:
    store calls and sealing on the trio thread (simulations on virtual
    time). ``collectors``: NodeIDs whose ``blk.delete`` this node obeys.
    ``service_class``: the block service (tests substitute a faulty one).
    A node with no store joins the overlay as a client only
    (``OverlayConfig.client_only``): it is never anyone's root, so clients
    coming and going do not move replica placement."""

    def __init__(self, transport: Transport, store: BlockStore | None, *,
                 config: OverlayConfig = OverlayConfig(), r: int = 3,
                 repair_interval: float = DEFAULT_INTERVAL, collectors: Sequence[bytes] = (),
                 publish: bool = True, inline: bool = False, placement_ttl: float = 30.0,
                 clock=time.time, rng=None, service_class: type[HolderService] = HolderService):
        if store is None and not config.client_only:
            config = config.with_(client_only=True)
        self.node = TapestryNode(transport, config=config, rng=rng)
        self.r = r
        self.inline = inline
        self._clock = clock
        self.raw_store = store
        self.store = AsyncBlockStore(store, inline=inline) if store is not None else None
        self.placement = Placement(self.node, stores=store is not None, ttl=placement_ttl)
        self.placement.register()
        self.keeper: ReplicaKeeper | None = None
        if self.store is not None:
            self.keeper = ReplicaKeeper(self.node, self.store, self.placement, r=r,
                                        interval=repair_interval, publish=publish, clock=clock)
            self.service = service_class(self.store, self.keeper, collectors=collectors)
            self.service.register(self.node.dispatcher)
        self._volumes: dict[tuple[bytes, int], ReplicatedBlocks] = {}
        self._scope: trio.CancelScope | None = None

    @property
    def id(self) -> bytes:
        return self.node.id

    @property
    def peer(self) -> Peer:
        return self.node.peer

    async def run(self, bootstrap: Sequence[Peer] = (), *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve, join through ``bootstrap`` (none: a new overlay), run the
        keeper's first pass, then report started with this node's Peer and
        keep running until :meth:`stop` or :meth:`leave`. JoinError if no
        bootstrap node could be joined."""
        failed: JoinError | None = None
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope

            async def node_task(task_status=trio.TASK_STATUS_IGNORED):
                try:
                    await self.node.run(task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()   # the node stopped: so does all the rest

            me = await nursery.start(node_task)
            if bootstrap:
                try:
                    await self.node.join(list(bootstrap))
                except JoinError as e:
                    failed = e
                    nursery.cancel_scope.cancel()
            else:
                self.node.joined = True
            if failed is None:
                if self.keeper is not None:
                    await nursery.start(self.keeper.run)
                    await self.keeper.ready.wait()
                task_status.started(me)
        if failed is not None:
            raise failed

    def stop(self) -> None:
        """Stop at once, telling no one (a crash as the others see it)."""
        self.node.stop()
        if self._scope is not None:
            self._scope.cancel()

    async def leave(self) -> None:
        """Leave the overlay gracefully, without unpublishing the blocks held
        here one routed message each (thousands of them: minutes): their
        pointers expire, and ``locate`` skips a holder that does not answer."""
        if self.keeper is not None:
            for g in self.keeper.published:
                self.node.published.pop(g, None)
        await self.node.leave()
        self.stop()

    def blocks(self, volume_key: bytes, *, r: int | None = None, **kw) -> ReplicatedBlocks:
        """The replicated BlockAccess of a volume through this node (cached
        per key and r unless options are given)."""
        r = self.r if r is None else r
        if kw:
            return self._make(volume_key, r, **kw)
        rb = self._volumes.get((volume_key, r))
        if rb is None:
            rb = self._volumes[(volume_key, r)] = self._make(volume_key, r)
        return rb

    def _make(self, volume_key: bytes, r: int, **kw) -> ReplicatedBlocks:
        return ReplicatedBlocks(
            self.node, volume_key, self.placement, r=r, local=self.store,
            on_stored=self.keeper.note_stored if self.keeper else None,
            offload=not self.inline, **kw)

    async def collect(self, live, started_at: float, **kw) -> "gc.CollectReport":
        """Sweep garbage from this node (``storage.gc.collect``): every block
        not in ``live`` and stored before ``started_at - skew``."""
        kw.setdefault("clock", self._clock)
        return await gc.collect(self.node, live, started_at, local=self.store,
                                on_deleted=self.keeper.note_deleted if self.keeper else None,
                                **kw)

    async def status(self) -> dict:
        out = self.node.status()
        out["placement"] = dict(self.placement.stats)
        if self.store is not None:
            s = await self.store.stats()
            out["store"] = {"blocks": s.blocks, "bytes": s.bytes, "used": s.used,
                            "quota": s.quota, "free": s.free, "corruptions": s.corruptions,
                            "quarantined": s.quarantined, "tombstones": s.tombstones}
            out["repair"] = dict(self.keeper.stats)
            out["publish_backlog"] = self.keeper.publish_backlog
        rs: dict = {}
        for rb in self._volumes.values():
            for k, v in rb.stats.items():
                rs[k] = rs.get(k, 0) + v
        out["replication"] = rs
        return out


# --------------------------------------------------------------------------
# Control commands (on the overlay's control socket)

_KEY = Bytes(exact=seal.KEY_BYTES)
CTL_STATUS = frames.message("blk.ctl.status", request={}, reply={"status": AnyValue()})
CTL_PUT = frames.message(
    "blk.ctl.put",
    request={"key": _KEY, "kind": Int(1, 255), "data": Bytes(max=MAX_BLOCK),
             "r": Optional(Int(1, 16))},
    reply={"bguid": GUID, "holders": ListOf(GUID, max=64)},
)
CTL_GET = frames.message(
    "blk.ctl.get",
    request={"key": _KEY, "kind": Int(1, 255), "bguid": GUID,
             "prefer": Optional(ListOf(m.PEER, max=16))},
    reply={"data": Bytes(max=MAX_BLOCK), "source": GUID, "rejected": ListOf(GUID, max=64)},
)
CTL_REPAIR = frames.message("blk.ctl.repair", request={}, reply={"report": AnyValue()})

_CODES = [(StoreFull, "store_full"), (TooFewHolders, "too_few_holders"),
          (BlockCorrupt, "corrupt"), (BlockNotFound, "not_found")]


def _refused(e: StorageError) -> Refused:
    code = next((c for cls, c in _CODES if isinstance(e, cls)), "storage_error")
    return Refused(code, str(e))


def register_control(sn: StorageNode, control: ControlServer) -> None:
    """Add the ``blk.ctl.*`` commands to a node's control server."""

    def kind_of(body: dict) -> Kind:
        try:
            return Kind(body["kind"])
        except ValueError:
            raise Refused("bad_request", f"unknown block kind {body['kind']}") from None

    async def status(_s, body):
        return {"status": await sn.status()}

    async def put(_s, body):
        rb = sn.blocks(body["key"], r=body.get("r"))
        kind = kind_of(body)
        try:
            s = await trio.to_thread.run_sync(seal.seal, body["key"], kind, body["data"])
            acked = await rb.store_sealed([(s.bguid, s.data)])
        except StorageError as e:
            raise _refused(e) from None
        return {"bguid": s.bguid, "holders": acked.get(s.bguid, [])}

    async def get(_s, body):
        rb = sn.blocks(body["key"])
        kind = kind_of(body)
        prefer = [m.peer_of(p) for p in body.get("prefer", ())]
        try:
            f = await rb.fetch(body["bguid"], prefer=prefer)
            data = await trio.to_thread.run_sync(seal.open, body["key"], kind, f.data)
        except StorageError as e:
            raise _refused(e) from None
        return {"data": data, "source": f.source, "rejected": f.rejected}

    async def repair(_s, body):
        if sn.keeper is None:
            raise Refused("unsupported", "this node stores no blocks")
        return {"report": dict(await sn.keeper.check_all())}

    d = control.dispatcher
    d.on(CTL_STATUS, status)
    d.on(CTL_PUT, put)
    d.on(CTL_GET, get)
    d.on(CTL_REPAIR, repair)


# --------------------------------------------------------------------------
# The process


def _size(s: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = s.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        n = int(float(num) * units[unit])
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 512M, 2G)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("a size must be positive")
    return n


def _node_id(s: str) -> bytes:
    try:
        b = bytes.fromhex(s)
    except ValueError:
        b = b""
    if len(b) != 32:
        raise argparse.ArgumentTypeError(f"not a NodeID (64 hex digits): {s!r}")
    return b


def build_parser(prog: str = "python -m storage") -> argparse.ArgumentParser:
    p = overlay_run.build_parser(prog)
    p.description = "Run one p2pfs storage node: overlay routing, block store, replica repair."
    # A storage node publishes every block it holds, and each republish is a
    # routed message per salt: soft state on the overlay's test-scale 10 s
    # period would cost about 2 RPCs per held block every 10 s (with 256 MiB
    # stored at r=3, most of this machine's CPU). Longer by default; readers
    # do not depend on pointers (they fall back to the placement roots).
    p.set_defaults(republish=STORAGE_REPUBLISH, pointer_ttl=STORAGE_POINTER_TTL)
    g = p.add_argument_group("storage")
    g.add_argument("--quota", type=_size, default=1 << 30, help="block store quota (default 1G)")
    g.add_argument("--r", type=int, default=3, help="replicas per block (default 3)")
    g.add_argument("--repair-interval", type=float, default=DEFAULT_INTERVAL,
                   help="seconds between repair passes (0: only on request)")
    g.add_argument("--no-fsync", action="store_true",
                   help="do not fsync each commit: a killed process loses nothing, "
                        "a power loss may lose this node's recent copies")
    g.add_argument("--no-stage", action="store_true",
                   help="commit every small put before acknowledging it, instead of "
                        "staging it (an append to a file, committed within 0.1 s; see "
                        "SECURITY.md, Durability)")
    g.add_argument("--collector", type=_node_id, action="append", default=[],
                   help="NodeID allowed to delete blocks here (garbage collection; repeatable)")
    g.add_argument("--no-store", action="store_true", help="route and place, hold no blocks")
    return p


async def run_storage_node(opts: overlay_run.NodeOptions, args: argparse.Namespace, *,
                           ready=None) -> int:
    from overlay.wire.tls import TlsTransport

    try:
        opts.data.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = Identity.load_or_create(opts.data / overlay_run.KEY_FILE)
        store = None if args.no_store else BlockStore(
            opts.data / STORE_DIR, quota=args.quota, sync=not args.no_fsync,
            stage=not args.no_stage)
    except (IdentityError, OSError, StorageError) as e:
        log.error("cannot use data directory %s: %s", opts.data, e)
        return overlay_run.EXIT_IDENTITY
    try:
        transport = TlsTransport(identity, listen=opts.listen, advertise=opts.advertise)
        sn = StorageNode(transport, store, config=opts.config, r=args.r,
                         repair_interval=args.repair_interval, collectors=args.collector)
        try:
            control = ControlServer(sn.node, opts.data / SOCKET_NAME)
        except ControlError as e:
            log.error("%s", e)
            return overlay_run.EXIT_IDENTITY
        register_control(sn, control)
        code = overlay_run.EXIT_OK
        async with trio.open_nursery() as nursery:

            async def node_task(task_status=trio.TASK_STATUS_IGNORED):
                try:
                    await sn.run(opts.bootstrap, task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()   # the node stopped: so does the process

            try:
                me = await nursery.start(node_task)
            except JoinError as e:
                log.error("%s", e)
                return overlay_run.EXIT_JOIN
            ctl_path = await nursery.start(control.serve)
            # SIGINT/SIGTERM: leave (bounded), which stops the node and so the process.
            nursery.start_soon(_leave_on_signal, sn)
            info = {"event": "ready", "id": me.id.hex(), "addr": me.addr,
                    "bootstrap": f"{me.addr}#{me.id.hex()}", "control": ctl_path}
            (ready or _print_ready)(info)
        return code
    finally:
        if store is not None:
            store.close()


def _print_ready(info: dict) -> None:
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()


async def _leave_on_signal(sn: StorageNode) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for sig in signals:
            log.info("signal %d: leaving the overlay", sig)
            cfg = sn.node.config
            with trio.move_on_after(cfg.route_timeout + 2 * cfg.rpc_timeout):
                await sn.leave()
            sn.stop()
            return


def main(argv: list[str] | None = None, prog: str = "python -m storage") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        opts = overlay_run.options_from(args)
        if not 1 <= args.r <= 16:
            raise overlay_run.UsageError("--r must be in 1..16")
    except overlay_run.UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return overlay_run.EXIT_USAGE
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return overlay_run.run_reporting_bind_errors(prog, opts, run_storage_node, opts, args)
