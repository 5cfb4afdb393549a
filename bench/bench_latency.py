"""Latency at 1,000 calls/s, open loop: Noop, Authorize and Closeout.

The driver sends on a fixed schedule whatever the answers do (open loop) and
measures each call from the moment it was due, so a stall shows up in the
percentiles instead of slowing the load down. One HTTP/2 connection, as a
local gRPC client or Envoy would use.
"""

from __future__ import annotations

from bench.bench_throughput import Runner
from bench.harness import (
    AUTHORIZE,
    CLOSEOUT,
    Context,
    Row,
    closeout_bodies,
    decisions,
    measure,
    median,
    write_bodies,
)

SECTION = "latency"
RATE = 1000.0


def run(ctx: Context) -> list[Row]:
    seconds = 2.0 if ctx.quick else 10.0
    n = int(RATE * seconds)
    rows: list[Row] = []
    results: dict[str, list[dict[str, float]]] = {"Noop": [], "Authorize": [], "Closeout": []}
    late = 0
    other: dict[str, int] = {}
    with ctx.redis("redis-latency") as server:
        sidecar = ctx.sidecar(server.url, name="latency", launcher_args=["--trace-gc"])
        with sidecar:
            r = Runner(ctx, sidecar, server, "lat")
            # A short closed-loop warm-up so the first timed calls find everything loaded.
            r.floor(n=2000, duration=None)
            for i in range(max(1, ctx.rounds - 1)):
                f = r.floor(rps=RATE, n=n, duration=None, warmup=0)
                bodies = ctx.path(f"lat-auth-{i}.bin")
                write_bodies(bodies, r.workload.authorize(f"lat{i}", 0, n))
                out = ctx.path(f"lat-auth-{i}.out")
                a = measure(ctx, sidecar, server, AUTHORIZE, bodies, rps=RATE, n=n, out=out)
                permits, counts = decisions(out)
                for k, v in counts.items():
                    if k != "ALLOW":
                        other[k] = other.get(k, 0) + v
                cbodies = ctx.path(f"lat-close-{i}.bin")
                closeout_bodies(cbodies, permits)
                c = measure(ctx, sidecar, server, CLOSEOUT, cbodies, rps=RATE, n=len(permits))
                for name, s in (("Noop", f), ("Authorize", a), ("Closeout", c)):
                    results[name].append(s.lat)
                    late += int(s.result["late"])
        gc_line = sidecar.log_line("gc pauses:") or "gc pauses: not reported"
    for name, lats in results.items():
        p50 = median([x["p50"] for x in lats]) / 1000
        p99 = median([x["p99"] for x in lats]) / 1000
        p999 = median([x["p999"] for x in lats]) / 1000
        target = " (target p50 <= 0.7 ms, p99 <= 2 ms)" if name == "Authorize" else ""
        rows.append(Row(SECTION, f"{name} p50 at 1,000/s open loop", p50, "ms", None, "",
                        f"p99 {p99:.2f} ms, p99.9 {p999:.2f} ms, median of {len(lats)} runs "
                        f"of {n} calls{target}"))
        rows.append(Row(SECTION, f"{name} p99 at 1,000/s open loop", p99, "ms"))
    rows.append(Row(SECTION, "calls sent more than 1 ms after their slot", late, "calls",
                    None, "", "0 means the schedule held (the driver shares the cores); "
                    f"answers other than ALLOW: {other or 'none'}; sidecar {gc_line}"))
    return rows
