"""The network volume: blocks replicated on a p2pfs network, log-heads and
the view certified by the volume's inner ring (DESIGN.md "Process model":
``p2pfs mount`` runs a node of its own, like an Ivy client with its DHash
server).

Attaching starts a client node in the mounting process: a Tapestry node on
the TLS transport that joins the network through the volume's bootstrap
nodes and holds no blocks itself (``StorageNode(..., store=None)``). Blocks
go through ``storage.replication.ReplicatedBlocks``: sealed here, stored on
r distinct holders chosen by the overlay's salted roots, verified on every
read. Storage nodes never see the volume key.

With an inner ring (``ring.json`` in the volume directory, an owner-signed
``RingDescriptor``), log-heads go through ``storage.ringboard``: each
writer's head is a ring object, certified by 2f+1 members, so writers on
other machines share the volume and a storage node cannot roll a log back;
while the ring is unreachable a writer keeps working on its own signed heads
(kept in ``heads/``) and certifies them when it is back. The view is a ring
object too: attaching adopts a newer certified view (a writer added or
removed), and the owner's first attach publishes it. Without a ring (older
volumes, tests), heads live only in ``heads/``: one writer per volume.

Layout of a network volume directory (written by :func:`mkfs_network` or
:func:`join_network`)::

    FORMAT        JSON: {"format": 1, "kind": "network", "r": 3,
                         "bootstrap": ["HOST:PORT#NODEID", ...], "ring": true|false}
    identity.key  this writer's Ed25519 key (mode 0600)
    node.key      the client node's own key (its NodeID on the network)
    view          the newest signed view known here (the volume key wrapped
                  for each writer)
    ring.json     the inner ring's descriptor, signed by the volume owner
    heads/        LMDB: this writer's own newest log-head (and, ringless, all)
    quarantine.json  what ``p2pfs fsck --repair`` found untrustworthy (if any)
    lock          flock'ed while a process has the volume attached
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
from pathlib import Path
from typing import AsyncIterator

import trio

from overlay.errors import JoinError
from overlay.run import UsageError, parse_bootstrap
from overlay.wire.ids import Identity, IdentityError
from overlay.wire.tls import TlsTransport
from storage.certificate import RingDescriptor
from storage.errors import StorageError
from storage.localstore import LocalHeadBoard
from storage.ring_errors import BadDescriptor, RingError
from storage.logs import decode_head
from storage.ringboard import RingHeadBoard, fetch_view, head_aguid, publish_view
from storage.ringclient import RingClient
from storage.server import StorageNode
from storage.volume import View, create_volume

from .backend import BackendError, LocalBackend, Session, _atomic_write

log = logging.getLogger(__name__)

NETWORK_FORMAT = 1
VIEW_TIMEOUT = 15.0          # attaching waits this long for the ring's view


def local_address(peers) -> str:
    """The address of this machine on the way to the first reachable-looking
    bootstrap node: the client node listens there, since routed results come
    back to the address it gives (127.0.0.1 only works when every node shares
    this machine's loopback). A UDP "connect" sends nothing; it only asks the
    kernel for the route."""
    for p in peers:
        host = p.addr.rsplit(":", 1)[0].strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((host, 9))
                return s.getsockname()[0]
        except OSError:
            continue
    return "127.0.0.1"


def _check_bootstrap(bootstrap: list[str], r: int) -> None:
    if not bootstrap:
        raise BackendError("a network volume needs at least one bootstrap node (HOST:PORT#NODEID)")
    try:
        for b in bootstrap:
            parse_bootstrap(b)
    except UsageError as e:
        raise BackendError(str(e)) from None
    if not 1 <= r <= 16:
        raise BackendError("r (copies of each block) must be in 1..16")


def _fresh_dir(d: Path) -> None:
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise BackendError(f"cannot create a volume in {d}: it exists and is not an empty directory")
    d.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_volume(d: Path, ident: Identity, view: View, bootstrap: list[str], r: int,
                  ring: RingDescriptor | None) -> None:
    try:
        ident.save(d / "identity.key")
        Identity.generate().save(d / "node.key")
    except IdentityError as e:
        raise BackendError(str(e)) from None
    _atomic_write(d / "view", view.encode())
    if ring is not None:
        _atomic_write(d / "ring.json", ring.to_json().encode())
    LocalHeadBoard(d / "heads").close()
    fmt = {"format": NETWORK_FORMAT, "kind": "network", "r": r, "bootstrap": list(bootstrap),
           "ring": ring is not None}
    _atomic_write(d / "FORMAT", json.dumps(fmt).encode() + b"\n")   # last: the volume exists


def mkfs_network(volume_dir: str | Path, bootstrap: list[str], *, r: int = 3,
                 name: str = "p2pfs", identity: Identity | None = None,
                 ring: RingDescriptor | None = None) -> View:
    """Create a network volume directory naming its bootstrap nodes and, if
    given, its inner ring (whose members must name the owner ``identity``'s
    key as their owner). The view reaches the ring on the first attach."""
    d = Path(volume_dir)
    _check_bootstrap(bootstrap, r)
    ident = identity or Identity.generate()
    if ring is not None:
        try:
            ring.verify_owner()
        except BadDescriptor as e:
            raise BackendError(f"the ring descriptor is not valid: {e}") from None
        if ring.owner != ident.public_key:
            raise BackendError("the ring descriptor is signed by another owner than the "
                               "volume's: sign it with the volume owner's key")
    _fresh_dir(d)
    view, _key = create_volume(ident, name, ring=[m.id for m in ring.members] if ring else [])
    _write_volume(d, ident, view, bootstrap, r, ring)
    return view


def write_ticket(volume_dir: str | Path, view: View) -> dict:
    """What another writer needs to join (no secrets: the volume key in the
    view is wrapped for each writer's own key)."""
    d = Path(volume_dir)
    fmt = json.loads((d / "FORMAT").read_text())
    if not fmt.get("ring"):
        raise BackendError("only a volume with an inner ring can have several writers "
                           "(create it with a ring)")
    return {"p2pfs-ticket": 1, "bootstrap": fmt["bootstrap"], "r": fmt["r"],
            "ring": json.loads((d / "ring.json").read_text()), "view": view.encode().hex()}


def join_network(volume_dir: str | Path, ticket: dict, identity: Identity) -> View:
    """Create this writer's directory for a volume it was added to."""
    try:
        if ticket.get("p2pfs-ticket") != 1:
            raise ValueError("not a p2pfs ticket")
        view = View.decode(bytes.fromhex(ticket["view"]))
        view.verify()
        ring = RingDescriptor.from_json(json.dumps(ticket["ring"]))
        ring.verify_owner()
        bootstrap, r = list(ticket["bootstrap"]), int(ticket["r"])
    except (KeyError, TypeError, ValueError, StorageError, RingError) as e:
        raise BackendError(f"bad ticket: {e}") from None
    if ring.owner != view.owner:
        raise BackendError("bad ticket: the ring and the view name different owners")
    try:
        view.participant(identity.id)
    except StorageError:
        raise BackendError("this identity is not a writer of the volume in the ticket: ask "
                           "the owner to run p2pfs add-writer with its key") from None
    _check_bootstrap(bootstrap, r)
    d = Path(volume_dir)
    _fresh_dir(d)
    _write_volume(d, identity, view, bootstrap, r, ring)
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

    def _ring(self) -> RingDescriptor:
        try:
            ring = RingDescriptor.from_json((self.dir / "ring.json").read_text())
            ring.verify_owner()
        except (OSError, ValueError, RingError) as e:
            raise BackendError(f"{self.dir}/ring.json: {e}") from None
        return ring

    @contextlib.asynccontextmanager
    async def connect(self, fmt: dict | None = None, *,
                      ephemeral: bool = True) -> AsyncIterator["Connection"]:
        """A client node joined to the volume's network, with a ring client
        signing as this writer (no volume lock: for admin commands, and
        inside :meth:`attach`). ``ephemeral``: the node gets a fresh NodeID,
        so it can run beside this volume's mount (which uses ``node.key``:
        two live nodes must never share an id)."""
        fmt = fmt or self._read_format()
        try:
            identity = Identity.load(self.dir / "identity.key")
            node_identity = (Identity.generate() if ephemeral
                             else Identity.load(self.dir / "node.key"))
            view = View.decode((self.dir / "view").read_bytes())
            view.verify()
            ring = self._ring() if fmt.get("ring") else None
        except (IdentityError, StorageError, OSError) as e:
            raise BackendError(f"cannot open volume {self.dir}: {e}") from None
        transport = TlsTransport(node_identity, listen=(local_address(fmt["peers"]), 0))
        sn = StorageNode(transport, None, r=fmt["r"])
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(sn.run, fmt["peers"])
            except JoinError as e:
                raise BackendError(f"cannot join the network through "
                                   f"{', '.join(fmt['bootstrap'])}: {e}") from None
            try:
                yield Connection(self, fmt, identity, view, ring, sn, transport, nursery)
            finally:
                with trio.move_on_after(5) as cs:
                    cs.shield = True
                    await sn.leave()
                sn.stop()
                nursery.cancel_scope.cancel()

    @contextlib.asynccontextmanager
    async def attach(self, *, sync_close: bool = False) -> AsyncIterator[Session]:
        fmt = self._read_format()
        with self._locked():
            try:
                # Closes stage the writer's head (storage.heads_stage) unless
                # asked to wait for the disk; fsync always does.
                local = LocalHeadBoard(self.dir / "heads", stage=not sync_close)
            except StorageError as e:
                raise BackendError(f"cannot open volume {self.dir}: {e}") from None
            try:
                async with self.connect(fmt, ephemeral=False) as conn:
                    yield await conn.session(local)
            finally:
                local.close()



class Connection:
    """A joined client node and ring client for one volume directory."""

    def __init__(self, backend: NetworkBackend, fmt, identity, view, ring, sn, transport,
                 nursery):
        self.backend = backend
        self.dir = backend.dir
        self.fmt = fmt
        self.identity = identity
        self.view = view
        self.sn = sn
        self.transport = transport
        self.nursery = nursery
        self.r = fmt["r"]
        self.ring = RingClient(transport, ring, identity) if ring is not None else None
        # Raw blocks (views, log-heads: signed, and needed before the volume
        # key is known) are stored as they are, named by their hash.
        self._raw = sn.blocks(bytes(32), r=self.r)

    async def put_raw(self, data: bytes) -> bytes:
        g = hashlib.sha256(data).digest()
        await self._raw.store_sealed([(g, data)])
        return g

    async def get_raw(self, g: bytes) -> bytes:
        return (await self._raw.fetch(g)).data

    def save_view(self, view: View) -> None:
        _atomic_write(self.dir / "view", view.encode())
        self.view = view

    async def session(self, local: LocalHeadBoard) -> Session:
        r, identity = self.r, self.identity
        desc = f"network volume {self.view.name!r} (r={r}) in {self.dir}"
        if self.ring is None:
            key = self.key()
            return Session(identity, self.view, self.sn.blocks(key, r=r), local, replicas=r,
                           description=desc + ", heads kept locally (no inner ring)")
        await self.current_view()
        key = self.key()
        view = self.view

        def key_of(w: bytes) -> bytes:
            return self.view.participant(w).public_key

        board = RingHeadBoard(self.ring, view.volume, key_of, self.put_raw, self.get_raw, local,
                              wait=view.active_ids() != {identity.id})
        await self.nursery.start(board.run)

        async def newer_view() -> View | None:
            try:
                v = await fetch_view(self.ring, self.get_raw, view.owner, view.volume,
                                     known=self.view)
            except (RingError, StorageError) as e:
                log.debug("view not refreshed: %s", e)
                return None
            if v is None or v.version <= self.view.version:
                return None
            self.save_view(v)
            board.wait = v.active_ids() != {identity.id}
            return v

        return Session(identity, view, self.sn.blocks(key, r=r), board, replicas=r,
                       description=desc + f", inner ring of {self.ring.ring.n} "
                                          f"(f={self.ring.ring.f})",
                       views=newer_view, ring=self.ring)

    async def current_view(self) -> View:
        """The ring's newest view (saved here), or the one held here if the
        ring is out of reach (a partition: the mount works on what it knows).
        The owner's first attach publishes the view."""
        view = self.view
        try:
            with trio.fail_after(VIEW_TIMEOUT):
                newest = await fetch_view(self.ring, self.get_raw, view.owner, view.volume,
                                          known=view)
                if newest is None and self.identity.public_key == view.owner:
                    await publish_view(self.ring, self.put_raw, view)
                    log.info("published the view of %r to the inner ring", view.name)
        except (RingError, StorageError, trio.TooSlowError) as e:
            log.warning("inner ring unreachable while attaching (%s): using the view held "
                        "here (version %d)", e, view.version)
            return view
        if newest is not None and newest.version > view.version:
            self.save_view(newest)
        return self.view

    def key(self) -> bytes:
        try:
            return self.view.volume_key(self.identity)
        except StorageError as e:
            raise BackendError(f"cannot open volume {self.dir}: {e}") from None

    async def add_writer(self, public_key: bytes) -> View:
        """Add a writer to the volume (the owner only): a new view, certified
        by the ring. Returns it."""
        if self.ring is None:
            raise BackendError("only a volume with an inner ring can have several writers")
        if self.identity.public_key != self.view.owner:
            raise BackendError("only the volume's owner adds writers")
        view = await self.current_view()
        try:
            new = view.add_writer(self.identity, self.key(), public_key)
        except StorageError as e:
            raise BackendError(f"cannot add this writer: {e}") from None
        try:
            await publish_view(self.ring, self.put_raw, new)
        except (RingError, StorageError) as e:
            raise BackendError(f"the inner ring did not accept the new view: {e}") from None
        self.save_view(new)
        return new

    async def remove_writer(self, writer_id: bytes) -> View:
        """Remove a writer (owner only): its records up to its newest
        certified log-head still count; anything it writes later is ignored
        by every reader. Certified by the ring like any view change."""
        if self.ring is None:
            raise BackendError("only a volume with an inner ring has several writers")
        if self.identity.public_key != self.view.owner:
            raise BackendError("only the volume's owner removes writers")
        view = await self.current_view()
        try:
            p = view.participant(writer_id)
        except StorageError:
            raise BackendError(f"{writer_id.hex()[:16]} is not a writer of this volume") from None
        if p.public_key == view.owner:
            raise BackendError("the owner cannot remove itself")
        try:
            cert = await self.ring.latest(head_aguid(p.public_key, view.volume))
            last = 0
            if cert is not None:
                last = decode_head(await self.get_raw(cert.vguid)).seq
            new = view.remove_writer(self.identity, writer_id, last)
            await publish_view(self.ring, self.put_raw, new)
        except (RingError, StorageError) as e:
            raise BackendError(f"the writer was not removed: {e}") from None
        self.save_view(new)
        return new

