"""Reconciliation time for a month: 20,000 requests and 1,000,000 requests.

The months come from the independent generator the tests use
(``tests.reconcile_month.generate``): two providers, tenants on their own
clocks, every variance category seeded. Each size is reconciled for both
providers through the same code path as ``keel-pdp reconcile`` (import the
exports, read the internal export, attribute every request, write the four
documents). The baseline, measured in the same run on the same files, is only
reading the inputs (export import and internal parse), so the ratio is what
attribution and writing cost on top of parsing.

    python -m bench.bench_reconcile [--sizes 20000,1000000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from bench.harness import Context, Row
from keel_pdp.reconcile import commands
from keel_pdp.reconcile.adapters.generic import load_column_map
from keel_pdp.reconcile.adapters.imports import import_exports
from keel_pdp.reconcile.internal import FileInternalSource
from keel_pdp.reconcile.mapping import load_mapping
from keel_pdp.reconcile.period import Period
from tests.reconcile_month.generate import generate

PROVIDERS = ("openai", "anthropic")


def _args(month: pathlib.Path, answer: dict[str, Any], provider: str,
          out: pathlib.Path) -> list[str]:
    ex = answer["providers"][provider]
    args = ["reconcile", "--internal", str(month / answer["internal"]), "--period",
            answer["period"], "--provider", provider, "--mapping",
            str(month / answer["mapping"]), "--out", str(out), "--replace",
            "--column-map", str(month / ex["column_map"])]
    for name in ex["exports"]:
        args += ["--export", str(month / name)]
    return args


def _reconcile(argv: list[str]) -> float:
    parser = argparse.ArgumentParser(prog="keel-pdp")
    commands.register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = ns.func(ns)
    elapsed = time.perf_counter() - started
    if code not in (0, 1):
        raise RuntimeError(f"reconcile exited {code}")
    return elapsed


def _read_only(month: pathlib.Path, answer: dict[str, Any], provider: str) -> float:
    ex = answer["providers"][provider]
    period = Period.parse(answer["period"])
    gc.disable()  # as the reconcile command runs
    try:
        started = time.perf_counter()
        mapping = load_mapping(month / answer["mapping"])
        cmap = load_column_map(month / ex["column_map"])
        import_exports(provider, [month / n for n in ex["exports"]], period,
                       mapping.aliases(provider), cmap)
        FileInternalSource(month / answer["internal"]).all_lines()
        return time.perf_counter() - started
    finally:
        gc.enable()


def measure(sizes: Sequence[int], rounds: int, work: pathlib.Path) -> list[Row]:
    rows: list[Row] = []
    for size in sizes:
        month = work / f"month-{size}"
        started = time.perf_counter()
        answer = generate(month, seed=1, requests=size)
        gen_s = time.perf_counter() - started
        full: list[float] = []
        base: list[float] = []
        for _ in range(rounds):
            full.append(sum(_reconcile(_args(month, answer, p, work / f"out-{size}"))
                            for p in PROVIDERS))
            base.append(sum(_read_only(month, answer, p) for p in PROVIDERS))
        f, b = statistics.median(full), statistics.median(base)
        label = f"{size:,} requests"
        rows.append(Row("reconcile", f"month of {label}, both providers", f, "s", f / b,
                        "reading the same inputs only",
                        f"reading only: {b:.2f} s; generating the month: {gen_s:.1f} s; "
                        f"{size / f:,.0f} requests/s"))
        shutil.rmtree(month, ignore_errors=True)
        shutil.rmtree(work / f"out-{size}", ignore_errors=True)
    return rows


def run(ctx: Context) -> list[Row]:
    sizes = (2_000, 20_000) if ctx.quick else (20_000, 1_000_000)
    return measure(sizes, 1, ctx.path("reconcile"))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,1000000")
    ap.add_argument("--rounds", type=int, default=1)
    ns = ap.parse_args(argv)
    sizes = [int(s) for s in ns.sizes.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="bench-reconcile-") as tmp:
        for row in measure(sizes, ns.rounds, pathlib.Path(tmp)):
            ratio = "" if row.ratio is None else f"  {row.ratio:.2f}x {row.baseline}"
            print(f"{row.name}: {row.value:.2f} {row.unit}{ratio}  ({row.note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
