"""Object pointers: the soft state of Tapestry's DOLR (JSAC §III-B; PAPERS.md
"Publish", "Soft state").

Publishing object ``G`` from holder ``H`` routes toward ``root(salt_i(G))`` and
leaves a pointer ``G -> H`` on every hop; locating ``G`` diverts at the first
pointer. A pointer remembers which salted GUID its publish was routed toward
(the *target*: a node that roots a target hands such pointers over when a
closer root joins), the nodes it came from and was passed on to (so that a
delete can walk an old path that routing no longer takes, both ways), the
holder's *epoch* and an expiry time.

Epochs order a holder's publishes and deletes of one object: a delete at epoch
``e`` removes pointers of epoch ``<= e`` and leaves a tombstone until the
pointers it killed would have expired, so that a republish still in flight
when the delete passed cannot resurrect the pointer; the holder publishes its
next copy at ``e + 1``.

Pure data structure: times are passed in, nothing here sleeps or sends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from .wire.ids import short
from .wire.transport import Peer


@dataclass(slots=True)
class Pointer:
    obj: bytes                  # the object's GUID (what locate asks for)
    holder: Peer                # who stores the object
    target: bytes               # the salted GUID the publish was routed toward
    epoch: int
    expires: float
    prev_hops: set[bytes] = field(default_factory=set)  # nodes that sent us this publish
    sent_to: set[bytes] = field(default_factory=set)    # nodes we passed it (or a copy) on to
    rooted: bool = False        # we were the root of ``target`` when it arrived

    def __repr__(self) -> str:
        return (f"Pointer({short(self.obj)}->{short(self.holder.id)} via {short(self.target)} "
                f"e{self.epoch}{' root' if self.rooted else ''})")


class PointerStore:
    """The pointers one node holds, by object, then by (holder, target)."""

    def __init__(self):
        self._by_obj: dict[bytes, dict[tuple[bytes, bytes], Pointer]] = {}
        self._tombs: dict[tuple[bytes, bytes], tuple[int, float]] = {}  # (obj, holder) -> (epoch, until)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_obj.values())

    def put(self, p: Pointer, now: float) -> bool:
        """Store or refresh a pointer. Refused (False) when a tombstone or a
        newer epoch for the same holder says it is stale."""
        tomb = self._tombs.get((p.obj, p.holder.id))
        if tomb is not None:
            epoch, until = tomb
            if until <= now:
                del self._tombs[(p.obj, p.holder.id)]
            elif p.epoch <= epoch:
                return False
        entries = self._by_obj.setdefault(p.obj, {})
        key = (p.holder.id, p.target)
        old = entries.get(key)
        if old is not None and old.epoch > p.epoch:
            return False
        if old is not None:
            if old.rooted and not p.rooted and old.epoch == p.epoch:
                # A refresh along the path must not clear the root's mark; the
                # routing code decides rootedness when the publish ends here.
                p.rooted = True
            # Paths change as tables improve: remember every neighbour on any
            # path this pointer came by or went to, for deletes (bounded).
            if len(old.prev_hops) < 8:
                p.prev_hops |= old.prev_hops
            if len(old.sent_to) < 8:
                p.sent_to |= old.sent_to
        entries[key] = p
        return True

    def delete(self, obj: bytes, holder_id: bytes, epoch: int, now: float,
               tomb_until: float) -> list[Pointer]:
        """Remove the holder's pointers to ``obj`` with epoch ``<= epoch`` and
        leave a tombstone until ``tomb_until``. Returns what was removed."""
        removed = []
        entries = self._by_obj.get(obj)
        if entries:
            for key in [k for k, p in entries.items()
                        if k[0] == holder_id and p.epoch <= epoch]:
                removed.append(entries.pop(key))
            if not entries:
                del self._by_obj[obj]
        old = self._tombs.get((obj, holder_id))
        if old is None or old[0] <= epoch:
            self._tombs[(obj, holder_id)] = (epoch, tomb_until)
        return removed

    def drop_holder(self, obj: bytes, holder_id: bytes) -> None:
        """Forget pointers to a holder that said it does not hold ``obj``
        (no tombstone: it may publish again later)."""
        entries = self._by_obj.get(obj)
        if entries:
            for key in [k for k in entries if k[0] == holder_id]:
                del entries[key]
            if not entries:
                del self._by_obj[obj]

    def holders(self, obj: bytes, now: float, *, exclude: Iterable[bytes] = (),
                rtt_of: Callable[[bytes], float | None] = lambda _id: None) -> list[Peer]:
        """Live (unexpired) holders of ``obj``, one entry per holder, nearest
        first by this node's RTT to them (unknown RTTs last)."""
        entries = self._by_obj.get(obj)
        if not entries:
            return []
        skip = set(exclude)
        seen: dict[bytes, Peer] = {}
        for (hid, _t), p in entries.items():
            if p.expires > now and hid not in skip:
                seen[hid] = p.holder
        def key(peer: Peer):
            r = rtt_of(peer.id)
            return (r is None, r if r is not None else 0.0, peer.id)
        return sorted(seen.values(), key=key)

    def rooted(self) -> list[Pointer]:
        """Pointers this node stored as the root of their target."""
        return [p for entries in self._by_obj.values() for p in entries.values() if p.rooted]

    def all(self) -> list[Pointer]:
        return [p for entries in self._by_obj.values() for p in entries.values()]

    def get(self, obj: bytes, holder_id: bytes, target: bytes) -> Pointer | None:
        return self._by_obj.get(obj, {}).get((holder_id, target))

    def expire(self, now: float) -> int:
        """Drop expired pointers and tombstones; returns pointers dropped."""
        n = 0
        for obj in list(self._by_obj):
            entries = self._by_obj[obj]
            for key in [k for k, p in entries.items() if p.expires <= now]:
                del entries[key]
                n += 1
            if not entries:
                del self._by_obj[obj]
        for key in [k for k, (_e, until) in self._tombs.items() if until <= now]:
            del self._tombs[key]
        return n

    def objects(self) -> list[bytes]:
        return list(self._by_obj)
