"""``python -m storage``: run one storage node (see ``storage/server.py``)."""

import sys

from .server import main

sys.exit(main())
