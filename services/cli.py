"""The ``parley`` command: ``parley serve <stage> [flags]`` and the operator tools."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

STAGES = ("vad", "stt", "translate", "tts", "gateway")


def _serve(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in STAGES:
        sys.stderr.write(f"usage: parley serve {{{','.join(STAGES)}}} [flags]; 'parley serve STAGE --help'\n")
        return 2
    stage, flags = argv[0], list(argv[1:])
    module = importlib.import_module(f"services.{stage}.__main__")
    module.main(flags, prog=f"parley serve {stage}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``parley`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="parley", description=__doc__)
    parser.add_argument("command", choices=["serve"], help="serve: run one stage server")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return _serve(rest)
    parser.error(f"unknown command {command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
