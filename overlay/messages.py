"""Wire messages of the Tapestry overlay (all named ``tap.*``), and the salted
GUIDs every node must compute alike.

Routed messages (``tap.route``) travel hop by hop: each hop answers at once
with an empty acknowledgement (so a dead next hop is noticed within
``hop_timeout``, not after the whole route) and carries the message on in the
background; the node where the route ends sends the outcome straight back to
the origin in a ``tap.result`` that names the origin's request id. Every other
message is a plain request with its reply.

``kind`` of a routed message (what each hop and the end of the route do):

=========== ======================================= ==========================
kind        on every hop                            where it ends
=========== ======================================= ==========================
root        nothing                                 root: reports itself
deliver     nothing                                 root: application upcall
publish     store pointer obj -> holder             root: marks pointer rooted
unpublish   delete holder's pointers (epoch)        root
locate      collect unexcluded holders of obj       first hop with ``want``
                                                    holders, or the root
result      nothing                                 the origin (its own root)
=========== ======================================= ==========================

``result`` carries a ``tap.result`` body through the overlay when the direct
request to the origin failed (a cut link between the end of the route and the
origin must not lose the answer that an alternate route brought through).

Batched publishing (``overlay/publish_batch.py``): ``tap.publish_batch``
carries many unconfirmed publishes of one holder, each entry a (salted
target, object, epoch), hop by hop like a ``publish`` route (acknowledged at
once, no result); ``tap.pointer_batch`` is the batched ``tap.pointer`` of
pointer caching. Both lists are bounded by ``MAX_BATCH`` entries (about
100 bytes each framed, so a full batch stays near 100 KB, far below the frame
cap): a longer list is a ``FrameError``, and the connection is closed.
"""

from __future__ import annotations

from .wire import frames
from .wire.frames import GUID, AnyValue, Bytes, Int, ListOf, Nullable, Optional, Str
from .wire.ids import guid_of
from .wire.transport import Peer

ADDR = Str(256)
PEER = {"id": GUID, "addr": ADDR}
RID = Bytes(exact=16)
MAX_NODES = 512   # peers in one reply (a table has at most 64 * 16 * 3 entries; we cap)

KINDS = ("root", "deliver", "publish", "unpublish", "locate", "result")


def peer_body(p: Peer) -> dict:
    return {"id": p.id, "addr": p.addr}


def peer_of(d: dict) -> Peer:
    return Peer(d["id"], d["addr"])


def salted(g: bytes, i: int) -> bytes:
    """The i-th salted GUID of ``g`` (PAPERS.md "Salted roots"): salt 0 is
    ``g`` itself, so ``route_to_node(g)`` and ``roots(g, 1)`` agree."""
    if i == 0:
        return g
    return guid_of(b"tapestry-salt", i.to_bytes(2, "big"), g)


# ------------------------------------------------------------- neighbour care

PING = frames.message(
    "tap.ping",
    # listed: the sender has us in its table; client: it is a client-only
    # node (OverlayConfig.client_only), never to be adopted.
    request={"addr": ADDR, "listed": bool, "client": Optional(bool)},
    reply={},
)

NODES = frames.message(
    "tap.nodes",
    # The nodes the receiver knows (table, backpointers, itself) that share at
    # least ``min`` and at most ``max`` digits with ``of``. ``requester``, when
    # given, may be adopted by the receiver (join's nearest-neighbour search).
    # ``table_only``: leave out backpointers (a joining node copying a table).
    request={"of": GUID, "min": Int(0, 64), "max": Optional(Int(0, 64)),
             "requester": Optional(PEER), "table_only": Optional(bool)},
    reply={"nodes": ListOf(PEER, max=MAX_NODES)},
)

LEAVING = frames.message(
    "tap.leaving",
    # The sender leaves; ``replacements`` are nodes it knew that may fill the
    # slot it leaves in the receiver's table.
    request={"replacements": ListOf(PEER, max=MAX_NODES)},
    reply={},
)

MCAST = frames.message(
    "tap.mcast",
    # Join's acknowledged multicast (JSAC §III-C1) to every node sharing the
    # first ``level`` digits with ``new``; ``budget`` is the seconds left.
    request={"new": PEER, "level": Int(0, 64), "budget": float},
    reply={"nodes": ListOf(PEER, max=MAX_NODES), "reached": Int(0)},
)

HOLDS = frames.message(
    "tap.holds",
    request={"obj": GUID},
    reply={"holds": bool},
)

POINTER = frames.message(
    "tap.pointer",
    # Store a pointer without routing (pointer caching on a hop's backups).
    request={"obj": GUID, "holder": PEER, "target": GUID, "epoch": Int(0)},
    reply={},
)

MAX_BATCH = 1024  # entries in one publish or pointer batch

BATCH_ENTRY = {"target": GUID, "obj": GUID, "epoch": Int(0)}

PUBLISH_BATCH = frames.message(
    "tap.publish_batch",
    # Unconfirmed publishes of ``holder``'s objects, travelling together as
    # far as their routes agree. ``level``, ``hops`` and ``detours`` mean what
    # they mean in ``tap.route``, for every entry: a node splits a batch by
    # next hop, so the entries of one batch have resolved the same digits.
    request={"origin": PEER, "holder": PEER, "level": Int(0, 64), "hops": Int(0, 255),
             "detours": Optional(Int(0, 255)),
             "entries": ListOf(BATCH_ENTRY, max=MAX_BATCH)},
    reply={},
)

POINTER_BATCH = frames.message(
    "tap.pointer_batch",
    # Store pointers without routing (pointer caching on a hop's backups).
    request={"holder": PEER, "entries": ListOf(BATCH_ENTRY, max=MAX_BATCH)},
    reply={},
)

UNPUBLISH_WALK = frames.message(
    "tap.unpub_walk",
    # Delete the holder's pointers here, then pass the delete on to the nodes
    # the deleted pointers came from or went to: an old publish path that
    # routing no longer takes, walked both ways.
    request={"obj": GUID, "holder": GUID, "epoch": Int(0), "ttl": Int(0, 64)},
    reply={},
)

# ------------------------------------------------------------------- routing

ROUTE = frames.message(
    "tap.route",
    request={
        "rid": Nullable(RID),            # origin's request id; nil: no result wanted
        "origin": PEER,
        "kind": Str(16),
        "target": GUID,                  # the (salted) GUID routed toward
        "level": Int(0, 64),             # digits resolved so far
        "hops": Int(0, 255),
        "detours": Optional(Int(0, 255)),  # sideways hops to alternates so far
        "obj": Optional(GUID),           # publish, unpublish, locate
        "holder": Optional(PEER),        # publish, unpublish
        "epoch": Optional(Int(0)),       # publish, unpublish
        "want": Optional(Int(1, 64)),    # locate: holders wanted
        "exclude": Optional(ListOf(GUID, max=64)),   # locate: holders to skip
        "found": Optional(ListOf(PEER, max=64)),     # locate: holders collected so far
        "app_type": Optional(Str(64)),   # deliver: application message type ...
        "app_body": Optional(AnyValue()),            # ... and body (checked at the root)
        "trace": Optional(ListOf(GUID, max=256)),    # nodes visited, when asked for
        "result": Optional(AnyValue()),  # result: a tap.result body (checked at the end)
    },
    reply={},
)

RESULT = frames.message(
    "tap.result",
    request={
        "rid": RID,
        "at": PEER,                      # where the route ended
        "hops": Int(0, 255),
        "found": ListOf(PEER, max=64),
        "reply": Optional(AnyValue()),   # deliver: the application's reply
        "error": Optional({"code": Str(64), "msg": Str(2048)}),
        "trace": Optional(ListOf(GUID, max=256)),
    },
    reply={},
)

# ----------------------------------------------------------- control socket
# Spoken on the node's local unix socket (overlay/control.py), never on the
# network transport; the sender is whoever can open the socket file (mode 0600).

HEX_GUID = Str(64)

CTL_STATUS = frames.message("tap.ctl.status", request={}, reply={"status": AnyValue()})
CTL_TABLE = frames.message("tap.ctl.table", request={}, reply={"table": AnyValue()})
CTL_PUBLISH = frames.message("tap.ctl.publish", request={"guid": GUID},
                             reply={"roots": ListOf(PEER, max=64)})
CTL_UNPUBLISH = frames.message("tap.ctl.unpublish", request={"guid": GUID}, reply={})
CTL_LOCATE = frames.message("tap.ctl.locate", request={"guid": GUID, "n": Int(1, 64)},
                            reply={"holders": ListOf(PEER, max=64)})
CTL_ROUTE = frames.message("tap.ctl.route", request={"guid": GUID},
                           reply={"root": PEER, "hops": Int(0), "trace": ListOf(GUID, max=256)})
CTL_ROOTS = frames.message("tap.ctl.roots", request={"guid": GUID, "k": Int(1, 64)},
                           reply={"roots": ListOf(PEER, max=64)})
CTL_LEAVE = frames.message("tap.ctl.leave", request={}, reply={})
