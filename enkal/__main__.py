"""``python -m enkal``: the ``enkal`` command line (:func:`enkal.cli.main`), same exit
statuses."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
