"""``make bench``: runs every ``benchmarks/bench_*.py`` module's ``main()`` in turn and prints its figures.

Usage: ``python -m benchmarks.run [NAME ...]`` (names like ``stt`` or ``vad``; default: all).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    names = argv if argv is not None else sys.argv[1:]
    found = sorted(p.stem.removeprefix("bench_") for p in Path(__file__).parent.glob("bench_*.py"))
    for name in names or found:
        if name not in found:
            print(f"unknown benchmark {name!r}; have: {', '.join(found)}")
            return 2
        print(f"\n=== {name} ===", flush=True)
        importlib.import_module(f"benchmarks.bench_{name}").main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
