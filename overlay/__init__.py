"""The bottom two layers of p2pfs.

``overlay.wire``  identities, framing, and the transports (TLS over TCP, and an
                  in-process simulated network) that every node talks through.
``overlay``       the Tapestry DOLR: prefix/surrogate routing, publish/locate,
                  join, leave and repair.

Nothing here imports ``storage`` or ``p2pfs``.
"""
