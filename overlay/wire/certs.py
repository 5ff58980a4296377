"""TLS 1.3 contexts and self-signed node certificates (DESIGN.md, Wire).

A node's certificate is self-signed with its own Ed25519 key: nothing in it is
trusted except the public key, and the only check that matters is that this
key hashes to the NodeID the connecting side expected (``node_id_of``).
TLS 1.3's CertificateVerify, which OpenSSL checks even with chain
verification turned off, proves the server holds the private half; so "the
certificate's key hashes to the NodeID" is exactly "this is that node".

The client presents no certificate: the stdlib's verification has no callback
for unknown self-signed client certificates, so clients prove their NodeID
inside the channel instead (``handshake.py``).

Only TLS 1.3 is offered, in both directions; no session tickets (connections
are long-lived and reused, resumption would only add state).
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from .ids import Identity, node_id_of, short
from .transport import PeerAuthError

# RFC 5280 4.1.2.5: 99991231235959Z means "no well-defined expiration". Nobody
# checks validity here (trust comes from the NodeID), so the dates are fixed.
_NOT_BEFORE = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)


def self_signed_certificate(identity: Identity) -> bytes:
    """A PEM X.509 certificate for ``identity``'s Ed25519 key, signed by that
    key, with the NodeID in hex as its common name (for humans reading it)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.id.hex())])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .sign(identity.private_key, None)  # Ed25519 takes no hash algorithm
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _tls13_only(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def server_context(identity: Identity) -> ssl.SSLContext:
    """The context a node accepts connections with: its self-signed
    certificate, TLS 1.3 only, no client certificate requested."""
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.verify_mode = ssl.CERT_NONE
    ctx.num_tickets = 0
    _load_chain(ctx, self_signed_certificate(identity) + identity.to_pem())
    return ctx


def client_context() -> ssl.SSLContext:
    """The context a node connects with. Chain and host name checks are off
    on purpose: the server is authenticated afterwards by
    :func:`check_server_certificate` against the NodeID we asked for."""
    ctx = _tls13_only(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load_chain(ctx: ssl.SSLContext, pem: bytes) -> None:
    # ssl can only load a key from a file. An anonymous memory file (Linux)
    # keeps the private key off every file system; elsewhere a 0600 temporary
    # file lives only for the duration of the call.
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("p2pfs-node-key", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="p2pfs-node-key-")  # created mode 0600
    try:
        os.write(fd, pem)
        os.close(fd)
        fd = -1
        ctx.load_cert_chain(path)
    finally:
        if fd >= 0:
            os.close(fd)
        os.unlink(path)


def certificate_key(der: bytes | None) -> bytes:
    """The raw Ed25519 public key of a DER certificate; PeerAuthError when
    there is no certificate, it does not parse, or its key is not Ed25519."""
    if not der:
        raise PeerAuthError("peer presented no certificate")
    try:
        key = x509.load_der_x509_certificate(der).public_key()
    except ValueError as e:
        raise PeerAuthError(f"peer certificate does not parse: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PeerAuthError(f"peer certificate key is {type(key).__name__}, not Ed25519")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def check_server_certificate(der: bytes | None, expected_id: bytes) -> None:
    """Raise PeerAuthError unless the certificate's key hashes to
    ``expected_id`` (the NodeID the caller meant to reach)."""
    got = node_id_of(certificate_key(der))
    if got != expected_id:
        raise PeerAuthError(
            f"server key hashes to {short(got)}, expected {short(expected_id)}", expected_id
        )
