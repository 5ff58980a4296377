"""The ``p2pfs`` command.

One entry point, one subcommand per job. ``main`` is the error boundary: the
project's expected errors become one line on stderr and a documented exit code;
only bugs print a traceback.

Exit codes:
    0  success
    1  the operation failed (a clear message says why)
    2  bad command-line usage
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
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
    print(f"{'identity exists' if existed else 'created identity'}: {path}\nid: {ident.id.hex()}")
    return EXIT_OK


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

    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except CliError as e:
        print(f"p2pfs {args.command}: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        print(f"p2pfs {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
