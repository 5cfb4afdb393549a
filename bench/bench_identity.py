"""What caller identity checks cost Authorize: the same sidecar, bundle and load
with ``--caller-auth open`` and with ``--caller-auth enforce``, in interleaved rounds.

In enforce mode every call carries a bearer token that ``--caller-tokens-file``
maps to an identity; its binding names the workload's 100 tenants and 4
workloads, and 200 other bindings (half with wildcard segments) sit next to it.
So each call pays the interceptor, the token look-up and the binding check.
A short run without the token checks that enforce really refuses.

Reported: calls/s (closed loop, as in ``throughput``), event-loop CPU per call,
and p50/p99 at 1,000 calls/s open loop; each enforce figure against open.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import yaml

from bench.bench_throughput import Runner
from bench.harness import (
    AUTHORIZE,
    POLICIES,
    BenchError,
    Context,
    Row,
    Sample,
    Sidecar,
    drive,
    median,
    spread,
    write_bodies,
)

SECTION = "identity"
TOKEN = "bench-token-0123456789abcdef"
RATE = 1000.0


def _bundle(ctx: Context) -> Any:
    d = ctx.path("identity-policies")
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(POLICIES / "generous", d)
    bindings: list[dict[str, Any]] = [{
        "id": "bench-app", "identities": ["bench-app"],
        "tenants": [f"t{i:05d}" for i in range(100)],
        "workloads": ["chat", "search", "summarize", "agent"]}]
    for i in range(200):
        ident = (f"spiffe://corp/ns/team{i}/sa/*" if i % 2 else f"spiffe://corp/ns/team{i}/sa/app")
        bindings.append({"id": f"team{i}", "identities": [ident], "tenants": [f"other{i}"],
                         "workloads": ["*"]})
    (d / "callers.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "keel.pdp/v1", "kind": "Callers", "bindings": bindings}))
    return d


@contextmanager
def _mode(mode: str, tokens: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("KEEL_CALLER_AUTH", "KEEL_CALLER_TOKENS_FILE")}
    os.environ["KEEL_CALLER_AUTH"] = mode
    os.environ["KEEL_CALLER_TOKENS_FILE"] = tokens if mode != "open" else ""
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(ctx: Context) -> list[Row]:
    policies = _bundle(ctx)
    tokens = ctx.path("identity-tokens")
    tokens.write_text(f"bench-app {TOKEN}\n")
    header = [f"authorization: Bearer {TOKEN}"]
    modes = ("open", "enforce")
    loads: dict[str, list[Sample]] = {m: [] for m in modes}
    lats: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    n_lat = int(RATE * (2.0 if ctx.quick else 5.0))
    refused = 0
    degraded = dict.fromkeys(modes, 0)
    lat_errors = dict.fromkeys(modes, 0)
    with ctx.redis("redis-identity") as server:
        for rnd in range(max(1, ctx.rounds - 1)):
            for mode in modes:
                with _mode(mode, str(tokens)), \
                        Sidecar(server.url, policies, ctx.work, name=f"identity-{mode}") as sc:
                    r = Runner(ctx, sc, server, f"id-{mode}-{rnd}")
                    r.floor(n=2000, duration=None)  # warm-up
                    a, _, counts = r.authorize(headers=header)
                    # A degraded ALLOW is Redis too slow for the store timeout on a busy
                    # machine; a refusal would be an error (and stop the run).
                    if any(not k.startswith("ALLOW") for k in counts):
                        raise BenchError(f"identity {mode}: answers {counts}")
                    degraded[mode] += sum(v for k, v in counts.items() if k != "ALLOW")
                    loads[mode].append(a)
                    bodies = ctx.path(f"id-lat-{mode}-{rnd}.bin")
                    write_bodies(bodies, r.workload.authorize(f"idl{mode}{rnd}", 0, n_lat))
                    res = drive(ctx.driver, sc.port, AUTHORIZE, bodies, rps=RATE, n=n_lat,
                                headers=header)
                    # Every call carries the same identity, so a refusal would fail them
                    # all; a few errors are an overloaded machine (the stderr says which).
                    if res["errors"] > n_lat // 100:
                        raise BenchError(f"identity {mode}: {res['errors']} calls failed "
                                         f"({res['stderr']})")
                    lat_errors[mode] += int(res["errors"])
                    lats[mode].append(dict(res["lat_us"]))
                    if mode == "enforce" and rnd == 0:
                        probe = ctx.path("id-probe.bin")
                        write_bodies(probe, r.workload.authorize("idprobe", 0, 100))
                        refused = int(drive(ctx.driver, sc.port, AUTHORIZE, probe,
                                            n=100)["errors"])
                        if refused != 100:
                            raise BenchError(f"enforce refused {refused} of 100 calls "
                                             "without a token")
    rows: list[Row] = []
    rps = {m: median([s.rps for s in loads[m]]) for m in modes}
    cpu = {m: median([s.us_per_call for s in loads[m]]) for m in modes}
    ratios = [e.rps / o.rps for o, e in zip(loads["open"], loads["enforce"], strict=True)]
    rows.append(Row(SECTION, "Authorize, caller-auth open", rps["open"], "calls/s"))
    rows.append(Row(SECTION, "Authorize, caller-auth enforce (token identity, 201 bindings)",
                    rps["enforce"], "calls/s", rps["enforce"] / rps["open"], "open",
                    f"per-round ratios {spread(ratios) or ratios}; without a token enforce "
                    f"refused {refused} of 100 calls; degraded ALLOWs (store timeout): {degraded}"))
    rows.append(Row(SECTION, "Authorize event-loop CPU per call, open", cpu["open"], "us"))
    rows.append(Row(SECTION, "Authorize event-loop CPU per call, enforce", cpu["enforce"],
                    "us", cpu["enforce"] / cpu["open"], "open"))
    for q in ("p50", "p99"):
        o = median([x[q] for x in lats["open"]]) / 1000
        e = median([x[q] for x in lats["enforce"]]) / 1000
        rows.append(Row(SECTION, f"Authorize {q} at 1,000/s, open", o, "ms"))
        rows.append(Row(SECTION, f"Authorize {q} at 1,000/s, enforce", e, "ms",
                        e / o if o else None, "open",
                        f"calls that failed at 1,000/s (overload): {lat_errors}"
                        if q == "p99" else ""))
    return rows
