"""``p2pfs inspect log|block|file``: what a volume's data is made of, read
through ``p2pfs.inspect.open_volume`` (read-only): a writer's records
decoded, a block's holders with each copy checked and its content decoded
by kind, a file's extents down to the holders of each block.
"""

from __future__ import annotations

import msgpack

from overlay.wire.ids import Identity
from overlay.wire.transport import PeerError
from storage import seal
from storage.blockapi import Kind
from storage.errors import StorageError
from storage.extents import Blk
from storage.logs import HeadBoard, decode_head
from storage.namespace import Namespace
from storage.records import RecordError, decode_block
from storage.timenames import time_text

from .inspect import InspectError, Reader, _decode_any, _head_dict, _writer, jsonable, open_volume


async def log_info(volume_dir, writer: str, start: int = 1, limit: int = 100) -> dict:
    """A writer's records from ``start`` (up to ``limit`` of them), decoded."""
    async with open_volume(volume_dir) as rd:
        w = _writer(rd.view, writer)
        raw = (await rd.heads()).get(w)
        if raw is None:
            return {"writer": w.hex(), "head": None, "records": []}
        head = decode_head(raw)
        blocks, g = [], head.block
        while g is not None:            # newest first, back to the first block needed
            try:
                blk = decode_block(await rd.blocks.get(g, Kind.RECORD))
            except (StorageError, RecordError) as e:
                blocks.append({"block": g.hex(), "error": str(e)})
                break
            blocks.append({"block": g.hex(), "first": blk.first, "last": blk.last,
                           "records": blk.records})
            if blk.first <= start:
                break
            g = blk.prev
        recs = []
        for b in reversed(blocks):
            for r in b.get("records", ()):
                if start <= r.seq < start + limit:
                    recs.append(_record_dict(r, b["block"]))
        return {"writer": w.hex(), "head": _head_dict(raw), "records": recs,
                "errors": [b for b in blocks if "error" in b]}


def _record_dict(r, block: str) -> dict:
    body = {}
    for attr, _key, _spec in r.body.FIELDS:
        v = getattr(r.body, attr)
        if attr == "blocks" and v is not None:
            v = [[g.hex(), n] for g, n in v]
        elif attr == "data" and v is not None:
            v = {"inline_bytes": len(v)}
        elif attr == "cover":
            v = {w.hex()[:16]: s for w, s in v.sorted_items()}
        body[attr] = jsonable(v)
    return {"seq": r.seq, "op": r.op.name.lower(), "time": time_text(r.time),
            "block": block[:16], "vv": {w.hex()[:16]: s for w, s in r.vv.sorted_items()},
            **body}


async def block_info(volume_dir, bguid_hex: str) -> dict:
    """Where a block is held (each candidate's copy checked) and what it is."""
    try:
        g = bytes.fromhex(bguid_hex)
        assert len(g) == 32
    except (ValueError, AssertionError):
        raise InspectError("a BGUID is 64 hex digits") from None
    async with open_volume(volume_dir) as rd:
        st = (await rd.holders.survey([g], verify=True))[g]
        holders = {"targets": [rd.holders.describe(n) for n in st.targets],
                   "verified": [rd.holders.describe(n) for n in sorted(st.good)],
                   "missing": [rd.holders.describe(n) for n in sorted(st.missing)],
                   "corrupt": [rd.holders.describe(n) for n in sorted(st.corrupt)],
                   "tombstoned": [rd.holders.describe(n) for n in sorted(st.tombstoned)],
                   "forged": [rd.holders.describe(n) for n in sorted(st.forged)],
                   "unreachable": [rd.holders.describe(n) for n in sorted(st.unreachable)],
                   "elsewhere": rd.holders.describe(st.elsewhere) if st.elsewhere else None,
                   "r": rd.holders.r}
        return {"bguid": g.hex(), "holders": holders, "content": await _content(rd, g)}


async def _content(rd: Reader, g: bytes) -> dict:
    """The block decoded by what it turns out to be."""
    try:
        if rd.conn is not None:
            sealed = (await rd.conn.sn.blocks(bytes(32), r=rd.conn.r).fetch(g)).data
        else:
            sealed = rd.blocks.store.get(g)
    except (StorageError, PeerError) as e:
        return {"error": f"no verified copy: {e}"}
    try:
        kind = seal.kind_of(sealed)
    except StorageError:
        kind = None
    if kind is None:             # unsealed: a log-head or a view (ring objects)
        return _decode_any(sealed)
    try:
        plain = seal.open(rd.view.volume_key(rd.identity), kind, sealed)
    except StorageError as e:
        return {"kind": kind.name, "error": f"does not open: {e}"}
    out: dict = {"kind": kind.name.lower(), "sealed_bytes": len(sealed), "bytes": len(plain)}
    if kind == Kind.RECORD:
        try:
            blk = decode_block(plain)
            out.update(writer=blk.writer.hex(), first=blk.first, last=blk.last,
                       prev=blk.prev.hex() if blk.prev else None,
                       records=[_record_dict(r, g.hex()) for r in blk.records[:200]])
        except RecordError as e:
            out["error"] = str(e)
    elif kind == Kind.SNAPSHOT:
        try:
            d = msgpack.unpackb(plain, raw=False, strict_map_key=False)
            out["fields"] = sorted(d) if isinstance(d, dict) else type(d).__name__
            if isinstance(d, dict) and "w" in d:
                out["snapshot_root_of"] = jsonable(d["w"])
                out["taken"] = time_text(d.get("t", 0))
        except Exception as e:  # a damaged page: say what, do not crash
            out["error"] = f"{type(e).__name__}: {e}"
    else:
        out["head_hex"] = plain[:32].hex()
    return out


async def file_info(volume_dir, path: str) -> dict:
    """A file's inode, extents and the state of each block it uses (the
    newest version, as a reader computes it)."""
    async with open_volume(volume_dir) as rd:
        reader = Identity.generate()      # not a participant: reads only, writes nothing
        board = _FixedBoard(await rd.heads())
        ns = await Namespace.mount(rd.view, reader, rd.blocks, board)
        ino = 1
        for part in [p for p in path.split("/") if p]:
            try:
                ino = (await ns.lookup(ino, part)).ino
            except StorageError as e:
                raise InspectError(f"{path}: {part}: {e}") from None
        n = ns._st.inodes[ino]
        out = {"path": path, "inode": ino, "type": n.ftype.name.lower(), "size": n.st_size,
               "mode": oct(n.mode), "mtime": time_text(n.mtime)}
        if n.data is None:
            if n.entries is not None:
                out["entries"] = sorted(k.decode(errors="replace") for k in n.entries)
            return out
        gs = [x.src.bguid for x in n.data if isinstance(x.src, Blk)]
        states = await rd.holders.survey(list(dict.fromkeys(gs)), verify=True) if gs else {}
        ext = []
        for x in n.data:
            e = {"offset": x.off, "end": x.end}
            if isinstance(x.src, Blk):
                st = states[x.src.bguid]
                e.update(block=x.src.bguid.hex(), block_offset=x.soff,
                         verified_copies=len(st.good), r=rd.holders.r,
                         holders=[rd.holders.describe(h) for h in sorted(st.good)],
                         problems=sorted(k for k in ("missing", "corrupt", "tombstoned",
                                                     "forged") if getattr(st, k)))
            else:
                e["inline_bytes"] = x.length
            ext.append(e)
        out["extents"] = ext
        return out


class _FixedBoard(HeadBoard):
    """Heads already fetched, for a reader that must not publish."""

    def __init__(self, heads: dict[bytes, bytes]):
        self.heads = heads

    async def publish(self, head) -> None:
        raise StorageError("inspect does not write")

    async def fetch(self, writers):
        return {w: self.heads[w] for w in writers if w in self.heads}
