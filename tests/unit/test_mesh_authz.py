"""ext_authz Check -> Authorize -> Envoy's answer, over fakeredis (no Envoy)."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import fakeredis
import pytest

from keel_pdp.mesh import envoy_types as et
from keel_pdp.mesh.authz import AuthorizationServicer
from keel_pdp.mesh.config import MeshConfig
from keel_pdp.mesh.metrics import MeshMetrics
from keel_pdp.mesh.request import Api, estimate_input_tokens
from keel_pdp.metrics import Metrics
from tests.conftest import ROOT
from tests.helpers import make_engine, read_stream

POLICIES = ROOT / "tests" / "fixtures" / "mesh_policies"
CHAT = {"model": "gpt-4.1-mini", "max_tokens": 100,
        "messages": [{"role": "user", "content": "hello there"}]}


def servicer(connected: bool = True, cfg: MeshConfig | None = None) -> AuthorizationServicer:
    server = fakeredis.FakeServer()
    server.connected = connected
    engine = make_engine(fakeredis.FakeAsyncRedis(server=server), POLICIES, timeout_s=0.2)
    return AuthorizationServicer(engine, MeshMetrics(Metrics()), cfg or MeshConfig())


def check_request(body: object = CHAT, *, path: str = "/v1/chat/completions",
                  method: str = "POST", tenant: str | None = "acme", workload: str = "chat",
                  headers: dict[str, str] | None = None, ext: dict[str, str] | None = None,
                  host: str = "api.openai.com", raw_map: bool = False) -> Any:
    req = et.auth.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.id = method, path, host, "envoy-req-1"
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"x-keel-workload": workload,
            "x-request-id": "rid-" + hashlib.sha256(payload).hexdigest()[:16], **(headers or {})}
    if tenant is not None:
        hdrs["x-keel-tenant"] = tenant
    if raw_map:
        for k, v in hdrs.items():
            http.header_map.headers.add(key=k, raw_value=v.encode())
    else:
        http.headers.update(hdrs)
    http.raw_body = payload
    req.attributes.context_extensions.update(ext or {})
    return req


def headers_of(options: Any) -> dict[str, str]:
    return {o.header.key: o.header.value for o in options}


def denied(resp: Any) -> tuple[int, dict[str, str], dict[str, Any]]:
    assert resp.WhichOneof("http_response") == "denied_response"
    d = resp.denied_response
    return d.status.code, headers_of(d.headers), json.loads(d.body)


async def _stream_kinds(s: Any, until: bytes | None = None) -> list[bytes]:
    """The event types on the servicer's decision stream; with ``until``, once one
    of that type is there (the release of a given-up Check goes out in the
    background), looking for up to 2 s."""
    client: Any = s.engine.store.client
    for _ in range(100):
        if until is not None:
            await asyncio.sleep(0.02)
        kinds = [f[b"type"] for _, f in await read_stream(client, s.engine.store.keys.stream)]
        if until is None or until in kinds:
            break
    return kinds


async def test_allow_sets_permit_headers_metadata_and_overwrites_client_copies() -> None:
    resp = await servicer().check(check_request(), None)
    assert resp.status.code == 0
    ok = resp.ok_response
    h = headers_of(ok.headers)
    assert h["x-keel-decision"] == "ALLOW"
    assert h["x-keel-permit-id"].startswith("pmt_")
    assert (h["x-keel-model"], h["x-keel-provider"], h["x-keel-max-tokens"]) == (
        "gpt-4.1-mini", "openai", "100")
    assert h["x-keel-input-tokens"] == str(estimate_input_tokens(Api.CHAT, CHAT))
    assert h["x-keel-policy-revision"].startswith("mesh-test-r1@")
    assert "x-keel-enforce-max-tokens" not in h
    assert "x-keel-enforce-max-tokens" in ok.headers_to_remove
    assert all(o.append_action == et.OVERWRITE for o in ok.headers)
    assert headers_of(ok.response_headers_to_add)["x-keel-permit-id"] == h["x-keel-permit-id"]
    md = resp.dynamic_metadata
    assert md["permit_id"] == h["x-keel-permit-id"]
    assert md["decision"] == "ALLOW"
    assert md["policy_revision"] == h["x-keel-policy-revision"]
    assert isinstance(md["estimated_cost_micros"], str)  # money never as a double


async def test_request_without_a_cap_asks_ext_proc_to_write_the_held_one() -> None:
    body = {k: v for k, v in CHAT.items() if k != "max_tokens"}
    resp = await servicer().check(check_request(body), None)
    h = headers_of(resp.ok_response.headers)
    assert h["x-keel-max-tokens"] == h["x-keel-enforce-max-tokens"] == "1024"
    assert resp.dynamic_metadata["enforce_max_tokens"] is True


async def test_constrain_lowers_max_tokens_and_asks_for_enforcement() -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 1000,
            "messages": [{"role": "user", "content": "hi"}]}
    resp = await servicer().check(check_request(body, path="/v1/messages", tenant="tight",
                                                host="api.anthropic.com"), None)
    h = headers_of(resp.ok_response.headers)
    assert h["x-keel-decision"] == "CONSTRAIN"
    assert h["x-keel-provider"] == "anthropic"
    k = int(h["x-keel-max-tokens"])
    assert 16 <= k < 1000
    assert h["x-keel-enforce-max-tokens"] == str(k)


async def test_over_budget_is_429_with_reasons_and_retry_after() -> None:
    code, h, body = denied(await servicer().check(check_request(tenant="broke"), None))
    assert code == 429
    assert h["content-type"] == "application/json"
    assert int(h["retry-after"]) >= 1
    assert (h["x-keel-decision"], h["x-keel-reason"]) == ("DENY", "BUDGET_EXHAUSTED")
    err = body["error"]
    assert err["type"] == "rate_limit_error"
    assert err["block_reasons"][0]["budget_id"] == "broke-daily"
    assert err["block_reasons"][0]["retry_after_seconds"] == int(h["retry-after"])


async def test_model_not_allowed_and_unknown_price_are_403_without_retry_after() -> None:
    code, h, body = denied(await servicer().check(check_request(workload="restricted", body={
        **CHAT, "model": "gpt-4.1"}), None))
    assert (code, body["error"]["code"]) == (403, "MODEL_NOT_ALLOWED")
    assert "retry-after" not in h
    code, _, body = denied(await servicer().check(check_request({**CHAT, "model": "nope"}), None))
    assert (code, body["error"]["code"]) == (403, "UNKNOWN_MODEL_PRICE")


async def test_store_down_and_budget_failing_closed_is_503() -> None:
    code, h, body = denied(await servicer(connected=False).check(check_request(), None))
    assert (code, h["retry-after"], body["error"]["code"]) == (503, "1", "STORE_UNAVAILABLE")


@pytest.mark.parametrize(("kw", "status", "message"), [
    ({"body": b"{"}, 400, "not valid JSON"),
    ({"body": {"messages": []}}, 400, "model is required"),
    ({"tenant": None}, 400, "header x-keel-tenant is required"),
    ({"workload": ""}, 400, "header x-keel-workload is required"),
    ({"headers": {"content-encoding": "br"}}, 415, "not supported"),
    ({"body": {**CHAT, "max_tokens": 0}}, 400, "positive integer"),
])
async def test_unreadable_requests_get_a_clear_4xx(kw: dict[str, Any], status: int,
                                                   message: str) -> None:
    code, _, body = denied(await servicer().check(check_request(**kw), None))
    assert code == status
    assert message in body["error"]["message"]


async def test_provider_comes_from_the_host_before_the_path() -> None:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": []}
    # Anthropic's OpenAI-compatible endpoint: chat completions path, Anthropic host.
    resp = await servicer().check(check_request(body, host="api.anthropic.com"), None)
    assert headers_of(resp.ok_response.headers)["x-keel-provider"] == "anthropic"
    resp = await servicer().check(check_request(body, host="gw.internal",
                                                headers={"x-keel-provider": "anthropic"}), None)
    assert headers_of(resp.ok_response.headers)["x-keel-provider"] == "anthropic"


async def test_context_extensions_pin_tenant_and_workload_over_headers() -> None:
    resp = await servicer().check(check_request(tenant="acme", ext={"keel_tenant": "broke"}),
                                  None)
    code, _, _ = denied(resp)
    assert code == 429


async def test_raw_header_map_and_configured_header_names() -> None:
    cfg = MeshConfig(tenant_header="x-team", workload_header="x-app")
    req = check_request(tenant=None, workload="", raw_map=True,
                        headers={"x-team": "acme", "x-app": "bot"})
    resp = await servicer(cfg=cfg).check(req, None)
    assert resp.status.code == 0


async def test_cut_body_flagged_complete_is_estimated_not_refused() -> None:
    """Envoy 1.40 sometimes says x-envoy-auth-partial-body: false for a cut body."""
    full = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 4000}]}).encode()
    req = check_request(full[:300], headers={"x-envoy-auth-partial-body": "false",
                                             "content-length": str(len(full))})
    resp = await servicer().check(req, None)
    assert resp.status.code == 0, resp.denied_response.body
    h = headers_of(resp.ok_response.headers)
    assert h["x-keel-input-tokens"] == str(-(-len(full) // 4) + 3)
    assert h["x-keel-max-tokens"] == "100"
    # No content-length, exactly max_request_bytes arrived and it is not whole JSON.
    cfg = MeshConfig(max_request_bytes=1024)
    req = check_request(full[:1024], headers={"x-envoy-auth-partial-body": "false"})
    resp = await servicer(cfg=cfg).check(req, None)
    assert resp.status.code == 0, resp.denied_response.body
    assert headers_of(resp.ok_response.headers)["x-keel-input-tokens"] == str(256 + 3)
    # A short body that is simply broken JSON is still a 400.
    code, _, body = denied(await servicer(cfg=cfg).check(check_request(b'{"model": "gpt'), None))
    assert code == 400 and "not valid JSON" in body["error"]["message"]


async def test_cut_gzip_body_is_estimated_from_its_inflated_prefix() -> None:
    import gzip

    text = " ".join(str(i * 7919 % 100003) for i in range(3000))
    full = json.dumps({**CHAT, "messages": [{"role": "user", "content": text}]}).encode()
    packed = gzip.compress(full)
    cut = packed[: len(packed) // 2]
    req = check_request(cut, headers={"x-envoy-auth-partial-body": "true",
                                      "content-encoding": "gzip",
                                      "content-length": str(len(packed))})
    resp = await servicer().check(req, None)
    assert resp.status.code == 0, resp.denied_response.body
    est = int(headers_of(resp.ok_response.headers)["x-keel-input-tokens"])
    assert abs(est - len(full) / 4) < len(full) / 16


async def test_two_bodies_under_one_request_id_never_share_a_permit() -> None:
    s = servicer()
    a = {**CHAT, "messages": [{"role": "user", "content": "alpha one"}]}
    b = {**CHAT, "messages": [{"role": "user", "content": "omega two"}]}
    rid = {"x-request-id": "same-rid"}
    first = await s.check(check_request(a, headers=rid), None)
    assert first.status.code == 0
    code, h, body = denied(await s.check(check_request(b, headers=rid), None))
    assert (code, body["error"]["code"]) == (409, "REQUEST_ID_REUSED")
    assert "another body" in body["error"]["message"]
    # The same body again: a second provider call on a held permit is refused as well.
    code, h, body = denied(await s.check(check_request(a, headers=rid), None))
    assert (code, h["x-keel-reason"]) == (409, "REQUEST_ID_REUSED")
    pid = headers_of(first.ok_response.headers)["x-keel-permit-id"]
    assert pid in body["error"]["message"]


async def test_truncated_body_is_authorized_from_its_prefix_and_length() -> None:
    full = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 4000}]}).encode()
    req = check_request(full[:200], headers={"x-envoy-auth-partial-body": "true",
                                             "content-length": str(len(full))})
    resp = await servicer().check(req, None)
    h = headers_of(resp.ok_response.headers)
    assert h["x-keel-input-tokens"] == str(-(-len(full) // 4) + 3)


async def test_unmetered_calls_are_refused_unless_listed_or_explicitly_passed() -> None:
    # Default: nothing unmetered reaches anyone (issue 12 item 8).
    assert MeshConfig().pass_unmetered is False
    for host, method, path in (("api.openai.com", "POST", "/v1/completions"),
                               ("api.openai.com", "GET", "/v1/models"),
                               ("example.internal", "POST", "/v1/anything")):
        code, h, body = denied(await servicer().check(
            check_request(method=method, path=path, host=host), None))
        assert (code, body["error"]["code"], h["x-keel-reason"]) == (403, "NOT_METERED",
                                                                     "NOT_METERED")
        assert host in body["error"]["message"] and path in body["error"]["message"]
    listed = MeshConfig(unmetered_routes=(("api.openai.com", "/v1/models"),))
    s = servicer(cfg=listed)
    resp = await s.check(check_request(method="GET", path="/v1/models?x=1"), None)
    assert resp.status.code == 0
    assert "x-keel-permit-id" in resp.ok_response.headers_to_remove
    assert not resp.ok_response.headers
    assert s.m.unmetered.labels("listed")._value.get() == 1
    # A listed prefix is a whole path segment; another host is not listed.
    for host, path in (("api.openai.com", "/v1/modelsx"), ("evil.example", "/v1/models")):
        code, _, _ = denied(await s.check(check_request(method="GET", path=path, host=host),
                                          None))
        assert code == 403
    # KEEL_MESH_PASS_UNMETERED only opens non-provider hosts.
    open_cfg = MeshConfig(pass_unmetered=True)
    resp = await servicer(cfg=open_cfg).check(
        check_request(method="GET", path="/status", host="intranet.local"), None)
    assert resp.status.code == 0
    for host in ("api.anthropic.com", "my.openai.azure.com",
                 "bedrock-runtime.us-east-1.amazonaws.com", "generativelanguage.googleapis.com"):
        code, _, _ = denied(await servicer(cfg=open_cfg).check(
            check_request(method="POST", path="/v1/unknown", host=host), None))
        assert code == 403, host
    code, _, _ = denied(await servicer(cfg=open_cfg).check(check_request(
        method="POST", path="/x", host="intranet.local", headers={"x-keel-provider": "openai"}),
        None))
    assert code == 403  # a caller that names a provider is making a provider call


def test_deploy_k8s_does_not_pass_unmetered_calls() -> None:
    text = (ROOT / "deploy" / "k8s" / "app-deployment.yaml").read_text()
    assert "KEEL_MESH_PASS_UNMETERED" not in text


def test_mesh_config_from_environment() -> None:
    cfg = MeshConfig.from_env({"KEEL_MESH_TENANT_HEADER": "X-Team",
                               "KEEL_MESH_PASS_UNMETERED": "false",
                               "KEEL_MESH_UNMETERED_ROUTES": "api.openai.com/v1/models, "
                                                             ".corp.example,*/healthz",
                               "KEEL_MESH_MAX_REQUEST_BYTES": "65536",
                               "KEEL_MESH_PROVIDER_HOSTS": "bedrock=aws-bedrock,azure=azure"})
    assert cfg.tenant_header == "x-team"
    assert cfg.pass_unmetered is False
    assert cfg.unmetered_routes == (("api.openai.com", "/v1/models"), (".corp.example", ""),
                                    ("*", "/healthz"))
    assert cfg.listed_unmetered("wiki.corp.example:443", "/a/b")
    assert cfg.max_request_bytes == 65536
    assert cfg.provider_hosts == (("bedrock", "aws-bedrock"), ("azure", "azure"))
    assert MeshConfig.from_env({}) == MeshConfig()
    from keel_pdp.mesh.config import MeshConfigError

    for bad in ({"KEEL_MESH_PASS_UNMETERED": "maybe"}, {"KEEL_MESH_PROVIDER_HOSTS": "x"},
                {"KEEL_MESH_MAX_RESPONSE_BYTES": "1"}, {"KEEL_MESH_UNMETERED_ROUTES": "/x"}):
        with pytest.raises(MeshConfigError):
            MeshConfig.from_env(bad)


async def test_check_envoy_gave_up_on_releases_its_hold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = servicer()
    real = s.engine.authorize
    started = asyncio.Event()

    async def slow(inp: Any, deadline: float | None = None) -> Any:
        started.set()
        await asyncio.sleep(0.05)
        return await real(inp, deadline)

    monkeypatch.setattr(s.engine, "authorize", slow)
    task = asyncio.ensure_future(s.check(check_request(), None))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    kinds = await _stream_kinds(s, until=b"void")
    assert kinds.count(b"void") == 1
    assert s.m.abandoned._value.get() == 1


async def test_reroute_of_a_model_named_in_the_path_is_refused_and_released() -> None:
    s = servicer()
    body = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 10}}
    req = check_request(body, path="/v1beta/models/gemini-2.5-pro:generateContent",
                        workload="cheap-gemini", host="generativelanguage.googleapis.com")
    code, h, out = denied(await s.check(req, None))
    assert (code, out["error"]["code"]) == (403, "REROUTE_NOT_POSSIBLE")
    assert h["x-keel-reason"] == "REROUTE_NOT_POSSIBLE"
    assert "gemini-2.5-flash" in out["error"]["message"]
    kinds = await _stream_kinds(s, until=b"void")
    assert kinds.count(b"void") == 1  # the hold the decision made is released at once
    assert s.m.abandoned._value.get() == 0


async def test_azure_deployment_map_and_embeddings_are_read() -> None:
    cfg = MeshConfig(azure_deployments=(("prod", "gpt-4.1-mini"),))
    resp = await servicer(cfg=cfg).check(check_request(
        {"messages": [{"role": "user", "content": "hi"}], "model": "ignored"},
        path="/openai/deployments/prod/chat/completions?api-version=2024-10-21",
        host="x.openai.azure.com"), None)
    h = headers_of(resp.ok_response.headers)
    assert (h["x-keel-model"], h["x-keel-provider"]) == ("gpt-4.1-mini", "azure")
    resp = await servicer().check(check_request(
        {"model": "text-embedding-3-small", "input": "abcdefgh"}, path="/v1/embeddings"), None)
    h = headers_of(resp.ok_response.headers)
    assert (h["x-keel-api"], h["x-keel-input-tokens"]) == ("embeddings", "2")
    assert "x-keel-enforce-max-tokens" not in h


def test_provider_hosts_are_known_whatever_the_configured_substrings() -> None:
    cfg = MeshConfig(provider_hosts=(("llm-gw", "openai"),))
    for host in ("api.openai.com", "api.openai.com:443", "res1.openai.azure.com",
                 "us-central1-aiplatform.googleapis.com", "aiplatform.googleapis.com",
                 "generativelanguage.googleapis.com", "bedrock-runtime.eu-west-1.amazonaws.com",
                 "bedrock-runtime-fips.us-east-1.amazonaws.com", "llm-gw.internal"):
        assert cfg.is_provider_host(host), host
    for host in ("s3.us-east-1.amazonaws.com", "storage.googleapis.com", "example.com",
                 "notopenai.com"):
        assert not cfg.is_provider_host(host), host


async def test_check_given_up_on_after_its_outcome_arrived_still_releases_the_hold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The outcome is handed over, but the Check is cancelled before it resumes."""
    s = servicer()
    real = s.engine.authorize
    obtained = asyncio.Event()

    async def signal(inp: Any, deadline: float | None = None) -> Any:
        out = await real(inp, deadline)
        obtained.set()
        return out

    monkeypatch.setattr(s.engine, "authorize", signal)
    task = asyncio.ensure_future(s.check(check_request(), None))
    await obtained.wait()  # the outcome is set; the Check has not run since
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    kinds = await _stream_kinds(s, until=b"void")
    assert kinds.count(b"void") == 1
    assert s.m.abandoned._value.get() == 1


async def test_denied_check_given_up_on_releases_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    s = servicer()
    real = s.engine.authorize
    started = asyncio.Event()

    async def slow(inp: Any, deadline: float | None = None) -> Any:
        started.set()
        await asyncio.sleep(0.05)
        return await real(inp, deadline)

    monkeypatch.setattr(s.engine, "authorize", slow)
    task = asyncio.ensure_future(s.check(check_request(tenant="broke"), None))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    assert b"void" not in await _stream_kinds(s)
    assert s.m.abandoned._value.get() == 0


async def test_an_engine_failure_reaches_the_check_as_its_internal_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    s = servicer()

    async def broken(inp: Any, deadline: float | None = None) -> Any:
        await asyncio.sleep(0)
        raise RuntimeError("engine broke")

    monkeypatch.setattr(s.engine, "authorize", broken)
    with pytest.raises(RuntimeError, match="engine broke"):
        await s.check(check_request(), None)
