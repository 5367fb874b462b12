"""``python -m giva``: the ``giva`` command, where its console script is not on PATH."""

import sys

from giva.cli import main

if __name__ == "__main__":
    sys.exit(main())
