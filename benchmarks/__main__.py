"""Run every benchmark module (``benchmarks/bench_*.py``), or those named with ``--only``.

Each module has ``main(argv=None) -> int`` and prints a Markdown table whose results are ratios
to a peer or a floor measured in the same run (absolute numbers vary between machines).
``make bench`` runs this; ``python -m benchmarks --only eventbus`` runs one.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import benchmarks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", help="run modules whose name contains this")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args = parser.parse_args(argv)
    names = sorted(
        m.name for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_")
    )
    if args.only:
        names = [n for n in names if any(o in n for o in args.only)]
    status = 0
    for name in names:
        print(f"\n## {name}\n", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        code = module.main(["--quick"] if args.quick else [])
        status = status or (code or 0)
        sys.stdout.flush()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
