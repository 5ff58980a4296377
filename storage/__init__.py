"""Storage layers of p2pfs: blocks, versioned objects and multi-writer logs.

Built on ``overlay``; never imports ``p2pfs``.
"""
