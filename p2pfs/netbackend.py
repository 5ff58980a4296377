"""The network volume: blocks replicated on a p2pfs network (DESIGN.md
"Process model": ``p2pfs mount`` runs a node of its own, like an Ivy client
with its DHash server).

Attaching starts a client node in the mounting process: a Tapestry node on
the TLS transport that joins the network through the volume's bootstrap
nodes and holds no blocks itself (``StorageNode(..., store=None)``). Blocks
go through ``storage.replication.ReplicatedBlocks``: sealed here, stored on
r distinct holders chosen by the overlay's salted roots, verified on every
read. Storage nodes never see the volume key.

Log-heads: this version keeps each writer's signed log-head in the volume
directory (``heads/``, the same LMDB board as the single-node volume), so a
network volume has one writer per volume directory. Certifying heads through
the inner ring, which lets writers on other machines share a volume and stops
a storage node from rolling a log back, is the ring-board step that follows;
the seam is ``Session.board``.

Layout of a network volume directory (written by :func:`mkfs_network`)::

    FORMAT        JSON: {"format": 1, "kind": "network", "r": 3,
                         "bootstrap": ["HOST:PORT#NODEID", ...]}
    identity.key  the writer's Ed25519 key (mode 0600); it owns the volume
    node.key      the client node's own key (its NodeID on the network)
    view          the signed view, with the volume key wrapped for the writer
    heads/        LMDB log-head board
    lock          flock'ed while a process has the volume attached
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import AsyncIterator

import trio

from overlay.errors import JoinError
from overlay.run import UsageError, parse_bootstrap
from overlay.wire.ids import Identity, IdentityError
from overlay.wire.tls import TlsTransport
from storage.errors import StorageError
from storage.localstore import LocalHeadBoard
from storage.server import StorageNode
from storage.volume import View, create_volume

from .backend import Backend, BackendError, LocalBackend, Session, _atomic_write

NETWORK_FORMAT = 1


def mkfs_network(volume_dir: str | Path, bootstrap: list[str], *, r: int = 3,
                 name: str = "p2pfs", identity: Identity | None = None) -> View:
    """Create a network volume directory naming its bootstrap nodes."""
    d = Path(volume_dir)
    if not bootstrap:
        raise BackendError("a network volume needs at least one bootstrap node (HOST:PORT#NODEID)")
    try:
        for b in bootstrap:
            parse_bootstrap(b)
    except UsageError as e:
        raise BackendError(str(e)) from None
    if not 1 <= r <= 16:
        raise BackendError("r (copies of each block) must be in 1..16")
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise BackendError(f"cannot create a volume in {d}: it exists and is not an empty directory")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    ident = identity or Identity.generate()
    try:
        ident.save(d / "identity.key")
        Identity.generate().save(d / "node.key")
    except IdentityError as e:
        raise BackendError(str(e)) from None
    view, _key = create_volume(ident, name)
    _atomic_write(d / "view", view.encode())
    LocalHeadBoard(d / "heads").close()
    fmt = {"format": NETWORK_FORMAT, "kind": "network", "r": r, "bootstrap": list(bootstrap)}
    _atomic_write(d / "FORMAT", json.dumps(fmt).encode() + b"\n")
    return view


class NetworkBackend(LocalBackend):
    """The network volume in ``volume_dir`` (module docstring). Shares the
    single-node backend's directory locking."""

    def _read_format(self) -> dict:
        try:
            fmt = json.loads((self.dir / "FORMAT").read_text())
        except FileNotFoundError:
            raise BackendError(f"{self.dir} is not a p2pfs volume (no FORMAT file)") from None
        except (OSError, ValueError) as e:
            raise BackendError(f"{self.dir}/FORMAT is unreadable: {e}") from None
        if not isinstance(fmt, dict) or fmt.get("kind") != "network" or fmt.get(
                "format") != NETWORK_FORMAT:
            raise BackendError(f"{self.dir}: {fmt!r} is not a network volume of format "
                               f"{NETWORK_FORMAT}")
        try:
            fmt["peers"] = [parse_bootstrap(b) for b in fmt["bootstrap"]]
        except (KeyError, TypeError, UsageError) as e:
            raise BackendError(f"{self.dir}/FORMAT: bad bootstrap list: {e}") from None
        if not isinstance(fmt.get("r"), int) or not 1 <= fmt["r"] <= 16:
            raise BackendError(f"{self.dir}/FORMAT: bad r {fmt.get('r')!r}")
        return fmt

    @contextlib.asynccontextmanager
    async def attach(self) -> AsyncIterator[Session]:
        fmt = self._read_format()
        with self._locked():
            try:
                identity = Identity.load(self.dir / "identity.key")
                node_identity = Identity.load(self.dir / "node.key")
                view = View.decode((self.dir / "view").read_bytes())
                key = view.volume_key(identity)
                board = LocalHeadBoard(self.dir / "heads")
            except (IdentityError, StorageError, OSError) as e:
                raise BackendError(f"cannot open volume {self.dir}: {e}") from None
            try:
                transport = TlsTransport(node_identity, listen=("127.0.0.1", 0))
                sn = StorageNode(transport, None, r=fmt["r"])
                async with trio.open_nursery() as nursery:
                    try:
                        await nursery.start(sn.run, fmt["peers"])
                    except JoinError as e:
                        raise BackendError(f"cannot join the network through "
                                           f"{', '.join(fmt['bootstrap'])}: {e}") from None
                    blocks = sn.blocks(key, r=fmt["r"])
                    try:
                        yield Session(identity, view, blocks, board, replicas=fmt["r"],
                                      description=f"network volume {view.name!r} "
                                                  f"(r={fmt['r']}) in {self.dir}")
                    finally:
                        with trio.move_on_after(5) as cs:
                            cs.shield = True
                            await sn.leave()
                        sn.stop()
                        nursery.cancel_scope.cancel()
            finally:
                board.close()
