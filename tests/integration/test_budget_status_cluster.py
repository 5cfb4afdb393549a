"""Live budget status on a real Redis Cluster: the status of a per-tenant budget
across all tenants walks every node's SCAN cursor (redis-py's RedisCluster answers
SCAN with one cursor per node), after real Authorize calls through the cluster
store. Figures are worked out here from the calls made."""

from __future__ import annotations

import pathlib

from keel_pdp.budget.status import StatusReader
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.reload import PolicyHolder
from tests.helpers import budget, write_bundle
from tests.integration.cluster_fixture import RedisCluster, redis_cluster

__all__ = ["redis_cluster"]

# gpt-4.1 at $2/M input and $8/M output tokens: a hold of 1000 in + 500 out, in micro-USD.
HOLD = 1000 * 2 + 500 * 8


async def test_status_of_every_tenant_on_a_cluster(redis_cluster: RedisCluster,
                                                   tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path / "bundle",
                     [budget("per-tenant", "0.50", per=["tenant"], window="monthly")])
    holder = PolicyHolder(d)
    holder.reload()
    snapshot = holder.current
    assert snapshot is not None, holder.last_error
    store = BudgetStore.from_url(redis_cluster.url, prefix="stc", timeout_s=1.0)
    engine = Engine(holder, store, Metrics())
    calls = {"acme": 3, "globex": 1, "initech": 2, "umbrella": 1, "a:b c": 2}
    try:
        for tenant, n in calls.items():
            for i in range(n):
                out = await engine.authorize(AuthorizeInput(
                    f"{tenant}-{i}", tenant, "chat", "gpt-4.1", "openai", 1000, 500))
                assert out.decision == DecisionKind.ALLOW and not out.degraded, out
        reader = StatusReader(store)
        every = await reader.status(snapshot)
        held = {w.split: w.held_micros for w in every}
        assert held == {(t,): n * HOLD for t, n in calls.items()}
        assert all(w.settled_micros == 0 and w.remaining_micros == 500_000 - w.held_micros
                   for w in every)
        # One tenant, and a budget filter, give that tenant's counter only.
        one = await reader.status(snapshot, tenant="initech", budget_id="per-tenant")
        assert [(w.split, w.held_micros) for w in one] == [(("initech",), 2 * HOLD)]
    finally:
        await store.close()
