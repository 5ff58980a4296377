"""The frame codec (overlay/wire/frames.py): round trips, strict refusals, and
hypothesis garbage that must raise FrameError and nothing else."""

import struct

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from overlay.wire import frames
from overlay.wire.frames import FrameError, Kind

PING = frames.message(
    "test.frames.ping",
    request={"guid": frames.GUID, "n": int, "tags": frames.ListOf(frames.Str(16), max=4),
             "opt": frames.Optional(bytes), "maybe": frames.Nullable(int)},
    reply={"ok": bool, "data": frames.Bytes(max=100)},
)

G = b"\x11" * 32


def raw(env) -> bytes:
    return msgpack.packb(env, use_bin_type=True)


def good_env(**over):
    env = {"v": 1, "k": 0, "t": PING, "i": 7,
           "b": {"guid": G, "n": 3, "tags": ["a"], "maybe": None}}
    env.update(over)
    return env


def test_round_trip_request_and_reply():
    body = {"guid": G, "n": -5, "tags": ["x", "y"], "opt": b"o", "maybe": 4}
    data = frames.encode(Kind.REQUEST, PING, 42, body)
    (n,) = struct.unpack(">I", data[:4])
    assert n == len(data) - 4
    f = frames.decode(data[4:])
    assert (f.kind, f.type, f.id, f.body) == (Kind.REQUEST, PING, 42, body)
    r = frames.decode(frames.encode(Kind.REPLY, PING, 42, {"ok": True, "data": b"z"})[4:])
    assert r.kind == Kind.REPLY and r.body == {"ok": True, "data": b"z"}
    e = frames.decode(frames.encode(Kind.ERROR, PING, 42, {"code": "nope", "msg": "why"})[4:])
    assert e.kind == Kind.ERROR and e.body["code"] == "nope"


def test_outgoing_body_is_checked():
    with pytest.raises(ValueError, match="guid"):
        frames.encode(Kind.REQUEST, PING, 1, {"guid": b"short", "n": 1, "tags": [], "maybe": None})
    with pytest.raises(ValueError, match="unknown message type"):
        frames.encode(Kind.REQUEST, "test.frames.nosuch", 1, {})


@pytest.mark.parametrize("env, reason", [
    (good_env(v=2), "protocol version"),
    (good_env(v=True), "protocol version"),
    (good_env(k=9), "kind"),
    (good_env(t="test.frames.nosuch"), "unknown message type"),
    (good_env(i=-1), "request id"),
    (good_env(i="7"), "request id"),
    (good_env(b={"guid": G[:31], "n": 3, "tags": [], "maybe": None}), "32 bytes"),
    (good_env(b={"guid": G, "n": True, "tags": [], "maybe": None}), "expected int"),
    (good_env(b={"guid": G, "n": 3, "tags": ["a"] * 5, "maybe": None}), "exceeds"),
    (good_env(b={"guid": G, "n": 3, "tags": ["a" * 17], "maybe": None}), "exceeds"),
    (good_env(b={"guid": G, "n": 3, "tags": [], "maybe": None, "extra": 1}), "unknown key"),
    (good_env(b={"guid": G, "tags": [], "maybe": None}), "missing"),
    (good_env(b=[1, 2]), "expected map"),
    ({"v": 1, "k": 0, "t": PING, "i": 1}, "envelope"),
    ([1, 0, PING, 1, {}], "envelope"),
])
def test_strict_refusals(env, reason):
    with pytest.raises(FrameError, match=reason):
        frames.decode(raw(env))


def test_extension_types_refused():
    payload = msgpack.packb(good_env(b=msgpack.ExtType(5, b"x")), use_bin_type=True)
    with pytest.raises(FrameError):
        frames.decode(payload)


def test_deep_nesting_refused_without_crash():
    payload = b"\x91" * 100_000 + b"\xc0"  # a list inside a list ... 100k deep
    with pytest.raises(FrameError):
        frames.decode(payload)


def test_truncated_frame_refused():
    data = frames.encode(Kind.REQUEST, PING, 1, {"guid": G, "n": 1, "tags": [], "maybe": None})
    with pytest.raises(FrameError):
        frames.decode(data[4:-3])


def test_frame_buffer_refuses_oversized_length_before_body():
    buf = frames.FrameBuffer(max_frame=1000)
    with pytest.raises(FrameError, match="exceeds cap"):
        buf.feed(struct.pack(">I", 1001))
    with pytest.raises(FrameError, match="empty"):
        frames.FrameBuffer().feed(struct.pack(">I", 0))


def test_encode_refuses_frames_over_cap():
    with pytest.raises(ValueError, match="exceeds"):
        frames.encode(Kind.REPLY, PING, 1, {"ok": True, "data": b"x" * 100}, max_frame=50)


bodies = st.fixed_dictionaries(
    {"guid": st.binary(min_size=32, max_size=32), "n": st.integers(-2**63, 2**64 - 1),
     "tags": st.lists(st.text(max_size=16), max_size=4), "maybe": st.none() | st.integers(0, 10)},
    optional={"opt": st.binary(max_size=64)},
)


@given(bodies, st.integers(0, frames.MAX_REQUEST_ID), st.lists(st.integers(1, 50), max_size=20))
def test_round_trip_through_any_chunking(body, req_id, cuts):
    data = frames.encode(Kind.REQUEST, PING, req_id, body) * 2
    buf = frames.FrameBuffer()
    out, pos = [], 0
    for c in cuts:
        out += buf.feed(data[pos:pos + c])
        pos += c
    out += buf.feed(data[pos:])
    assert buf.pending == 0
    assert [frames.decode(p).body for p in out] == [body, body]


@settings(max_examples=500)
@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_frame_error(data):
    try:
        frames.decode(data)
    except FrameError:
        pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["v", "k", "t", "i", "b", "x"]), msgpack_values, max_size=6))
def test_random_envelopes_raise_only_frame_error(env):
    try:
        f = frames.decode(raw(env))
    except FrameError:
        return
    # Anything accepted must really satisfy the schema.
    assert f.type == PING and f.kind in (Kind.REQUEST, Kind.REPLY, Kind.ERROR)
