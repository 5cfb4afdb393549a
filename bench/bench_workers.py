"""More cores: ``--workers N`` pre-forked processes sharing the port (SO_REUSEPORT).

The kernel spreads connections, not calls, over the workers, so the driver
opens 8 connections with 4 streams each (32 streams in all, as elsewhere).
On a 2-core machine the workers share the cores with Redis and the driver, so
the scaling printed here is a floor for what a sidecar with 2 dedicated cores
gets.
"""

from __future__ import annotations

from bench.bench_throughput import Runner
from bench.harness import Context, Row, Sample, cpu_seconds, median, spread

SECTION = "workers"
CONNS = 8
STREAMS_PER_CONN = 4


def run(ctx: Context) -> list[Row]:
    counts = (1, 2)
    floors: dict[int, list[Sample]] = {n: [] for n in counts}
    auths: dict[int, list[Sample]] = {n: [] for n in counts}
    busy: dict[int, str] = {}
    with ctx.redis("redis-workers") as server:
        for _ in range(max(1, ctx.rounds - 1)):
            for n in counts:
                with ctx.sidecar(server.url, name=f"workers-{n}", workers=n) as sidecar:
                    r = Runner(ctx, sidecar, server, f"w{n}")
                    kw = {"conns": CONNS, "streams": STREAMS_PER_CONN}
                    before = {p: cpu_seconds(p) for p in sidecar.worker_pids()}
                    floors[n].append(r.floor(**kw))
                    a, _, _ = r.authorize(**kw)
                    auths[n].append(a)
                    used = [cpu_seconds(p) - c for p, c in before.items()]
                    busy[n] = " / ".join(f"{u:.1f}s" for u in used)
    rows = []
    for label, samples in (("Noop", floors), ("Authorize", auths)):
        one = median([s.rps for s in samples[1]])
        scale = [b.rps / a.rps for a, b in zip(samples[1], samples[2], strict=True)]
        rows.append(Row(SECTION, f"{label}, 1 worker (8 conns x 4 streams)", one, "calls/s",
                        1.0, "1 worker"))
        rows.append(Row(SECTION, f"{label}, 2 workers (8 conns x 4 streams)",
                        median([s.rps for s in samples[2]]), "calls/s", median(scale),
                        "1 worker", f"spread {spread(scale) or '-'}"
                        + (f"; CPU per worker in the last round {busy[2]}" if label == "Authorize"
                           else "")))
    return rows
