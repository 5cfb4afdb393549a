"""Redis time per Authorize and per Closeout script: the scripts of 70efe85 against today's.

    python -m bench.bench_script [--calls 2000] [--rounds 8] [--redis-defaults]
                                 [--redis-arg=ARG ...]

One redis-server of its own (with the budget store's documented settings,
``STORE_SETTINGS``, unless ``--redis-defaults``), two variants sent to it
alternately, several rounds:

* ``now``: keel_pdp/budget/lua/authorize.lua and closeout.lua with the arguments the
  product builds (``Engine.plan`` / ``Engine.prepare_hold`` / ``BudgetStore.hold_call``
  and ``settle_call``);
* ``70efe85``: the same requests, planned by the same engine, with the scripts as
  they were at commit 70efe85 (kept verbatim in bench/lua/baseline/) and the
  arguments that version built (``_Baseline`` below rebuilds them).

Every command is built before it is timed and sent over one raw socket in
pipelined batches of 32 (the throughput bench's concurrency), so the Python
client's work never shares the CPU (and its caches) with Redis while it runs a
script; both variants are driven the same way. Each phase (one variant's
Authorize calls, then its Closeout calls) starts with ``CONFIG RESETSTAT`` and
ends with ``INFO commandstats``: EVALSHA ``usec_per_call`` is the Redis time of
one script call, and the commands the script ran (Redis counts those too) give
the breakdown: their own time per call, and what is left for Lua itself
("lua+args": argument parsing, interpreter, string work, redis.call overhead).
``used_memory`` before and after each Authorize phase gives the bytes each
decision leaves in Redis (stream entry, permit record, idempotency record).

The request mix is the throughput bench's: 100 tenants, two workloads, one
candidate, three enforce budgets with bench/policies/generous (every call an
ALLOW that holds in three windows). A busy machine only adds time (Redis is
preempted inside a script), so the quietest round of each variant is reported
next to the medians.
"""

from __future__ import annotations

import argparse
import pathlib
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis.asyncio as aioredis

from bench.harness import BENCH, POLICIES, Context, RedisServer, Row, median, spread
from keel_pdp import events
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.material import meta_head, meta_stamp
from keel_pdp.budget.replies import hold_reply, settle_reply
from keel_pdp.budget.resp_pack import Shared, pack_evalsha
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
# The budget store's documented settings that change what a script does (README,
# "Redis layout"; deploy/k8s/redis.yaml; make run): permit and idempotency records
# stay compact listpacks. Persistence is off here: Redis writes the AOF after a
# command's time is taken, so it would not show in usec_per_call.
STORE_SETTINGS = ("--hash-max-listpack-value", "512")


def _requests(tag: str, calls: int) -> list[AuthorizeInput]:
    return [AuthorizeInput(f"{tag}-{i}", f"t{i % 100:05d}", ("chat", "search")[i % 2],
                           "gpt-4o-mini", "openai", 800 + i % 400, 256,
                           (("team", "bench"),)) for i in range(calls)]


class _Baseline:
    """The Authorize and Closeout calls as commit 70efe85 made them: its scripts,
    its argument layout (static policy data in every call)."""

    def __init__(self, engine: Engine, shas: dict[str, str]) -> None:
        self.engine = engine
        self.keys = engine.store.keys
        self.shas = shas
        self._shapes: dict[int, tuple[Shape, Shared, tuple[str, ...], tuple[str, ...]]] = {}

    def _shape(self, shape: Shape) -> tuple[Shared, tuple[str, ...], tuple[str, ...]]:
        found = self._shapes.get(id(shape))
        if found is not None and found[0] is shape:
            return found[1], found[2], found[3]
        keys = self.keys
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

    def authorize(self, req: AuthorizeInput) -> tuple[bytes, tuple[str, ...], str]:
        """The EVALSHA, the shape's window keys and the idempotency key."""
        planned = self.engine.plan(req, self.engine.ids.now_ms())
        assert planned is not None
        p, data = planned
        assert p.shape is not None
        assert not p.denial
        shared, window_keys, heads = self._shape(p.shape)
        stamp = meta_stamp(p.now_ms, req.estimated_input_tokens)
        keys = self.keys
        ik = keys.idempotency(req.tenant, req.request_id)
        call_keys = [ik, keys.permit(p.permit_id), keys.expiries, keys.stream]
        args: list[str | int] = [p.permit_id, p.fingerprint, p.now_ms, p.expires_at_ms, data,
                                 len(p.candidates)]
        for c, head in zip(p.candidates, heads, strict=True):
            args.extend((req.estimated_input_tokens * c.rate.input, c.rate.output,
                         c.output_tokens, 1 if c.may_constrain else 0, head + stamp,
                         len(c.target_idx)))
            args.extend(i + 1 for i in c.target_idx)
        return pack_evalsha(self.shas["authorize"], call_keys, args, shared), window_keys, ik

    def closeout(self, permit: Closing) -> bytes:
        pid, window_keys, ik = permit
        now, actual, data = _settlement(self.engine)
        pkey = self.keys.permit(pid)
        call_keys = [pkey, self.keys.stream, self.keys.expiries, ik or pkey, *window_keys]
        args: list[str | int] = [pid, now, actual, data, USAGE.output_tokens, 0,
                                 OVERRUN_FACTOR, OVERRUN_SLACK_MICROS]
        return pack_evalsha(self.shas["closeout"], call_keys, args)


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


class _Wire:
    """One raw connection: pipelined batches of pre-built commands, replies parsed
    by hiredis."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.reader = hiredis.Reader()

    def send(self, commands: Sequence[bytes]) -> list[Any]:
        out: list[Any] = []
        for i in range(0, len(commands), CONCURRENCY):
            chunk = commands[i:i + CONCURRENCY]
            self.sock.sendall(b"".join(chunk))
            got = 0
            while got < len(chunk):
                reply = self.reader.gets()
                if reply is False:
                    data = self.sock.recv(1 << 20)
                    if not data:
                        raise RuntimeError("redis-server closed the connection")
                    self.reader.feed(data)
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    raise RuntimeError(f"script failed: {reply}")
                out.append(reply)
                got += 1
        return out

    def close(self) -> None:
        self.sock.close()


@dataclass
class Results:
    authorize: dict[str, list[Phase]] = field(default_factory=lambda: {"before": [],
                                                                         "after": []})
    closeout: dict[str, list[Phase]] = field(default_factory=lambda: {"before": [],
                                                                        "after": []})


Closing = tuple[str, tuple[str, ...], str]  # permit id, held window keys, idempotency key


class _Now:
    """Today's calls, built by the product's own code."""

    def __init__(self, engine: Engine, shas: dict[str, str]) -> None:
        self.engine = engine
        self.store = engine.store
        self.shas = shas

    def authorize(self, req: AuthorizeInput) -> tuple[bytes, tuple[str, ...], str]:
        planned = self.engine.plan(req, self.engine.ids.now_ms())
        assert planned is not None
        p, data = planned
        hold, mat, _ = self.engine.prepare_hold(p, data)
        keys, args = self.store.hold_call(hold)
        return (pack_evalsha(self.shas["authorize"], keys, args, hold.shape), mat.window_keys,
                hold.idempotency_key)

    def closeout(self, permit: Closing) -> bytes:
        pid, window_keys, ik = permit
        now, actual, data = _settlement(self.engine)
        keys, args = self.store.settle_call(
            pid, window_keys, now, actual, data, idempotency_key=ik,
            output_tokens=USAGE.output_tokens, overrun_factor=OVERRUN_FACTOR,
            overrun_slack_micros=OVERRUN_SLACK_MICROS)
        return pack_evalsha(self.shas["closeout"], keys, args)


def _settlement(engine: Engine) -> tuple[int, int, str]:
    now = engine.ids.now_ms()
    snapshot = engine.policies.current
    assert snapshot is not None
    mp = snapshot.price_for("openai", "gpt-4o-mini", now)
    assert mp is not None
    exact = usage_cost_pico(mp.for_input(USAGE.input_tokens), USAGE)
    actual = ceil_div(exact, PICO_PER_MICRO)
    return now, actual, events.settlement_data(now, "SUCCEEDED", actual, None, actual, USAGE,
                                               "", exact)


def _presize(server: RedisServer, keys: int) -> None:
    """Size the key space for every key the rounds will add (idempotency records
    and permits, both with a TTL) before measuring. A growing key space rehashes
    its tables now and then, and the round that happens to pay for it (either
    version's) measures the rehash, not the script; in production the key space
    holds its size (keys expire as fast as they are made). Filler keys with a
    TTL grow the main table and the expiry table past what the rounds need."""
    # A table of size S grows when it holds S keys: filled with S/2 + 1 it has size
    # S and takes S/2 - 2 more without growing.
    size = 1
    while size // 2 - 2 < keys:
        size *= 2
    filler = size // 2 + 1
    pipe = server.client.pipeline(transaction=False)
    for i in range(filler):
        pipe.set(f"bench:fill:{i}", b"", ex=86_400)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    time.sleep(1.0)  # Redis finishes the last rehash in the background meanwhile


def _measure(server: RedisServer, policies: pathlib.Path, calls: int, rounds: int) -> Results:
    client = aioredis.Redis(port=server.port)  # never connects: the store builds calls only
    store = BudgetStore(client, KeySpace())
    holder = PolicyHolder(str(policies))
    holder.reload(force=True)
    engine = Engine(holder, store, Metrics())
    sources = {"now": store.script_sources,
               "70efe85": {name: (BASELINE / f"{name}.lua").read_text()
                           for name in ("authorize", "closeout")}}
    shas = {v: {name: str(server.client.script_load(src)) for name, src in srcs.items()}
            for v, srcs in sources.items()}
    variants: dict[str, _Now | _Baseline] = {"after": _Now(engine, shas["now"]),
                                             "before": _Baseline(engine, shas["70efe85"])}
    wire = _Wire(server.port)
    results = Results()
    try:
        _presize(server, (rounds + 1) * calls * 2 * 2)
        for r in range(-1, rounds):  # round -1 warms both (shapes, windows, allocator)
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            for name in order:
                v = variants[name]
                built = [v.authorize(req) for req in _requests(f"r{r}-{name}", calls)]
                server.client.config_resetstat()
                mem0 = server.used_memory()
                replies = wire.send([b for b, _, _ in built])
                mem1 = server.used_memory()
                auth = Phase(calls, _stats(server), mem1 - mem0)
                permits: list[Closing] = []
                for reply, (_, windows, ik) in zip(replies, built, strict=True):
                    res = hold_reply(reply)
                    if res.decision not in ("ALLOW", "CONSTRAIN"):
                        raise RuntimeError(f"{name}: Authorize answered {res.decision}")
                    permits.append((res.permit_id, tuple(windows[i] for i in res.held), ik))
                closing = [v.closeout(p) for p in permits]
                server.client.config_resetstat()
                statuses = [settle_reply(x).status for x in wire.send(closing)]
                bad = [s for s in statuses if s != "SETTLED"]
                if bad:
                    raise RuntimeError(f"{name}: Closeout answered {bad[0]} ({len(bad)} times)")
                if r >= 0:
                    results.authorize[name].append(auth)
                    results.closeout[name].append(Phase(len(permits), _stats(server)))
    finally:
        wire.close()
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
    with ctx.redis("redis-script", extra=STORE_SETTINGS) as server:
        res = _measure(server, POLICIES / "generous", calls, rounds)
    print_breakdown(res)
    return rows_of(res, calls)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_script", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=2000, help="Authorize calls per phase")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--redis-arg", action="append", default=[], metavar="ARG",
                    help="an extra redis-server argument (repeat it), e.g. "
                         "--redis-arg=--stream-node-max-bytes --redis-arg=16384")
    ap.add_argument("--redis-defaults", action="store_true",
                    help="run Redis with its own defaults, not the store's documented "
                         f"settings ({' '.join(STORE_SETTINGS)})")
    ns = ap.parse_args(argv)
    from bench.run_all import print_table
    extra = [*(() if ns.redis_defaults else STORE_SETTINGS), *ns.redis_arg]
    with tempfile.TemporaryDirectory(prefix="keel-script-") as d, \
            RedisServer(pathlib.Path(d), extra=extra) as server:
        res = _measure(server, POLICIES / "generous", ns.calls, ns.rounds)
    print_breakdown(res)
    print_table(rows_of(res, ns.calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
