"""The inner ring as 4 real member processes on loopback, over TLS
(``python -m storage.ringnode``): a silent (SIGSTOPped) member, a member
killed with SIGKILL and restarted on its LMDB state, and two members down.
Every process is stopped by PID at teardown."""

from types import SimpleNamespace

import msgpack
import pytest
import trio

from overlay.wire.ids import Identity
from overlay.wire.tls import TlsTransport
from overlay.wire.transport import Peer
from storage.certificate import RingDescriptor
from storage.ring import STATUS
from storage.ring_errors import Conflict, RingUnavailable
from storage.ring_local import LocalRing
from storage.ringclient import RingClient

ARGS = ["--request-timeout", "0.6", "--view-change-timeout", "0.6", "--checkpoint", "8",
        "--no-sync"]


def v(k: int) -> bytes:
    return k.to_bytes(32, "big")


@pytest.fixture
async def ring(tmp_path):
    lr = LocalRing(tmp_path, args=ARGS)
    try:
        await lr.start()
        yield lr
    finally:
        lr.close()


@pytest.fixture
async def client(ring):
    async with TlsTransport(ring.owner) as t:
        yield RingClient(t, ring.ring, ring.owner, attempt_timeout=2.0, deadline=20.0)


async def status(client, k: int) -> dict:
    m = client.ring.members[k]
    return await client.transport.request(Peer(m.id, m.addr), STATUS, {}, timeout=5.0)


async def wait_caught_up(client, k: int, others, timeout: float = 20.0) -> dict:
    with trio.fail_after(timeout):
        while True:
            want = max([(await status(client, j))["exec"] for j in others])
            got = await status(client, k)
            if got["exec"] >= want:
                return got
            await trio.sleep(0.2)


async def test_silent_member_does_not_stop_updates(ring, client):
    cert = await client.create(b"doc", v(1))
    ring.pause(0)                           # the primary of view 0: alive, but silent
    try:
        for k in range(2, 12):
            cert = await client.update(cert.aguid, v(k), expect_seq=cert.seq)
        assert cert.seq == 11 and ring.ids[0].id not in cert.signatures
        assert (await status(client, 1))["view"] >= 1
    finally:
        ring.resume(0)
    got = await wait_caught_up(client, 0, (1, 2, 3))
    assert got["objects"] == 1


async def test_killed_member_restarts_and_catches_up(ring, client):
    cert = await client.create(b"doc", v(1))
    for k in range(2, 6):
        cert = await client.update(cert.aguid, v(k), expect_seq=cert.seq)
    before = (await wait_caught_up(client, 3, (0, 1, 2)))["exec"]
    ring.kill(3)                            # kill -9, mid-stream
    for k in range(6, 24):                  # two stable checkpoints go by without it
        cert = await client.update(cert.aguid, v(k), expect_seq=cert.seq)
    ready = await ring.restart(3)
    assert ready["exec"] == before          # it recovered its own LMDB state first
    for k in range(24, 28):
        cert = await client.update(cert.aguid, v(k), expect_seq=cert.seq)
    got = await wait_caught_up(client, 3, (0, 1, 2))
    assert got["stats"]["state_transfers"] >= 1     # the log it missed was trimmed
    ring.kill(1)                            # now it is needed for every quorum
    cert = await client.update(cert.aguid, v(28), expect_seq=cert.seq)
    assert cert.seq == 28 and ring.ids[3].id in cert.signatures
    latest = await client.latest(cert.aguid)
    assert latest.seq == 28


async def test_two_down_clear_error_then_resume(ring, client):
    cert = await client.create(b"doc", v(1))
    ring.kill(2)
    ring.kill(3)
    short = RingClient(client.transport, ring.ring, ring.owner, attempt_timeout=1.0,
                       deadline=3.0)
    with pytest.raises(RingUnavailable) as e:
        await short.update(cert.aguid, v(2), expect_seq=1)
    assert "only 2 of 4 members reachable" in str(e.value)
    await ring.restart(3)
    cert2 = await client.resubmit(e.value.request)
    assert (cert2.seq, cert2.vguid) == (2, v(2))
    cert3 = await client.update(cert.aguid, v(3), expect_seq=2)
    assert cert3.seq == 3


def test_ringnode_refuses_bad_configuration(tmp_path):
    """Bad configuration: one clear line and exit code 2, never a traceback."""
    import subprocess
    import sys

    from overlay.wire.ids import Identity
    from storage.certificate import RingDescriptor
    key = tmp_path / "node.key"
    Identity.generate().save(key)
    (tmp_path / "garbage.json").write_text("{not json")
    other = Identity.generate()
    ring = RingDescriptor.create(other, "x", [(Identity.generate().public_key, "127.0.0.1:9")
                                              for _ in range(4)])
    (tmp_path / "ring.json").write_text(ring.to_json())
    for ring_file, expect in (("garbage.json", "not a ring descriptor"),
                              ("ring.json", "is not a member")):
        p = subprocess.run([sys.executable, "-m", "storage.ringnode", "--data", str(tmp_path),
                            "--ring", str(tmp_path / ring_file)],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and expect in p.stderr and "Traceback" not in p.stderr


async def test_two_stopped_then_continued_resume(ring, client):
    """Two members stopped (SIGSTOP) while requests and protocol frames are
    queued to them: no quorum, a clear error; once they run again, frames
    and answers that arrive too late are made up for and the ring goes on."""
    cert = await client.create(b"doc", v(1))
    for k in range(2, 5):
        cert = await client.update(cert.aguid, v(k), expect_seq=cert.seq)
    ring.pause(0)
    ring.pause(1)
    try:
        short = RingClient(client.transport, ring.ring, ring.owner, attempt_timeout=1.0,
                           deadline=4.0)
        with pytest.raises(RingUnavailable):
            await short.update(cert.aguid, v(5), expect_seq=cert.seq)
    finally:
        ring.resume(0)
        ring.resume(1)
    for k in range(5, 10):
        try:
            cert = await client.update(cert.aguid, v(k), expect_seq=cert.seq)
        except Conflict as e:             # the stopped attempt made it in after all
            cert = e.current
    assert cert.seq >= 8
    got = await wait_caught_up(client, 0, (1, 2, 3))
    assert got["exec"] == (await status(client, 3))["exec"]


class _SameBatch:
    """A transport whose requests all wait for one event, so their replies
    resume in one scheduler batch, in an order trio shuffles: member 0
    answers with a whole certificate, the others with a plain reply."""

    def __init__(self):
        self.go = trio.Event()
        self.waiting = 0

    async def request(self, peer, msg_type, body, *, timeout):
        self.waiting += 1
        await self.go.wait()
        res = msgpack.packb(["ok", b"body", "", b"share"])
        return {"res": res, "sigs": [b"s"]} if peer.addr == "m0" else {"res": res}


class _Client(RingClient):
    def _whole(self, j, rep, sigs, alone):
        return ("ok", "certificate of member 0", "") if j == 0 else None

    def _evaluate(self, replies):
        return None         # no quorum among plain replies


async def test_an_outcome_found_is_not_lost_to_a_reply_in_the_same_batch():
    """Regression (a flake of test_silent_member_does_not_stop_updates under
    load): a member's whole certificate settled the request and cancelled
    the others, but another ask, resumed in the same batch and past its
    last checkpoint, evaluated the replies so far and overwrote the outcome
    with "none yet", so submit raised RingUnavailable."""
    owner = Identity.from_seed(b"same batch")
    ring = RingDescriptor.create(owner, "r", [(Identity.from_seed(b"m%d" % k).public_key, f"m{k}")
                                              for k in range(4)])
    for _ in range(40):
        t = _SameBatch()
        client = _Client(t, ring, owner, attempt_timeout=5, deadline=10, primary_timeout=0.01)
        req = SimpleNamespace(c=b"c", r=1, op=b"op", s=b"s")
        async with trio.open_nursery() as n:
            async def release():
                while t.waiting < 1 + ring.n:       # the primary's try, then all four
                    await trio.sleep(0.001)
                t.go.set()
            n.start_soon(release)
            got = await client.submit(req, alone=lambda status, body: True)
        assert got == ("ok", "certificate of member 0", "")
