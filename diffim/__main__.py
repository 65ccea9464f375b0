"""``python -m diffim``: the command line (see :mod:`diffim.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
