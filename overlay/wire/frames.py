"""Frames: the one codec every byte from the network passes through.

A frame on a stream is a 4-byte big-endian length followed by that many bytes
of msgpack encoding one map, the envelope::

    {"v": PROTOCOL_VERSION, "k": kind, "t": message type, "i": request id,
     "b": body}

``kind`` is REQUEST, REPLY or ERROR. A REPLY or ERROR carries the id of the
request it answers. Each message type registers a schema for its request
body and its reply body (``message()``); an ERROR body is always
``{"code": str, "msg": str}``.

Decoding is strict, in this order, and any failure raises :class:`FrameError`:

1. a length over the frame cap is refused before the body is read;
2. msgpack is unpacked with no extension types and string keys only;
3. the envelope must have exactly the keys above, of the right types;
4. the protocol version must be ours;
5. the message type must be registered, and the body must match its schema:
   every required key present, no unknown key, each value of its type, byte
   strings and lists within their bounds, GUIDs exactly 32 bytes.

A transport that sees a FrameError closes that connection with a logged reason
and goes on serving everyone else. Outgoing bodies are checked against the same
schemas, so a bug in our own code fails loudly at the sender.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME = 8 * 1024 * 1024
_LEN = struct.Struct(">I")
HEADER_BYTES = _LEN.size


class FrameError(Exception):
    """Bytes from a peer are not a valid frame: too large, truncated, not
    msgpack, a wrong envelope, an unknown version or message type, or a body
    that does not match its schema. The connection that carried them is closed."""


class Kind(IntEnum):
    REQUEST = 0
    REPLY = 1
    ERROR = 2


# --------------------------------------------------------------------------
# Schemas


class Spec:
    """A check of one decoded msgpack value. ``check`` raises FrameError."""

    def check(self, v: Any, where: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class _Type(Spec):
    def __init__(self, *types: type, name: str):
        self.types = types
        self.name = name

    def check(self, v, where):
        # bool is an int subclass in Python; an int field refuses True/False.
        if type(v) not in self.types:
            raise FrameError(f"{where}: expected {self.name}, got {type(v).__name__}")


class Bytes(Spec):
    """A byte string of at most ``max`` bytes (or exactly ``exact``)."""

    def __init__(self, max: int = DEFAULT_MAX_FRAME, exact: int | None = None):
        self.max = max
        self.exact = exact

    def check(self, v, where):
        if type(v) is not bytes:
            raise FrameError(f"{where}: expected bytes, got {type(v).__name__}")
        if self.exact is not None and len(v) != self.exact:
            raise FrameError(f"{where}: expected {self.exact} bytes, got {len(v)}")
        if len(v) > self.max:
            raise FrameError(f"{where}: {len(v)} bytes exceeds {self.max}")


class Str(Spec):
    def __init__(self, max: int = 4096):
        self.max = max

    def check(self, v, where):
        if type(v) is not str:
            raise FrameError(f"{where}: expected str, got {type(v).__name__}")
        if len(v) > self.max:
            raise FrameError(f"{where}: string of {len(v)} exceeds {self.max}")


class Int(Spec):
    def __init__(self, min: int | None = None, max: int | None = None):
        self.min = min
        self.max = max

    def check(self, v, where):
        if type(v) is not int:
            raise FrameError(f"{where}: expected int, got {type(v).__name__}")
        if (self.min is not None and v < self.min) or (self.max is not None and v > self.max):
            raise FrameError(f"{where}: {v} out of range [{self.min}, {self.max}]")


class ListOf(Spec):
    def __init__(self, item: Spec | type, max: int = 1024):
        self.item = spec(item)
        self.max = max

    def check(self, v, where):
        if type(v) is not list:
            raise FrameError(f"{where}: expected list, got {type(v).__name__}")
        if len(v) > self.max:
            raise FrameError(f"{where}: list of {len(v)} exceeds {self.max}")
        for i, x in enumerate(v):
            self.item.check(x, f"{where}[{i}]")


class MapOf(Spec):
    def __init__(self, key: Spec | type, value: Spec | type, max: int = 1024):
        self.key = spec(key)
        self.value = spec(value)
        self.max = max

    def check(self, v, where):
        if type(v) is not dict:
            raise FrameError(f"{where}: expected map, got {type(v).__name__}")
        if len(v) > self.max:
            raise FrameError(f"{where}: map of {len(v)} exceeds {self.max}")
        for k, x in v.items():
            self.key.check(k, f"{where} key")
            self.value.check(x, f"{where}[{k!r}]")


class Nullable(Spec):
    """The value may be nil (None) or match ``inner``."""

    def __init__(self, inner: Spec | type):
        self.inner = spec(inner)

    def check(self, v, where):
        if v is not None:
            self.inner.check(v, where)


class Optional(Spec):
    """Inside a Struct: the key may be absent; when present it matches ``inner``."""

    def __init__(self, inner: Spec | type):
        self.inner = spec(inner)

    def check(self, v, where):
        self.inner.check(v, where)


class AnyValue(Spec):
    """Any msgpack value (bounded only by the frame cap). Use sparingly: only
    for payloads a higher layer decodes and checks itself."""

    def check(self, v, where):
        return None


class Struct(Spec):
    """A map with string keys: exactly the given fields (Optional ones may be
    missing), nothing else."""

    def __init__(self, fields: dict[str, Spec | type]):
        self.fields = {k: spec(s) for k, s in fields.items()}
        self.required = frozenset(k for k, s in self.fields.items() if not isinstance(s, Optional))

    def check(self, v, where):
        if type(v) is not dict:
            raise FrameError(f"{where}: expected map, got {type(v).__name__}")
        missing = self.required.difference(v)
        if missing:
            raise FrameError(f"{where}: missing {sorted(missing)}")
        for k, x in v.items():
            s = self.fields.get(k) if type(k) is str else None
            if s is None:
                raise FrameError(f"{where}: unknown key {k!r}")
            s.check(x, f"{where}.{k}")


_PLAIN = {
    int: Int(),
    str: Str(),
    bytes: Bytes(),
    bool: _Type(bool, name="bool"),
    float: _Type(float, int, name="number"),
}

GUID = Bytes(exact=32)
PUBKEY = Bytes(exact=32)
SIG = Bytes(exact=64)


def spec(s: Spec | type | dict) -> Spec:
    """Turn a shorthand (``int``, ``bytes``, a dict of fields) into a Spec."""
    if isinstance(s, Spec):
        return s
    if isinstance(s, dict):
        return Struct(s)
    try:
        return _PLAIN[s]
    except (KeyError, TypeError):
        raise TypeError(f"not a schema: {s!r}") from None


# --------------------------------------------------------------------------
# Registry of message types


@dataclass(frozen=True)
class MessageType:
    name: str
    request: Struct
    reply: Struct


REGISTRY: dict[str, MessageType] = {}
ERROR_BODY = Struct({"code": Str(64), "msg": Str(2048)})


def message(name: str, request: dict, reply: dict | None = None) -> str:
    """Register a message type with the schemas of its request and reply
    bodies; returns ``name`` so modules can write ``PING = message(...)``."""
    if not name or len(name) > 64:
        raise ValueError("message type names are 1-64 characters")
    mt = MessageType(name, Struct(request), Struct(reply or {}))
    old = REGISTRY.get(name)
    if old is not None and (old.request.fields.keys() != mt.request.fields.keys()
                            or old.reply.fields.keys() != mt.reply.fields.keys()):
        raise ValueError(f"message type {name!r} registered twice with different schemas")
    REGISTRY[name] = mt
    return name


def body_schema(kind: Kind, msg_type: str) -> Struct:
    if kind == Kind.ERROR:
        return ERROR_BODY
    mt = REGISTRY.get(msg_type)
    if mt is None:
        raise FrameError(f"unknown message type {msg_type[:64]!r}")
    return mt.request if kind == Kind.REQUEST else mt.reply


# --------------------------------------------------------------------------
# Encoding and decoding


@dataclass(slots=True)
class Frame:
    kind: Kind
    type: str
    id: int
    body: dict


_ENVELOPE_KEYS = frozenset(("v", "k", "t", "i", "b"))
MAX_REQUEST_ID = 2**63 - 1


def encode(kind: Kind, msg_type: str, req_id: int, body: dict, *,
           max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """The bytes of one frame, length prefix included. The body is checked
    against its schema first: a ValueError here is a bug in our caller."""
    prefix, payload = encode_parts(kind, msg_type, req_id, body, max_frame=max_frame)
    return prefix + payload


def encode_parts(kind: Kind, msg_type: str, req_id: int, body: dict, *,
                 max_frame: int = DEFAULT_MAX_FRAME) -> tuple[bytes, bytes]:
    """``encode`` as (length prefix, payload): sent one after the other they
    are the same bytes, without copying a large payload once more to join
    them (a transport that writes both in one send wants this)."""
    try:
        body_schema(kind, msg_type).check(body, msg_type)
    except FrameError as e:
        raise ValueError(f"outgoing {kind.name} {msg_type}: {e}") from None
    payload = msgpack.packb(
        {"v": PROTOCOL_VERSION, "k": int(kind), "t": msg_type, "i": req_id, "b": body},
        use_bin_type=True,
    )
    if len(payload) > max_frame:
        raise ValueError(f"outgoing {msg_type} frame of {len(payload)} bytes exceeds {max_frame}")
    return _LEN.pack(len(payload)), payload


def decode(payload: bytes) -> Frame:
    """Decode and check one frame's payload (without its length prefix)."""
    try:
        env = msgpack.unpackb(
            payload,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_no_ext,
        )
    except FrameError:
        raise
    except Exception as e:  # msgpack raises several unrelated types
        raise FrameError(f"not a msgpack frame: {type(e).__name__}: {e}"[:200]) from None
    if type(env) is not dict or env.keys() != _ENVELOPE_KEYS:
        raise FrameError("envelope must be a map with keys v, k, t, i, b")
    v, k, t, i, b = env["v"], env["k"], env["t"], env["i"], env["b"]
    if type(v) is not int or v != PROTOCOL_VERSION:
        raise FrameError(f"unsupported protocol version {v!r} (we speak {PROTOCOL_VERSION})")
    if type(k) is not int or k not in (0, 1, 2):
        raise FrameError(f"bad frame kind {k!r}")
    if type(t) is not str or not 0 < len(t) <= 64:
        raise FrameError("bad message type")
    if type(i) is not int or not 0 <= i <= MAX_REQUEST_ID:
        raise FrameError("bad request id")
    kind = Kind(k)
    body_schema(kind, t).check(b, t)
    return Frame(kind, t, i, b)


def _no_ext(code, data):
    raise FrameError("msgpack extension types are not allowed")


class FrameBuffer:
    """Splits a byte stream into frame payloads, refusing oversized lengths
    before buffering their bodies.

    Chunks are kept as they arrive (``bytes`` as is, other buffers copied
    once) and each payload is put together with a single copy, so a frame of
    MiBs arriving in many reads costs one pass over its bytes."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._chunks: deque[memoryview] = deque()
        self._have = 0                   # bytes held in _chunks
        self._size: int | None = None    # payload length, once the header is in

    def feed(self, data: bytes) -> list[bytes]:
        if data:
            if type(data) is not bytes:
                data = bytes(data)  # the caller may reuse its buffer
            self._chunks.append(memoryview(data))
            self._have += len(data)
        out = []
        while True:
            if self._size is None:
                if self._have < HEADER_BYTES:
                    break
                first = self._chunks[0]
                if len(first) > HEADER_BYTES:
                    (n,) = _LEN.unpack_from(first)
                    self._chunks[0] = first[HEADER_BYTES:]
                    self._have -= HEADER_BYTES
                else:
                    (n,) = _LEN.unpack(self._take(HEADER_BYTES))
                if n > self.max_frame:
                    raise FrameError(f"frame length {n} exceeds cap {self.max_frame}")
                if n == 0:
                    raise FrameError("empty frame")
                self._size = n
            if self._have < self._size:
                break
            out.append(self._take(self._size))
            self._size = None
        return out

    def _take(self, n: int) -> bytes:
        """The next ``n`` held bytes (``n <= _have``) as one bytes object."""
        self._have -= n
        first = self._chunks[0]
        if len(first) >= n:
            if len(first) == n:
                self._chunks.popleft()
                whole = first.obj
                if len(whole) == n:
                    return whole  # a chunk that is exactly one payload: no copy
            else:
                self._chunks[0] = first[n:]
            return first[:n].tobytes()
        parts = []
        while n:
            c = self._chunks[0]
            if len(c) <= n:
                parts.append(c)
                self._chunks.popleft()
                n -= len(c)
            else:
                parts.append(c[:n])
                self._chunks[0] = c[n:]
                n = 0
        return b"".join(parts)

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return self._have + (HEADER_BYTES if self._size is not None else 0)
