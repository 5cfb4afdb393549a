"""Run every benchmark and print one table of ratios measured in this run.

    python -m bench.run_all                 # everything (about 15 minutes on 2 cores)
    python -m bench.run_all --quick         # a smoke run of every section (about 1 minute)
    python -m bench.run_all --only throughput,latency

Each section is a module ``bench/bench_<name>.py`` with ``run(ctx) -> list[Row]``
(see bench/README.md). Absolute numbers drift with the machine's load; the
ratios are taken against baselines measured in the same run, next to them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence

from bench.harness import BUILD, BenchError, Context, Row, build_driver, new_workdir

SECTIONS = ("throughput", "anatomy", "latency", "client", "workers", "growth", "policy_scale",
            "ledger", "envoy", "envoy-burst", "identity", "reconcile", "cluster", "script")


def _fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def print_table(rows: Sequence[Row]) -> None:
    head = ("section", "measurement", "value", "unit", "ratio", "against")
    body = [(r.section, r.name, _fmt(r.value), r.unit,
             "" if r.ratio is None else f"{r.ratio:.2f}x", r.baseline) for r in rows]
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    print("  ".join(str(h).ljust(w) for h, w in zip(head, widths, strict=True)))
    print(line)
    for i, b in enumerate(body):
        cells = [str(c).rjust(w) if j in (2, 4) else str(c).ljust(w)
                 for j, (c, w) in enumerate(zip(b, widths, strict=True))]
        mark = f"[{i + 1}]" if rows[i].note else ""
        print("  ".join(cells) + "  " + mark)
    print(line)
    for i, r in enumerate(rows):
        if r.note:
            print(f"[{i + 1}] {r.note}")


def _run_section(name: str, ctx: Context) -> list[Row]:
    module_name = f"bench.bench_{name.replace('-', '_')}"
    if importlib.util.find_spec(module_name) is None:
        return []
    module = importlib.import_module(module_name)
    if hasattr(module, "run"):
        rows: list[Row] = module.run(ctx)
        return rows
    if hasattr(module, "main"):
        # A benchmark with its own command line: run it, show its output as is.
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", module_name], check=False)
        return [Row(name, f"python -m {module_name}", time.monotonic() - started, "s", None,
                    "", f"exit status {proc.returncode}; its own output is printed above")]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short runs of every section: checks the harness, not the figures")
    ap.add_argument("--only", default="", help="comma-separated sections to run")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds per timed run (default 5, --quick 1)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="repetitions of each comparison (default 3, --quick 1)")
    ap.add_argument("--growth-decisions", type=int, default=None,
                    help="decisions for the sidecar RSS check (default 1,000,000)")
    ap.add_argument("--growth-holds", type=int, default=None,
                    help="open holds preloaded for the growth check (default 1,000,000)")
    ap.add_argument("--growth-windows", type=int, default=None,
                    help="budget windows preloaded for the growth check (default 100,000)")
    ap.add_argument("--json", default="", help="also write the rows to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ns = ap.parse_args(argv)

    wanted = [s for s in (ns.only.split(",") if ns.only else SECTIONS) if s]
    skip = set(filter(None, ns.skip.split(",")))
    unknown = [s for s in [*wanted, *skip] if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    options = {k: v for k, v in (("growth_decisions", ns.growth_decisions),
                                 ("growth_holds", ns.growth_holds),
                                 ("growth_windows", ns.growth_windows)) if v is not None}
    ctx = Context(quick=ns.quick, work=new_workdir(), driver=build_driver(),
                  duration_s=ns.duration or (1.0 if ns.quick else 5.0),
                  rounds=ns.rounds or (1 if ns.quick else 3), options=options)
    print(f"bench: work directory {ctx.work}; {ctx.rounds} round(s) of {ctx.duration_s:g}s "
          "per comparison", flush=True)
    rows: list[Row] = []
    failed: list[str] = []
    started = time.monotonic()
    for name in wanted:
        if name in skip:
            continue
        t0 = time.monotonic()
        print(f"bench: {name} ...", flush=True)
        try:
            got = _run_section(name, ctx)
        except Exception as exc:  # one broken section must not hide the others' figures
            failed.append(name)
            print(f"bench: {name} FAILED: {exc}", file=sys.stderr, flush=True)
            if not isinstance(exc, BenchError):
                traceback.print_exc()
            continue
        rows.extend(got)
        print(f"bench: {name} done in {time.monotonic() - t0:.0f}s", flush=True)
    print()
    print(f"Results ({time.monotonic() - started:.0f}s; ratios are within this run; the "
          "machine is shared, so expect a few percent of noise)")
    print_table(rows)
    result_file = BUILD / "results.json"
    payload = json.dumps([r.as_dict() for r in rows], indent=1)
    result_file.write_text(payload)
    if ns.json:
        with open(ns.json, "w") as f:
            f.write(payload)
    print(f"rows written to {result_file}")
    if not ns.keep:
        shutil.rmtree(ctx.work, ignore_errors=True)
    if failed:
        print(f"bench: failed sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
