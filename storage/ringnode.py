"""A standalone inner ring member process (for real-process tests, the
benchmark, and small deployments until ``p2pfs node`` hosts ring duties).

    python -m storage.ringnode --data DIR --ring ring.json [--listen HOST:PORT]

The member's key is ``DIR/node.key`` (``--key`` to override; ``--init``
creates it and prints its public key, then exits). Its ring state lives in
LMDB under ``DIR/ring``. It listens on ``--listen`` or else on its own
address in the descriptor, serves TLS (``overlay.wire.tls``), and prints one
JSON line on stdout once it serves::

    {"ready": true, "id": HEX, "index": I, "addr": "HOST:PORT", "view": V, "exec": N}

It runs until SIGTERM or SIGINT (clean exit 0). Exit codes: 2 bad usage or
configuration (descriptor, key, not a member, or no longer one after a
reconfiguration), 3 ring store failure.
``--byzantine FAULT[,FAULT]`` makes it a faulty member (tests only; see
``storage.ring_byzantine``); ``--profile FILE`` writes a pyinstrument text
profile there on exit, ``--cpu-profile FILE`` a cProfile of CPU time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
from pathlib import Path

import trio

from overlay.lifeline import watch_parent
from overlay.wire.ids import Identity, IdentityError
from overlay.wire.tls import TlsTransport, parse_address
from overlay.wire.transport import Dispatcher

from .certificate import RingDescriptor
from .pbft import PbftConfig, Replica
from .ring import RingService
from .ring_byzantine import FAULTS, ByzantineReplica
from .ring_errors import BadDescriptor, NotAMember
from .ring_store import RingStore, RingStoreError

log = logging.getLogger("storage.ringnode")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {v}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r} (seconds)") from None
    if not 0 < v < math.inf:    # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, "
                                         f"not {text}")
    return v


def _listen(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m storage.ringnode",
                                description="Run one inner ring member.")
    p.add_argument("--data", required=True, type=Path, help="member directory (key, LMDB)")
    p.add_argument("--ring", type=Path, help="ring descriptor JSON (signed by the owner)")
    p.add_argument("--listen", type=_listen, help="HOST:PORT to listen on (default: own descriptor address)")
    p.add_argument("--key", type=Path, help="key file (default DATA/node.key)")
    p.add_argument("--init", action="store_true", help="create the key, print it, exit")
    p.add_argument("--byzantine", default="", help=f"faults, comma-separated: {FAULTS}")
    p.add_argument("--request-timeout", type=_seconds, default=1.0)
    p.add_argument("--view-change-timeout", type=_seconds, default=1.0)
    p.add_argument("--checkpoint", type=_positive_int, default=128,
                   help="checkpoint interval K")
    p.add_argument("--batch", type=_positive_int, default=64, help="requests per batch at most")
    p.add_argument("--pipeline", type=_positive_int, default=2,
                   help="batches in flight at the primary")
    p.add_argument("--no-tentative", action="store_true",
                   help="execute batches only once decided (no tentative execution)")
    p.add_argument("--commit-delay", type=float, default=0.05,
                   help="seconds the primary holds a COMMITTED for the next frame")
    p.add_argument("--no-sync", action="store_true",
                   help="never fsync, not even executed state (unsafe)")
    p.add_argument("--commit-thread", action="store_true",
                   help="commit LMDB in a worker thread (default: on the trio thread; the "
                        "hand-off costs more CPU than it saves unless cores are idle)")
    p.add_argument("--profile", type=Path, help="write a pyinstrument profile here on exit")
    p.add_argument("--cpu-profile", type=Path,
                   help="write a cProfile (CPU time) of the member here on exit")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


async def serve(args, identity: Identity, ring: RingDescriptor) -> None:
    me = ring.member(identity.id)
    listen = parse_address(args.listen or me.addr)
    store = RingStore(args.data / "ring", sync=not args.no_sync, threaded=args.commit_thread)
    cfg = PbftConfig(checkpoint_interval=args.checkpoint, window=2 * args.checkpoint,
                     batch_max=args.batch, pipeline=args.pipeline,
                     tentative=not args.no_tentative, commit_delay=args.commit_delay,
                     request_timeout=args.request_timeout,
                     view_change_timeout=args.view_change_timeout)
    faults = [f for f in args.byzantine.split(",") if f]
    kw = {"replica_cls": ByzantineReplica, "faults": faults} if faults else \
        {"replica_cls": Replica}
    transport = TlsTransport(identity, listen=listen)
    svc = RingService(identity, ring, store, transport, cfg, **kw)
    disp = Dispatcher()
    svc.register(disp)
    try:
        async with trio.open_nursery() as n:
            addr = await n.start(transport.serve, disp)
            await n.start(svc.run)
            r = svc.replica
            print(json.dumps({"ready": True, "id": identity.id.hex(), "index": r.i,
                              "addr": addr, "view": r.view, "exec": r.exec_seq}), flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for s in sigs:
                    log.warning("signal %d: stopping", s)
                    break
            n.cancel_scope.cancel()
    finally:
        await transport.aclose()
        store.close()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    key = args.key or args.data / "node.key"
    try:
        if args.init:
            ident = Identity.load_or_create(key)
            print(json.dumps({"id": ident.id.hex(), "key": ident.public_key.hex()}))
            return 0
        identity = Identity.load(key)
        if args.ring is None:
            raise BadDescriptor("--ring is required")
        ring = RingDescriptor.from_json(args.ring.read_text())
        ring.verify_owner()
        if ring.member(identity.id) is None:
            raise BadDescriptor(f"key {key} is not a member of ring {ring.ring_id.hex()[:8]}")
    except UnicodeDecodeError as e:
        print(f"ringnode: {args.ring} is not a ring descriptor (not UTF-8 text: {e.reason})",
              file=sys.stderr)
        return 2
    except (IdentityError, BadDescriptor, OSError) as e:
        print(f"ringnode: {e}", file=sys.stderr)
        return 2
    profiler = cprofiler = None
    if args.profile:
        from pyinstrument import Profiler
        profiler = Profiler(interval=0.005, async_mode="disabled")
        profiler.start()
    if args.cpu_profile:
        import cProfile
        import time
        cprofiler = cProfile.Profile(time.process_time)
        cprofiler.enable()
    watch_parent()
    try:
        trio.run(serve, args, identity, ring)
    except (NotAMember, BadDescriptor) as e:
        print(f"ringnode: {e}", file=sys.stderr)
        return 2
    except RingStoreError as e:
        print(f"ringnode: {e}", file=sys.stderr)
        return 3
    except BaseExceptionGroup as eg:
        # trio wraps errors of concurrent tasks: report the store's plainly.
        store = eg.subgroup(RingStoreError)
        if store is None:
            raise
        print(f"ringnode: {store.exceptions[0]}", file=sys.stderr)
        return 3
    finally:
        if profiler is not None:
            profiler.stop()
            args.profile.write_text(profiler.output_text(unicode=False, color=False))
        if cprofiler is not None:
            cprofiler.disable()
            cprofiler.dump_stats(args.cpu_profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
