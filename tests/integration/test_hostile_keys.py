"""Hostile key material through the real Lua scripts: separators, braces,
unicode, long names and huge numbers never collide, escape their key or crash."""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel_pdp.decision import AuthorizeInput, DecisionKind, InvalidRequest
from tests.helpers import budget, make_engine, write_bundle

hostile = st.text(alphabet=st.sampled_from(list(":{}*?[]% \\\"'\n\tü漢🙂aA0-_.")),
                  min_size=1, max_size=64)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=hostile, b=hostile, rid=hostile)
def test_distinct_hostile_tenants_get_distinct_counters(
        redis_url: str, tmp_path: pathlib.Path, a: str, b: str, rid: str) -> None:
    bundle = tmp_path / "b"
    if not bundle.exists():
        write_bundle(bundle, [budget("per", "0.000500", per=["tenant", "workload"])],
                     settings={"allow_constrain": False})

    async def run() -> None:
        client = aioredis.Redis.from_url(redis_url)
        await client.flushall()
        engine = make_engine(client, bundle)
        try:
            outs = []
            for tenant in (a, b):
                try:
                    outs.append(await engine.authorize(AuthorizeInput(
                        rid, tenant, tenant, "gpt-4o-mini", "openai", 1000, 500)))
                except InvalidRequest:
                    return
            assert all(o.decision is DecisionKind.ALLOW for o in outs)
            raw: Any = await client.keys("*")
            keys = {k.decode() for k in raw}
            windows = [k for k in keys if ":b:per:" in k]
            assert len(windows) == (1 if a == b else 2), windows
            # Every key stays inside the sidecar's own key space.
            assert all(k.startswith("t:{pdp}:") for k in keys), keys
            held = [int(v or 0) for v in [await client.hget(k, "h") for k in windows]]
            # The same tenant twice is the same request (same id): replayed, held once.
            assert held == ([450] if a == b else [450, 450])
        finally:
            await client.aclose()

    asyncio.run(run())
