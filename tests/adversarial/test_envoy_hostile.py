"""Trust at the edges of the Envoy path (issue 12 items 3, 4 and 8), with a real Envoy.

* One provider call, one permit: a second body under a reused ``x-request-id``,
  or the same body again (while the first call is in flight or after it
  settled), is refused with 409 ``REQUEST_ID_REUSED`` and never reaches the
  provider.
* A body Envoy cut at ``max_request_bytes`` is estimated from what arrived,
  never refused as 400, whatever ``x-envoy-auth-partial-body`` says.
* Nothing reaches a provider unmetered: an endpoint Keel cannot read on a
  provider host is 403 ``NOT_METERED``; only routes listed as not LLM traffic
  pass, counted and logged.
"""

from __future__ import annotations

import gzip
import http.client
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from keel_pdp.mesh.config import MeshConfig
from tests.conftest import RedisServer
from tests.integration.envoy_fixture import (
    MeshStack,
    Reply,
    events,
    mesh_stack,
    permit_state,
    redis_client,
    window_figures,
)

MAX_REQUEST_BYTES = 8192


@pytest.fixture(scope="module")
def mesh(redis_server: RedisServer) -> Iterator[MeshStack]:
    # stream_usage="pass": Keel asks chat streams for usage and lets the chunk through
    # (the documented alternative to stripping it; see the SDK test below).
    cfg = MeshConfig(unmetered_routes=(("*", "/healthz"), ("api.openai.com", "/v1/files")),
                     max_request_bytes=MAX_REQUEST_BYTES, stream_usage="pass")
    yield from mesh_stack(redis_server, "split", cfg=cfg, max_request_bytes=MAX_REQUEST_BYTES)


@pytest.fixture
def rdb(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    yield from redis_client(redis_server)


def chat(text: str = "Summarise the ledger rules.", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4.1-mini", "max_tokens": 50,
            "messages": [{"role": "user", "content": text}], **extra}


def raw_call(mesh: MeshStack, path: str, body: bytes, headers: dict[str, str],
             chunked: bool = False) -> Reply:
    hdrs = {"x-keel-tenant": "acme", "x-keel-workload": "chat",
            "content-type": "application/json", **headers}
    conn = http.client.HTTPConnection("127.0.0.1", mesh.port, timeout=10)
    try:
        if chunked:
            conn.putrequest("POST", path)
            for k, v in hdrs.items():
                conn.putheader(k, v)
            conn.putheader("transfer-encoding", "chunked")
            conn.endheaders()
            step = 1000
            for i in range(0, len(body), step):
                piece = body[i:i + step]
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            conn.send(b"0\r\n\r\n")
        else:
            conn.request("POST", path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def test_other_body_under_a_reused_request_id_is_refused_409_before_the_provider(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    rid = {"x-request-id": "reuse-body-1"}
    first = mesh.call("/v1/chat/completions", chat("Summarise the ledger rules."), headers=rid)
    assert first.status == 200, first.body
    pid = first.headers["x-keel-permit-id"]
    before = len(mesh.upstream_calls())
    # Same size, same model, same cap: today's fingerprint cannot tell them apart.
    second = mesh.call("/v1/chat/completions", chat("Summarise the budget rules."), headers=rid)
    assert second.status == 409, second.body
    err = second.json()["error"]
    assert err["code"] == "REQUEST_ID_REUSED"
    assert "reuse-body-1" in err["message"] and "another body" in err["message"]
    assert second.headers["x-keel-reason"] == "REQUEST_ID_REUSED"
    assert len(mesh.upstream_calls()) == before
    permit_state(rdb, pid)
    (ev,) = events(rdb, pid, "settlement")
    assert window_figures(rdb, "tenant-daily") == (ev["res"]["act"], 0)


def test_same_body_again_never_rides_on_the_first_calls_permit(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    rid = {"x-request-id": "reuse-same-1"}
    body = chat("Hold on.")
    got: list[OSError] = []

    def slow_first() -> None:
        try:
            mesh.call("/v1/chat/completions", body, timeout=1.5,
                      headers={**rid, "x-mock-mode": "hang"})
        except OSError as exc:  # the client gives up (TimeoutError) by design
            got.append(exc)

    before = len(mesh.upstream_calls())
    t = threading.Thread(target=slow_first)
    t.start()
    for _ in range(200):
        if len(mesh.upstream_calls()) > before:
            break
        threading.Event().wait(0.01)
    assert len(mesh.upstream_calls()) == before + 1
    pid = mesh.upstream_calls()[-1]["keel"]["x-keel-permit-id"]
    # While the first call is in flight (its permit held): a second provider call.
    during = mesh.call("/v1/chat/completions", body, headers=rid)
    assert during.status == 409, during.body
    assert pid in during.json()["error"]["message"]
    t.join(10)
    assert got and isinstance(got[0], TimeoutError)
    rec = permit_state(rdb, pid)
    assert rec["state"] == "settled"
    # After the permit ended (settled at the hold): still no second call on it.
    after = mesh.call("/v1/chat/completions", body, headers=rid)
    assert after.status == 409, after.body
    assert after.json()["error"]["code"] == "REQUEST_ID_REUSED"
    assert len(mesh.upstream_calls()) == before + 1
    assert len(events(rdb, pid, "settlement")) == 1
    assert window_figures(rdb, "tenant-daily") == (int(rec["act"]), 0)
    # A fresh request id is a fresh call with its own permit.
    fresh = mesh.call("/v1/chat/completions", body, headers={"x-request-id": "reuse-same-2"})
    assert fresh.status == 200
    assert fresh.headers["x-keel-permit-id"] != pid


def big_chat(words: int) -> bytes:
    return json.dumps(chat("word " * words, stream=False)).encode()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_cut_at_max_request_bytes_is_estimated_not_refused(
        mesh: MeshStack, rdb: redis.Redis, chunked: bool) -> None:
    body = big_chat(4000)
    assert len(body) > 2 * MAX_REQUEST_BYTES
    reply = raw_call(mesh, "/v1/chat/completions", body, {}, chunked=chunked)
    assert reply.status == 200, reply.body
    h = mesh.upstream_calls()[-1]["keel"]
    # content-length known: the whole body / 4 (+3); unknown: what arrived / 4 (+3).
    seen = len(body) if not chunked else MAX_REQUEST_BYTES
    assert h["x-keel-input-tokens"] == str(-(-seen // 4) + 3)
    assert h["x-keel-max-tokens"] == "50"  # the cap read by pattern from the prefix


def test_compressed_body_cut_at_max_request_bytes_is_estimated_from_its_prefix(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    # Text that does not compress away (a prompt of distinct numbers).
    text = " ".join(str(i * 7919 % 100003) for i in range(9000))
    plain = json.dumps(chat(text)).encode()
    packed = gzip.compress(plain)
    assert len(packed) > MAX_REQUEST_BYTES
    reply = raw_call(mesh, "/v1/chat/completions", packed, {"content-encoding": "gzip"})
    assert reply.status == 200, reply.body  # today: 413 "compressed request body was truncated"
    est = int(mesh.upstream_calls()[-1]["keel"]["x-keel-input-tokens"])
    # Scaled by the prefix's compression ratio: within a quarter of the whole text's size.
    assert abs(est - len(plain) / 4) < len(plain) / 16


def test_unknown_endpoint_on_a_provider_host_is_refused_not_metered(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    before = len(mesh.upstream_calls())
    refused = mesh.metric("keel_pdp_mesh_checks_total", result="not_metered")
    for method, path in (("POST", "/v1/completions"), ("POST", "/v1/batches"),
                         ("GET", "/v1/realtime")):
        reply = mesh.call(path, {"model": "gpt-4.1-mini", "prompt": "hi"}, method=method,
                          headers={"host": "api.openai.com"})
        assert reply.status == 403, (path, reply.body)
        err = reply.json()["error"]
        assert err["code"] == "NOT_METERED"
        assert "api.openai.com" in err["message"] and path in err["message"]
    # Not a provider host, not listed: refused too (KEEL_MESH_PASS_UNMETERED is off).
    reply = mesh.call("/internal/report", {"x": 1})
    assert reply.status == 403
    assert reply.json()["error"]["code"] == "NOT_METERED"
    assert len(mesh.upstream_calls()) == before
    assert mesh.metric("keel_pdp_mesh_checks_total", result="not_metered") == refused + 4


def test_listed_non_llm_route_passes_counted_and_logged_without_keel_headers(
        mesh: MeshStack, rdb: redis.Redis, caplog: pytest.LogCaptureFixture) -> None:
    passed = mesh.metric("keel_pdp_mesh_unmetered_passthrough_total", reason="listed")
    caplog.set_level("INFO", logger="keel_pdp.mesh.authz")
    forged = "pmt_0000000000000000000000000000"
    reply = mesh.call("/v1/files?purpose=secret-key", None, method="GET",
                      headers={"host": "api.openai.com", "x-keel-permit-id": forged})
    assert reply.status == 404  # the mock does not serve it; Keel let it through
    call = mesh.upstream_calls()[-1]
    assert call["path"] == "/v1/files"
    assert "x-keel-permit-id" not in call["keel"]
    assert mesh.metric("keel_pdp_mesh_unmetered_passthrough_total", reason="listed") \
        == passed + 1
    logged = [r.getMessage() for r in caplog.records if "unmetered" in r.getMessage()]
    assert any("api.openai.com/v1/files" in m for m in logged), logged
    assert not any("secret-key" in m for m in logged)


def test_usage_chunk_passed_through_reaches_the_official_sdk_as_an_empty_choices_chunk(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    """KEEL_MESH_STREAM_USAGE=pass: the extra chunk arrives; the OpenAI SDK yields it
    with choices == [] and usage set, so a loop that indexes choices[0] breaks (why
    "strip" is the default)."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{mesh.port}/v1", api_key="sk-test",
                           default_headers={"x-keel-tenant": "acme", "x-keel-workload": "chat"},
                           max_retries=0)
    chunks = list(client.chat.completions.create(
        model="gpt-4.1-mini", stream=True, max_tokens=50,
        messages=[{"role": "user", "content": "Say tok."}]))
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    with pytest.raises(IndexError):
        "".join(c.choices[0].delta.content or "" for c in chunks)
