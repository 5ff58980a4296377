"""Operator commands over a network volume: ring descriptors, adding writers,
joining, status (``p2pfs ring-init``, ``add-writer``, ``join``, ``status``,
``conflicts``). Each one is a function the CLI calls and tests call
directly; errors are :class:`~p2pfs.backend.BackendError` with a message
that says what to do.

None of them takes the volume's lock: they only read the view and talk to
the network, so they work while the volume is mounted (a mounted writer
adopts a new view within ``mount.VIEW_POLL`` seconds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import trio

from overlay.wire.ids import Identity, node_id_of, short
from overlay.wire.tls import parse_address
from overlay.wire.transport import Peer, PeerError, RemoteError
from storage.certificate import RingDescriptor
from storage.errors import StorageError
from storage.ring import STATUS
from storage.ring_errors import RingError
from storage.ringboard import head_aguid

from .backend import BackendError, _atomic_write
from .netbackend import NetworkBackend, join_network, write_ticket

CONFLICTS_XATTR = "user.p2pfs.conflicts"


def parse_member(text: str) -> tuple[bytes, str]:
    """``PUBKEYHEX@HOST:PORT`` -> (public key, address)."""
    key_hex, sep, addr = text.partition("@")
    try:
        key = bytes.fromhex(key_hex)
    except ValueError:
        key = b""
    if not sep or len(key) != 32:
        raise BackendError(f"not a ring member {text!r}: want PUBKEY@HOST:PORT with the "
                           f"member's 64-hex-digit public key (p2pfs ring-member --init prints it)")
    try:
        parse_address(addr)
    except ValueError as e:
        raise BackendError(f"ring member {short(key)}: bad address {addr!r}: {e}") from None
    return key, addr


def ring_init(identity: Identity, members: list[str], out: Path, *, f: int = 1,
              name: str = "ring") -> RingDescriptor:
    """Write a ring descriptor of ``members`` signed by ``identity`` (the
    volume's future owner) to ``out``."""
    if f < 1:
        raise BackendError("f (faulty members tolerated) must be at least 1")
    parsed = [parse_member(m) for m in members]
    if len(parsed) != 3 * f + 1:
        raise BackendError(f"a ring tolerating f={f} faulty members has exactly {3 * f + 1} "
                           f"members; {len(parsed)} given")
    if len({k for k, _ in parsed}) != len(parsed):
        raise BackendError("a ring member is listed twice")
    try:
        ring = RingDescriptor.create(identity, name, parsed, f=f)
    except (StorageError, ValueError) as e:
        raise BackendError(f"cannot make the ring descriptor: {e}") from None
    if out.exists():
        raise BackendError(f"{out} exists: not overwritten")
    _atomic_write(out, ring.to_json().encode())
    return ring


def load_ring(path: Path) -> RingDescriptor:
    try:
        ring = RingDescriptor.from_json(path.read_text())
        ring.verify_owner()
    except (OSError, ValueError, RingError) as e:
        raise BackendError(f"{path}: not a valid ring descriptor: {e}") from None
    return ring


async def add_writer(volume_dir: Path, public_key: bytes, ticket_out: Path) -> dict:
    """Add a writer (owner only); write the ticket it joins with."""
    if ticket_out.exists():
        raise BackendError(f"{ticket_out} exists: not overwritten")
    async with NetworkBackend(volume_dir).connect() as conn:
        view = await conn.add_writer(public_key)
    ticket = write_ticket(volume_dir, view)
    _atomic_write(ticket_out, json.dumps(ticket, indent=1).encode() + b"\n", mode=0o644)
    return {"writer": node_id_of(public_key).hex(), "view_version": view.version,
            "ticket": str(ticket_out)}


async def remove_writer(volume_dir: Path, writer: str) -> dict:
    """Remove a writer (owner only), named by its id or public key (hex,
    or a unique prefix of the id of at least 8 digits)."""
    async with NetworkBackend(volume_dir).connect() as conn:
        view = await conn.current_view()
        w = writer.lower()
        matches = [p for p in view.participants
                   if p.id.hex().startswith(w) or p.public_key.hex() == w]
        if len(w) < 8 or len(matches) != 1:
            raise BackendError(f"{writer!r} names {len(matches)} writers of this volume; give "
                               f"at least 8 hex digits of one writer's id (p2pfs status lists them)")
        new = await conn.remove_writer(matches[0].id)
    p = new.participant(matches[0].id)
    return {"writer": p.id.hex(), "view_version": new.version, "last_seq": p.removed_at}


def join(ticket_path: Path, volume_dir: Path, identity: Identity) -> dict:
    try:
        ticket = json.loads(ticket_path.read_text())
    except (OSError, ValueError) as e:
        raise BackendError(f"cannot read the ticket {ticket_path}: {e}") from None
    if not isinstance(ticket, dict):
        raise BackendError(f"bad ticket {ticket_path}: not a JSON object")
    view = join_network(volume_dir, ticket, identity)
    return {"volume": view.name, "writers": len(view.active_ids()), "dir": str(volume_dir)}


async def status(volume_dir: Path) -> dict:
    """The volume seen from the network: writers and their certified heads,
    the ring's members and their health, this client's overlay neighbours."""
    backend = NetworkBackend(volume_dir)
    async with backend.connect() as conn:
        out: dict = {"volume": conn.view.name, "id": conn.view.volume.hex(), "r": conn.r,
                     "bootstrap": conn.fmt["bootstrap"]}
        out["overlay"] = {"client": conn.sn.id.hex(), "neighbours": len(conn.sn.node.table)}
        if conn.ring is None:
            out["ring"] = None
            out["writers"] = [{"id": p.id.hex(), "active": p.active}
                              for p in conn.view.participants]
            return out
        view = await conn.current_view()
        ring = conn.ring.ring
        members = []

        async def ask(m):
            entry = {"id": m.id.hex(), "addr": m.addr}
            try:
                with trio.fail_after(3):
                    st = await conn.transport.request(Peer(m.id, m.addr), STATUS, {},
                                                      timeout=3)
                entry.update(up=True, view=st.get("view"), executed=st.get("exec"))
            except (PeerError, RemoteError, trio.TooSlowError) as e:
                entry.update(up=False, error=str(e))
            members.append(entry)

        writers = []

        async def head(p):
            entry = {"id": p.id.hex(), "active": p.active,
                     "owner": p.public_key == view.owner}
            try:
                cert = await conn.ring.latest(head_aguid(p.public_key, view.volume))
                entry["certified_heads"] = 0 if cert is None else cert.seq
                if cert is not None:
                    entry["last_certified_ms"] = cert.time
            except RingError as e:
                entry["error"] = str(e)
            writers.append(entry)

        async with trio.open_nursery() as n:
            for m in ring.members:
                n.start_soon(ask, m)
            for p in view.participants:
                n.start_soon(head, p)
        up = sum(m["up"] for m in members)
        out["ring"] = {"id": ring.ring_id.hex(), "epoch": ring.epoch, "f": ring.f,
                       "members_up": up, "quorum": ring.quorum,
                       "healthy": up >= ring.quorum,
                       "members": sorted(members, key=lambda m: m["id"])}
        out["view_version"] = view.version
        out["writers"] = sorted(writers, key=lambda w: (not w["owner"], w["id"]))
        return out


def conflicts(mountpoint: Path) -> list:
    """The conflicts a mounted volume knows of (read from its root)."""
    try:
        raw = os.getxattr(mountpoint, CONFLICTS_XATTR)
    except OSError as e:
        raise BackendError(f"{mountpoint}: cannot read the conflict list ({e.strerror}); is "
                           f"it a p2pfs mount point?") from None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise BackendError(f"{mountpoint}: unreadable conflict list: {e}") from None
