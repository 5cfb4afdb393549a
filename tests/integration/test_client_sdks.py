"""keel_pdp.client with the official openai and anthropic SDKs, against real components.

A real ``keel-pdp serve`` process on a real Redis, the mock provider (the SDKs
reach it through ``base_url``) and the real SDK packages. Each call's settled
cost is computed here from the price table with this file's own arithmetic
(Decimal, USD per million tokens, rounded up once) and compared with what the
sidecar answered and what it appended to the decision stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from decimal import ROUND_CEILING, Decimal
from typing import Any

import anthropic
import openai
import pytest
import redis

from keel_pdp.client import (
    AsyncKeelClient,
    KeelClient,
    KeelRequestError,
    PermitDenied,
    SidecarUnavailable,
    TokenUsage,
    read_usage,
)
from tests.conftest import ROOT, RedisServer, free_port
from tests.helpers import PRICES, budget, write_bundle
from tests.integration.client_stack import ClientStack, redis_reader, running
from tests.integration.envoy_fixture import events, permit_state

# Each test sends a prompt of about 10,000 tokens by Keel's estimate and the mock
# reports exactly these figures (its x-mock-* headers).
INPUT, CACHED, CACHE_WRITE, OUTPUT, REASONING = 10_000, 4_000, 2_000, 321, 100
PROMPT = "lorem " * 6_700
CAP = 500


def expected_cost(provider: str, model: str, u: TokenUsage) -> int:
    """Micro-USD, from the price table: tokens x USD-per-million = micro-USD, ceil once."""
    p = PRICES[provider][model]
    rate = {k: Decimal(p[k]) for k in ("input", "output")}
    cached = Decimal(p.get("cached_input", p["input"]))
    write = Decimal(p.get("cache_write", p["input"]))
    fresh = u.input_tokens - u.cached_input_tokens - u.cache_write_tokens
    total = (fresh * rate["input"] + u.cached_input_tokens * cached
             + u.cache_write_tokens * write + u.output_tokens * rate["output"])
    return int(total.to_integral_value(rounding=ROUND_CEILING))


OPENAI_USAGE = TokenUsage(INPUT, CACHED, 0, OUTPUT, REASONING)
ANTHROPIC_USAGE = TokenUsage(INPUT, CACHED, CACHE_WRITE, OUTPUT, 0)


class Stack(ClientStack):
    """The sidecar with this module's budgets, and the mock provider."""

    def __init__(self, redis_server: RedisServer, workdir: pathlib.Path) -> None:
        super().__init__(redis_server, workdir, [
            budget("acme-daily", "100.00", scope={"tenant": "acme"}),
            # Fits a 10k-token prompt with ~100 output tokens of gpt-4o-mini, not 500.
            budget("tight-daily", "0.001600", scope={"tenant": "tight"}),
            budget("broke-daily", "0.000001", scope={"tenant": "broke"},
                   exception_path="finance-overage"),
        ])

    @property
    def base_url(self) -> str:
        return self.root

    def calls(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(self.base_url + "/_mock/stats", timeout=5) as r:
            return list(json.loads(r.read())["calls"])


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer) -> Iterator[Stack]:
    with running(Stack, redis_server, "keel-client-") as s:
        yield s


@pytest.fixture
def rdb(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    with redis_reader(redis_server) as client:
        yield client


def mock_headers(provider: str, **extra: str) -> dict[str, str]:
    h = {"x-mock-input-tokens": str(INPUT), "x-mock-cached-tokens": str(CACHED),
         "x-mock-output-tokens": str(OUTPUT)}
    if provider == "anthropic":
        h["x-mock-cache-write-tokens"] = str(CACHE_WRITE)
    else:
        h["x-mock-reasoning-tokens"] = str(REASONING)
    return h | extra


API_CASES = [("chat", False), ("chat", True), ("responses", False), ("responses", True),
             ("messages", False), ("messages", True)]


def sdk_call(client: Any, api: str, stream: bool, **extra: str) -> Any:
    """One create() through the wrapped sync client; a stream is read to its end."""
    if api == "chat":
        r = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}],
            max_completion_tokens=CAP, stream=stream, extra_headers=mock_headers("openai",
                                                                                 **extra))
    elif api == "responses":
        r = client.responses.create(model="gpt-4o-mini", input=PROMPT, max_output_tokens=CAP,
                                    stream=stream, extra_headers=mock_headers("openai", **extra))
    else:
        r = client.messages.create(
            model="claude-sonnet-4-5", max_tokens=CAP,
            messages=[{"role": "user", "content": PROMPT}], stream=stream,
            extra_headers=mock_headers("anthropic", **extra))
    return list(r) if stream else r


async def async_sdk_call(client: Any, api: str, stream: bool, **extra: str) -> Any:
    if api == "chat":
        r = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}],
            max_completion_tokens=CAP, stream=stream, extra_headers=mock_headers("openai",
                                                                                 **extra))
    elif api == "responses":
        r = await client.responses.create(model="gpt-4o-mini", input=PROMPT,
                                          max_output_tokens=CAP, stream=stream,
                                          extra_headers=mock_headers("openai", **extra))
    else:
        r = await client.messages.create(
            model="claude-sonnet-4-5", max_tokens=CAP,
            messages=[{"role": "user", "content": PROMPT}], stream=stream,
            extra_headers=mock_headers("anthropic", **extra))
    if stream:
        return [item async for item in r]
    return r


def streamed_text(api: str, items: list[Any]) -> str:
    out = []
    for it in items:
        if api == "chat":
            out += [c.delta.content or "" for c in it.choices]
        elif api == "responses" and it.type == "response.output_text.delta":
            out.append(it.delta)
        elif api == "messages" and it.type == "content_block_delta":
            out.append(it.delta.text)
    return "".join(out)


def sdk_clients(base_url: str) -> tuple[openai.OpenAI, anthropic.Anthropic]:
    return (openai.OpenAI(api_key="test", base_url=base_url + "/v1", max_retries=0),
            anthropic.Anthropic(api_key="test", base_url=base_url, max_retries=0))


def check_settled(rdb: redis.Redis, stack: Stack, api: str, stream: bool, permit: Any,
                  calls_before: int, result: Any) -> None:
    provider, model, usage = (("anthropic", "claude-sonnet-4-5", ANTHROPIC_USAGE)
                              if api == "messages" else ("openai", "gpt-4o-mini", OPENAI_USAGE))
    want = expected_cost(provider, model, usage)
    assert permit.decision == "ALLOW"
    assert permit.settlement is not None, permit.settle_error
    assert (permit.settlement.status, permit.settlement.actual_cost_micros) == ("SETTLED", want)
    assert permit.usage == usage
    assert permit_state(rdb, permit.permit_id)["state"] == "settled"
    (ev,) = events(rdb, permit.permit_id, "settlement")
    assert ev["res"]["act"] == want
    assert ev["data"]["usage"] == {"in": usage.input_tokens, "cached": usage.cached_input_tokens,
                                   "cw": usage.cache_write_tokens, "out": usage.output_tokens,
                                   "rsn": usage.reasoning_tokens}
    assert ev["data"]["outcome"] == "SUCCEEDED"
    (call,) = stack.calls()[calls_before:]
    assert call["stream"] is stream
    assert call["model"] == model
    assert list(call["caps"].values()) == [CAP]  # ALLOW within the caller's cap: untouched
    if stream:
        assert streamed_text(api, result) == "tok " * OUTPUT  # every item passed through


@pytest.mark.parametrize(("api", "stream"), API_CASES)
def test_wrapped_sync_sdk_call_settles_the_exact_cost(
        stack: Stack, rdb: redis.Redis, api: str, stream: bool) -> None:
    oai, ant = sdk_clients(stack.base_url)
    with KeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(ant if api == "messages" else oai, tenant="acme", workload="chat")
        before = len(stack.calls())
        result = sdk_call(client, api, stream)
        check_settled(rdb, stack, api, stream, client.last_permit, before, result)
        if not stream:
            assert read_usage(result) == client.last_permit.usage


@pytest.mark.parametrize(("api", "stream"), API_CASES)
async def test_wrapped_async_sdk_call_settles_the_exact_cost(
        stack: Stack, rdb: redis.Redis, api: str, stream: bool) -> None:
    oai = openai.AsyncOpenAI(api_key="test", base_url=stack.base_url + "/v1", max_retries=0)
    ant = anthropic.AsyncAnthropic(api_key="test", base_url=stack.base_url, max_retries=0)
    async with AsyncKeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(ant if api == "messages" else oai, tenant="acme", workload="chat")
        before = len(await asyncio.to_thread(stack.calls))
        result = await async_sdk_call(client, api, stream)
        check_settled(rdb, stack, api, stream, client.last_permit, before, result)


def test_permit_context_manager_with_record_and_meter(stack: Stack, rdb: redis.Redis) -> None:
    """Without the wrapper: the constraints go into the call by hand, usage is recorded."""
    oai, ant = sdk_clients(stack.base_url)
    keel = KeelClient(stack.target, tenant="acme", workload="chat", timeout=5)
    with keel.permit("gpt-4o-mini", provider="openai", estimated_input_tokens=INPUT,
                     max_output_tokens=CAP) as p:
        resp = oai.chat.completions.create(
            model=p.model, max_completion_tokens=p.max_output_tokens,
            messages=[{"role": "user", "content": "hi"}], extra_headers=mock_headers("openai"))
        p.record(resp)
    assert p.settlement is not None
    assert p.settlement.actual_cost_micros == expected_cost("openai", "gpt-4o-mini",
                                                            OPENAI_USAGE)
    with keel.permit("claude-sonnet-4-5", provider="anthropic", estimated_input_tokens=INPUT,
                     max_output_tokens=CAP) as q:
        stream = ant.messages.create(model=q.model, max_tokens=q.max_output_tokens,
                                     messages=[{"role": "user", "content": "hi"}], stream=True,
                                     extra_headers=mock_headers("anthropic"))
        n = sum(1 for _ in q.meter(stream))
    assert n > 0
    assert q.settlement is not None
    assert (q.settlement.status, q.settlement.actual_cost_micros) == (
        "SETTLED", expected_cost("anthropic", "claude-sonnet-4-5", ANTHROPIC_USAGE))
    assert q.request_id != p.request_id  # a fresh request id per permit
    keel.close()


def test_exception_in_the_block_voids_the_permit(stack: Stack, rdb: redis.Redis) -> None:
    keel = KeelClient(stack.target, tenant="acme", workload="chat", timeout=5)
    with pytest.raises(RuntimeError, match="application failed"), \
            keel.permit("gpt-4o-mini", provider="openai", estimated_input_tokens=100) as p:
        raise RuntimeError("application failed before the provider call")
    assert p.settlement is not None and p.settlement.action == "void"
    assert p.settlement.status == "VOIDED"
    assert permit_state(rdb, p.permit_id)["state"] == "voided"
    keel.close()


def test_constrained_call_goes_out_with_the_permits_cap(stack: Stack, rdb: redis.Redis) -> None:
    oai, _ = sdk_clients(stack.base_url)
    keel = KeelClient(stack.target, timeout=5)
    client = keel.wrap(oai, tenant="tight", workload="chat")
    before = len(stack.calls())
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}],
        max_completion_tokens=CAP, extra_headers=mock_headers("openai"))
    p = client.last_permit
    assert p.decision == "CONSTRAIN"
    assert "OUTPUT_TOKENS_CAPPED" in [r.code for r in p.reasons]
    assert 0 < p.max_output_tokens < CAP
    (call,) = stack.calls()[before:]
    assert call["caps"] == {"max_completion_tokens": p.max_output_tokens}
    assert p.settlement is not None and p.settlement.status == "SETTLED"
    out = min(OUTPUT, p.max_output_tokens)  # the mock cuts its answer to the request's cap
    assert p.settlement.actual_cost_micros == expected_cost(
        "openai", "gpt-4o-mini", TokenUsage(INPUT, CACHED, 0, out, min(REASONING, out)))
    keel.close()


def test_denied_call_never_reaches_the_provider(stack: Stack, rdb: redis.Redis) -> None:
    _, ant = sdk_clients(stack.base_url)
    keel = KeelClient(stack.target, timeout=5)
    client = keel.wrap(ant, tenant="broke", workload="chat")
    before = len(stack.calls())
    with pytest.raises(PermitDenied) as info:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=CAP,
                               messages=[{"role": "user", "content": "hi"}])
    assert "BUDGET_EXHAUSTED" in info.value.codes
    assert info.value.exception_paths == ("finance-overage",)
    assert not isinstance(info.value, SidecarUnavailable)
    assert len(stack.calls()) == before
    keel.close()


def test_provider_error_voids_and_broken_stream_settles_partial(
        stack: Stack, rdb: redis.Redis) -> None:
    oai, ant = sdk_clients(stack.base_url)
    keel = KeelClient(stack.target, timeout=5)
    client = keel.wrap(oai, tenant="acme", workload="chat")
    with pytest.raises(openai.InternalServerError):
        sdk_call(client, "chat", False, **{"x-mock-mode": "error500"})
    p = client.last_permit
    assert p.settlement is not None and p.settlement.status == "VOIDED"
    assert permit_state(rdb, p.permit_id)["state"] == "voided"

    aclient = keel.wrap(ant, tenant="acme", workload="chat")
    with pytest.raises((anthropic.APIError, Exception)):
        sdk_call(aclient, "messages", True, **{"x-mock-mode": "break"})
    q = aclient.last_permit
    assert q.settlement is not None and q.settlement.status == "SETTLED", q.settle_error
    (ev,) = events(rdb, q.permit_id, "settlement")
    assert ev["data"]["outcome"] == "PARTIAL"
    # message_start reported the input side before the break; output estimated from text
    assert ev["data"]["usage"]["in"] == INPUT
    assert ev["data"]["usage"]["cw"] == CACHE_WRITE
    keel.close()


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_unreachable_sidecar_follows_the_callers_fail_mode(stack: Stack, mode: str) -> None:
    oai, _ = sdk_clients(stack.base_url)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    keel = KeelClient(dead, fail_mode=mode, timeout=0.3)
    client = keel.wrap(oai, tenant="acme", workload="chat")
    before = len(stack.calls())
    if mode == "closed":
        with pytest.raises(SidecarUnavailable, match="fail_mode=closed"):
            sdk_call(client, "chat", False)
        assert len(stack.calls()) == before
    else:
        resp = sdk_call(client, "chat", False)
        assert resp.usage.prompt_tokens == INPUT
        p = client.last_permit
        assert p.local and p.degraded and p.permit_id == "" and p.settlement is None
        assert len(stack.calls()) == before + 1
    keel.close()


def test_a_request_the_sidecar_refuses_is_an_error_even_when_failing_open(
        stack: Stack) -> None:
    """INVALID_ARGUMENT is a bug in the caller, not an outage: fail_mode=open does not
    turn it into an unmetered call, and nothing is retried."""
    keel = KeelClient(stack.target, fail_mode="open", timeout=5)
    with pytest.raises(KeelRequestError, match=r"INVALID_ARGUMENT.*model"), \
            keel.permit("", tenant="acme", workload="chat"):
        pytest.fail("the block must not run")
    keel.close()


def test_retry_of_a_held_request_replays_and_reuse_after_the_end_is_refused(
        stack: Stack, rdb: redis.Redis) -> None:
    """What the client's same-id retries rely on, against the real sidecar: while the
    permit is held the same request id answers the same permit and holds nothing
    more; once it has ended, the id cannot carry a second provider call."""
    keel = KeelClient(stack.target, tenant="acme", workload="chat", timeout=5)
    req = keel.request("gpt-4o-mini", provider="openai", estimated_input_tokens=1_000,
                       max_output_tokens=100, request_id="order-42")
    first = keel.authorize(req)
    again = keel.authorize(req)
    assert (again.permit_id, again.replayed) == (first.permit_id, True)
    assert len(events(rdb, first.permit_id, "decision")) == 1
    first.record_usage(TokenUsage(input_tokens=900, output_tokens=80))
    keel.end(first)
    assert first.settlement is not None and first.settlement.status == "SETTLED"
    with pytest.raises(PermitDenied) as info, keel.permit(
            "gpt-4o-mini", provider="openai", estimated_input_tokens=1_000,
            max_output_tokens=100, request_id="order-42"):
        pytest.fail("a settled permit's request id must not authorize a new call")
    assert info.value.codes == ("REQUEST_ID_REUSED",)
    keel.close()


def keel_estimate(prompt: str, messages: int = 1) -> int:
    """The documented input estimate (docs/mesh.md): ceil(text bytes / 4) + 4 per message
    + 3, worked out here."""
    return -(-len(prompt.encode()) // 4) + 4 * messages + 3


def test_provider_timeout_is_booked_at_the_hold(stack: Stack, rdb: redis.Redis) -> None:
    """The request left and no answer came: the provider may have billed it, so the
    permit is closed out at what it held (CANCELLED), not voided."""
    oai = openai.OpenAI(api_key="test", base_url=stack.base_url + "/v1", max_retries=0,
                        timeout=0.5)
    keel = KeelClient(stack.target, timeout=5)
    client = keel.wrap(oai, tenant="acme", workload="chat")
    with pytest.raises(openai.APITimeoutError):
        sdk_call(client, "chat", False, **{"x-mock-mode": "hang"})
    p = client.last_permit
    assert p.settlement is not None and p.settlement.status == "SETTLED", p.settle_error
    (ev,) = events(rdb, p.permit_id, "settlement")
    assert ev["data"]["outcome"] == "CANCELLED"
    at_hold = TokenUsage(input_tokens=keel_estimate(PROMPT), output_tokens=CAP)
    assert ev["res"]["act"] == expected_cost("openai", "gpt-4o-mini", at_hold)
    keel.close()


async def test_cancelled_async_call_is_booked_at_the_hold(stack: Stack, rdb: redis.Redis) -> None:
    ant = anthropic.AsyncAnthropic(api_key="test", base_url=stack.base_url, max_retries=0)
    async with AsyncKeelClient(stack.target, timeout=5) as keel:
        client = keel.wrap(ant, tenant="acme", workload="chat")
        task = asyncio.create_task(async_sdk_call(client, "messages", False,
                                                  **{"x-mock-mode": "hang"}))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        p = client.last_permit
        assert p.settlement is not None and p.settlement.status == "SETTLED"
    (ev,) = events(rdb, p.permit_id, "settlement")
    assert ev["data"]["outcome"] == "CANCELLED"
    assert ev["data"]["usage"]["out"] == CAP


def test_authorize_waits_out_a_sidecar_restart_with_one_request_id(
        rdb: redis.Redis, redis_server: RedisServer,
        tmp_path: pathlib.Path) -> None:
    """Nothing listens yet when the client asks: it retries UNAVAILABLE with the same
    request id until a sidecar comes up within the deadline, and gets one permit."""
    port = free_port()
    keel = KeelClient(f"127.0.0.1:{port}", tenant="acme", workload="chat", timeout=30)
    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            result["permit"] = keel.authorize(keel.request(
                "gpt-4o-mini", provider="openai", estimated_input_tokens=100,
                max_output_tokens=50))
        except Exception as exc:  # reported below
            result["error"] = exc

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.5)  # several refused attempts
    assert asker.is_alive()
    policies = write_bundle(tmp_path / "p", [budget("acme-daily", "100.00",
                                                    scope={"tenant": "acme"})])
    env = {**os.environ, "KEEL_POLICIES": str(policies), "KEEL_REDIS_URL": redis_server.url,
           "KEEL_LISTEN": f"127.0.0.1:{port}", "KEEL_METRICS_PORT": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "keel_pdp.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        asker.join(40)
        assert not asker.is_alive()
        assert "error" not in result, result.get("error")
        p = result["permit"]
        assert p.decision == "ALLOW" and not p.local and not p.replayed
        entries: Any = rdb.xrange("keel:{pdp}:events")
        decisions = [f for _, f in entries if f.get("type") == "decision"]
        assert len(decisions) == 1  # one hold, however many attempts
        p.record_usage(TokenUsage(input_tokens=100, output_tokens=50))
        keel.end(p)
        assert p.settlement is not None and p.settlement.status == "SETTLED"
    finally:
        proc.terminate()
        proc.wait(20)
        keel.close()


def test_the_application_guide_example_runs_as_printed(stack: Stack) -> None:
    """docs/adopting-application.md, section 1: the example, pointed at this test's
    sidecar and mock provider, prints what the page says it prints."""
    doc = (ROOT / "docs" / "adopting-application.md").read_text()
    found = re.search(r"\.venv/bin/python - <<'EOF'\n(.*?)\nEOF\n# -> (.*?)\n", doc, re.S)
    assert found, "the guide lost its first example"
    code = found.group(1).replace("127.0.0.1:50051", stack.target).replace(
        "http://127.0.0.1:8081", stack.base_url)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    printed = found.group(2)
    # the page's output, with the permit id left open; the cost worked out here:
    # input = the documented estimate of the message, output = the mock's 24 tokens
    usage = TokenUsage(input_tokens=keel_estimate("What is a permit?"), output_tokens=24)
    want = expected_cost("openai", "gpt-4o-mini", usage)
    assert printed == f"ALLOW pmt_… settled: SETTLED {want} micro-USD"
    assert re.fullmatch(rf"ALLOW pmt_\w+ settled: SETTLED {want} micro-USD\n", out.stdout)
