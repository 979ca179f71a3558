"""Run every level's demo, in order, on the embedded defaults; then one summary line per level.

``make demo`` runs this. Each demo runs as its own process (``python -m <module>``), exactly as
a learner would start it, with no server needed: the in-process bus, the simulated broker and
files under a temporary data directory. A demo whose module does not exist yet is reported as
"not built yet" rather than failing, so the runner serves the repository as it grows.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

# (level, module, arguments): the embedded defaults, bounded so that the whole run is short.
DEMOS: list[tuple[str, str, list[str]]] = [
    ("Level 1 (basic)", "level_1_basic.demo_basic", []),
    ("Level 2 (intermediate)", "level_2_intermediate.main", ["--orders", "20", "--seed", "7"]),
    ("Level 2 (intermediate)", "level_2_intermediate.demo_queue", []),
    ("Level 3 (advanced)", "level_3_advanced.event_replay.demo_replay", []),
    ("Level 3 (advanced)", "level_3_advanced.rabbitmq_simulation.main", ["--broker", "simulated"]),
    ("Level 3 (advanced)", "level_3_advanced.webhook.demo", []),
    ("Level 4 (hard)", "level_4_hard.file_kafka.demo", []),
    ("Level 4 (hard)", "level_4_hard.saga_pattern.demo", []),
]


@dataclass
class Outcome:
    level: str
    module: str
    status: str  # "ok", "failed (exit N)", "not built yet"
    seconds: float


def run_demo(
    module: str, args: list[str], env: dict[str, str], timeout: float
) -> tuple[str, float]:
    if importlib.util.find_spec(module) is None:
        return "not built yet", 0.0
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", module, *args], env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"failed (no end after {timeout:.0f}s)", time.perf_counter() - start
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    return status, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="per demo, in seconds")
    parser.add_argument("--only", help="run only demos whose module contains this text")
    args = parser.parse_args(argv)

    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="eda-demo-") as data_dir:
        env = dict(os.environ)
        env.setdefault("EDA_DATA_DIR", data_dir)
        for level, module, demo_args in DEMOS:
            if args.only and args.only not in module:
                continue
            if importlib.util.find_spec(module) is not None:
                print(f"\n===== {level}: python -m {module} {' '.join(demo_args)}".rstrip())
            sys.stdout.flush()
            status, seconds = run_demo(module, demo_args, env, args.timeout)
            outcomes.append(Outcome(level, module, status, seconds))

    print("\n===== summary")
    levels = dict.fromkeys(o.level for o in outcomes)
    for level in levels:
        parts = [
            f"{o.module.split('.', 1)[1]} {o.status}"
            + (f" ({o.seconds:.1f}s)" if o.status != "not built yet" else "")
            for o in outcomes
            if o.level == level
        ]
        print(f"{level}: {'; '.join(parts)}")
    failed = [o for o in outcomes if o.status.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
