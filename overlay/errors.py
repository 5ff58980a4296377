"""Errors of the Tapestry overlay, as the layers above see them.

Transport errors (``overlay.wire.transport.PeerError`` and ``RemoteError``)
stay inside the overlay: routing retries backups and alternates, and reports
what is left as one of these.
"""


class OverlayError(Exception):
    """Base of the overlay's errors."""


class NotRunning(OverlayError):
    """The node is not running (``run`` not started yet, or it left/stopped)."""


class NoRoute(OverlayError):
    """A routed message did not reach the end of its route in time: next hops
    and their alternates failed, or the result never came back."""


class ObjectNotFound(OverlayError):
    """No live holder of the object was found under any of its salted roots."""


class JoinError(OverlayError):
    """No bootstrap node could be reached, or none could route our join."""


class DeliveryError(OverlayError):
    """The application at the end of a route (or at a holder) refused the
    message; ``code`` and ``msg`` are its refusal."""

    def __init__(self, code: str, msg: str):
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg
