"""The wire layer: identities, frames and transports.

Everything above talks to other nodes only through :class:`Transport`
(``transport.py``), which has two implementations with one behaviour:

* ``tls.TlsTransport``: TCP + TLS 1.3, peers authenticated by NodeID;
* ``simnet.SimTransport``: an in-process network on virtual time, for tests
  and scale benchmarks of thousands of nodes.
"""
