"""p2pfs: the FUSE frontend, the ``p2pfs`` command and the embedded local network.

This is the top layer. It may import ``storage`` and ``overlay``; neither of
them imports it (``tests/test_layers.py`` checks).
"""

__version__ = "0.1.0"
