"""The node runner and control socket (overlay/run.py, overlay/control.py),
and the overlay's handling of bad requests: refused with a clear error, the
node goes on serving."""

from __future__ import annotations

import os
import stat

import msgpack
import pytest
import trio

from overlay import control, run
from overlay.config import OverlayConfig
from overlay.errors import DeliveryError
from overlay.node import TapestryNode
from overlay.run import UsageError, parse_bootstrap, parse_listen
from overlay.wire.ids import Identity
from overlay.wire.simnet import PlaneTopology, SimNetwork
from overlay.wire.transport import Peer, RemoteError

HEXID = "ab" * 32


def test_bootstrap_syntax():
    p = parse_bootstrap(f"127.0.0.1:4000#{HEXID}")
    assert p == Peer(bytes.fromhex(HEXID), "127.0.0.1:4000")
    for bad in ["127.0.0.1:4000", f"127.0.0.1#{HEXID}", f"127.0.0.1:0#{HEXID}",
                "127.0.0.1:4000#abcd", f"127.0.0.1:x#{HEXID}", f"#{HEXID}"]:
        with pytest.raises(UsageError):
            parse_bootstrap(bad)
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    with pytest.raises(UsageError):
        parse_listen("localhost")


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert run.main(["--data", str(tmp_path), "--bootstrap", "nonsense"]) == run.EXIT_USAGE
    assert "HOST:PORT#NODEID" in capsys.readouterr().err
    assert run.main(["--data", str(tmp_path), "--republish", "30", "--pointer-ttl", "10"]) == 2


async def test_unusable_data_dir_and_unreachable_bootstrap(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a directory")
    assert await run.run_node(run.NodeOptions(data=f)) == run.EXIT_IDENTITY
    d = tmp_path / "d"
    d.mkdir()
    (d / run.KEY_FILE).write_bytes(Identity.generate().to_pem())
    os.chmod(d / run.KEY_FILE, 0o644)          # readable by others: refused
    assert await run.run_node(run.NodeOptions(data=d)) == run.EXIT_IDENTITY
    # A bootstrap node that does not exist: exit 3, key created 0600.
    e = tmp_path / "e"
    opts = run.NodeOptions(data=e, bootstrap=[Peer(bytes(32), "127.0.0.1:1")],
                           config=OverlayConfig(rpc_timeout=1, hop_timeout=1, route_timeout=2))
    assert await run.run_node(opts, ready=lambda info: None) == run.EXIT_JOIN
    assert stat.S_IMODE((e / run.KEY_FILE).stat().st_mode) == 0o600
    assert not (e / control.SOCKET_NAME).exists()


@pytest.fixture
async def sim_nodes(nursery):
    """Three nodes on a fast simulated network, real time (the control socket
    does real I/O)."""
    net = SimNetwork(seed=1, topology=PlaneTopology(seed=1, size_ms=1, access_ms=(0.1, 0.2)))
    nodes = []
    for i in range(3):
        node = TapestryNode(net.add(Identity.from_seed(b"ctl-%d" % i)))
        await nursery.start(node.run)
        if nodes:
            await node.join(nodes[0].peer)
        nodes.append(node)
    return nodes


async def test_control_socket_commands_and_bad_input(sim_nodes, nursery, tmp_path):
    node = sim_nodes[1]
    path = tmp_path / control.SOCKET_NAME
    await nursery.start(control.ControlServer(node, path).serve)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    g = b"\x42" * 32
    st = (await control.call(path, "tap.ctl.status"))["status"]
    assert st["id"] == node.id.hex() and st["neighbours"] == 2
    roots = (await control.call(path, "tap.ctl.publish", {"guid": g}))["roots"]
    assert len(roots) == 3
    holders = (await control.call(path, "tap.ctl.locate", {"guid": g, "n": 2}))["holders"]
    assert [h["id"] for h in holders] == [node.id]
    r = await control.call(path, "tap.ctl.route", {"guid": g})
    assert r["root"] == roots[0] and r["trace"][0] == node.id
    assert (await control.call(path, "tap.ctl.roots", {"guid": g, "k": 3}))["roots"] == roots
    t = (await control.call(path, "tap.ctl.table"))["table"]
    assert t["published"] == [g.hex()] and t["size"] == 2

    # Garbage, then a frame of an unknown type: each closes only its connection.
    unknown = msgpack.packb({"v": 1, "k": 0, "t": "tap.ctl.nope", "i": 1, "b": {}})
    for junk in (b"\x00\x00\x00\x05hello",
                 len(unknown).to_bytes(4, "big") + unknown,
                 b"\xff\xff\xff\xff"):                  # a length over the cap
        s = await trio.open_unix_socket(str(path))
        await s.send_all(junk)
        assert await s.receive_some(100) == b""
        await s.aclose()
    # A request the node refuses comes back as a coded error.
    await control.call(path, "tap.ctl.unpublish", {"guid": g})
    assert (await control.call(path, "tap.ctl.locate", {"guid": g, "n": 1}))["holders"] == []
    with pytest.raises(control.ControlError):
        await control.call(tmp_path / "nothing.sock", "tap.ctl.status")


async def test_malformed_overlay_requests_are_refused(sim_nodes):
    a, b = sim_nodes[0], sim_nodes[1]
    base = {"rid": None, "origin": {"id": a.id, "addr": a.peer.addr}, "target": b"\x01" * 32,
            "level": 0, "hops": 0}
    for body, code in [
        (dict(base, kind="teleport"), "bad_request"),
        (dict(base, kind="publish"), "bad_request"),           # no obj/holder/epoch
        (dict(base, kind="locate", obj=b"\x02" * 32), "bad_request"),   # no want
        # Withdrawing someone else's pointers.
        (dict(base, kind="unpublish", obj=b"\x02" * 32, epoch=1, hops=1,
              holder={"id": b.id, "addr": b.peer.addr}), "bad_request"),
    ]:
        with pytest.raises(RemoteError) as e:
            await a.transport.request(b.peer, "tap.route", body)
        assert e.value.code == code
    # A type no application serves, delivered at a root: a coded refusal.
    with pytest.raises(DeliveryError) as e:
        await a.router.request("deliver", b.id, app_type="tap.ping",
                               app_body={"addr": "x", "listed": False})
    assert e.value.code == "unsupported"
    # The node still serves.
    assert (await a.find_root(b.id)).at.id == b.id
