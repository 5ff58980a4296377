"""Errors of the inner ring: certificates, agreement and the ring client.

Kept apart from ``storage.errors`` (owned by the block layer) until the lead
merges them; every class here derives from :class:`storage.errors.StorageError`
so the CLI and FUSE boundaries catch them with everything else.
"""

from __future__ import annotations

from .errors import StorageError


class RingError(StorageError):
    """Base of the inner ring's errors."""


class BadCertificate(RingError):
    """A certificate (or its encoding) must not be trusted. ``reason`` is one
    of the ``REASON_*`` codes below, so callers and tests can tell a forged
    certificate from a malformed one without parsing the message."""

    MALFORMED = "malformed"              # not a certificate encoding at all
    UNSUPPORTED = "unsupported_version"  # a format version we do not know
    WRONG_RING = "wrong_ring"            # another ring, or another epoch of it
    UNKNOWN_SIGNER = "unknown_signer"    # a signer that is not a ring member
    DUPLICATE = "duplicate_signer"       # one member listed twice
    BAD_SIGNATURE = "bad_signature"      # a signature that does not verify
    TOO_FEW = "too_few"                  # fewer than 2f+1 member signatures
    MISMATCH = "mismatch"                # valid, but not the one asked for

    def __init__(self, reason: str, msg: str):
        super().__init__(f"bad certificate ({reason}): {msg}")
        self.reason = reason


class BadDescriptor(RingError):
    """A ring descriptor is malformed, inconsistent (member count other than
    3f+1, a repeated member key, a ring id that its owner key and name do not
    give) or not signed by the volume owner, or a successor descriptor is not
    certified by the ring it replaces."""


class NotAMember(RingError):
    """A node was asked to act as a member of a ring whose descriptor does
    not list it (a wrong key or descriptor, or it was replaced)."""


class RingUnavailable(RingError):
    """Fewer than 2f+1 ring members gave a usable answer in time, so nothing
    can be certified now. The outcome of an update is then unknown: it may
    still be applied once enough members are back. ``request`` is the signed
    request, which ``RingClient.resubmit`` sends again (the ring applies a
    retried request at most once); ``errors`` maps member NodeIDs to what
    went wrong with each."""

    def __init__(self, msg: str, request=None, errors: dict | None = None):
        super().__init__(msg)
        self.request = request
        self.errors = errors or {}


class Conflict(RingError):
    """The update's predicate was false: the object is not at the version the
    writer expected (or a create found it existing). ``current`` is the
    verified certificate of the object's current version."""

    def __init__(self, current, msg: str | None = None):
        super().__init__(msg or (
            f"conflict: object {current.aguid[:4].hex()} is at seq {current.seq} "
            f"(VGUID {current.vguid[:4].hex()})"))
        self.current = current


class NotAuthorised(RingError):
    """The ring refused the request: its signer is not a writer of the object
    (or not its owner, for creation and ACL changes and reconfiguration)."""


class ObjectNotFound(RingError):
    """The ring has no object under this AGUID (never created)."""


class BadRequest(RingError):
    """The ring refused the request as malformed: an operation it cannot
    decode, an AGUID that does not match owner key and name, or a field out
    of range. A bug in the client, never retried."""


class StaleRequest(RingError):
    """The request id is older than every id the ring still remembers for
    this client, so the ring can no longer tell whether it was applied.
    Make a new request (with a fresh id) after reading the current version."""
