"""Redis time per Authorize and per Closeout script: the scripts of 70efe85 against today's.

    python -m bench.bench_script [--calls 2000] [--rounds 8] [--policies generous]

One redis-server of its own, two budget paths driven in-process against it,
alternately, several rounds:

* ``after``: ``Engine.authorize`` / ``Engine.closeout`` as ``keel-pdp serve`` runs
  them (keel_pdp/budget/lua/authorize.lua and closeout.lua, the store's argument
  building);
* ``before``: the same requests planned by the same engine, sent to the scripts
  as they were at commit 70efe85 (kept verbatim in bench/lua/baseline/) with the
  arguments that version built (``_Baseline`` below rebuilds them).

Each phase (one variant's Authorize calls, then its Closeout calls) starts with
``CONFIG RESETSTAT`` and ends with ``INFO commandstats``: EVALSHA
``usec_per_call`` is the Redis time of one script call, and the commands the
script ran (Redis counts those too) give the breakdown: their own time per
call, and what is left for Lua itself (argument parsing, interpreter, string
work). ``used_memory`` before and after each Authorize phase gives the bytes each
decision leaves in Redis (stream entry, permit record, idempotency record).

The request mix is the throughput bench's: 100 tenants, two workloads, one
candidate, three enforce budgets with bench/policies/generous (every call an
ALLOW that holds in three windows); ``--policies tight`` adds CONSTRAIN/DENY.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.harness import BENCH, POLICIES, Context, RedisServer, Row, median, spread
from keel_pdp import events
from keel_pdp.budget.material import meta_head, meta_stamp
from keel_pdp.budget.replies import hold_reply, settle_reply
from keel_pdp.budget.resp import Shared
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput
from keel_pdp.decision.shape import Shape
from keel_pdp.engine import OVERRUN_FACTOR, OVERRUN_SLACK_MICROS, Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import PICO_PER_MICRO, TokenUsage, ceil_div, usage_cost_pico

SECTION = "script"
BASELINE = BENCH / "lua" / "baseline"
CONCURRENCY = 32
USAGE = TokenUsage(input_tokens=900, cached_input_tokens=100, output_tokens=180)
_META = ("calls", "usec", "usec_per_call")


def _requests(tag: str, calls: int) -> list[AuthorizeInput]:
    return [AuthorizeInput(f"{tag}-{i}", f"t{i % 100:05d}", ("chat", "search")[i % 2],
                           "gpt-4o-mini", "openai", 800 + i % 400, 256,
                           (("team", "bench"),)) for i in range(calls)]


class _Baseline:
    """The Authorize and Closeout calls as commit 70efe85 made them: its scripts,
    its argument layout (static policy data in every call)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.store = engine.store
        t = self.store.transport
        self.authorize_script = t.script((BASELINE / "authorize.lua").read_text())
        self.closeout_script = t.script((BASELINE / "closeout.lua").read_text())
        self._shapes: dict[int, tuple[Shape, Shared, tuple[str, ...], tuple[str, ...]]] = {}

    def _shape(self, shape: Shape) -> tuple[Shared, tuple[str, ...], tuple[str, ...]]:
        found = self._shapes.get(id(shape))
        if found is not None and found[0] is shape:
            return found[1], found[2], found[3]
        keys = self.store.keys
        settings = shape.snapshot.settings
        observe = shape.route_mode == "observe"
        targets = shape.targets
        window_keys = tuple(keys.window(t.budget.id, t.split, t.window_start_ms)
                            for t in targets)
        grant_keys = [keys.grants(t.budget.id, t.split) for t in targets]
        args: list[str | int] = [len(targets)]
        for t in targets:
            wx = t.window_end_ms // 1000 + settings.permit_retention_seconds
            args.extend((t.budget.limit_micros, 1 if t.budget.enforce and not observe else 0,
                         wx, ",".join(str(x) for x in t.budget.thresholds)))
        args.extend((settings.idempotency_ttl_seconds, settings.permit_retention_seconds,
                     settings.min_output_tokens))
        shared = Shared.of((*window_keys, *grant_keys), args)
        heads = tuple(meta_head(shape.tenant, shape.workload, mp) for mp in shape.prices)
        self._shapes[id(shape)] = (shape, shared, window_keys, heads)
        return shared, window_keys, heads

    async def authorize(self, req: AuthorizeInput) -> tuple[str, tuple[str, ...], str] | None:
        """(permit id, held window keys, idempotency key) of an ALLOW/CONSTRAIN."""
        now = self.engine.ids.now_ms()
        planned = self.engine.plan(req, now)
        assert planned is not None
        p, data = planned
        assert p.shape is not None
        assert not p.denial
        shared, window_keys, heads = self._shape(p.shape)
        stamp = meta_stamp(p.now_ms, req.estimated_input_tokens)
        keys = self.store.keys
        ik = keys.idempotency(req.tenant, req.request_id)
        call_keys = [ik, keys.permit(p.permit_id), keys.expiries, keys.stream]
        args: list[str | int] = [p.permit_id, p.fingerprint, p.now_ms, p.expires_at_ms, data,
                                 len(p.candidates)]
        for c, head in zip(p.candidates, heads, strict=True):
            args.extend((req.estimated_input_tokens * c.rate.input, c.rate.output,
                         c.output_tokens, 1 if c.may_constrain else 0, head + stamp,
                         len(c.target_idx)))
            args.extend(i + 1 for i in c.target_idx)
        res = hold_reply(await self.store.transport.eval_script(
            self.authorize_script, call_keys, args, 5.0, shared))
        if res.decision not in ("ALLOW", "CONSTRAIN"):
            return None
        return res.permit_id, tuple(window_keys[i] for i in res.held), ik

    async def closeout(self, permit: tuple[str, tuple[str, ...], str]) -> str:
        pid, window_keys, ik = permit
        now = self.engine.ids.now_ms()
        snapshot = self.engine.policies.current
        assert snapshot is not None
        mp = snapshot.price_for("openai", "gpt-4o-mini", now)
        assert mp is not None
        price = mp.for_input(USAGE.input_tokens)
        exact = usage_cost_pico(price, USAGE)
        actual = ceil_div(exact, PICO_PER_MICRO)
        data = events.settlement_data(now, "SUCCEEDED", actual, None, actual, USAGE, "", exact)
        keys = self.store.keys
        pkey = keys.permit(pid)
        call_keys = [pkey, keys.stream, keys.expiries, ik or pkey, *window_keys]
        args: list[str | int] = [pid, now, actual, data, USAGE.output_tokens, 0,
                                 OVERRUN_FACTOR, OVERRUN_SLACK_MICROS]
        out = settle_reply(await self.store.transport.eval_script(
            self.closeout_script, call_keys, args, 5.0))
        return out.status


@dataclass
class Phase:
    """INFO commandstats of one phase: per command (calls, usec)."""

    calls: int
    stats: dict[str, tuple[int, int]]
    memory: int = 0

    def per_call(self, command: str = "evalsha") -> float:
        c, usec = self.stats.get(command, (0, 0))
        return usec / c if c else 0.0


def _stats(server: RedisServer) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for name, s in server.client.info("commandstats").items():
        if isinstance(s, dict):
            out[name.removeprefix("cmdstat_")] = (int(s["calls"]), int(s["usec"]))
    return out


async def _gather(items: Sequence[Any], fn: Any) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(items), CONCURRENCY):
        out.extend(await asyncio.gather(*(fn(x) for x in items[i:i + CONCURRENCY])))
    return out


@dataclass
class Results:
    authorize: dict[str, list[Phase]] = field(default_factory=lambda: {"before": [],
                                                                         "after": []})
    closeout: dict[str, list[Phase]] = field(default_factory=lambda: {"before": [],
                                                                        "after": []})


async def _measure(server: RedisServer, policies: pathlib.Path, calls: int,
                   rounds: int) -> Results:
    store = BudgetStore.from_url(server.url, timeout_s=5.0)
    holder = PolicyHolder(str(policies))
    holder.reload(force=True)
    engine = Engine(holder, store, Metrics())
    base = _Baseline(engine)
    results = Results()

    async def after_auth(req: AuthorizeInput) -> str | None:
        out = await engine.authorize(req)
        return out.permit_id if out.decision.name in ("ALLOW", "CONSTRAIN") else None

    async def after_close(pid: str) -> str:
        return (await engine.closeout(pid, USAGE, "SUCCEEDED", None)).status

    variants: dict[str, tuple[Any, Any]] = {"before": (base.authorize, base.closeout),
                                            "after": (after_auth, after_close)}
    # Warm both paths (scripts loaded, connections open, shapes cached).
    for name, (auth, close) in variants.items():
        permits = [x for x in await _gather(_requests(f"warm-{name}", 256), auth) if x]
        await _gather(permits, close)
    for r in range(rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for name in order:
            auth, close = variants[name]
            reqs = _requests(f"r{r}-{name}", calls)
            server.client.config_resetstat()
            mem0 = server.used_memory()
            permits = [x for x in await _gather(reqs, auth) if x]
            mem1 = server.used_memory()
            results.authorize[name].append(Phase(len(reqs), _stats(server), mem1 - mem0))
            server.client.config_resetstat()
            statuses = await _gather(permits, close)
            bad = [s for s in statuses if s != "SETTLED"]
            if bad:
                raise RuntimeError(f"{name}: closeout answered {bad[0]} ({len(bad)} times)")
            results.closeout[name].append(Phase(len(permits), _stats(server)))
    await store.close()
    return results


def breakdown(phases: Sequence[Phase]) -> list[tuple[str, float, float]]:
    """(command, calls per script call, usec per script call) summed over phases,
    the script's own commands first, then "lua+args": what EVALSHA took beyond them."""
    totals: dict[str, list[int]] = {}
    for ph in phases:
        for cmd, (c, u) in ph.stats.items():
            t = totals.setdefault(cmd, [0, 0])
            t[0] += c
            t[1] += u
    scripts = totals.get("evalsha", [0, 0])[0]
    if not scripts:
        return []
    rows = [(cmd, c / scripts, u / scripts) for cmd, (c, u) in totals.items()
            if cmd not in ("evalsha", "eval", "info", "config|resetstat", "config", "script",
                           "script|load", "hmget|admin")]
    rows.sort(key=lambda x: -x[2])
    inner = sum(u for _, _, u in rows)
    return [*rows, ("lua+args", 0.0, totals["evalsha"][1] / scripts - inner)]


def rows_of(res: Results, calls: int) -> list[Row]:
    rows: list[Row] = []
    for label, phases in (("Authorize", res.authorize), ("Closeout", res.closeout)):
        before = [p.per_call() for p in phases["before"]]
        after = [p.per_call() for p in phases["after"]]
        ratios = [a / b for a, b in zip(after, before, strict=True) if b]
        rows.append(Row(SECTION, f"Redis time per {label} script, 70efe85", median(before),
                        "us", None, "", f"commandstats EVALSHA usec_per_call, median of "
                        f"{len(before)} rounds of {calls} calls; rounds: {spread(before)}"))
        rows.append(Row(SECTION, f"Redis time per {label} script, now", median(after), "us",
                        median(ratios) if ratios else None, "70efe85",
                        f"rounds: {spread(after)}; ratio: median of the per-round ratios "
                        f"(spread {spread(ratios)})"))
        # A busy machine only adds time (Redis is preempted inside a script): the
        # quietest round of each is the better estimate of a quiet machine.
        if before and after:
            rows.append(Row(SECTION, f"Redis time per {label} script, now, quietest round",
                            min(after), "us", min(after) / min(before),
                            "70efe85 quietest", f"70efe85 quietest round: {min(before):.1f} us"))
    for name in ("before", "after"):
        mem = [p.memory / p.calls for p in res.authorize[name] if p.calls]
        rows.append(Row(SECTION, f"Redis bytes per decision ({name})", median(mem), "B",
                        None, "", "used_memory growth over an Authorize phase / calls "
                        "(stream entry, permit and idempotency records)"))
    return rows


def print_breakdown(res: Results) -> None:
    for label, phases in (("Authorize", res.authorize), ("Closeout", res.closeout)):
        for name in ("before", "after"):
            print(f"{label} script, {name}: per script call (commandstats, all rounds)")
            for cmd, c, u in breakdown(phases[name]):
                calls = f"{c:5.2f} calls" if cmd != "lua+args" else " " * 11
                print(f"  {cmd:<14} {calls}  {u:6.2f} us")


def run(ctx: Context) -> list[Row]:
    calls = 500 if ctx.quick else 2000
    rounds = 2 if ctx.quick else max(ctx.rounds, 8)
    with ctx.redis("redis-script") as server:
        res = asyncio.run(_measure(server, POLICIES / "generous", calls, rounds))
    print_breakdown(res)
    return rows_of(res, calls)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_script", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="Authorize calls per phase")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--policies", default="generous", help="a bundle under bench/policies")
    ns = ap.parse_args(argv)
    from bench.run_all import print_table
    with tempfile.TemporaryDirectory(prefix="keel-script-") as d, \
            RedisServer(pathlib.Path(d)) as server:
        res = asyncio.run(_measure(server, POLICIES / ns.policies, ns.calls, ns.rounds))
    print_breakdown(res)
    print_table(rows_of(res, ns.calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
