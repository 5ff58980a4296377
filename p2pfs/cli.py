"""The ``p2pfs`` command.

One entry point, one subcommand per job. ``main`` is the error boundary: the
project's expected errors become one line on stderr and a documented exit code;
only bugs print a traceback.

Exit codes:
    0  success
    1  the operation failed (a clear message says why)
    2  bad command-line usage
  130  interrupted (Ctrl-C)

``p2pfs fsck`` has its own, for scripts (``p2pfs.fsck``): 0 clean, 1 every
problem found was repaired, 2 problems are left, 4 the volume could not be
checked.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from . import __version__

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class CliError(Exception):
    """An expected failure of a command, reported as one line and exit code 1."""


def default_home() -> Path:
    return Path(os.environ.get("P2PFS_HOME", Path.home() / ".p2pfs"))


def cmd_init(args) -> int:
    from overlay.wire.ids import Identity, IdentityError

    path = Path(args.home) / "identity.key"
    existed = path.exists()
    try:
        ident = Identity.load_or_create(path)
    except IdentityError as e:
        raise CliError(str(e)) from None
    print(f"{'identity exists' if existed else 'created identity'}: {path}\nid: {ident.id.hex()}\n"
          f"public key: {ident.public_key.hex()}")
    return EXIT_OK


def cmd_node(args) -> int:
    from storage.server import main as storage_main

    return storage_main(args.node_args, prog="p2pfs node")


def _backend_for(volume_dir: str):
    from .backend import LocalBackend, is_local_volume
    from .netbackend import NetworkBackend

    try:
        fmt = json.loads((Path(volume_dir) / "FORMAT").read_text())
    except (OSError, ValueError):
        if not Path(volume_dir).exists():
            raise CliError(f"{volume_dir}: no such volume directory (create one with p2pfs mkfs)")
        raise CliError(f"{volume_dir} is not a p2pfs volume (no readable FORMAT file)")
    if not isinstance(fmt, dict):
        raise CliError(f"{volume_dir} is not a p2pfs volume (its FORMAT file is not a JSON object)")
    return NetworkBackend(volume_dir) if fmt.get("kind") == "network" else LocalBackend(volume_dir)


def _home_identity(args):
    from overlay.wire.ids import Identity, IdentityError

    path = Path(args.home) / "identity.key"
    if not path.exists():
        raise CliError(f"no identity at {path}: create one with p2pfs init")
    try:
        return Identity.load(path)
    except IdentityError as e:
        raise CliError(str(e)) from None


def cmd_mkfs(args) -> int:
    from .admin import load_ring
    from .backend import BackendError, mkfs_local
    from .netbackend import mkfs_network

    if args.ring and not args.bootstrap:
        raise CliError("--ring needs --bootstrap: a ring certifies a network volume")
    try:
        if args.bootstrap:
            ring = load_ring(Path(args.ring)) if args.ring else None
            ident = _home_identity(args) if ring else None
            view = mkfs_network(args.volume_dir, args.bootstrap, r=args.replicas, name=args.name,
                                identity=ident, ring=ring)
            kind = f"network volume (r={args.replicas}" + (
                f", inner ring of {ring.n})" if ring else ", no inner ring: one writer)")
        else:
            view = mkfs_local(args.volume_dir, name=args.name)
            kind = "single-node volume"
    except BackendError as e:
        raise CliError(str(e)) from None
    print(f"created {kind} {view.name!r} in {args.volume_dir}")
    return EXIT_OK


def cmd_ring_init(args) -> int:
    from .admin import ring_init

    ring = ring_init(_home_identity(args), args.member, Path(args.output), f=args.f,
                     name=args.name)
    print(f"wrote {args.output}: ring {ring.ring_id.hex()[:16]} of {ring.n} members (f={ring.f}),"
          f" owner {ring.owner.hex()[:16]}\nstart each member with: p2pfs ring-member --data DIR "
          f"--ring {args.output}")
    return EXIT_OK


def cmd_add_writer(args) -> int:
    import trio

    from .admin import add_writer

    try:
        key = bytes.fromhex(args.public_key)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise CliError("the writer's public key is 64 hex digits (p2pfs init prints it)")
    out = trio.run(add_writer, Path(args.volume_dir), key, Path(args.ticket))
    print(f"added writer {out['writer'][:16]} (view version {out['view_version']}); give it "
          f"{out['ticket']} and let it run: p2pfs join {out['ticket']} VOLUME_DIR")
    return EXIT_OK


def cmd_remove_writer(args) -> int:
    import trio

    from .admin import remove_writer

    out = trio.run(remove_writer, Path(args.volume_dir), args.writer)
    print(f"removed writer {out['writer'][:16]} (view version {out['view_version']}); its "
          f"records up to seq {out['last_seq']} still count, later ones are ignored")
    return EXIT_OK


def cmd_join(args) -> int:
    from .admin import join

    out = join(Path(args.ticket), Path(args.volume_dir), _home_identity(args))
    print(f"joined volume {out['volume']!r} ({out['writers']} writers) in {out['dir']}; "
          f"mount it with: p2pfs mount {out['dir']} MOUNTPOINT")
    return EXIT_OK


def cmd_status(args) -> int:
    import trio

    from .admin import status

    backend = _backend_for(args.volume_dir)
    from .netbackend import NetworkBackend

    if not isinstance(backend, NetworkBackend):
        raise CliError(f"{args.volume_dir} is a single-node volume: nothing on a network to "
                       f"report")
    out = trio.run(status, Path(args.volume_dir))
    if args.json:
        print(json.dumps(out, indent=1))
        return EXIT_OK
    print(f"volume {out['volume']!r} ({out['id'][:16]}), r={out['r']}")
    print(f"overlay: client {out['overlay']['client'][:16]}, "
          f"{out['overlay']['neighbours']} neighbours")
    ring = out["ring"]
    if ring is None:
        print("inner ring: none (log-heads kept locally: one writer)")
    else:
        print(f"inner ring {ring['id'][:16]} epoch {ring['epoch']}: {ring['members_up']}/"
              f"{len(ring['members'])} members up, quorum {ring['quorum']}: "
              f"{'healthy' if ring['healthy'] else 'NO QUORUM: updates wait'}")
        for m in ring["members"]:
            state = (f"up, view {m['view']}, executed {m['executed']}" if m["up"]
                     else f"DOWN ({m['error']})")
            print(f"  member {m['id'][:16]} at {m['addr']}: {state}")
    print(f"writers (view version {out.get('view_version', 1)}):")
    for w in out["writers"]:
        extra = f", {w['certified_heads']} certified heads" if "certified_heads" in w else ""
        print(f"  {w['id'][:16]}{' (owner)' if w.get('owner') else ''}"
              f"{'' if w['active'] else ' removed'}{extra}")
    return EXIT_OK if ring is None or ring["healthy"] else EXIT_FAIL


def cmd_conflicts(args) -> int:
    from .admin import conflicts

    found = conflicts(Path(args.mountpoint))
    if args.json:
        print(json.dumps(found, indent=1))
    elif not found:
        print("no conflicts")
    else:
        for c in found:
            print(json.dumps(c))
    return EXIT_OK


def cmd_ring_member(args) -> int:
    from storage.ringnode import main as ring_main

    return ring_main(args.member_args)


def cmd_mount(args) -> int:
    import trio

    from .backend import BackendError
    from .mount import MountError, serve

    backend = _backend_for(args.volume_dir)
    try:
        trio.run(lambda: serve(backend, args.mountpoint, debug=args.debug,
                               sync_close=args.sync_close))
    except (MountError, BackendError) as e:
        raise CliError(str(e)) from None
    return EXIT_OK


def cmd_umount(args) -> int:
    from .mount import MountError, is_mounted, unmount

    if not is_mounted(args.mountpoint):
        raise CliError(f"{args.mountpoint} is not mounted")
    try:
        unmount(args.mountpoint, lazy=args.lazy)
    except MountError as e:
        raise CliError(str(e)) from None
    print(f"unmounted {args.mountpoint}")
    return EXIT_OK


def cmd_demo(args) -> int:
    from .demo import DemoError, run_demo

    try:
        return run_demo(args.mountpoint, nodes=args.nodes, replicas=args.replicas,
                        data=args.data, debug=args.debug, ring_size=args.ring)
    except DemoError as e:
        raise CliError(str(e)) from None


def cmd_fsck(args) -> int:
    from .fsck import run

    return run(args.volume_dir, do_repair=args.repair, as_json=args.json,
               verify_data=not args.quick, quiet=args.quiet)


def cmd_inspect(args) -> int:
    from .inspect import run

    return run(args.what, args, args.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p2pfs",
        description="A peer-to-peer read/write file system: Tapestry routing, "
        "OceanStore-style certified versions, Ivy-style multi-writer logs, mounted with FUSE.",
    )
    p.add_argument("--version", action="version", version=f"p2pfs {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("init", help="create this user's identity (an Ed25519 key pair)")
    s.add_argument("--home", default=str(default_home()),
                   help="directory holding identity.key (default: $P2PFS_HOME or ~/.p2pfs)")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("node", help="run a storage node (overlay routing, block store, repair)",
                       add_help=False, description="Run one p2pfs node; see p2pfs node --help.")
    s.add_argument("node_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_node)

    s = sub.add_parser("mkfs", help="create a volume (single-node, or on a network with --bootstrap)")
    s.add_argument("volume_dir", help="an empty or missing directory to hold the volume's keys and state")
    s.add_argument("--bootstrap", action="append", default=[], metavar="HOST:PORT#NODEID",
                   help="a node of the network to keep the blocks on (repeatable); none: single-node")
    s.add_argument("-r", "--replicas", type=int, default=3, help="copies of each block (default 3)")
    s.add_argument("--name", default="p2pfs", help="the volume's name (default p2pfs)")
    s.add_argument("--ring", metavar="RING.json",
                   help="the volume's inner ring (from p2pfs ring-init, signed by this user's "
                        "identity, which owns the volume): certified heads, several writers")
    s.add_argument("--home", default=str(default_home()), help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_mkfs)

    s = sub.add_parser("ring-init", help="write an inner ring descriptor signed by this user")
    s.add_argument("-o", "--output", required=True, help="file to write (ring.json)")
    s.add_argument("--member", action="append", default=[], required=True,
                   metavar="PUBKEY@HOST:PORT", help="a member (3f+1 of them; repeatable)")
    s.add_argument("-f", type=int, default=1, help="faulty members tolerated (default 1)")
    s.add_argument("--name", default="ring", help="a name for the ring")
    s.add_argument("--home", default=str(default_home()), help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_ring_init)

    s = sub.add_parser("ring-member", help="run an inner ring member; see p2pfs ring-member "
                                           "--help", add_help=False)
    s.add_argument("member_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_ring_member)

    s = sub.add_parser("add-writer", help="let another user write to a volume (owner only)")
    s.add_argument("volume_dir")
    s.add_argument("public_key", help="the new writer's public key (64 hex digits)")
    s.add_argument("--ticket", required=True, help="write the join ticket here")
    s.set_defaults(func=cmd_add_writer)

    s = sub.add_parser("remove-writer", help="stop accepting a writer's changes (owner only)")
    s.add_argument("volume_dir")
    s.add_argument("writer", help="the writer's id (8+ hex digits, from p2pfs status) or key")
    s.set_defaults(func=cmd_remove_writer)

    s = sub.add_parser("join", help="set up this user's directory for a volume it was added to")
    s.add_argument("ticket", help="the ticket from p2pfs add-writer")
    s.add_argument("volume_dir", help="an empty or missing directory")
    s.add_argument("--home", default=str(default_home()), help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_join)

    s = sub.add_parser("status", help="a network volume's ring, writers and overlay")
    s.add_argument("volume_dir")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("conflicts", help="list the conflicts of a mounted volume")
    s.add_argument("mountpoint")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_conflicts)

    s = sub.add_parser(
        "fsck", help="check a volume (and --repair it)",
        description="Check everything reachable from a volume's view: certificates, log-heads, "
                    "logs, snapshots and every block's copies. Exit codes: 0 clean, 1 every "
                    "problem was repaired, 2 problems are left, 4 the volume could not be "
                    "checked.")
    s.add_argument("volume_dir")
    s.add_argument("--repair", action="store_true",
                   help="restore missing copies, fix stale certificates, rebuild snapshots "
                        "from the logs, quarantine what cannot be trusted (deletes nothing)")
    s.add_argument("--quick", action="store_true",
                   help="trust holders that say they hold a block (do not fetch and hash "
                        "every copy)")
    s.add_argument("--json", action="store_true", help="the report as one JSON object")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    s.set_defaults(func=cmd_fsck)

    s = sub.add_parser("inspect", help="look inside a node or a volume (read-only)")
    isub = s.add_subparsers(dest="what", metavar="WHAT", required=True)
    i = isub.add_parser("node", help="a node's routing table, pointers and store")
    i.add_argument("target", help="the node's data directory or control socket")
    i = isub.add_parser("volume", help="the view, ring members and health, writers' heads")
    i.add_argument("volume")
    i = isub.add_parser("object", help="each ring member's certificate of an object")
    i.add_argument("volume")
    i.add_argument("object", help="'view', a writer id (prefix) for its log-head, or an AGUID")
    i = isub.add_parser("log", help="a writer's log records, decoded")
    i.add_argument("volume")
    i.add_argument("writer", help="the writer's id (or a prefix of it)")
    i.add_argument("--from", dest="start", type=int, default=1, help="first seq (default 1)")
    i.add_argument("--limit", type=int, default=100, help="records at most (default 100)")
    i = isub.add_parser("block", help="a block's holders, their copies, and its content")
    i.add_argument("volume")
    i.add_argument("bguid")
    i = isub.add_parser("file", help="a file's extents and each block's holders")
    i.add_argument("volume")
    i.add_argument("path", help="the file's path inside the volume (/dir/name)")
    for i in isub.choices.values():
        i.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("mount", help="mount a volume (foreground; Ctrl-C or p2pfs umount to stop)")
    s.add_argument("volume_dir")
    s.add_argument("mountpoint", help="an empty directory")
    s.add_argument("--debug", action="store_true", help="log every FUSE request")
    s.add_argument("--sync-close", action="store_true",
                   help="a close also waits for this writer's new log-head to reach the local "
                        "disk, as fsync does (default: within 0.1 s; SECURITY.md, Durability)")
    s.set_defaults(func=cmd_mount)

    s = sub.add_parser("umount", help="unmount a mounted volume")
    s.add_argument("mountpoint")
    s.add_argument("--lazy", action="store_true", help="detach now even if busy")
    s.set_defaults(func=cmd_umount)

    s = sub.add_parser("demo", help="start an embedded local network and mount a volume on it")
    s.add_argument("mountpoint", help="an empty directory (created if missing)")
    s.add_argument("-n", "--nodes", type=int, default=4, help="node processes to start (default 4)")
    s.add_argument("-r", "--replicas", type=int, default=3, help="copies of each block (default 3)")
    s.add_argument("--ring", type=int, default=4, metavar="N",
                   help="inner ring members, 3f+1 (default 4); 0: none, heads kept locally")
    s.add_argument("--data", help="keep the network's state here (default: a temporary directory, "
                                  "removed at exit)")
    s.add_argument("--debug", action="store_true", help="log every FUSE request")
    s.set_defaults(func=cmd_demo)

    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["node"]:
        # The node's own parser owns all its options (and --help).
        from storage.server import main as storage_main

        return storage_main(argv[1:], prog="p2pfs node")
    if argv[:1] == ["ring-member"]:
        from storage.ringnode import main as ring_main

        return ring_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BaseException as e:  # the one error boundary (module docstring)
        inner = unwrap_group(e)
        if isinstance(inner, expected_errors()):
            print(f"p2pfs {args.command}: {inner}", file=sys.stderr)
            return EXIT_FAIL
        if isinstance(inner, KeyboardInterrupt):
            print(f"p2pfs {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        raise


def unwrap_group(e: BaseException) -> BaseException:
    """The single error inside (nested) one-member exception groups, as trio's
    nurseries wrap what their tasks raise."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's or the environment's, not bugs: reported as
    one line and exit code 1."""
    from storage.errors import StorageError

    from .backend import BackendError
    from .demo import DemoError
    from .mount import MountError

    # OSError: the environment refused (a path that is a file, no space,
    # no permission); the message names the path.
    return (CliError, BackendError, MountError, DemoError, StorageError, OSError, _ring_error())


def _ring_error() -> type[BaseException]:
    from storage.ring_errors import RingError

    return RingError


if __name__ == "__main__":
    sys.exit(main())
