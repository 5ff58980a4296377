"""``python -m overlay``: run one overlay node (see ``overlay/run.py``)."""

import sys

from .run import main

sys.exit(main())
