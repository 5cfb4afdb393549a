"""bench/bench_script.py keeps working: both script variants decide and settle a
handful of requests, and the breakdown accounts for every microsecond EVALSHA
took. No figure is asserted (benchmarks are never timed tests)."""

from __future__ import annotations

import pathlib

import pytest

from bench import bench_script
from bench.harness import POLICIES, RedisServer


@pytest.mark.redis
def test_both_variants_hold_and_settle_and_the_breakdown_adds_up(
        tmp_path: pathlib.Path) -> None:
    with RedisServer(tmp_path) as server:
        res = bench_script._measure(server, POLICIES / "generous", 64, 1)
    for phases in (res.authorize, res.closeout):
        for name in ("before", "after"):
            (phase,) = phases[name]
            assert phase.calls == 64
            assert phase.stats["evalsha"][0] == 64
            rows = bench_script.breakdown(phases[name])
            total = sum(u for _, _, u in rows)
            assert total == pytest.approx(phase.per_call(), rel=1e-6)
    # Every hold writes one stream entry and one permit record in either variant.
    for name in ("before", "after"):
        assert res.authorize[name][0].stats["xadd"][0] == 64
    table = bench_script.rows_of(res, 64)
    assert {r.name for r in table} >= {"Redis time per Authorize script, now",
                                      "Redis time per Closeout script, now"}
