"""A standalone overlay node process: ``python -m overlay`` (and, through
``run_node``/``main``, ``p2pfs node``).

::

    python -m overlay --listen 127.0.0.1:0 --data DIR \\
        [--bootstrap HOST:PORT#NODEID ...] [--heartbeat S] [--republish S] ...

* The node's identity is ``DIR/node.key`` (Ed25519, PKCS#8 PEM, mode 0600),
  created on first start.
* Bootstrap addresses are ``HOST:PORT#NODEID``: the 64 hex digits of the
  gateway's NodeID are needed because every connection authenticates the peer
  against the ID it expects (DESIGN.md "Wire"). A running node prints both in
  its ready line, and ``tap.ctl.status`` reports them.
* Once serving (and joined, when bootstrap addresses were given) the process
  prints one JSON line on stdout and nothing else there::

      {"event": "ready", "id": "<hex>", "addr": "127.0.0.1:PORT",
       "bootstrap": "127.0.0.1:PORT#<hex>", "control": "DIR/control.sock"}

* Logs (joins, repairs, dropped neighbours, failures) go to stderr.
* ``DIR/control.sock`` is the control interface (``overlay/control.py``).
* SIGINT or SIGTERM: leave the overlay gracefully (bounded in time), exit 0.

Exit codes: 0 stopped (left, signal, or ``tap.ctl.leave``); 2 bad arguments;
3 no bootstrap node could be joined; 4 identity or data directory unusable.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import lifeline
from .config import OverlayConfig
from .control import SOCKET_NAME, ControlError, ControlServer
from .errors import JoinError
from .node import TapestryNode
from .wire.ids import IdentityError, Identity
from .wire.transport import Peer

log = logging.getLogger("overlay.run")

EXIT_OK, EXIT_USAGE, EXIT_JOIN, EXIT_IDENTITY = 0, 2, 3, 4
KEY_FILE = "node.key"


class UsageError(Exception):
    """A command-line value is malformed (exit code 2)."""


def parse_bootstrap(s: str) -> Peer:
    """``HOST:PORT#NODEID`` (64 hex digits) as a Peer; UsageError if not."""
    addr, sep, hexid = s.rpartition("#")
    if not sep or not addr:
        raise UsageError(f"bootstrap {s!r}: expected HOST:PORT#NODEID")
    try:
        node_id = bytes.fromhex(hexid)
    except ValueError:
        node_id = b""
    if len(node_id) != 32:
        raise UsageError(f"bootstrap {s!r}: NODEID must be 64 hex digits")
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"bootstrap {s!r}: expected HOST:PORT before '#'")
    return Peer(node_id, addr)


def parse_listen(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"listen address {s!r}: expected HOST:PORT (port 0: any free port)")
    return host, int(port)


@dataclass
class NodeOptions:
    data: Path
    listen: tuple[str, int] = ("127.0.0.1", 0)
    bootstrap: list[Peer] = field(default_factory=list)
    config: OverlayConfig = field(default_factory=OverlayConfig)
    advertise: str | None = None


def build_parser(prog: str = "python -m overlay") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run one Tapestry overlay node.")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default %(default)s)")
    p.add_argument("--data", required=True, help="data directory (identity, control socket)")
    p.add_argument("--bootstrap", action="append", default=[], metavar="HOST:PORT#NODEID",
                   help="a node to join through (repeatable; the first that works is used)")
    p.add_argument("--advertise", help="address to give others, if not the listen address")
    d = OverlayConfig()
    p.add_argument("--heartbeat", type=float, default=d.heartbeat_interval, help="seconds between heartbeats")
    p.add_argument("--dead-after", type=float, default=d.dead_after, help="drop a silent neighbour after this")
    p.add_argument("--republish", type=float, default=d.republish_interval, help="seconds between republishes")
    p.add_argument("--pointer-ttl", type=float, default=d.pointer_ttl, help="pointer lifetime in seconds")
    p.add_argument("--repair", type=float, default=d.repair_interval, help="seconds between repair rounds")
    p.add_argument("--hop-timeout", type=float, default=d.hop_timeout, help="seconds a next hop has to accept")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def options_from(args: argparse.Namespace) -> NodeOptions:
    cfg = OverlayConfig(heartbeat_interval=args.heartbeat, dead_after=args.dead_after,
                        backpointer_ttl=args.dead_after + args.heartbeat,
                        republish_interval=args.republish, pointer_ttl=args.pointer_ttl,
                        repair_interval=args.repair, hop_timeout=args.hop_timeout)
    try:
        cfg.check()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return NodeOptions(data=Path(args.data), listen=parse_listen(args.listen),
                       bootstrap=[parse_bootstrap(b) for b in args.bootstrap],
                       config=cfg, advertise=args.advertise)


async def run_node(opts: NodeOptions, *, ready=None) -> int:
    """Run a node until it leaves or is signalled; returns the exit code.
    ``ready(info: dict)`` is called once serving and joined (default: print
    the ready JSON line on stdout)."""
    from .wire.tls import TlsTransport   # the real transport; the simulator never needs it

    try:
        opts.data.mkdir(mode=0o700, parents=True, exist_ok=True)
        identity = Identity.load_or_create(opts.data / KEY_FILE)
    except (IdentityError, OSError) as e:
        log.error("cannot use data directory %s: %s", opts.data, e)
        return EXIT_IDENTITY
    transport = TlsTransport(identity, listen=opts.listen, advertise=opts.advertise)
    node = TapestryNode(transport, config=opts.config)
    try:
        control = ControlServer(node, opts.data / SOCKET_NAME)
    except ControlError as e:
        log.error("%s", e)
        return EXIT_IDENTITY
    code = EXIT_OK
    async with trio.open_nursery() as nursery:

        async def node_task(task_status=trio.TASK_STATUS_IGNORED):
            try:
                await node.run(task_status=task_status)
            finally:
                nursery.cancel_scope.cancel()   # the node stopped: so does the process

        me = await nursery.start(node_task)
        ctl_path = await nursery.start(control.serve)
        if opts.bootstrap:
            try:
                await node.join(opts.bootstrap)
            except JoinError as e:
                log.error("%s", e)
                code = EXIT_JOIN
                nursery.cancel_scope.cancel()
                return code
        else:
            node.joined = True
            log.info("node %s started a new overlay on %s", me.id.hex()[:8], me.addr)
        info = {"event": "ready", "id": me.id.hex(), "addr": me.addr,
                "bootstrap": f"{me.addr}#{me.id.hex()}", "control": ctl_path}
        (ready or _print_ready)(info)
        nursery.start_soon(_on_signal, node)
    return code


def _print_ready(info: dict) -> None:
    sys.stdout.write(json.dumps(info) + "\n")
    sys.stdout.flush()


async def _on_signal(node: TapestryNode) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for sig in signals:
            log.info("signal %d: leaving the overlay", sig)
            with trio.move_on_after(node.config.route_timeout + 2 * node.config.rpc_timeout):
                await node.maint.leave()
            node.stop()
            return


def main(argv: list[str] | None = None, prog: str = "python -m overlay") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        opts = options_from(args)
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_reporting_bind_errors(prog, opts, run_node, opts)


def run_reporting_bind_errors(prog: str, opts: NodeOptions, fn, *args) -> int:
    """``trio.run(fn, *args)``; a listen address that cannot be bound (in
    use, not ours) is one line and exit code 4, not a traceback."""
    lifeline.watch_parent()
    try:
        return trio.run(fn, *args)
    except BaseExceptionGroup as group:
        inner = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if isinstance(inner, OSError):
            host, port = opts.listen
            print(f"{prog}: error: cannot listen on {host}:{port}: {inner.strerror or inner}",
                  file=sys.stderr)
            return EXIT_IDENTITY
        raise
