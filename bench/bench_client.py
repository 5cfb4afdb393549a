"""Which Redis client: redis-py's asyncio client against the pipelined RESP client.

Two views, each measured in interleaved rounds of this run:

1. The client alone (issue 7's method): ``bench.rt_server`` serves Noop with
   the sidecar's gRPC stack, and with ``--client`` each call first runs a
   one-line Lua script through the store's transport. Ratio to the same
   server without the script call.
2. The whole sidecar: ``keel-pdp serve`` with ``--redis-client redis-py`` and
   with ``--redis-client resp``, Authorize at 32 streams, each against its own
   Noop floor.

Next to calls/s the table gives the CPU the event-loop thread spends per call,
which a busy machine disturbs much less than throughput.
"""

from __future__ import annotations

import importlib.util
import sys

from bench.bench_throughput import STREAMS, Runner
from bench.harness import (
    NOOP,
    Context,
    Row,
    Sample,
    measure,
    median,
    noop_body,
    read_responses,
    spread,
)

SECTION = "client"
# valkey-glide joins the client-alone comparison when it is installed
# (`pip install valkey-glide`); it is not a dependency of the sidecar.
CLIENTS = ("none", "redis-py", "resp") + (
    ("glide",) if importlib.util.find_spec("glide") is not None else ())


def run(ctx: Context) -> list[Row]:
    rows = _alone(ctx)
    rows.extend(_sidecar(ctx))
    return rows


def _alone(ctx: Context) -> list[Row]:
    body = noop_body(ctx.path("client-noop.bin"))
    samples: dict[str, list[Sample]] = {c: [] for c in CLIENTS}
    failures: dict[str, int] = {}
    with ctx.redis("redis-client") as server:
        servers = {c: ctx.sidecar(server.url, name=f"rt-{c}", command=[
            sys.executable, "-m", "bench.rt_server", "--port", "{port}", "--redis-url",
            server.url, "--client", c]) for c in CLIENTS}
        for s in servers.values():
            s.start()
        try:
            warm = 200 if ctx.quick else 2000
            for _ in range(ctx.rounds):
                for c in CLIENTS:
                    out = ctx.path(f"rt-{c}.out")
                    samples[c].append(measure(ctx, servers[c], server, NOOP, body, cycle=True,
                                              duration=ctx.duration_s, warmup=warm,
                                              streams=STREAMS, out=out))
                    for _, raw in read_responses(out):
                        if raw:
                            failures[c] = failures.get(c, 0) + 1
                    out.unlink()
        finally:
            for s in servers.values():
                s.stop()
    rows = []
    floor = samples["none"]
    for c in CLIENTS:
        ratios = [s.rps / f.rps for s, f in zip(samples[c], floor, strict=True)]
        cpu = median([s.us_per_call for s in samples[c]])
        cpu_ratio = median([f.us_per_call / s.us_per_call
                            for s, f in zip(samples[c], floor, strict=True)])
        name = ("gRPC floor (Noop, no Redis call)" if c == "none"
                else f"Noop + one EVALSHA via {c}")
        rows.append(Row(SECTION, name, median([s.rps for s in samples[c]]), "calls/s",
                        median(ratios), "floor" if c == "none" else "gRPC floor",
                        f"ratio spread {spread(ratios) or '-'}; event-loop CPU {cpu:.0f} us/call"
                        f" (floor/this {cpu_ratio:.2f}); failed script calls (25 ms timeout) "
                        f"{failures.get(c, 0)}; {samples[c][-1].cpu_share()}"))
    return rows


def _sidecar(ctx: Context) -> list[Row]:
    rows = []
    with ctx.redis("redis-client-sidecar") as server:
        sidecars = {c: ctx.sidecar(server.url, name=f"client-{c}", redis_client=c)
                    for c in ("redis-py", "resp")}
        for s in sidecars.values():
            s.start()
        try:
            runners = {c: Runner(ctx, s, server, f"cl-{c}") for c, s in sidecars.items()}
            ratios: dict[str, list[float]] = {c: [] for c in runners}
            rates: dict[str, list[float]] = {c: [] for c in runners}
            cpu: dict[str, list[float]] = {c: [] for c in runners}
            mixes: dict[str, dict[str, int]] = {c: {} for c in runners}
            for _ in range(ctx.rounds):
                for c, r in runners.items():
                    f = r.floor()
                    a, _, counts = r.authorize()
                    ratios[c].append(a.rps / f.rps)
                    rates[c].append(a.rps)
                    cpu[c].append(a.us_per_call)
                    for k, v in counts.items():
                        mixes[c][k] = mixes[c].get(k, 0) + v
        finally:
            for s in sidecars.values():
                s.stop()
    for c in ("redis-py", "resp"):
        rows.append(Row(SECTION, f"Authorize via keel-pdp serve, client {c}", median(rates[c]),
                        "calls/s", median(ratios[c]), "its Noop floor",
                        f"ratio spread {spread(ratios[c]) or '-'}; event-loop CPU "
                        f"{median(cpu[c]):.0f} us/call; decisions {mixes[c]}"))
    gain = [a / b for a, b in zip(rates["resp"], rates["redis-py"], strict=True)]
    cpu_gain = [b / a for a, b in zip(cpu["resp"], cpu["redis-py"], strict=True)]
    rows.append(Row(SECTION, "Authorize calls/s, resp over redis-py", median(gain), "x", None, "",
                    f"spread {spread(gain) or '-'}; event-loop CPU per call redis-py/resp "
                    f"{median(cpu_gain):.2f}"))
    return rows
