"""PBFT protocol messages: formats, signatures and the checks of proofs
(Castro and Liskov, TOCS 2002, sections 4.2-4.4; PAPERS.md "PBFT").

Messages travel between ring members inside one-way ``pbft.msgs`` frames
(``ring_outbox``) as plain maps, each with a type ``t``:

    pp   PRE-PREPARE  v n d i s b   primary i of view v orders batch b (digest d) at seq n
    p    PREPARE      v n d i s     backup i accepted that pre-prepare (to the primary)
    pc   PREPARED     v n d i ps    primary i collected 2f PREPAREs ps (to the backups)
    c    COMMIT       v n d i s     member i is prepared for (v, n, d) (to the primary)
    cc   COMMITTED    v n d i cs    primary i collected 2f COMMITs cs (to the backups)
    sh   SHARES       n d i s       member i's certificate shares of the results of
                                    batch n, one per request (to the primary)
    ck   CHECKPOINT   n d i s       member i's state after executing n has digest d
    vc   VIEW-CHANGE  v h C P i s   member i moves to view v; its stable checkpoint
                                    is h (proof C) and P its prepared certificates
    nv   NEW-VIEW     v V O i s     primary i of view v: 2f+1 VIEW-CHANGEs and the
                                    pre-prepares O computed from them
    rq   REQUEST      r             a client request forwarded to the primary

The normal case is PBFT's three phases with the primary as the collector
of each all-to-all phase (the "linear" PBFT of SBFT, Gueta et al., DSN
2019): backups send PREPAREs and COMMITs to the primary only, which relays
each quorum as one PREPARED or COMMITTED message. A member is prepared with
the pre-prepare and 2f valid PREPAREs from distinct backups, exactly PBFT's
predicate, however they reached it; it decides with 2f+1 COMMITs. That is
3(n-1) messages per batch instead of about 2n^2, the same proofs, and one
more hop per phase, which is cheap next to what a message costs here.

Authentication. Inside the ring the transport already proves who sent a
frame (TLS proves the NodeID), which plays the role of PBFT's MACs: direct
messages must come from the member they name, and a PREPARED or COMMITTED
counts as the primary's own vote. A vote the primary relays must be
verifiable by others, so PREPAREs and COMMITs carry Ed25519 signatures, as
does everything a member may show a third party later: PRE-PREPAREs and
PREPAREs (cited in view changes as prepared certificates), CHECKPOINTs
(stable-checkpoint proofs), VIEW-CHANGEs (cited in NEW-VIEWs) and NEW-VIEWs.
A member verifies each signature it relies on once, when it relies on it;
its own messages it knows. Signatures cover a context string, the ring id
and epoch, and a canonical list of the message's fields, so no signature
can be replayed into another ring, epoch or message kind.

Everything here is pure: functions of messages and a :class:`RingContext`.
Malformed or unprovable messages raise :class:`BadMessage`; the replica drops
them (and logs the sender), it never crashes on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import msgpack

from overlay.wire import frames
from overlay.wire.frames import GUID, SIG, Bytes, Int, ListOf, Str
from overlay.wire.ids import BadSignature, guid
from overlay.wire.ids import verify as verify_signature

from .certificate import RingDescriptor

PBFT_CONTEXT = b"p2pfs pbft v1\x00"
REQUEST_CONTEXT = b"p2pfs ring request v1\x00"
MAX_OP = 4096               # bytes of one client operation
MAX_BATCH_REQUESTS = 256
MAX_BATCH_BYTES = MAX_BATCH_REQUESTS * (MAX_OP + 160)
MAX_MSGS = 4096             # messages in one pbft.msgs frame
U64 = Int(0, 2**63 - 1)
IDX = Int(0, 63)


class BadMessage(Exception):
    """A protocol message is malformed, wrongly signed, or proves less than it
    claims (a prepared certificate without 2f prepares, a NEW-VIEW whose
    pre-prepares do not follow from its VIEW-CHANGEs, ...). The message is
    dropped; the sender is probably faulty."""


# ---- shapes -------------------------------------------------------------------

_PP = {"t": Str(4), "v": U64, "n": U64, "d": GUID, "i": IDX, "s": SIG,
       "b": Bytes(max=MAX_BATCH_BYTES)}
_P = {"t": Str(4), "v": U64, "n": U64, "d": GUID, "i": IDX, "s": SIG}
_C = {"t": Str(4), "v": U64, "n": U64, "d": GUID, "i": IDX, "s": SIG}
_PC = {"t": Str(4), "v": U64, "n": U64, "d": GUID, "i": IDX, "ps": ListOf(_P, max=64)}
_CC = {"t": Str(4), "v": U64, "n": U64, "d": GUID, "i": IDX, "cs": ListOf(_C, max=64)}
_SH = {"t": Str(4), "n": U64, "d": GUID, "i": IDX,
       "s": ListOf(Bytes(max=64), max=MAX_BATCH_REQUESTS)}
_CK = {"t": Str(4), "n": U64, "d": GUID, "i": IDX, "s": SIG}
_VC = {"t": Str(4), "v": U64, "h": U64, "C": ListOf(_CK, max=64),
       "P": ListOf({"pp": _PP, "ps": ListOf(_P, max=64)}, max=1024), "i": IDX, "s": SIG}
_NV = {"t": Str(4), "v": U64, "V": ListOf(_VC, max=64), "O": ListOf(_PP, max=1024),
       "i": IDX, "s": SIG}
_RQ = {"t": Str(4), "r": ListOf(frames.AnyValue(), max=4)}
AGREEMENT = ("pp", "p", "pc", "c", "cc")   # the normal case's messages (they name a view)
RESULTS = ("sh",)                          # released only once the executed state is fsynced
SHAPES = {k: frames.spec(v) for k, v in
          {"pp": _PP, "p": _P, "pc": _PC, "c": _C, "cc": _CC, "sh": _SH, "ck": _CK, "vc": _VC,
           "nv": _NV, "rq": _RQ}.items()}

# The frames carrying these (registered once, shared by every member), sent
# one-way (``Transport.send``). ``at`` and the reply's ``msgs`` are no longer
# used (members used to answer a frame with their messages for its sender);
# they stay in the schema so that frames of members not yet upgraded decode.
MSGS = frames.message("pbft.msgs", {"msgs": ListOf(frames.AnyValue(), max=MAX_MSGS),
                                    "at": frames.Optional(float)},
                      {"msgs": frames.Optional(ListOf(frames.AnyValue(), max=MAX_MSGS))})


def check_shape(m) -> str:
    """The type of a well-formed message; BadMessage otherwise."""
    if type(m) is not dict:
        raise BadMessage("message is not a map")
    t = m.get("t")
    shape = SHAPES.get(t) if type(t) is str else None
    if shape is None:
        raise BadMessage(f"unknown message type {str(t)[:8]!r}")
    fast = _FAST.get(t)
    if fast is not None and fast(m):
        return t
    try:
        shape.check(m, t)
    except frames.FrameError as e:
        raise BadMessage(str(e)) from None
    return t


# The normal case's messages, checked without the generic schema walk (which
# builds a path string per field): the same rules as their shapes above,
# answering only yes or no; a "no" goes through the generic check, which
# says what is wrong.

_VOTE_KEYS = frozenset(("t", "v", "n", "d", "i", "s"))
_PP_KEYS = _VOTE_KEYS | {"b"}
_PC_KEYS = frozenset(("t", "v", "n", "d", "i", "ps"))
_CC_KEYS = frozenset(("t", "v", "n", "d", "i", "cs"))
_SH_KEYS = frozenset(("t", "n", "d", "i", "s"))
_TOP = 2**63 - 1


def _u64(x) -> bool:
    return type(x) is int and 0 <= x <= _TOP


def _head_ok(m) -> bool:
    """``v``, ``n``, ``d`` and ``i`` of a normal-case message."""
    t, d, i = m["t"], m["d"], m["i"]
    return (type(t) is str and len(t) <= 4 and _u64(m["v"]) and _u64(m["n"])
            and type(d) is bytes and len(d) == 32 and type(i) is int and 0 <= i <= 63)


def _vote_ok(m) -> bool:
    if type(m) is not dict or m.keys() != _VOTE_KEYS or not _head_ok(m):
        return False
    sig = m["s"]
    return type(sig) is bytes and len(sig) == 64


def _pp_ok(m) -> bool:
    if m.keys() != _PP_KEYS or not _head_ok(m):
        return False
    sig, b = m["s"], m["b"]
    return type(sig) is bytes and len(sig) == 64 and type(b) is bytes \
        and len(b) <= MAX_BATCH_BYTES


def _relay_ok(keys, field):
    def ok(m) -> bool:
        if m.keys() != keys or not _head_ok(m):
            return False
        votes = m[field]
        return type(votes) is list and len(votes) <= 64 and all(_vote_ok(x) for x in votes)
    return ok


def _sh_ok(m) -> bool:
    if m.keys() != _SH_KEYS:
        return False
    d, i, sigs = m["d"], m["i"], m["s"]
    return (_u64(m["n"]) and type(d) is bytes and len(d) == 32 and type(i) is int
            and 0 <= i <= 63 and type(sigs) is list and len(sigs) <= MAX_BATCH_REQUESTS
            and all(type(x) is bytes and len(x) <= 64 for x in sigs))


_FAST = {"p": _vote_ok, "c": _vote_ok, "pp": _pp_ok, "pc": _relay_ok(_PC_KEYS, "ps"),
         "cc": _relay_ok(_CC_KEYS, "cs"), "sh": _sh_ok}


# ---- client requests ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """A client's signed operation: client key ``c``, request id ``r`` (unique
    per client, increasing), operation bytes ``op``, signature ``s``."""

    c: bytes
    r: int
    op: bytes
    s: bytes

    @property
    def key(self) -> tuple[bytes, int]:
        return (self.c, self.r)

    def as_list(self) -> list:
        return [self.c, self.r, self.op, self.s]

    @classmethod
    def from_list(cls, x) -> "Request":
        if (type(x) is not list or len(x) != 4 or type(x[0]) is not bytes or len(x[0]) != 32
                or type(x[1]) is not int or not 0 <= x[1] < 2**63
                or type(x[2]) is not bytes or len(x[2]) > MAX_OP
                or type(x[3]) is not bytes or len(x[3]) != 64):
            raise BadMessage("malformed client request")
        return cls(x[0], x[1], x[2], x[3])

    @staticmethod
    def signing_bytes(ring_id: bytes, c: bytes, r: int, op: bytes) -> bytes:
        return REQUEST_CONTEXT + msgpack.packb([ring_id, c, r, op], use_bin_type=True)

    def check_signature(self, ring_id: bytes) -> None:
        try:
            verify_signature(self.c, self.s, self.signing_bytes(ring_id, self.c, self.r, self.op))
        except BadSignature:
            raise BadMessage("client signature does not verify") from None

    def digest(self) -> bytes:
        return guid(msgpack.packb(self.as_list(), use_bin_type=True))


# ---- batches --------------------------------------------------------------------


def encode_batch(time_ms: int, reqs: list[Request]) -> bytes:
    return msgpack.packb([time_ms, [r.as_list() for r in reqs]], use_bin_type=True)


NULL_BATCH = encode_batch(0, [])
NULL_DIGEST = guid(NULL_BATCH)


@lru_cache(maxsize=4096)
def decode_batch(data: bytes) -> tuple[int, tuple[Request, ...]]:
    """(time in ms, requests) of a batch; BadMessage if malformed. Cached:
    the same batch is decoded by a member for its pre-prepare, its prepared
    certificate and maybe a view change."""
    try:
        x = msgpack.unpackb(data, raw=False, strict_map_key=True, max_array_len=MAX_BATCH_REQUESTS,
                            max_map_len=0, max_bin_len=MAX_BATCH_BYTES, max_str_len=0)
    except Exception as e:
        raise BadMessage(f"batch is not msgpack: {type(e).__name__}") from None
    if type(x) is not list or len(x) != 2 or type(x[0]) is not int or type(x[1]) is not list:
        raise BadMessage("malformed batch")
    if not 0 <= x[0] < 2**63:
        raise BadMessage("batch time out of range")
    reqs = tuple(Request.from_list(r) for r in x[1])
    if len({r.key for r in reqs}) != len(reqs):
        raise BadMessage("batch lists one request twice")
    return x[0], reqs


# ---- signing --------------------------------------------------------------------


@dataclass(frozen=True)
class RingContext:
    """What signing and checking need: the ring (keys, f) and its epoch."""

    ring: RingDescriptor

    @property
    def f(self) -> int:
        return self.ring.f

    @property
    def n(self) -> int:
        return self.ring.n

    def primary(self, view: int) -> int:
        return view % self.ring.n

    def _bytes(self, fields: list) -> bytes:
        return PBFT_CONTEXT + msgpack.packb([self.ring.ring_id, self.ring.epoch] + fields,
                                            use_bin_type=True)

    def sign(self, identity, m: dict) -> dict:
        m["s"] = identity.sign(self._bytes(signed_fields(m)))
        return m

    def check_sig(self, m: dict) -> None:
        i = m["i"]
        if i >= self.ring.n:
            raise BadMessage(f"no member {i} in a ring of {self.ring.n}")
        try:
            verify_signature(self.ring.members[i].key, m["s"], self._bytes(signed_fields(m)))
        except BadSignature:
            raise BadMessage(f"{m['t']} signature of member {i} does not verify") from None


def signed_fields(m: dict) -> list:
    """The canonical list a message's signature covers (its type first)."""
    t = m["t"]
    if t in ("pp", "p", "c"):
        return [t, m["v"], m["n"], m["d"], m["i"]]
    if t == "ck":
        return [t, m["n"], m["d"], m["i"]]
    if t == "vc":
        cs = [[c["n"], c["d"], c["i"], c["s"]] for c in m["C"]]
        ps = [[e["pp"]["v"], e["pp"]["n"], e["pp"]["d"], e["pp"]["i"], e["pp"]["s"],
               [[p["i"], p["s"]] for p in e["ps"]]] for e in m["P"]]
        return [t, m["v"], m["h"], m["i"], guid(msgpack.packb([cs, ps], use_bin_type=True))]
    if t == "nv":
        vs = [[vc["i"], vc["s"]] for vc in m["V"]]
        os_ = [[pp["n"], pp["d"], pp["s"]] for pp in m["O"]]
        return [t, m["v"], m["i"], guid(msgpack.packb([vs, os_], use_bin_type=True))]
    raise BadMessage(f"{t} messages are not signed")


# ---- constructors ----------------------------------------------------------------


def pre_prepare(ctx: RingContext, identity, i: int, v: int, n: int, batch: bytes) -> dict:
    return ctx.sign(identity, {"t": "pp", "v": v, "n": n, "d": guid(batch), "i": i, "s": b"",
                               "b": batch})


def prepare(ctx, identity, i, v, n, d) -> dict:
    return ctx.sign(identity, {"t": "p", "v": v, "n": n, "d": d, "i": i, "s": b""})


def commit(ctx, identity, i, v, n, d) -> dict:
    return ctx.sign(identity, {"t": "c", "v": v, "n": n, "d": d, "i": i, "s": b""})


def prepared(i, v, n, d, ps: list) -> dict:
    return {"t": "pc", "v": v, "n": n, "d": d, "i": i, "ps": ps}


def committed(i, v, n, d, cs: list) -> dict:
    return {"t": "cc", "v": v, "n": n, "d": d, "i": i, "cs": cs}


def shares(i, n, d, sigs: list[bytes]) -> dict:
    return {"t": "sh", "n": n, "d": d, "i": i, "s": sigs}


def checkpoint(ctx, identity, i, n, d) -> dict:
    return ctx.sign(identity, {"t": "ck", "n": n, "d": d, "i": i, "s": b""})


def view_change(ctx, identity, i, v, h, proof: list, prepared: list) -> dict:
    return ctx.sign(identity, {"t": "vc", "v": v, "h": h, "C": proof,
                               "P": [{"pp": pp, "ps": ps} for pp, ps in prepared],
                               "i": i, "s": b""})


def new_view(ctx, identity, i, v, vcs: list, pps: list) -> dict:
    return ctx.sign(identity, {"t": "nv", "v": v, "V": vcs, "O": pps, "i": i, "s": b""})


# ---- checks of proofs --------------------------------------------------------------


def check_pre_prepare(ctx: RingContext, pp: dict) -> None:
    """Signed by the primary of its view, and its batch has its digest."""
    if pp["i"] != ctx.primary(pp["v"]):
        raise BadMessage(f"pre-prepare for view {pp['v']} from member {pp['i']}, "
                         f"who is not its primary")
    if guid(pp["b"]) != pp["d"]:
        raise BadMessage("pre-prepare batch does not match its digest")
    ctx.check_sig(pp)


def check_votes(ctx: RingContext, votes: list, key: tuple, primary: int, need: int,
                known=None) -> list[dict]:
    """``need`` valid PREPAREs or COMMITs out of those relayed in a PREPARED
    or COMMITTED message, or BadMessage. Every relayed vote must be for
    ``key`` = (view, seq, digest) and from a distinct backup (not the
    primary); signatures are checked only as far as needed, those this
    member already knows (``known(m)``: checked before, or its own) first.
    A correct primary relays only valid votes, so a bad one is refused."""
    good, unknown, seen = [], [], set()
    for m in votes:
        if (m["v"], m["n"], m["d"]) != key:
            raise BadMessage(f"relayed {m['t']} does not match ({key[0]}, {key[1]})")
        if m["i"] == primary or m["i"] in seen:
            raise BadMessage(f"relayed {m['t']}s repeat a member or count the primary")
        seen.add(m["i"])
        (good if known is not None and known(m) else unknown).append(m)
    for m in unknown:
        if len(good) >= need:
            break
        ctx.check_sig(m)
        good.append(m)
    if len(good) < need:
        raise BadMessage(f"{len(good)} relayed votes, {need} needed")
    return good[:need] if need else good


def check_prepared(ctx: RingContext, pp: dict, ps: list) -> None:
    """A prepared certificate: a valid pre-prepare and 2f valid PREPAREs
    from distinct backups, all for the same (view, seq, digest)."""
    check_pre_prepare(ctx, pp)
    key = (pp["v"], pp["n"], pp["d"])
    seen = set()
    for p in ps:
        if (p["v"], p["n"], p["d"]) != key:
            raise BadMessage("prepare does not match its pre-prepare")
        if p["i"] == pp["i"] or p["i"] in seen:
            raise BadMessage("prepared certificate repeats a member or counts the primary")
        seen.add(p["i"])
        ctx.check_sig(p)
    if len(seen) < 2 * ctx.f:
        raise BadMessage(f"prepared certificate with {len(seen)} prepares, {2 * ctx.f} needed")


def check_checkpoint_proof(ctx: RingContext, h: int, proof: list,
                           base: tuple[int, bytes]) -> bytes:
    """The state digest that ``proof`` (2f+1 CHECKPOINTs for seq h from
    distinct members) shows stable. ``base`` is (seq, digest) of the state
    the current epoch started from (seq 0 and the initial state, or the
    reconfiguration's seq and the state after it): agreed without proof."""
    if h == base[0] and not proof:
        return base[1]
    digests = {c["d"] for c in proof}
    if len(digests) != 1 or any(c["n"] != h for c in proof):
        raise BadMessage("checkpoint proof mixes sequence numbers or digests")
    if len({c["i"] for c in proof}) != len(proof) or len(proof) < 2 * ctx.f + 1:
        raise BadMessage(f"checkpoint proof with {len(proof)} members, {2 * ctx.f + 1} needed")
    for c in proof:
        ctx.check_sig(c)
    return digests.pop()


def check_view_change(ctx: RingContext, vc: dict, window: int, base: tuple[int, bytes]) -> None:
    """A VIEW-CHANGE whose every claim is proven."""
    ctx.check_sig(vc)
    h = vc["h"]
    if h < base[0]:
        raise BadMessage(f"view-change from before this epoch's start {base[0]}")
    check_checkpoint_proof(ctx, h, vc["C"], base)
    seqs = set()
    for e in vc["P"]:
        pp = e["pp"]
        if not h < pp["n"] <= h + window:
            raise BadMessage(f"prepared seq {pp['n']} outside ({h}, {h + window}]")
        if pp["v"] >= vc["v"]:
            raise BadMessage("prepared certificate from a view not before the new one")
        if pp["n"] in seqs:
            raise BadMessage("two prepared certificates for one seq")
        seqs.add(pp["n"])
        check_prepared(ctx, pp, e["ps"])


def compute_new_view(vcs: list[dict]) -> tuple[int, int, list[tuple[int, bytes, bytes]], dict]:
    """From 2f+1 valid VIEW-CHANGEs: (min_s, max_s, [(seq, digest, batch)],
    the VIEW-CHANGE with the highest stable checkpoint). For every seq in
    (min_s, max_s] the new view re-proposes the batch of the prepared
    certificate from the highest view, or the null batch (TOCS 4.4)."""
    best = max(vcs, key=lambda vc: (vc["h"], -vc["i"]))
    min_s = best["h"]
    chosen: dict[int, dict] = {}
    for vc in vcs:
        for e in vc["P"]:
            pp = e["pp"]
            if pp["n"] > min_s and (pp["n"] not in chosen or pp["v"] > chosen[pp["n"]]["v"]):
                chosen[pp["n"]] = pp
    max_s = max(chosen, default=min_s)
    out = []
    for n in range(min_s + 1, max_s + 1):
        pp = chosen.get(n)
        out.append((n, pp["d"], pp["b"]) if pp else (n, NULL_DIGEST, NULL_BATCH))
    return min_s, max_s, out, best


def check_new_view(ctx: RingContext, nv: dict, window: int, base: tuple[int, bytes]) -> tuple:
    """Check a NEW-VIEW against the VIEW-CHANGEs it cites; return
    ``compute_new_view`` of them."""
    v = nv["v"]
    if nv["i"] != ctx.primary(v):
        raise BadMessage(f"new-view for view {v} from member {nv['i']}, not its primary")
    ctx.check_sig(nv)
    senders = set()
    for vc in nv["V"]:
        if vc["v"] != v:
            raise BadMessage("new-view cites a view-change for another view")
        if vc["i"] in senders:
            raise BadMessage("new-view cites one member's view-change twice")
        senders.add(vc["i"])
        check_view_change(ctx, vc, window, base)
    if len(senders) < 2 * ctx.f + 1:
        raise BadMessage(f"new-view cites {len(senders)} view-changes, {2 * ctx.f + 1} needed")
    result = compute_new_view(nv["V"])
    expect = result[2]
    if len(nv["O"]) != len(expect):
        raise BadMessage("new-view pre-prepares do not follow from its view-changes")
    for pp, (n, d, _) in zip(nv["O"], expect):
        if (pp["v"], pp["n"], pp["d"]) != (v, n, d):
            raise BadMessage(f"new-view pre-prepare for seq {pp['n']} is not the one "
                             f"its view-changes require")
        check_pre_prepare(ctx, pp)
    return result
