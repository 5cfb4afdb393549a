"""Admin RPCs over gRPC: bearer token, exception grants, forced reload."""

from __future__ import annotations

import pathlib

import grpc
import pytest
import redis.asyncio as aioredis

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.server.admin import add_admin
from keel_pdp.server.service import build_server
from tests.conftest import free_port
from tests.helpers import budget, write_bundle

TOKEN = "s3cret-admin-token"


def grant_request(**kw: object) -> pb.GrantExceptionRequest:
    base: dict[str, object] = dict(
        exception_path="finance-overage", budget_id="acme", amount_micros=2_000_000,
        duration_seconds=3600, approver="Dana", approver_role="finance-owner",
        justification="Customer launch week, approved in FIN-42")
    base.update(kw)
    return pb.GrantExceptionRequest(**base)  # type: ignore[arg-type]


async def test_admin_needs_the_token_and_grants_raise_the_cap(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    d = write_bundle(tmp_path, [budget("acme", "0.006000", scope={"tenant": "acme"},
                                       exception_path="finance-overage")],
                     exception_paths=[{"name": "finance-overage", "max_overage_usd": "10"}],
                     settings={"allow_constrain": False})
    holder = PolicyHolder(d)
    holder.reload()
    store = BudgetStore(aioredis.Redis.from_url(redis_url), KeySpace("adm"), 1.0)
    engine = Engine(holder, store, Metrics())
    token: list[str | None] = [None]
    server, _, port = build_server(engine, engine.metrics, f"127.0.0.1:{free_port()}",
                                   extra_services=[add_admin(engine, lambda: token[0])])
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            admin = pb_grpc.AdminStub(ch)
            pdp = pb_grpc.PolicyDecisionPointStub(ch)
            auth = (("authorization", f"Bearer {TOKEN}"),)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.GrantException(grant_request(), metadata=auth)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "no admin token" in (info.value.details() or "")
            token[0] = TOKEN
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.GrantException(grant_request(),
                                           metadata=(("authorization", "Bearer nope"),))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.GrantException(grant_request(approver_role="intern"), metadata=auth)
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.GrantException(grant_request(amount_micros=99_000_000),
                                           metadata=auth)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "maximum overage" in (info.value.details() or "")

            areq = pb.AuthorizeRequest(request_id="a", tenant="acme", workload="w",
                                       model="gpt-4.1", provider="openai",
                                       estimated_input_tokens=1000, max_output_tokens=500)
            assert (await pdp.Authorize(areq)).decision == pb.ALLOW
            areq.request_id = "b"
            denied = await pdp.Authorize(areq)
            assert denied.decision == pb.DENY
            assert denied.block_reasons[0].exception_path == "finance-overage"
            res = await admin.GrantException(grant_request(), metadata=auth)
            assert res.created
            areq.request_id = "c"
            ok = await pdp.Authorize(areq)
            assert ok.decision == pb.ALLOW
            assert pb.EXCEPTION_GRANT_APPLIED in [r.code for r in ok.block_reasons]

            (d / "budgets.yaml").write_text("not: [valid")
            rel = await admin.ReloadPolicy(pb.ReloadPolicyRequest(), metadata=auth)
            assert not rel.changed
            assert rel.problems
            assert rel.policy_revision.startswith("test-r1@")
    finally:
        await server.stop(0)
        await store.close()
