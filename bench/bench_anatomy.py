"""Where an Authorize's cost goes, against the Noop floor of the same server.

Three servers, each measured against its own Noop floor in interleaved
rounds (32 streams, closed loop):

* ``canned``: the real servicer (request conversion, deadline, metrics,
  response building) with an engine that answers a fixed ALLOW at once;
* ``script``: the same, after a one-line Lua script through the production
  Redis client (the one round trip every Authorize makes);
* ``sidecar``: ``keel-pdp serve`` with the real engine.

The first two bound what any decision engine can reach on this server stack:
whatever the engine does comes on top of ``script``.
"""

from __future__ import annotations

import sys

from bench.bench_throughput import Runner
from bench.harness import Context, Row, Sample, Sidecar, median, spread

SECTION = "anatomy"
MODES = ("canned", "script", "sidecar")


def run(ctx: Context) -> list[Row]:
    floors: dict[str, list[Sample]] = {m: [] for m in MODES}
    auths: dict[str, list[Sample]] = {m: [] for m in MODES}
    with ctx.redis("redis-anatomy") as server:
        for _ in range(ctx.rounds):
            for mode in MODES:
                if mode == "sidecar":
                    sidecar = ctx.sidecar(server.url, name="anatomy-sidecar")
                else:
                    sidecar = Sidecar(server.url, ctx.work, ctx.work, name=f"anatomy-{mode}",
                                      command=[sys.executable, "-m", "bench.anatomy_server",
                                               "--port", "{port}", "--redis-url", server.url,
                                               "--mode", mode])
                with sidecar:
                    r = Runner(ctx, sidecar, server, f"an-{mode}")
                    floors[mode].append(r.floor())
                    a, _, _ = r.authorize()
                    auths[mode].append(a)
    rows = []
    words = {"canned": "servicer with a canned answer (no Redis)",
             "script": "servicer with a canned answer after one 1-line script call",
             "sidecar": "keel-pdp serve (the real engine)"}
    for mode in MODES:
        ratio = [a.rps / f.rps for f, a in zip(floors[mode], auths[mode], strict=True)]
        us = median([a.us_per_call for a in auths[mode]])
        floor_us = median([f.us_per_call for f in floors[mode]])
        rows.append(Row(SECTION, f"Authorize, {words[mode]}", median([a.rps for a in auths[mode]]),
                        "calls/s", median(ratio), "its Noop floor",
                        f"spread {spread(ratio) or '-'}; event-loop CPU {us:.0f} us/call "
                        f"(Noop {floor_us:.0f} us)"))
    return rows
