"""``python -m lalora_curv``: the ``lalora-curv`` command line (see :mod:`lalora_curv.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
