"""Start ``keel-pdp serve`` for a benchmark, with two knobs of the benchmarks' own.

    python -m bench.serve [--redis-client resp|redis-py] [--workers N] -- SERVE-ARGS...

``--redis-client`` picks the Redis client of the budget store, so the client
comparison runs both in the same run against the same floor. ``--workers N``
is passed on as ``keel-pdp serve --workers N``. ``--trace-gc`` prints the
garbage collector's pauses when a single-process server stops. Everything
after ``--`` goes to ``keel-pdp serve`` unchanged: the servers under test are
the CLI's own.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__)
    parser.add_argument("--redis-client", choices=("resp", "redis-py"), default="resp")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--trace-gc", action="store_true",
                        help="print the garbage collector's pauses when the server stops")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    rest = [a for a in ns.serve_args if a != "--"] if ns.serve_args[:1] == ["--"] else list(
        ns.serve_args)

    from keel_pdp import cli
    from keel_pdp.budget import store as store_mod

    original = store_mod.BudgetStore.from_url

    def from_url(url: str, **kw: Any) -> Any:
        kw.setdefault("client", ns.redis_client)
        return original(url, **kw)

    store_mod.BudgetStore.from_url = from_url  # type: ignore[method-assign]

    args = ["serve", *rest]
    if ns.workers > 1:
        args += ["--workers", str(ns.workers)]
    report = _trace_gc() if ns.trace_gc and ns.workers <= 1 else None
    code = cli.main(args)
    if report is not None:
        print(report(), flush=True)
    return code


def _trace_gc() -> Callable[[], str]:
    """Time every collection; returns a function that summarises the pauses."""
    stats = {g: [0, 0.0, 0.0] for g in range(3)}  # count, total s, longest s
    started = [0.0]

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        took = time.perf_counter() - started[0]
        s = stats[int(info["generation"])]
        s[0] += 1
        s[1] += took
        s[2] = max(s[2], took)

    gc.callbacks.append(callback)

    def report() -> str:
        return "gc pauses: " + "; ".join(
            f"gen{g} {int(c)} x, total {t * 1000:.0f} ms, longest {m * 1000:.1f} ms"
            for g, (c, t, m) in stats.items())

    return report


if __name__ == "__main__":
    sys.exit(main())
