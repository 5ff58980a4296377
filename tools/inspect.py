#!/usr/bin/env python3
"""Look inside a p2pfs node or volume, read-only: the same as ``p2pfs inspect``.

    tools/inspect.py node DATA_DIR|SOCKET
    tools/inspect.py volume VOLUME_DIR
    tools/inspect.py object VOLUME_DIR view|WRITER|AGUID
    tools/inspect.py log VOLUME_DIR WRITER [--from SEQ] [--limit N]
    tools/inspect.py block VOLUME_DIR BGUID
    tools/inspect.py file VOLUME_DIR PATH

Each takes --json (``p2pfs.inspect`` has the details).
"""

import sys
from pathlib import Path

# The repository root instead of this directory: tools/inspect.py must not
# shadow the standard library's inspect module.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from p2pfs.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["inspect", *sys.argv[1:]]))
