"""Hostile callers of a shared Keel (issue 18): one names another team's tenant,
one closes out (or voids) another team's permit. Real PKI, real Redis, the
real server in enforce mode. Each is refused PERMISSION_DENIED naming the
identity and what it lacks, and nothing already recorded moves."""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.mesh import envoy_types as et
from tests.integration.identity_pki import make_pki
from tests.integration.test_identity import (
    BILLING,
    BOT,
    CI_TOKEN,
    STRANGER,
    SUPPORT,
    areq,
    bundle,
    channel,
    check_request,
    closeout,
    events,
    mtls,
    sidecar,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _window(redis_url: str, keys: tuple[str, ...]) -> list[dict[bytes, bytes]]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return [await client.hgetall(k) for k in keys]  # type: ignore[misc]
    finally:
        await client.aclose()


def _refused(exc: BaseException, *words: str) -> None:
    assert isinstance(exc, grpc.aio.AioRpcError), exc
    assert exc.code() == grpc.StatusCode.PERMISSION_DENIED, exc.details()
    for w in words:
        assert w in (exc.details() or ""), exc.details()


@pytest.mark.parametrize("tenant", ["acme", "Acme", "acme ", "acme%00", "acme\x00", "*",
                                    "\uff41\uff43\uff4d\uff45"])  # full-width "acme"
async def test_a_caller_naming_someone_elses_tenant_is_refused_and_holds_nothing(
        redis_url: str, tmp_path: pathlib.Path, pki: pathlib.Path, tenant: str) -> None:
    prefix = "hostile-tenant"
    async with sidecar(redis_url, bundle(tmp_path / "b"), "enforce", prefix, mtls(pki)) as sc:
        before = len(events(redis_url, sc.keys))
        async with channel(pki, sc.port, "billing") as ch:  # bound to globex/etl only
            stub = pb_grpc.PolicyDecisionPointStub(ch)
            req = areq(BOT)
            req.tenant = tenant
            # A stolen token does not change who the certificate says the caller is.
            meta = (("authorization", f"Bearer {CI_TOKEN}"),)
            results = await asyncio.gather(
                *(stub.Authorize(req, metadata=meta, timeout=5) for _ in range(20)),
                return_exceptions=True)
            for res in results:
                _refused(res, BILLING)  # type: ignore[arg-type]
        assert len(events(redis_url, sc.keys)) == before  # no decision, no hold


async def test_an_empty_tenant_is_a_bad_request_whoever_asks(
        redis_url: str, tmp_path: pathlib.Path, pki: pathlib.Path) -> None:
    async with sidecar(redis_url, bundle(tmp_path / "b"), "enforce", "hostile-empty",
                       mtls(pki)) as sc, channel(pki, sc.port, "stranger") as ch:
        before = len(events(redis_url, sc.keys))
        req = areq(BOT)
        req.tenant = ""
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.PolicyDecisionPointStub(ch).Authorize(req, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tenant" in (info.value.details() or "")
        assert len(events(redis_url, sc.keys)) == before


async def test_a_caller_closing_out_someone_elses_permit_is_refused_and_moves_nothing(
        redis_url: str, tmp_path: pathlib.Path, pki: pathlib.Path) -> None:
    prefix = "hostile-close"
    async with sidecar(redis_url, bundle(tmp_path / "b"), "enforce", prefix, mtls(pki)) as sc, \
            channel(pki, sc.port, "support") as owner_ch, \
            channel(pki, sc.port, "billing") as thief_ch, \
            channel(pki, sc.port, "stranger") as stranger_ch:
        owner = pb_grpc.PolicyDecisionPointStub(owner_ch)
        opened = await owner.Authorize(areq(BOT), timeout=5)
        assert opened.decision == pb.ALLOW
        pid = opened.permit_id
        rec = await sc.engine.store.permit(pid, 1.0)
        assert rec is not None
        before = await _window(redis_url, rec.keys)
        n_events = len(events(redis_url, sc.keys))
        absurd = pb.CloseoutRequest(
            permit_id=pid, outcome=pb.SUCCEEDED, provider_cost_micros=10**12,
            usage=pb.Usage(input_tokens=2_000_000, output_tokens=2_000_000))
        attacks: list[Any] = []
        for stub in (pb_grpc.PolicyDecisionPointStub(thief_ch),
                     pb_grpc.PolicyDecisionPointStub(stranger_ch)):
            attacks += [stub.Closeout(absurd, timeout=5), stub.Closeout(closeout(pid), timeout=5),
                        stub.Void(pb.VoidRequest(permit_id=pid, reason="mine now"), timeout=5)]
        results = await asyncio.gather(*attacks, return_exceptions=True)
        for i, res in enumerate(results):
            _refused(res, BILLING if i < 3 else STRANGER)
        _refused(results[0], pid, "tenant 'acme'")
        # Nothing moved: same balances, no event, the permit still held by its owner.
        assert await _window(redis_url, rec.keys) == before
        assert len(events(redis_url, sc.keys)) == n_events
        rec2 = await sc.engine.store.permit(pid, 1.0)
        assert rec2 is not None and rec2.state == rec.state
        done = await owner.Closeout(closeout(pid), timeout=5)
        assert done.status == pb.SETTLED and done.actual_cost_micros < 10**6
        settled = [d for t, p, d in events(redis_url, sc.keys) if p == pid and t == "settlement"]
        assert [d.get("caller") for d in settled] == [SUPPORT]


async def test_a_proxy_that_is_not_a_gateway_cannot_vouch_for_another_principal(
        redis_url: str, tmp_path: pathlib.Path, pki: pathlib.Path) -> None:
    prefix = "hostile-envoy"
    async with sidecar(redis_url, bundle(tmp_path / "b"), "enforce", prefix, mtls(pki)) as sc, \
            channel(pki, sc.port, "stranger") as ch:
        stub = et.auth_grpc.AuthorizationStub(ch)
        req = check_request("acme", "support-bot", SUPPORT,
                            {"keel_tenant": "acme", "keel_workload": "support-bot"})
        resp = await stub.Check(req, timeout=5)
        assert resp.denied_response.status.code == 403
        assert STRANGER in resp.denied_response.body
        assert events(redis_url, sc.keys) == []
