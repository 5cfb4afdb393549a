"""Live budget status from a real Redis: the BudgetStatus RPC and `keel-pdp budgets
status` after real traffic, checked against figures worked out here from the calls
made (not read back from the store)."""

from __future__ import annotations

import asyncio
import io
import json
import math
import pathlib
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime, timedelta
from fractions import Fraction

import grpc
import pytest
import redis.asyncio as aioredis

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore
from keel_pdp.cli import main
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.server.admin import add_admin
from keel_pdp.server.service import build_server
from tests.conftest import free_port
from tests.helpers import budget, write_bundle

TOKEN = "status-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
HOLD = 1000 * 2 + 500 * 8  # gpt-4.1: 1000 in at $2/M + 500 out at $8/M
SETTLE = 1000 * 2 + 250 * 8


def month_window(ms: int) -> tuple[int, int]:
    now = datetime.fromtimestamp(ms / 1000, UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def hour_window(ms: int) -> tuple[int, int]:
    start = ms - ms % 3_600_000
    return start, start + 3_600_000


def ceil_ratio(num: int, den: int) -> int:
    return math.ceil(Fraction(num, den))


async def test_budget_status_after_real_traffic(redis_url: str, tmp_path: pathlib.Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    d = write_bundle(
        tmp_path / "bundle",
        [budget("acme", "1.00", scope={"tenant": "acme"}, window="monthly",
                exception_path="finance-overage"),
         budget("per-tenant", "0.50", per=["tenant"], window="monthly"),
         budget("peak", "0.010", scope={"tenant": "acme"}, window="hourly", mode="observe"),
         {"id": "chat", "scope": {"workload": "chat"},
          "limits": [{"window": "hourly", "cap_usd": "0.20"},
                     {"window": "daily", "cap_usd": "2.00"}]},
         budget("globex", "0.30", scope={"tenant": "globex"}, window="monthly")],
        exception_paths=[{"name": "finance-overage", "max_overage_usd": "5.00"}])
    holder = PolicyHolder(d)
    holder.reload()
    assert holder.current is not None, holder.last_error
    store = BudgetStore(aioredis.Redis.from_url(redis_url), KeySpace("st"), 1.0)
    engine = Engine(holder, store, Metrics())
    server, _, port = build_server(engine, engine.metrics, f"127.0.0.1:{free_port()}",
                                   extra_services=[add_admin(engine, lambda: TOKEN)])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            pdp, admin = pb_grpc.PolicyDecisionPointStub(ch), pb_grpc.AdminStub(ch)

            def ask(rid: str, tenant: str, workload: str = "chat") -> pb.AuthorizeRequest:
                return pb.AuthorizeRequest(request_id=rid, tenant=tenant, workload=workload,
                                           model="gpt-4.1", provider="openai",
                                           estimated_input_tokens=1000, max_output_tokens=500)

            acme = [await pdp.Authorize(ask(f"a{i}", "acme")) for i in range(3)]
            globex = [await pdp.Authorize(ask(f"g{i}", "globex", "batch")) for i in range(2)]
            assert all(r.decision == pb.ALLOW for r in acme + globex)
            await pdp.Closeout(pb.CloseoutRequest(
                permit_id=acme[0].permit_id, outcome=pb.SUCCEEDED,
                usage=pb.Usage(input_tokens=1000, output_tokens=250)))
            grant = await admin.GrantException(pb.GrantExceptionRequest(
                exception_path="finance-overage", budget_id="acme", amount_micros=500_000,
                duration_seconds=3600, approver="dana", approver_role="finance-owner",
                justification="Quarter-end batch, FIN-7"), metadata=AUTH)

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.BudgetStatus(pb.BudgetStatusRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.BudgetStatus(pb.BudgetStatusRequest(budget_id="ghost"),
                                         metadata=AUTH)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "ghost" in (info.value.details() or "")

            res = await admin.BudgetStatus(pb.BudgetStatusRequest(tenant="acme"), metadata=AUTH)
            rows = {(b.budget_id, tuple(sorted(b.split.items()))): b for b in res.budgets}
            assert set(rows) == {("acme", ()), ("per-tenant", (("tenant", "acme"),)),
                                 ("peak", ()), ("chat.hourly", ()), ("chat.daily", ())}
            now = res.as_of_ms
            settled, held = SETTLE, 2 * HOLD  # one call settled, two still held
            a = rows[("acme", ())]
            start, end = month_window(now)
            assert (a.window, a.window_start_ms, a.window_end_ms) == ("monthly", start, end)
            assert (a.settled_micros, a.held_micros) == (settled, held)
            assert (a.cap_micros, a.granted_micros) == (1_000_000, 500_000)
            assert a.effective_cap_micros == 1_500_000
            assert a.remaining_micros == 1_500_000 - settled - held
            assert [(g.grant_id, g.amount_micros) for g in a.grants] == [
                (grant.grant_id, 500_000)]
            assert a.grants[0].expires_at_ms == grant.expires_at_ms
            elapsed = max(now - start, 1)
            assert a.burn_rate_micros_per_hour == ceil_ratio((settled + held) * 3_600_000,
                                                             elapsed)
            assert a.projected_end_micros == ceil_ratio((settled + held) * (end - start),
                                                        elapsed)
            assert a.exception_path == "finance-overage" and a.mode == "enforce"
            p = rows[("per-tenant", (("tenant", "acme"),))]
            assert (p.settled_micros, p.held_micros, p.cap_micros) == (settled, held, 500_000)
            peak = rows[("peak", ())]
            hs, he = hour_window(now)
            assert (peak.window_start_ms, peak.window_end_ms) == (hs, he)
            assert peak.mode == "observe" and peak.remaining_micros == 10_000 - settled - held
            assert peak.remaining_micros < 0 and peak.projected_over_cap

            both = await admin.BudgetStatus(pb.BudgetStatusRequest(budget_id="per-tenant"),
                                            metadata=AUTH)
            counters = {b.split["tenant"]: (b.settled_micros, b.held_micros)
                        for b in both.budgets}
            assert counters == {"acme": (settled, held), "globex": (0, 2 * HOLD)}
            chat = await admin.BudgetStatus(pb.BudgetStatusRequest(budget_id="chat"),
                                            metadata=AUTH)
            assert sorted(b.budget_id for b in chat.budgets) == ["chat.daily", "chat.hourly"]
            g = await admin.BudgetStatus(pb.BudgetStatusRequest(tenant="globex"), metadata=AUTH)
            assert {b.budget_id for b in g.budgets} == {"per-tenant", "globex", "chat.hourly",
                                                        "chat.daily"}
            chat_rows = [b for b in g.budgets if b.budget_id.startswith("chat")]
            assert all((b.settled_micros, b.held_micros) == (settled, held) for b in chat_rows)
            assert len({b.split["tenant"] for b in g.budgets if b.budget_id == "per-tenant"}) == 1

            monkeypatch.setenv("KEEL_ADMIN_TOKEN", TOKEN)
            buf = io.StringIO()

            def run(*argv: str) -> int:
                with redirect_stdout(buf), redirect_stderr(buf):
                    return main(list(argv))

            target = f"127.0.0.1:{port}"
            assert await asyncio.to_thread(run, "budgets", "status", "--target", target,
                                           "--tenant", "acme") == 0
            table = buf.getvalue()
            assert "per-tenant" in table and "tenant=acme" in table and "OVER" in table
            assert "globex" not in table
            buf.truncate(0)
            buf.seek(0)
            assert await asyncio.to_thread(run, "budgets", "status", "--target", target,
                                           "--budget", "acme", "--format", "json") == 0
            doc = json.loads(buf.getvalue())
            assert [b["budget_id"] for b in doc["budgets"]] == ["acme"]
            assert doc["budgets"][0]["granted_micros"] == "500000"  # int64 as JSON string
    finally:
        await server.stop(0)
        await store.close()
