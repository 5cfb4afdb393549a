"""The Envoy path with caller identities, through a real Envoy: Envoy calls
Keel's ext_authz and ext_proc with a bearer token (``initial_metadata`` of its
gRPC service) that Keel maps to the gateway's identity; the bindings decide
which tenants and workloads that gateway may meter, in enforce and observe
modes, and the identity is recorded on the permit's decision and settlement."""

from __future__ import annotations

import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import yaml

from keel_pdp.budget.store import BudgetStore
from keel_pdp.engine import Engine
from keel_pdp.mesh import services
from keel_pdp.mesh.envoyconf import bootstrap
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.server.identity import CallerGuard, CallerInterceptor, CallerTokens
from keel_pdp.server.service import build_server
from tests.conftest import RedisServer
from tests.integration.envoy_fixture import (
    MESH_POLICIES,
    PREFIX,
    MeshStack,
    events,
    permit_state,
    redis_client,
)

TOKEN = "gateway-token-0123456789"


class IdentityStack(MeshStack):
    def __init__(self, redis_server: RedisServer, workdir: pathlib.Path, caller_auth: str,
                 policies: pathlib.Path) -> None:
        super().__init__(redis_server, workdir, "split", policies=policies)
        self.caller_auth = caller_auth
        self.tokens = workdir / "tokens"
        self.tokens.write_text(f"egress-gw {TOKEN}\n")

    async def _start_sidecar(self) -> tuple[int, int]:
        holder = PolicyHolder(self.policies)
        holder.reload(force=True)
        self._store = BudgetStore.from_url(self.redis_server.url, prefix=PREFIX,
                                           timeout_s=0.5)
        engine = Engine(holder, self._store, self.metrics)
        guard = CallerGuard(self.caller_auth, holder, self.metrics, self._store,
                            CallerTokens(str(self.tokens)))
        server, health, port = build_server(
            engine, self.metrics, "127.0.0.1:0",
            extra_services=services(engine, self.metrics, self.cfg),
            interceptors=[CallerInterceptor(guard)])
        await server.start()
        await health.set(True)
        self._server = server
        return port, await self.mock.start("127.0.0.1", 0)


def _with_token(config: Any) -> Any:
    """Every gRPC service Envoy calls Keel with carries the gateway's token."""
    if isinstance(config, dict):
        if "grpc_service" in config:
            config["grpc_service"]["initial_metadata"] = [
                {"key": "authorization", "value": f"Bearer {TOKEN}"}]
        for v in config.values():
            _with_token(v)
    elif isinstance(config, list):
        for v in config:
            _with_token(v)
    return config


@pytest.fixture(params=["enforce", "observe"])
def stack(redis_server: RedisServer, tmp_path: pathlib.Path, request: pytest.FixtureRequest,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[IdentityStack]:
    policies = tmp_path / "policies"
    shutil.copytree(MESH_POLICIES, policies)
    (policies / "callers.yaml").write_text(yaml.safe_dump({
        "apiVersion": "keel.pdp/v1", "kind": "Callers", "bindings": [
            {"id": "egress", "identities": ["egress-gw"], "tenants": ["acme"],
             "workloads": ["chat"], "rpcs": ["authorize", "mesh"]}]}))
    monkeypatch.setattr("tests.integration.envoy_fixture.bootstrap",
                        lambda s: _with_token(bootstrap(s)))
    s = IdentityStack(redis_server, tmp_path, request.param, policies)
    try:
        s.start()
        yield s
    finally:
        s.stop()


@pytest.fixture
def rdb(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    yield from redis_client(redis_server)


CHAT = {"model": "gpt-4.1-mini", "max_tokens": 100,
        "messages": [{"role": "user", "content": "Who pays for this call?"}]}


def test_a_gateway_meters_only_the_tenants_it_is_bound_to(
        stack: IdentityStack, rdb: redis.Redis) -> None:
    ok = stack.call("/v1/chat/completions", CHAT, tenant="acme", workload="chat")
    assert ok.status == 200, ok.body
    pid = ok.headers["x-keel-permit-id"]
    assert permit_state(rdb, pid)["state"] == "settled"  # closed out by ext_proc
    (decision,) = events(rdb, pid, "decision")
    (settlement,) = events(rdb, pid, "settlement")
    assert decision["data"]["caller"] == "egress-gw"
    assert settlement["data"]["caller"] == "egress-gw"

    before = len(stack.upstream_calls())
    for tenant, workload in (("globex", "chat"), ("acme", "batch")):
        reply = stack.call("/v1/chat/completions", CHAT, tenant=tenant, workload=workload)
        if stack.caller_auth == "enforce":
            assert reply.status == 403, reply.body
            err = reply.json()["error"]
            assert err["code"] == "CALLER_NOT_BOUND"
            assert "egress-gw" in err["message"] and repr(tenant) in err["message"]
        else:
            assert reply.status == 200, reply.body
    refused = stack.metric("keel_pdp_caller_refusals_total", rpc="envoy_check",
                           reason="scope", mode=stack.caller_auth)
    assert refused == 2
    reached = len(stack.upstream_calls()) - before
    assert reached == (0 if stack.caller_auth == "enforce" else 2)
