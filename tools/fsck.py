#!/usr/bin/env python3
"""Check (and repair) a p2pfs volume: the same as ``p2pfs fsck``.

    tools/fsck.py VOLUME_DIR [--repair] [--quick] [--json] [--quiet]

Exit codes: 0 clean, 1 every problem found was repaired, 2 problems are
left, 4 the volume could not be checked (the checks: ``storage.fsck``).
"""

import sys
from pathlib import Path

# The repository root instead of this directory: tools/inspect.py must not
# shadow the standard library's inspect module.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from p2pfs.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["fsck", *sys.argv[1:]]))
