"""Long soak of the seeded fault simulation: many seeds, many steps.

    .venv/bin/python scripts/soak.py --seeds 100 --steps 2000 [--first 1000]

Prints one line per seed and a total; a failing seed is printed with the
invariant it broke, and belongs in REGRESSION_SEEDS of
tests/integration/test_simulation.py once fixed. Needs redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.simulation.harness import InvariantViolation, Report, run_seed, summary


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--max-seconds", type=float, default=3600.0)
    ns = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    reports: list[Report] = []
    failed: list[int] = []
    t0 = time.monotonic()
    for seed in range(ns.first, ns.first + ns.seeds):
        if time.monotonic() - t0 > ns.max_seconds:
            print(f"stopping: --max-seconds {ns.max_seconds} reached")
            break
        try:
            rep = await run_seed(seed, ns.steps)
        except InvariantViolation as exc:
            print(f"seed {seed}: FAILED: {exc}")
            failed.append(seed)
            continue
        reports.append(rep)
        print(rep.line(), flush=True)
    print(json.dumps({**summary(reports), "failed_seeds": failed,
                      "seconds": round(time.monotonic() - t0, 1)}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
