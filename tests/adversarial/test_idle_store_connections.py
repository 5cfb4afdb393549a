"""A Redis that closes idle client connections (``timeout`` in redis.conf, or a
firewall's idle cut) against the money: after the sidecar's connections sat idle
past it, the next Authorize must still be decided by the store (held and in the
stream), not answered by the fail mode. Both production transports (the pipelined
RESP client and redis-py), on the test run's real redis-server."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from tests.helpers import budget, write_bundle


@pytest.fixture
def idle_cut(redis_url: str) -> Iterator[redis.Redis]:
    """The server closes connections idle for a second, for this test only."""
    admin = redis.Redis.from_url(redis_url)
    admin.config_set("timeout", 1)
    try:
        yield admin
    finally:
        admin.config_set("timeout", 0)
        admin.close()


@pytest.mark.parametrize("client", ["resp", "redis-py"])
async def test_connections_closed_while_idle_are_reopened_not_answered_by_the_fail_mode(
        redis_url: str, idle_cut: redis.Redis, tmp_path: pathlib.Path, client: str) -> None:
    # Fail-closed: a decision the store did not make would be a DENY (STORE_UNAVAILABLE).
    bundle = write_bundle(tmp_path / "b", [budget("acme", "10", fail_mode="closed",
                                                  scope={"tenant": "acme"})])
    holder = PolicyHolder(bundle)
    holder.set(load_bundle(bundle))
    store = BudgetStore.from_url(redis_url, timeout_s=2.0, client=client)
    engine = Engine(holder, store, Metrics())
    try:
        opened = int(idle_cut.info("stats")["total_connections_received"])
        held = []
        for i in range(3):
            out = await engine.authorize(AuthorizeInput(f"r{i}", "acme", "chat", "gpt-4o-mini",
                                                        "openai", 1000, 100), deadline_s=5.0)
            assert out.decision is DecisionKind.ALLOW and not out.degraded, out
            held.append(out.permit_id)
            if i < 2:
                await asyncio.sleep(2.5)  # past the server's idle cut
        # The cut happened: the sidecar had to connect again after each idle spell.
        again = int(idle_cut.info("stats")["total_connections_received"]) - opened
        assert again >= 3, again
        entries: Any = idle_cut.xrange(store.keys.stream)
        assert [f[b"pid"].decode() for _, f in entries if f[b"type"] == b"decision"] == held
    finally:
        await store.close()
