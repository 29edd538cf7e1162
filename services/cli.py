"""``python -m services.cli``: the ``parley`` command, :mod:`services.clients.cli`, under its old module name.

The Makefile, scripts/setup.sh and the tests run this module; the ``parley`` console script points here too.
"""

from __future__ import annotations

import sys

from services.clients.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
