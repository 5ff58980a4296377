"""Faulty ring members, for tests: a real member process or simulated node
that lies in chosen ways (PBFT's fault model: up to f members may do
anything). Never use outside tests and fault-injection runs.

Faults (any combination):

* ``silent``      sends nothing and answers no client, but stays connected;
* ``wrong_vguid`` signs certificate bodies with made-up VGUIDs for clients,
  for the primary (SHARES) and for other members' share requests, and
  prepares and commits digests of batches nobody proposed;
* ``equivocate``  as primary, sends each backup a different pre-prepare for
  the same sequence number; to clients, claims success for every update
  with a certificate share of whatever each client wanted (a different body
  for each client at the same seq), and its shares for the primary are of
  made-up versions too;
* ``replay``      keeps every message it receives and sends and, a few times
  a second, re-sends a sample of old ones to everybody (old pre-prepares,
  prepares, commits, checkpoints, view changes), re-submits old client
  requests to the other members, and as primary slips old requests into
  new batches (so they are ordered, and executed, a second time);
* ``forge``       answers readers (``ring.latest``) with forged certificates:
  a newer version it made up, signed by itself and carrying the real
  certificate's signatures (which do not cover it), or signed by itself
  alone.
"""

from __future__ import annotations

import logging
import random

import msgpack
import trio

from overlay.wire.ids import guid
from overlay.wire.transport import Peer, PeerError, RemoteError

from . import ring_messages as M
from .certificate import CertBody, Certificate
from .pbft import REQ, Replica

log = logging.getLogger(__name__)

FAULTS = ("silent", "wrong_vguid", "equivocate", "replay", "forge")


class ByzantineReplica(Replica):
    def __init__(self, *args, faults=(), seed: int = 0, **kw):
        super().__init__(*args, **kw)
        bad = set(faults) - set(FAULTS)
        if bad:
            raise ValueError(f"unknown faults {sorted(bad)}; known: {FAULTS}")
        self.faults = set(faults)
        self.rng = random.Random(seed)
        self._seen_msgs: list[dict] = []
        self._seen_reqs: list[dict] = []
        self._old_reqs: list = []
        log.warning("member %d is BYZANTINE: %s", self.i, ", ".join(sorted(self.faults)))
        if self.faults & {"wrong_vguid", "equivocate"}:
            honest_reply = self.app.reply
            self.app.reply = lambda c, r, res: self._lying_reply(honest_reply, c, r, res)
            honest_sign = self.app.sign_body
            self.app.sign_body = lambda body: self._lying_sign(honest_sign, body)

    # ---- lies to clients ------------------------------------------------------

    def _lying_sign(self, honest, body: bytes) -> bytes:
        b = CertBody.decode(body)
        fake = CertBody(b.ring_id, b.epoch, b.aguid, b.seq, self.rng.randbytes(32), b.prev,
                        b.time)
        return self.me.sign(fake.signing_bytes())

    def _lying_reply(self, honest, client: bytes, rid: int, result: bytes) -> bytes:
        status, body, detail = msgpack.unpackb(result, raw=False)
        if body is None:
            return honest(client, rid, result)
        b = CertBody.decode(body)
        if "equivocate" in self.faults:
            # "You won": a made-up version for this very client.
            vguid = guid(client + rid.to_bytes(8, "big"))
            fake = CertBody(b.ring_id, b.epoch, b.aguid, b.seq, vguid, b.prev, b.time)
            status = "ok"
        else:
            fake = CertBody(b.ring_id, b.epoch, b.aguid, b.seq, self.rng.randbytes(32), b.prev,
                            b.time)
        enc = fake.encode()
        return msgpack.packb([status, enc, detail, self.me.sign(fake.signing_bytes())],
                             use_bin_type=True)

    # ---- lies to readers ------------------------------------------------------------

    def register(self, dispatcher) -> None:
        super().register(dispatcher)
        if "forge" in self.faults:
            from .ring import LATEST
            on = dispatcher.on

            def on_forging(msg_type, fn):
                on(msg_type, self._forging(fn) if msg_type == LATEST else fn)

            dispatcher.on = on_forging

    def _forging(self, honest):
        async def latest(sender: bytes, body: dict) -> dict:
            r = await honest(sender, body)
            if r["cert"] is None:
                return r
            real = Certificate.decode(r["cert"])
            b = real.body
            fake = CertBody(b.ring_id, b.epoch, b.aguid, b.seq + 1, self.rng.randbytes(32),
                            b.vguid, b.time + 1)
            sigs = {self.me.id: fake.sign(self.me)}
            if self.rng.random() < 0.5:
                sigs = {**real.signatures, **sigs}   # real signatures, of another body
            return {"cert": Certificate(fake, sigs).encode()}
        return latest

    # ---- lies to members ------------------------------------------------------------

    def _route(self, to, msg: dict) -> None:
        if "silent" in self.faults:
            return
        if "wrong_vguid" in self.faults and msg["t"] in ("p", "c"):
            msg = self.ctx.sign(self.me, dict(msg, d=self.rng.randbytes(32)))
        if "replay" in self.faults:
            self._remember(msg)
        super()._route(to, msg)

    def _propose(self, n: int, batch: bytes) -> None:
        t, reqs = M.decode_batch(batch)
        if "replay" in self.faults:
            # As primary, slip old (already executed) requests into new batches.
            keys = {r.key for r in reqs}
            old = [r for r in self.rng.sample(self._old_reqs, min(3, len(self._old_reqs)))
                   if r.key not in keys and keys.add(r.key) is None]
            if len(self._old_reqs) < 5000:
                self._old_reqs.extend(reqs)
            reqs = list(reqs) + old
            batch = M.encode_batch(t, reqs)
        if "equivocate" not in self.faults:
            return super()._propose(n, batch)
        first = None
        for j in range(self.ring.n):
            if j == self.i:
                continue
            variant = M.encode_batch(t + j, list(reqs))   # another digest for each backup
            pp = M.pre_prepare(self.ctx, self.me, self.i, self.view, n, variant)
            self._send(pp, to=j)
            first = first or pp
        self._accept_pp(self._slot(n), first)

    async def _on_msgs(self, sender: bytes, body: dict) -> dict:
        if "replay" in self.faults:
            for m in body["msgs"]:
                self._remember(m)
        return await super()._on_msgs(sender, body)

    async def _on_request(self, sender: bytes, body: dict) -> dict:
        if "silent" in self.faults:
            await trio.sleep_forever()
        if "replay" in self.faults and len(self._seen_reqs) < 5000:
            self._seen_reqs.append(dict(body))
        return await super()._on_request(sender, body)

    async def _on_fetch(self, sender: bytes, body: dict) -> dict:
        if "silent" in self.faults:
            await trio.sleep_forever()
        return await super()._on_fetch(sender, body)

    # ---- replays ---------------------------------------------------------------------

    def _remember(self, m) -> None:
        if type(m) is dict and len(self._seen_msgs) < 20000:
            self._seen_msgs.append(m)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            await n.start(super().run)
            if "replay" in self.faults:
                n.start_soon(self._replay_loop)
            task_status.started()

    async def _replay_loop(self) -> None:
        while True:
            await trio.sleep(0.2)
            if self._seen_msgs:
                for m in self.rng.sample(self._seen_msgs, min(50, len(self._seen_msgs))):
                    super()._route(None, m)
            if self._seen_reqs:
                body = self.rng.choice(self._seen_reqs)
                for j, m in enumerate(self.ring.members):
                    if j != self.i:
                        try:
                            await self.transport.request(Peer(m.id, m.addr), REQ,
                                                         dict(body, wait=0.0), timeout=1.0)
                        except (PeerError, RemoteError):
                            pass
