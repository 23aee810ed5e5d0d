"""``python -m mmedge``: the ``mmedge`` command (for a Python whose scripts folder is not on PATH)."""

import sys

from mmedge.cli import main

sys.exit(main())
