"""The client's NodeID proof inside a fresh TLS channel (DESIGN.md, Wire).

TLS authenticates the server (``certs.py``); the client has no certificate, so
it proves its NodeID with three frames right after the TLS handshake, before
any request:

1. server -> client  ``wire.hello``  {node: server NodeID, nonce: 32 random bytes}
2. client -> server  ``wire.proof``  {node: client NodeID, key: its Ed25519 key,
   sig: Ed25519 signature over  CONTEXT || server NodeID || client NodeID || nonce}
3. server -> client  ``wire.ready``  {node: client NodeID}, or an ERROR frame
   of type ``wire.proof`` with code ``"auth"`` and the reason, then close.

All three are REQUEST-kind frames with id 0 that get no reply: the envelope
is used for its strict decoding, not for request/response.

What each part of the signed string stops:

* CONTEXT: a signature made for something else (a log record, a certificate
  over the same bytes) cannot pass as a proof, nor can a proof pass as one.
* server NodeID: relaying. A malicious node M that receives a proof made for
  M cannot present it to another node S: S checks it under its own NodeID.
* client NodeID, and key hashing to it: a node cannot claim an ID whose key it
  lacks; the key must hash to the claimed ID and sign.
* nonce: replay. Each connection gets a fresh nonce, so a proof captured from
  an earlier connection does not verify on a new one.

All fields have fixed lengths, so the concatenation is unambiguous. This is
the only cryptographic step of the wire layer outside TLS. The module is
sans-I/O: it builds and checks frames; ``tls.py`` moves them.
"""

from __future__ import annotations

import secrets

from . import frames
from .frames import Frame, Kind
from .ids import BadSignature, Identity, node_id_of, short, verify
from .transport import PeerAuthError, PeerProtocolError

CONTEXT = b"p2pfs-wire-client-proof-v1\x00"
NONCE_BYTES = 32
RESERVED_PREFIX = "wire."  # handshake types; never valid as requests

HELLO = frames.message("wire.hello", request={
    "node": frames.GUID, "nonce": frames.Bytes(exact=NONCE_BYTES)})
PROOF = frames.message("wire.proof", request={
    "node": frames.GUID, "key": frames.PUBKEY, "sig": frames.SIG})
READY = frames.message("wire.ready", request={"node": frames.GUID})

AUTH_CODE = "auth"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof_payload(server_id: bytes, client_id: bytes, nonce: bytes) -> bytes:
    """The exact bytes a client signs to prove ``client_id`` to ``server_id``."""
    return CONTEXT + server_id + client_id + nonce


def _expect(frame: Frame, msg_type: str) -> dict:
    if frame.kind != Kind.REQUEST or frame.type != msg_type or frame.id != 0:
        raise PeerProtocolError(
            f"handshake: expected {msg_type}, got {frame.kind.name} {frame.type}")
    return frame.body


# -- server side --------------------------------------------------------------


def hello_frame(server: Identity, nonce: bytes) -> bytes:
    return frames.encode(Kind.REQUEST, HELLO, 0, {"node": server.id, "nonce": nonce})


def check_proof(frame: Frame, server_id: bytes, nonce: bytes) -> bytes:
    """The client NodeID a ``wire.proof`` frame proves for this connection.

    Raises PeerAuthError when the key does not hash to the claimed NodeID or
    the signature does not verify over (server_id, that NodeID, nonce), which
    is what a replayed or relayed proof looks like; PeerProtocolError when the
    frame is not a proof at all."""
    body = _expect(frame, PROOF)
    claimed, key = body["node"], body["key"]
    if node_id_of(key) != claimed:
        raise PeerAuthError(
            f"client key hashes to {short(node_id_of(key))}, not its claimed {short(claimed)}",
            claimed)
    try:
        verify(key, body["sig"], proof_payload(server_id, claimed, nonce))
    except BadSignature:
        raise PeerAuthError(
            f"proof of {short(claimed)} does not verify for this server and nonce "
            "(replayed, relayed or forged)", claimed) from None
    return claimed


def ready_frame(client_id: bytes) -> bytes:
    return frames.encode(Kind.REQUEST, READY, 0, {"node": client_id})


def refusal_frame(reason: str) -> bytes:
    return frames.encode(Kind.ERROR, PROOF, 0, {"code": AUTH_CODE, "msg": reason[:2048]})


# -- client side --------------------------------------------------------------


def read_hello(frame: Frame, expected_server: bytes) -> bytes:
    """The nonce from a ``wire.hello``. The server's NodeID was already
    checked against its certificate; a different one here is a broken peer."""
    body = _expect(frame, HELLO)
    if body["node"] != expected_server:
        raise PeerProtocolError(
            f"hello names {short(body['node'])}, certificate said {short(expected_server)}",
            expected_server)
    return body["nonce"]


def proof_body(client: Identity, server_id: bytes, nonce: bytes) -> dict:
    return {"node": client.id, "key": client.public_key,
            "sig": client.sign(proof_payload(server_id, client.id, nonce))}


def proof_frame(client: Identity, server_id: bytes, nonce: bytes) -> bytes:
    return frames.encode(Kind.REQUEST, PROOF, 0, proof_body(client, server_id, nonce))


def read_verdict(frame: Frame, client_id: bytes, server_id: bytes) -> None:
    """Accept a ``wire.ready`` naming us; raise PeerAuthError on the server's
    refusal, PeerProtocolError on anything else."""
    if frame.kind == Kind.ERROR and frame.type == PROOF:
        raise PeerAuthError(
            f"server refused our proof: {frame.body['code']}: {frame.body['msg']}", server_id)
    body = _expect(frame, READY)
    if body["node"] != client_id:
        raise PeerProtocolError("server confirmed a different client NodeID", server_id)
