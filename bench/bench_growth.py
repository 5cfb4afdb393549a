"""Cost as the work grows: many open holds and budget windows, many decisions.

1. Redis memory: real decisions are made first, then their permit,
   idempotency and window records serve as templates for a Lua preload
   (bench/lua/preload_*.lua) of 1,000,000 open holds and 100,000 budget
   windows; INFO memory before and after gives bytes per hold and per window.
   The decision stream's bytes per event come from MEMORY USAGE / XLEN.
2. Authorize throughput against that loaded Redis, against an empty one, in
   interleaved rounds (two sidecars, one per Redis).
3. Sidecar RSS after 100,000 decisions and after 1,000,000 (checkpoints in
   between), on a fresh sidecar, one decision per unique request.

Preloaded holds expire an hour from now, so the expiry sweeper has nothing to
do during the run: the figures are about size, not about sweeping.
"""

from __future__ import annotations

import time
from typing import Any

from bench.bench_throughput import STREAMS, Runner
from bench.harness import (
    AUTHORIZE,
    BENCH,
    Context,
    RedisServer,
    Row,
    drive,
    median,
    spread,
    write_bodies,
)

SECTION = "growth"
BATCH = 20_000
PREFIX = "keel:{pdp}:"


def _lua(name: str) -> str:
    return (BENCH / "lua" / name).read_text()


def _decode(d: dict[Any, Any]) -> list[str]:
    out: list[str] = []
    for k, v in d.items():
        out += [k.decode() if isinstance(k, bytes) else str(k),
                v.decode() if isinstance(v, bytes) else str(v)]
    return out


def _template(server: RedisServer, pattern: str) -> tuple[list[str], int]:
    c = server.client
    key = next(iter(c.scan_iter(match=pattern, count=1000)), None)
    if key is None:
        raise RuntimeError(f"no key matches {pattern}")
    return _decode(c.hgetall(key)), int(c.ttl(key))


def preload(server: RedisServer, holds: int, windows: int) -> dict[str, float]:
    """Write holds and windows shaped like the real ones already in ``server``."""
    c = server.client
    permit, permit_ttl = _template(server, PREFIX + "permit:*")
    idem, idem_ttl = _template(server, PREFIX + "req:*")
    window, _ = _template(server, PREFIX + "b:tenant-daily:*")
    now_ms = int(time.time() * 1000)
    hold_script = c.register_script(_lua("preload_holds.lua"))
    window_script = c.register_script(_lua("preload_windows.lua"))
    c.execute_command("MEMORY", "PURGE")  # type: ignore[no-untyped-call]
    m0 = server.used_memory()
    t0 = time.monotonic()
    # Windows first, then holds: the key table doubles as it grows, and that
    # doubling is part of what the many holds cost, not the fewer windows.
    for first in range(0, windows, BATCH):
        window_script(args=[PREFIX, first, min(BATCH, windows - first), now_ms,
                            int(time.time()) + 7200, len(window) // 2, *window])
    m1 = server.used_memory()
    for first in range(0, holds, BATCH):
        hold_script(keys=[PREFIX + "expiries"], args=[
            PREFIX, first, min(BATCH, holds - first), now_ms + 3_600_000,
            max(permit_ttl, 7200), max(idem_ttl, 7200), len(permit) // 2, *permit,
            len(idem) // 2, *idem])
    m2 = server.used_memory()
    sample_hold = (_usage(server, PREFIX + "permit:*") + _usage(server, PREFIX + "req:*"))
    return {"per_window": (m1 - m0) / max(windows, 1), "per_hold": (m2 - m1) / max(holds, 1),
            "seconds": time.monotonic() - t0, "permit_fields": len(permit) // 2,
            "window_usage": _usage(server, PREFIX + "b:preload-daily:*"),
            "hold_usage": sample_hold}


def _usage(server: RedisServer, pattern: str, samples: int = 200) -> float:
    """Mean MEMORY USAGE of some keys matching ``pattern`` (key, value, entry overhead)."""
    c = server.client
    sizes = []
    for key in c.scan_iter(match=pattern, count=1000):
        sizes.append(int(c.memory_usage(key, samples=0) or 0))
        if len(sizes) >= samples:
            break
    return sum(sizes) / max(len(sizes), 1)


def run(ctx: Context) -> list[Row]:
    quick = ctx.quick
    holds = int(ctx.options.get("growth_holds", 20_000 if quick else 1_000_000))
    windows = int(ctx.options.get("growth_windows", 5_000 if quick else 100_000))
    total = int(ctx.options.get("growth_decisions", 30_000 if quick else 1_000_000))
    rows: list[Row] = []
    with ctx.redis("redis-empty") as empty, ctx.redis("redis-loaded") as loaded, \
            ctx.sidecar(empty.url, name="growth-empty") as se, \
            ctx.sidecar(loaded.url, name="growth-loaded") as sl:
        r_e = Runner(ctx, se, empty, "ge")
        r_l = Runner(ctx, sl, loaded, "gl")
        # Real decisions first: they are the preload's templates, and warm both sidecars.
        r_e.authorize()
        r_l.authorize()
        mem = preload(loaded, holds, windows)
        keys = int(loaded.client.dbsize())
        rows.append(Row(SECTION, "Redis memory per open hold", mem["per_hold"], "bytes", None,
                        "", f"INFO used_memory delta over {holds:,} preloaded holds (permit hash "
                        f"of {mem['permit_fields']} fields + idempotency record + expiry zset "
                        f"entry, key-table growth included); MEMORY USAGE of the two keys "
                        f"{mem['hold_usage']:.0f} bytes; preload {mem['seconds']:.0f}s"))
        rows.append(Row(SECTION, "Redis memory per budget window", mem["per_window"], "bytes",
                        None, "", f"INFO used_memory delta over {windows:,} windows; MEMORY "
                        f"USAGE {mem['window_usage']:.0f} bytes; {keys:,} keys in the loaded "
                        "Redis"))
        ratios: list[float] = []
        rates_e: list[float] = []
        rates_l: list[float] = []
        for _ in range(ctx.rounds):
            a_e, _, _ = r_e.authorize()
            a_l, _, _ = r_l.authorize()
            ratios.append(a_l.rps / a_e.rps)
            rates_e.append(a_e.rps)
            rates_l.append(a_l.rps)
        rows.append(Row(SECTION, "Authorize, empty Redis", median(rates_e), "calls/s", 1.0,
                        "empty Redis"))
        rows.append(Row(SECTION, f"Authorize, {holds:,} holds + {windows:,} windows",
                        median(rates_l), "calls/s", median(ratios), "empty Redis",
                        f"spread {spread(ratios) or '-'} (target >= 0.9)"))
        stream = PREFIX + "events"
        xlen = int(loaded.client.xlen(stream))
        usage = loaded.client.memory_usage(stream, samples=0) or 0
        rows.append(Row(SECTION, "Redis memory per decision event (stream)",
                        usage / max(xlen, 1), "bytes", None, "",
                        f"{xlen:,} events; the ledger writer trims what it has stored"))
    rows.extend(_rss(ctx, total))
    return rows


def _checkpoints(total: int) -> list[int]:
    base = [100_000, 200_000, 500_000, 1_000_000]
    if total < 1_000_000:
        base = [round(total * f) for f in (0.1, 0.2, 0.5, 1.0)]
    return sorted({c for c in base if 0 < c <= total} | {total})


def _rss(ctx: Context, total: int) -> list[Row]:
    rss: dict[int, int] = {}
    rates: dict[int, float] = {}
    with ctx.redis("redis-rss") as server, ctx.sidecar(
            server.url, name="growth-rss", launcher_args=["--trace-gc"]) as s:
        r = Runner(ctx, s, server, "rss")
        done = 0
        started = time.monotonic()
        rss[0] = s.rss()
        for cp in _checkpoints(total):
            bodies = ctx.path(f"rss-{cp}.bin")
            write_bodies(bodies, r.workload.authorize("rss", done, cp - done))
            res: dict[str, Any] = drive(ctx.driver, s.port, AUTHORIZE, bodies, streams=STREAMS,
                                        timeout_s=3600)
            bodies.unlink()
            if res["errors"]:
                raise RuntimeError(f"{res['errors']} Authorize calls failed; see {s.log}")
            done = cp
            rss[cp] = s.rss()
            rates[cp] = float(res["rps"])
        minutes = (time.monotonic() - started) / 60
    gc_line = s.log_line("gc pauses:") or "gc pauses: not reported"
    points = sorted(rss)
    first = points[1]
    last = points[-1]
    trail = ", ".join(f"{p:,}: {rss[p] / 2**20:.0f} MiB" for p in points)
    rows = [Row(SECTION, f"sidecar RSS after {first:,} decisions", rss[first] / 2**20, "MiB",
                None, "", f"RSS by decisions made: {trail}"),
            Row(SECTION, f"sidecar RSS after {last:,} decisions", rss[last] / 2**20, "MiB",
                rss[last] / rss[first], f"after {first:,}",
                f"target within 10%; {minutes:.1f} min of load; calls/s first chunk "
                f"{rates[first]:,.0f}, last chunk {rates[last]:,.0f}; sidecar {gc_line}")]
    return rows

