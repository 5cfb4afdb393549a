"""Throughput at 32 concurrent streams: Authorize and Closeout against the floor.

The floor is ``Diagnostics.Noop`` served by the same sidecar process. Each
round measures floor, Authorize and Closeout back to back (Closeout settles the
permits that round's Authorize created, one Closeout per permit), and the
table reports the median of the per-round ratios with their spread. Every
Authorize carries its own request_id, so no call is an idempotent replay.

Round trips are counted from Redis twice: INFO commandstats during the timed
runs (script entry points per call; Redis also counts the commands a script
calls, so only EVALSHA/EVAL are comparable) and a MONITOR pass afterwards that
counts every command a client sent, apart from those run inside a script.
The sidecar's expiry sweeper (one ZRANGEBYSCORE a second) is left out of both.
A second sidecar on a bundle with a one-cent tenant cap measures the
CONSTRAIN/DENY path.
"""

from __future__ import annotations

import itertools
from typing import Any

from bench.harness import (
    AUTHORIZE,
    CLOSEOUT,
    NOOP,
    BenchError,
    Context,
    Monitor,
    RedisServer,
    Row,
    Sample,
    Sidecar,
    Workload,
    closeout_bodies,
    closeout_statuses,
    decisions,
    drive,
    h2load,
    measure,
    median,
    noop_body,
    spread,
    write_bodies,
)

SECTION = "throughput"
STREAMS = 32
SWEEPER = ("zrangebyscore",)
SCRIPTS = ("evalsha", "eval")


class Runner:
    """Authorize/Closeout/Noop runs against one sidecar, with fresh bodies each time."""

    def __init__(self, ctx: Context, sidecar: Sidecar, server: RedisServer, tag: str,
                 workload: Workload | None = None) -> None:
        self.ctx = ctx
        self.sidecar = sidecar
        self.server = server
        self.tag = tag
        self.workload = workload or Workload()
        self.noop = noop_body(ctx.path(f"{tag}-noop.bin"))
        self.counter = itertools.count()
        self.next_id = 0
        self.expected_rps = 20_000.0

    def warmup_calls(self) -> int:
        return 200 if self.ctx.quick else 2000

    def floor(self, **kw: Any) -> Sample:
        args: dict[str, Any] = {"cycle": True, "duration": self.ctx.duration_s,
                                "warmup": self.warmup_calls(), "streams": STREAMS}
        args.update(kw)
        return measure(self.ctx, self.sidecar, self.server, NOOP, self.noop, **args)

    def authorize(self, **kw: Any) -> tuple[Sample, list[str], dict[str, int]]:
        """Unique bodies, enough for the duration at the fastest rate seen so far."""
        n = int(self.expected_rps * self.ctx.duration_s * 1.5) + self.warmup_calls()
        i = next(self.counter)
        bodies = self.ctx.path(f"{self.tag}-auth-{i}.bin")
        write_bodies(bodies, self.workload.authorize(self.tag, self.next_id, n))
        self.next_id += n
        out = self.ctx.path(f"{self.tag}-auth-{i}.out")
        args: dict[str, Any] = {"duration": self.ctx.duration_s, "streams": STREAMS,
                                "warmup": self.warmup_calls(), "out": out}
        args.update(kw)
        sample = measure(self.ctx, self.sidecar, self.server, AUTHORIZE, bodies, **args)
        bodies.unlink()
        permits, counts = decisions(out)
        out.unlink()
        self.expected_rps = max(self.expected_rps * 0.5, sample.rps * 1.3)
        return sample, permits, counts

    def closeout(self, permits: list[str], **kw: Any) -> tuple[Sample, dict[str, int]]:
        if len(permits) < 2 * self.warmup_calls():
            raise BenchError(f"only {len(permits)} permits to close out")
        i = next(self.counter)
        bodies = self.ctx.path(f"{self.tag}-close-{i}.bin")
        closeout_bodies(bodies, permits)
        out = self.ctx.path(f"{self.tag}-close-{i}.out")
        args: dict[str, Any] = {"duration": self.ctx.duration_s, "streams": STREAMS,
                                "warmup": self.warmup_calls(), "out": out}
        args.update(kw)
        sample = measure(self.ctx, self.sidecar, self.server, CLOSEOUT, bodies, **args)
        bodies.unlink()
        statuses = closeout_statuses(out)
        out.unlink()
        return sample, statuses


def run(ctx: Context) -> list[Row]:
    rows: list[Row] = []
    with ctx.redis("redis-throughput") as server, \
            ctx.sidecar(server.url, name="throughput") as sidecar:
        r = Runner(ctx, sidecar, server, "tp")
        floors: list[Sample] = []
        auths: list[Sample] = []
        closes: list[Sample] = []
        auth_ratio: list[float] = []
        close_ratio: list[float] = []
        mix: dict[str, int] = {}
        statuses: dict[str, int] = {}
        h2: list[float] = []
        for _ in range(ctx.rounds):
            f = r.floor()
            # Cross-check of the driver, right after it: h2load on the same floor
            # (it posts one fixed body, which is fine for Noop).
            h = h2load(sidecar.port, NOOP, r.noop, n=max(int(f.rps * ctx.duration_s), 1000),
                       streams=STREAMS)
            h2.append(h["rps"] / f.rps)
            a, permits, counts = r.authorize()
            c, st = r.closeout(permits)
            floors.append(f)
            auths.append(a)
            closes.append(c)
            auth_ratio.append(a.rps / f.rps)
            close_ratio.append(c.rps / f.rps)
            for k, v in counts.items():
                mix[k] = mix.get(k, 0) + v
            for k, v in st.items():
                statuses[k] = statuses.get(k, 0) + v
        floor = median([f.rps for f in floors])
        def cpu(samples: list[Sample]) -> str:
            return f"event-loop CPU {median([x.us_per_call for x in samples]):.0f} us/call"

        rows.append(Row(SECTION, "Noop floor (32 streams)", floor, "calls/s", 1.0, "floor",
                        f"{ctx.rounds} rounds; {cpu(floors)}; {floors[-1].cpu_share()}"))
        rows.append(Row(SECTION, "Authorize (32 streams, ALLOW, 3 budgets)",
                        median([a.rps for a in auths]), "calls/s", median(auth_ratio),
                        "Noop floor", f"ratio spread {spread(auth_ratio)}; {cpu(auths)}; "
                        f"decisions {mix}; {auths[-1].cpu_share()}"))
        rows.append(Row(SECTION, "Closeout (32 streams, one per permit)",
                        median([c.rps for c in closes]), "calls/s", median(close_ratio),
                        "Noop floor", f"ratio spread {spread(close_ratio)}; {cpu(closes)}; "
                        f"statuses {statuses}; {closes[-1].cpu_share()}"))
        rows.append(Row(SECTION, "Authorize latency at saturation p50/p99",
                        auths[-1].lat["p50"] / 1000, "ms", None, "",
                        f"p99 {auths[-1].lat['p99'] / 1000:.2f} ms (closed loop, 32 streams)"))

        # Script entry points per call from INFO commandstats (all timed runs).
        issued_a = sum(a.issued for a in auths)
        issued_c = sum(c.issued for c in closes)
        per_a = sum(sum(a.commands.get(k, 0) for k in SCRIPTS) for a in auths) / issued_a
        per_c = sum(sum(c.commands.get(k, 0) for k in SCRIPTS) for c in closes) / issued_c
        rows.append(Row(SECTION, "EVALSHA+EVAL per Authorize (commandstats)", per_a, "calls",
                        None, "", f"{issued_a} Authorize calls"))
        rows.append(Row(SECTION, "EVALSHA+EVAL per Closeout (commandstats)", per_c, "calls",
                        None, "", f"{issued_c} Closeout calls"))
        for label, samples, issued in (("Authorize", auths, issued_a),
                                       ("Closeout", closes, issued_c)):
            usec = sum(sum(x.commands.get(k + ".usec", 0) for k in SCRIPTS) for x in samples)
            rows.append(Row(SECTION, f"Redis time per {label} script call (commandstats)",
                            usec / issued, "us", None, "",
                            "the script and every command it runs; Redis is single-threaded, "
                            f"so one Redis serves at most about {1e6 * issued / max(usec, 1):,.0f} "
                            f"{label} calls/s"))
        rows.extend(_round_trips(ctx, r))

        rows.append(Row(SECTION, "Noop floor measured by h2load", median(h2) * floor,
                        "calls/s", median(h2), "driver floor",
                        f"same rounds, run right after the driver's floor; spread "
                        f"{spread(h2) or '-'}; h2load cpu {h['client_cpu_s']:.2f}s vs driver "
                        f"{floors[-1].result['client_cpu_s']:.2f}s in the last round"))

    rows.extend(_tight(ctx))
    return rows


def _round_trips(ctx: Context, r: Runner) -> list[Row]:
    """Every command clients sent to Redis during 2,000 Authorize + 2,000 Closeout."""
    n = 300 if ctx.quick else 2000
    bodies = ctx.path("rt-auth.bin")
    write_bodies(bodies, r.workload.authorize("rt", 0, n))
    out = ctx.path("rt-auth.out")
    with Monitor(r.server.port) as mon:
        a = drive(ctx.driver, r.sidecar.port, AUTHORIZE, bodies, streams=STREAMS, out=out)
        mon.settle()
        auth_counts = dict(mon.counts)
        mon.counts.clear()
        permits, _ = decisions(out)
        cbodies = ctx.path("rt-close.bin")
        closeout_bodies(cbodies, permits)
        c = drive(ctx.driver, r.sidecar.port, CLOSEOUT, cbodies, streams=STREAMS)
        mon.settle()
        close_counts = dict(mon.counts)
    rows = []
    for name, counts, calls in (("Authorize", auth_counts, a["calls"]),
                                ("Closeout", close_counts, c["calls"])):
        total = sum(v for k, v in counts.items() if k not in SWEEPER)
        detail = ", ".join(f"{k} {v / calls:.3f}" for k, v in sorted(counts.items())
                           if k not in SWEEPER)
        rows.append(Row(SECTION, f"Redis round trips per {name} (MONITOR)", total / calls,
                        "commands", None, "", f"{calls} calls: {detail}; must be exactly 1"))
    return rows


def _tight(ctx: Context) -> list[Row]:
    """The CONSTRAIN/DENY path: one-cent tenant caps, so most answers are DENY."""
    with ctx.redis("redis-tight") as server, \
            ctx.sidecar(server.url, policies="tight", name="tight") as sidecar:
        r = Runner(ctx, sidecar, server, "tight")
        ratios: list[float] = []
        rates: list[float] = []
        mix: dict[str, int] = {}
        for _ in range(max(1, ctx.rounds - 1)):
            f = r.floor()
            a, _, counts = r.authorize()
            ratios.append(a.rps / f.rps)
            rates.append(a.rps)
            for k, v in counts.items():
                mix[k] = mix.get(k, 0) + v
        return [Row(SECTION, "Authorize, tight caps (mostly DENY)", median(rates), "calls/s",
                    median(ratios), "Noop floor",
                    f"ratio spread {spread(ratios)}; decisions {mix}")]
