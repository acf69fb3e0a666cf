"""``python -m kernels.bench OP ...``: see ``kernels/bench/__init__.py``."""

import sys

from kernels.bench import main

sys.exit(main())
