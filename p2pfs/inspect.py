"""``p2pfs inspect``: look inside a node, a volume, and what a volume is made
of, read-only (issue 9; compare tahoe's ``debug dump-share`` and S3QL's
ctrl tools). Human-readable by default, ``--json`` for scripts.

    p2pfs inspect node DATA_DIR|SOCKET        routing table, pointers, store
    p2pfs inspect volume VOLUME               view, ring members and health,
                                              writers' heads, quarantine list
    p2pfs inspect object VOLUME view|WRITER|AGUID
                                              each member's certificate of the
                                              object, the versions it names
    p2pfs inspect log VOLUME WRITER [--from SEQ] [--limit N]
                                              a writer's records, decoded
    p2pfs inspect block VOLUME BGUID          holders and their copies, the
                                              block decoded
    p2pfs inspect file VOLUME PATH            a file's extents and each
                                              block's holders

WRITER is a writer id or a prefix of it (hex); ``log``, ``block`` and
``file`` are in ``p2pfs.inspect_data``. Nothing here writes: a
network volume is read through an ephemeral client node (it runs beside a
mount); a single-node volume is opened under its lock (unmount it first).

Version history: a ring member keeps the newest certificate of an object
(``ring.latest``); older versions are reached through the ``prev`` VGUID of
each certificate, one step per version (older certificates are not served
by the ring today).
"""

from __future__ import annotations

import contextlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import trio

from overlay import control
from overlay.wire.ids import Identity
from overlay.wire.transport import Peer, PeerError, RemoteError
from storage.certificate import Certificate, verify
from storage.errors import StorageError
from storage.fsck_blocks import NetHolders, StoreHolders
from storage.localstore import LocalHeadBoard
from storage.logs import LogError, decode_head
from storage.ring import LATEST
from storage.ring_errors import BadCertificate, RingError
from storage.ringboard import head_aguid, raw_bguid, view_aguid
from storage.server import CTL_STATUS as BLK_CTL_STATUS
from storage.timenames import time_text
from storage.volume import View

from .backend import BackendError, LocalBackend
from .cli import unwrap_group
from .fsck import QUARANTINE_FILE, _kind
from .netbackend import NetworkBackend


class InspectError(BackendError):
    """What was asked for does not exist or cannot be reached; the message
    says which."""


# --------------------------------------------------------------------------
# Rendering


def jsonable(x):
    """Plain JSON values: bytes as hex (or text when printable)."""
    if isinstance(x, dict):
        return {str(jsonable(k)): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in x]
    if isinstance(x, (bytes, bytearray, memoryview)):
        b = bytes(x)
        if b and len(b) != 32 and all(chr(c) in string.printable for c in b):
            return b.decode()
        return b.hex()
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def render(obj, indent: int = 0) -> str:
    """Indented text of nested dicts and lists (the human form)."""
    pad = "  " * indent
    lines = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:")
                lines.append(render(v, indent + 1))
            else:
                lines.append(f"{pad}{k}: {v}")
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, dict) and v:
                items = list(v.items())
                first = render(dict(items[:1]), 0)
                lines.append(f"{pad}- {first}")
                if len(items) > 1:
                    lines.append(render(dict(items[1:]), indent + 1))
            else:
                lines.append(f"{pad}- {v}")
    else:
        lines.append(f"{pad}{obj}")
    return "\n".join(x for x in lines if x != "")


# --------------------------------------------------------------------------
# Nodes


async def node_info(where: str) -> dict:
    """A node's status, routing table, pointers and store, from its control
    socket (a node's data directory or the socket itself)."""
    p = Path(where)
    sock = p / control.SOCKET_NAME if p.is_dir() else p
    try:
        async with control.ControlClient(sock) as c:
            st = (await c.call("tap.ctl.status", {}))["status"]
            table = (await c.call("tap.ctl.table", {}))["table"]
            try:
                blk = (await c.call(BLK_CTL_STATUS, {}))["status"]
            except RemoteError:
                blk = None         # an overlay-only node
    except control.ControlError as e:
        raise InspectError(str(e)) from None
    out = {"id": st["id"], "addr": st["addr"], "joined": st["joined"],
           "neighbours": st["neighbours"], "depth": st["depth"], "suspects": st["suspects"],
           "routing_table": [{"level": r["level"], "own_digit": r["own_digit"],
                              "slots": {d: [f"{n['id'][:16]}@{n['addr']} {n['rtt_ms']} ms"
                                            + (" SUSPECT" if n["suspect"] else "")
                                            for n in ns] for d, ns in r["slots"].items()}}
                             for r in table["rows"]],
           "backpointers": [f"{b['id'][:16]}@{b['addr']} level {b['level']}"
                            for b in table["backpointers"]],
           "pointers": [{"object": x["obj"], "holder": f"{x['holder'][:16]}@{x['holder_addr']}",
                         "rooted": x["rooted"], "expires_in": x["expires_in"]}
                        for x in table["pointers"]],
           "published": len(table["published"])}
    if blk is not None:
        out["store"] = blk.get("store")
        out["repair"] = blk.get("repair")
    return out


# --------------------------------------------------------------------------
# Volumes, read-only


@dataclass
class Reader:
    """A volume opened for reading (``open_volume``)."""

    kind: str
    view: View
    identity: Identity
    blocks: object                 # BlockAccess
    holders: object                # fsck_blocks.Holders
    conn: object | None = None     # netbackend.Connection (network volumes)
    board: object | None = None    # a HeadBoard (single-node and ringless volumes)

    async def get_raw(self, g: bytes) -> bytes:
        if self.conn is None:
            raise InspectError("raw blocks live only on network volumes")
        return await self.conn.get_raw(g)

    async def heads(self) -> dict[bytes, bytes]:
        """The current encoded head of each writer (certified on a ring
        volume; this writer's durable one when newer)."""
        ids = [p.id for p in self.view.participants]
        if self.board is not None:
            return await self.board.fetch(ids)
        out: dict[bytes, bytes] = {}
        for p in self.view.participants:
            cert = await self.conn.ring.latest(head_aguid(p.public_key, self.view.volume))
            if cert is not None:
                out[p.id] = await self.get_raw(cert.vguid)
        own = LocalHeadBoard(self.conn.dir / "heads")
        try:
            mine = (await own.fetch([self.identity.id])).get(self.identity.id)
        finally:
            own.close()
        if mine is not None:
            cur = out.get(self.identity.id)
            if cur is None or decode_head(mine).n > decode_head(cur).n:
                out[self.identity.id] = mine
        return out


@contextlib.asynccontextmanager
async def open_volume(volume_dir) -> AsyncIterator[Reader]:
    """The volume opened for reading; errors come out as themselves, not
    wrapped in the exception groups of the nurseries they crossed."""
    try:
        async with _open_volume(volume_dir) as rd:
            yield rd
    except BaseExceptionGroup as eg:
        inner = unwrap_group(eg)
        if inner is eg:
            raise
        raise inner from None


@contextlib.asynccontextmanager
async def _open_volume(volume_dir) -> AsyncIterator[Reader]:
    d = Path(volume_dir)
    kind = _kind(d)
    if kind == "single-node":
        async with LocalBackend(d).attach() as s:
            yield Reader(kind, s.view, s.identity, s.blocks, StoreHolders(s.blocks.store),
                         board=s.board)
        return
    async with NetworkBackend(d).connect() as conn:
        if conn.ring is not None:
            try:
                await conn.current_view()
            except (RingError, StorageError):
                pass
        raw = conn.sn.blocks(bytes(32), r=conn.r)

        async def locate(g: bytes):
            f = await raw.fetch(g)
            return f.data, f.source

        holders = NetHolders(conn.transport, conn.sn.placement, locate, r=conn.r)
        board = None if conn.ring is not None else LocalHeadBoard(d / "heads")
        try:
            yield Reader(kind, conn.view, conn.identity, conn.sn.blocks(conn.key(), r=conn.r),
                         holders, conn=conn, board=board)
        finally:
            if board is not None:
                board.close()


def _writer(view: View, text: str) -> bytes:
    text = text.lower()
    found = [p.id for p in view.participants if p.id.hex().startswith(text)]
    if len(found) != 1:
        raise InspectError(f"{'no' if not found else 'more than one'} writer of this volume "
                           f"has an id starting with {text!r}; writers: "
                           + ", ".join(p.id.hex()[:16] for p in view.participants))
    return found[0]


def _view_dict(view: View) -> dict:
    return {"name": view.name, "id": view.volume.hex(), "owner": view.owner.hex(),
            "version": view.version, "ring": [m.hex() for m in view.ring],
            "writers": [{"index": p.index, "id": p.id.hex(), "public_key": p.public_key.hex(),
                         "active": p.active, "removed_at": p.removed_at,
                         "joined": {w.hex()[:16]: s for w, s in p.joined.sorted_items()}}
                        for p in view.participants]}


async def volume_info(volume_dir) -> dict:
    """The view, the ring and its health, writers' heads, the quarantine list."""
    d = Path(volume_dir)
    out: dict = {}
    async with open_volume(d) as rd:
        out["kind"] = rd.kind
        out["view"] = _view_dict(rd.view)
        heads = await rd.heads()
        out["heads"] = {}
        for p in rd.view.participants:
            raw = heads.get(p.id)
            out["heads"][p.id.hex()[:16]] = None if raw is None else _head_dict(raw)
    if rd.kind == "network":
        from .admin import status
        try:
            out["network"] = await status(d)
        except (BackendError, StorageError, RingError) as e:
            out["network"] = {"error": str(e)}
    q = d / QUARANTINE_FILE
    out["quarantine"] = json.loads(q.read_text())["entries"] if q.exists() else {}
    return out


def _head_dict(raw: bytes) -> dict:
    try:
        h = decode_head(raw)
    except LogError as e:
        return {"error": str(e)}
    return {"writer": h.writer.hex(), "n": h.n, "seq": h.seq,
            "block": h.block.hex() if h.block else None,
            "snapshot": h.snap.hex() if h.snap else None, "time": time_text(h.time),
            "vv": {w.hex()[:16]: s for w, s in h.vv.sorted_items()}}


def _cert_dict(c: Certificate) -> dict:
    return {"seq": c.seq, "vguid": c.vguid.hex(), "prev": c.prev.hex() if c.prev else None,
            "time": time_text(c.time * 1_000_000), "ring": c.ring_id.hex()[:16],
            "epoch": c.epoch, "signers": sorted(k.hex()[:16] for k in c.signatures)}


async def object_info(volume_dir, which: str) -> dict:
    """Each ring member's certificate of an object (the view, a writer's
    log-head, or any AGUID), and the versions the newest one leads to."""
    async with open_volume(volume_dir) as rd:
        if rd.conn is None or rd.conn.ring is None:
            raise InspectError("only a volume with an inner ring has certified objects")
        view, ring = rd.view, rd.conn.ring
        if which == "view":
            aguid, label, decode = view_aguid(view.owner, view.volume), "the view", _decode_view
        elif len(which) == 64 and not any(p.id.hex() == which for p in view.participants):
            aguid, label, decode = bytes.fromhex(which), f"object {which[:16]}", _decode_any
        else:
            w = _writer(view, which)
            aguid = head_aguid(view.participant(w).public_key, view.volume)
            label, decode = f"log-head of writer {w.hex()[:16]}", _head_dict
        members = []
        newest: Certificate | None = None
        for m in ring.ring.members:
            entry: dict = {"member": m.id.hex()[:16], "addr": m.addr}
            try:
                r = await rd.conn.transport.request(Peer(m.id, m.addr), LATEST,
                                                    {"aguid": aguid}, timeout=5)
                if r["cert"] is None:
                    entry["certificate"] = None
                else:
                    c = Certificate.decode(r["cert"])
                    entry["certificate"] = _cert_dict(c)
                    try:
                        verify(c, ring.ring)
                        entry["valid"] = True
                        if newest is None or c.seq > newest.seq:
                            newest = c
                    except BadCertificate as e:
                        entry["valid"] = False
                        entry["why"] = str(e)
            except (PeerError, RemoteError, BadCertificate) as e:
                entry["error"] = str(e)
            members.append(entry)
        versions = []
        g, seq = (newest.vguid, newest.seq) if newest else (None, 0)
        while g is not None and len(versions) < 2:
            v: dict = {"seq": seq, "vguid": g.hex()}
            try:
                raw = await rd.get_raw(g)
                v["content"] = (decode(raw) if raw_bguid(raw) == g
                                else {"error": "the bytes do not hash to the VGUID"})
            except (StorageError, PeerError) as e:
                v["error"] = str(e)
            versions.append(v)
            g, seq = (newest.prev, seq - 1) if len(versions) == 1 and newest.prev else (None, 0)
        return {"object": aguid.hex(), "what": label, "members": members,
                "newest_valid": _cert_dict(newest) if newest else None, "versions": versions,
                "note": "a member serves its newest certificate only; older versions are "
                        "reached through prev"}


def _decode_view(raw: bytes) -> dict:
    try:
        return _view_dict(View.decode(raw))
    except StorageError as e:
        return {"error": str(e)}


def _decode_any(raw: bytes) -> dict:
    """An unsealed ring version: a log-head, else a view."""
    head = _head_dict(raw)
    return {"kind": "log-head", **head} if "error" not in head else {"kind": "view",
                                                                    **_decode_view(raw)}


def run(what: str, args, as_json: bool) -> int:
    """The ``inspect`` command: print, return 0 (or raise InspectError)."""
    from .inspect_data import block_info, file_info, log_info

    jobs = {
        "node": lambda: node_info(args.target),
        "volume": lambda: volume_info(args.volume),
        "object": lambda: object_info(args.volume, args.object),
        "log": lambda: log_info(args.volume, args.writer, args.start, args.limit),
        "block": lambda: block_info(args.volume, args.bguid),
        "file": lambda: file_info(args.volume, args.path),
    }
    out = jsonable(trio.run(jobs[what]))
    print(json.dumps(out, indent=1) if as_json else render(out))
    return 0
