"""keel_pdp.client wrapping the official SDKs, against a hostile provider.

A real ``keel-pdp serve`` on the test run's Redis, the real ``openai`` and
``anthropic`` packages, and a "provider" scripted byte for byte per attempt
(``Provider``): the first call of a script may hang, reset, answer 5xx, 429 or
unreadable usage, and the SDK's own retry gets the next step. Each test checks
what the permits booked, at figures it computes from the price table itself:

* each provider attempt the SDK makes carries its own permit: an attempt that
  timed out or got a 504 may have been billed and is booked at its hold even
  when a retry then succeeds; refused attempts are voided;
* usage counts that are no counts (strings, floats, negative) are not booked
  as 0 tokens; usage impossible for the permit is booked at the hold, never
  left held to expire unbooked;
* a CONSTRAIN cannot be undone by the caller's ``extra_body``; ``with_options``
  copies of a wrapped client stay metered;
* Closeout answered PERMIT_PENDING (a degraded permit not yet journaled) is
  retried, not taken as the end;
* one wrapped client shared by many threads: one permit per call, all settled;
* a stream the caller stops reading and drops without ``close()`` (sync, asyncio,
  or left when ``asyncio.run`` ends) is closed out PARTIAL with what was read, and
  a ``p.meter()`` iteration held past its ``permit()`` block is not voided under it;
* usage in an early chat chunk that more text follows is the usage seen so far,
  not the final count (the mesh's rule): output is the larger of it and the text.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from decimal import ROUND_CEILING, Decimal
from typing import Any

import anthropic
import grpc
import openai
import pytest
import redis

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as rpc
from keel_pdp.client import AsyncKeelClient, KeelClient, Retry, TokenUsage
from tests.adversarial.conftest import Sidecar
from tests.conftest import RedisServer
from tests.helpers import PRICES, budget, write_bundle
from tests.integration.envoy_fixture import PREFIX, permit_state
from tests.scripted_http import Step, play
from tools.mockprovider import read_request

STREAM = f"{PREFIX}:{{pdp}}:events"
PROMPT = "Summarise the ledger rules for the month-end close. " * 40
CAP = 300

class Provider:
    """Answers call n of script ``x-script`` with ``scripts[name][n]`` (the last
    one repeats). Records every request it read."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[list[Step]]] = {}
        self.calls: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> None:
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._conn, "127.0.0.1", 0), self.loop).result(10)
        self.port = int(self.server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            assert self.server is not None
            self.server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def script(self, name: str, *attempts: list[Step]) -> dict[str, str]:
        self.scripts[name] = list(attempts)
        return {"x-script": name}

    def calls_of(self, name: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["script"] == name]

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            req = await read_request(reader)
            if req is None:
                return
            name = req.headers.get("x-script", "")
            n = len(self.calls_of(name))
            self.calls.append({"script": name, "path": req.path,
                               "body": json.loads(req.body or b"{}")})
            steps = self.scripts.get(name) or [[b""]]
            await play(writer, steps[min(n, len(steps) - 1)])
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def reply(obj: object, status: int = 200, **headers: str) -> bytes:
    body = json.dumps(obj).encode()
    head = {"content-type": "application/json", "content-length": str(len(body)),
            "connection": "close", **headers}
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in head.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chat_reply(usage: dict[str, Any], text: str = "The ledger is append-only.") -> bytes:
    return reply({"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
                  "model": "gpt-4o-mini",
                  "choices": [{"index": 0, "finish_reason": "stop",
                               "message": {"role": "assistant", "content": text}}],
                  "usage": usage})


def message_reply(usage: dict[str, Any]) -> bytes:
    return reply({"id": "msg_1", "type": "message", "role": "assistant",
                  "model": "claude-sonnet-4-5", "stop_reason": "end_turn",
                  "content": [{"type": "text", "text": "The ledger is append-only."}],
                  "usage": usage})


def error_reply(status: int) -> bytes:
    return reply({"error": {"message": "upstream trouble", "type": "server_error"}}, status,
                 **{"retry-after-ms": "10"})


# ------------------------------------------------------------------- figures
def cost(provider: str, model: str, u: TokenUsage) -> int:
    """Micro-USD from the price table, this file's own arithmetic: tokens x USD per
    million tokens is micro-USD, rounded up once."""
    p = PRICES[provider][model]
    cached = Decimal(p.get("cached_input", p["input"]))
    write = Decimal(p.get("cache_write", p["input"]))
    fresh = u.input_tokens - u.cached_input_tokens - u.cache_write_tokens
    total = (fresh * Decimal(p["input"]) + u.cached_input_tokens * cached
             + u.cache_write_tokens * write + u.output_tokens * Decimal(p["output"]))
    return int(total.to_integral_value(rounding=ROUND_CEILING))


def estimate(prompt: str, messages: int = 1) -> int:
    """docs/mesh.md's input estimate: ceil(text bytes / 4) + 4 per message + 3."""
    return -(-len(prompt.encode()) // 4) + 4 * messages + 3


AT_HOLD = TokenUsage(input_tokens=estimate(PROMPT), output_tokens=CAP)
USAGE = {"prompt_tokens": 700, "completion_tokens": 40, "total_tokens": 740}
REPORTED = TokenUsage(input_tokens=700, output_tokens=40)


# ------------------------------------------------------------------ fixtures
# Tenants with a budget that constrains one call each (one per constraint test).
TIGHT = ("tight-extra", "tight-max_tokens", "tight-max_completion_tokens", "tight-none")

class Stack:
    def __init__(self, sidecar: Sidecar, provider: Provider, rdb: redis.Redis) -> None:
        self.sidecar, self.provider, self.rdb = sidecar, provider, rdb

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.provider.port}"

    def mark(self) -> str:
        last: Any = self.rdb.xrevrange(STREAM, count=1)
        return str(last[0][0]) if last else "0-0"

    def events_since(self, mark: str, kind: str) -> list[dict[str, Any]]:
        out = []
        entries: Any = self.rdb.xrange(STREAM, min=f"({mark}")
        for _id, fields in entries:
            if fields.get("type") == kind:
                out.append({"pid": fields["pid"], "data": json.loads(fields["data"]),
                            "res": json.loads(fields["res"])})
        return out


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    bundle = write_bundle(tmp_path_factory.mktemp("client-hostile"), [
        budget("acme-daily", "100.00", scope={"tenant": "acme"}),
        # Each fits PROMPT with about 200 output tokens of gpt-4o-mini, not CAP.
        *(budget(f"{t}-daily", "0.000200", scope={"tenant": t}) for t in TIGHT),
    ])
    # A store timeout for a busy test machine: these budgets fail closed, and the tests
    # are about what the client books, not about the store's latency.
    sidecar = Sidecar(redis_server.url, bundle, ("--store-timeout", "2")).start()
    provider = Provider()
    provider.start()
    rdb = redis.Redis(port=redis_server.port, decode_responses=True)
    try:
        yield Stack(sidecar, provider, rdb)
    finally:
        rdb.close()
        provider.stop()
        sidecar.kill()


@pytest.fixture
def keel(stack: Stack) -> Iterator[KeelClient]:
    with KeelClient(stack.sidecar.target, tenant="acme", workload="chat", timeout=5) as k:
        yield k


def oai(stack: Stack, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key="test", base_url=stack.base_url + "/v1", **kw)


def chat(client: Any, headers: dict[str, str], **kw: Any) -> Any:
    args: dict[str, Any] = {"model": "gpt-4o-mini", "max_completion_tokens": CAP,
                            "messages": [{"role": "user", "content": PROMPT}],
                            "extra_headers": headers} | kw
    return client.chat.completions.create(**args)


def booked(stack: Stack, mark: str) -> tuple[int, list[str], list[str]]:
    """(micro-USD settled, outcomes, permit ids decided) since ``mark``."""
    decided = [e["pid"] for e in stack.events_since(mark, "decision")]
    settled = stack.events_since(mark, "settlement")
    return (sum(int(e["res"]["act"]) for e in settled), [e["data"]["outcome"] for e in settled],
            decided)


# --------------------------------------------------------------- SDK retries
# (first attempt, billed?): what the first attempt got; whether the provider may
# have billed it (the request went out and no refusal came back).
FIRST_ATTEMPTS: dict[str, tuple[list[Step], bool]] = {
    "timeout": ([3.0], True),
    "gateway-504": ([error_reply(504)], True),
    "reset-after-request": (["reset"], True),
    "server-500": ([error_reply(500)], False),
    "rate-limited-429": ([error_reply(429)], False),
}


@pytest.mark.parametrize("first", list(FIRST_ATTEMPTS))
def test_each_sdk_retry_attempt_carries_its_own_permit_and_billed_attempts_are_booked(
        stack: Stack, keel: KeelClient, first: str) -> None:
    """The SDK retries (max_retries) a timed-out, reset, 5xx or 429 attempt by itself.
    Every attempt is a provider call: it gets its own permit, and one that may have
    been billed is booked at its hold even though the retry then succeeded."""
    steps, billed = FIRST_ATTEMPTS[first]
    client = keel.wrap(oai(stack, max_retries=1, timeout=0.8))
    headers = stack.provider.script(f"retry-{first}", steps, [chat_reply(USAGE)])
    mark = stack.mark()
    resp = chat(client, headers)
    assert resp.usage.prompt_tokens == 700
    calls = stack.provider.calls_of(f"retry-{first}")
    assert len(calls) == 2
    total, outcomes, decided = booked(stack, mark)
    assert len(decided) == len(calls) == len(set(decided))  # one permit per attempt
    for pid in decided:
        assert permit_state(stack.rdb, pid)["state"] in ("settled", "voided")
    want = cost("openai", "gpt-4o-mini", REPORTED)
    if billed:
        want += cost("openai", "gpt-4o-mini", AT_HOLD)
    assert total == want
    assert outcomes.count("SUCCEEDED") == 1
    assert client.last_permit.usage == REPORTED


async def test_async_sdk_retry_after_a_timeout_books_both_attempts(stack: Stack) -> None:
    ant = anthropic.AsyncAnthropic(api_key="test", base_url=stack.base_url, max_retries=1,
                                   timeout=0.8)
    usage = {"input_tokens": 500, "output_tokens": 40, "cache_read_input_tokens": 0,
             "cache_creation_input_tokens": 0}
    headers = stack.provider.script("async-timeout", [3.0], [message_reply(usage)])
    mark = stack.mark()
    async with AsyncKeelClient(stack.sidecar.target, tenant="acme", workload="chat",
                               timeout=5) as keel:
        client = keel.wrap(ant)
        await client.messages.create(model="claude-sonnet-4-5", max_tokens=CAP,
                                     messages=[{"role": "user", "content": PROMPT}],
                                     extra_headers=headers)
        p = client.last_permit
    assert len(stack.provider.calls_of("async-timeout")) == 2
    total, outcomes, decided = booked(stack, mark)
    assert len(set(decided)) == 2 and sorted(outcomes) == ["CANCELLED", "SUCCEEDED"]
    at_hold = TokenUsage(input_tokens=p.request.estimated_input_tokens, output_tokens=CAP)
    assert total == (cost("anthropic", "claude-sonnet-4-5", at_hold)
                     + cost("anthropic", "claude-sonnet-4-5", TokenUsage(500, 0, 0, 40, 0)))


def test_retries_exhausted_every_attempt_ends_its_permit(
        stack: Stack, keel: KeelClient) -> None:
    client = keel.wrap(oai(stack, max_retries=2))
    headers = stack.provider.script("all-500", [error_reply(500)])
    mark = stack.mark()
    with pytest.raises(openai.InternalServerError):
        chat(client, headers)
    assert len(stack.provider.calls_of("all-500")) == 3
    total, _, decided = booked(stack, mark)
    assert len(decided) == 3 and total == 0
    for pid in decided:
        assert permit_state(stack.rdb, pid)["state"] == "voided"


def test_a_retry_that_should_not_be_retried_is_not(stack: Stack, keel: KeelClient) -> None:
    """x-should-retry: false (the SDK's own rule) stops the retry: one call, voided."""
    client = keel.wrap(oai(stack, max_retries=2))
    no = reply({"error": {"message": "no"}}, 503, **{"x-should-retry": "false"})
    headers = stack.provider.script("no-retry", [no])
    mark = stack.mark()
    with pytest.raises(openai.InternalServerError):
        chat(client, headers)
    assert len(stack.provider.calls_of("no-retry")) == 1
    assert len(booked(stack, mark)[2]) == 1


# ------------------------------------------------------------- hostile usage
UNREADABLE: dict[str, dict[str, Any]] = {
    "strings": {"prompt_tokens": "700", "completion_tokens": "40"},
    "floats": {"prompt_tokens": 700.5, "completion_tokens": 40.5},
    "negative-input": {"prompt_tokens": -700, "completion_tokens": 40},
    "garbage-details": {"prompt_tokens": 700, "completion_tokens": 40,
                        "prompt_tokens_details": {"cached_tokens": "all"}},
}


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_unreadable_usage_is_booked_at_the_estimate_not_zero(
        stack: Stack, keel: KeelClient, case: str) -> None:
    """A count that is no count is not read as 0 tokens ($0): the call settles on
    Keel's estimate (input estimate; output from the answer's size, capped)."""
    client = keel.wrap(oai(stack, max_retries=0))
    headers = stack.provider.script(f"usage-{case}", [chat_reply(UNREADABLE[case])])
    cap = 20  # any answer body is longer than 4 x 20 bytes: the output estimate is the cap
    chat(client, headers, max_completion_tokens=cap)
    p = client.last_permit
    assert p.settlement is not None and p.settlement.status == "SETTLED", p.settle_error
    assert p.estimated
    want = cost("openai", "gpt-4o-mini", TokenUsage(input_tokens=estimate(PROMPT),
                                                    output_tokens=cap))
    assert p.settlement.actual_cost_micros == want


def test_unreadable_usage_recorded_by_hand_is_estimated_not_voided(
        stack: Stack, keel: KeelClient) -> None:
    """``p.record(resp)`` of an answer whose usage cannot be read: the call was made,
    so the permit is closed out on the estimate, not voided."""
    raw = oai(stack, max_retries=0)
    headers = stack.provider.script("record-strings", [chat_reply(UNREADABLE["strings"])])
    inp = estimate(PROMPT)
    with keel.permit("gpt-4o-mini", provider="openai", estimated_input_tokens=inp,
                     max_output_tokens=20) as p:
        p.record(chat(raw, headers, max_completion_tokens=p.max_output_tokens))
    assert p.settlement is not None and p.settlement.status == "SETTLED", p.settle_error
    assert p.settlement.actual_cost_micros == cost(
        "openai", "gpt-4o-mini", TokenUsage(input_tokens=inp, output_tokens=20))


def test_anthropic_unreadable_usage_is_not_zero(stack: Stack, keel: KeelClient) -> None:
    ant = anthropic.Anthropic(api_key="test", base_url=stack.base_url, max_retries=0)
    client = keel.wrap(ant)
    headers = stack.provider.script("ant-floats", [message_reply(
        {"input_tokens": 650.5, "output_tokens": "40", "cache_read_input_tokens": 0})])
    client.messages.create(model="claude-sonnet-4-5", max_tokens=20,
                           messages=[{"role": "user", "content": PROMPT}],
                           extra_headers=headers)
    p = client.last_permit
    assert p.settlement is not None and p.settlement.status == "SETTLED", p.settle_error
    assert p.settlement.actual_cost_micros == cost(
        "anthropic", "claude-sonnet-4-5",
        TokenUsage(input_tokens=p.request.estimated_input_tokens, output_tokens=20))
    assert p.request.estimated_input_tokens > 0


def test_usage_impossible_for_the_permit_is_booked_at_the_hold(
        stack: Stack, keel: KeelClient) -> None:
    """10^18 prompt tokens: the sidecar refuses the closeout as impossible. The call
    was made, so the permit is booked at its hold, not left held to expire with
    nothing booked."""
    client = keel.wrap(oai(stack, max_retries=0))
    headers = stack.provider.script("usage-huge", [chat_reply(
        {"prompt_tokens": 10**18, "completion_tokens": 40})])
    chat(client, headers)
    p = client.last_permit
    assert permit_state(stack.rdb, p.permit_id, timeout=1)["state"] == "settled"
    assert p.settlement is not None and p.settlement.status == "SETTLED", p.settle_error
    assert p.settlement.actual_cost_micros == cost("openai", "gpt-4o-mini", AT_HOLD)


def test_cached_tokens_above_prompt_tokens_book_the_cached_count(
        stack: Stack, keel: KeelClient) -> None:
    """cached > prompt (a provider bug): input is raised to the cached count, so the
    booking never goes below what the cached part alone costs."""
    client = keel.wrap(oai(stack, max_retries=0))
    headers = stack.provider.script("cached-above", [chat_reply(
        {"prompt_tokens": 100, "completion_tokens": 40,
         "prompt_tokens_details": {"cached_tokens": 600}})])
    chat(client, headers)
    p = client.last_permit
    assert p.settlement is not None and p.settlement.status == "SETTLED", p.settle_error
    assert p.settlement.actual_cost_micros == cost(
        "openai", "gpt-4o-mini", TokenUsage(600, 600, 0, 40, 0))


# -------------------------------------------------------------- constraints
def test_constrained_cap_and_model_hold_against_extra_body(
        stack: Stack, keel: KeelClient) -> None:
    """The caller's extra_body is merged over the SDK's body: a cap (or model) there
    must not undo the permit's CONSTRAIN."""
    client = keel.wrap(oai(stack, max_retries=0), tenant="tight-extra")
    headers = stack.provider.script("constrain-extra", [chat_reply(USAGE)])
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": PROMPT}],
        extra_body={"max_completion_tokens": 5000}, extra_headers=headers)
    p = client.last_permit
    assert p.decision == "CONSTRAIN" and 0 < p.max_output_tokens < 5000
    (call,) = stack.provider.calls_of("constrain-extra")
    assert call["body"]["max_completion_tokens"] == p.max_output_tokens
    assert call["body"]["model"] == p.model


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", None])
def test_constrained_cap_is_what_is_sent_whatever_field_the_caller_used(
        stack: Stack, keel: KeelClient, field: str | None) -> None:
    client = keel.wrap(oai(stack, max_retries=0), tenant=f"tight-{(field or 'none')}")
    name = f"constrain-{field}"
    headers = stack.provider.script(name, [chat_reply(USAGE)])
    kw: dict[str, Any] = {"model": "gpt-4o-mini", "extra_headers": headers,
                          "messages": [{"role": "user", "content": PROMPT}]}
    if field is not None:
        kw[field] = 5000
    client.chat.completions.create(**kw)
    p = client.last_permit
    assert p.decision == "CONSTRAIN" and 0 < p.max_output_tokens < 1000
    (call,) = stack.provider.calls_of(name)
    caps = {k: v for k, v in call["body"].items() if k in ("max_tokens",
                                                          "max_completion_tokens")}
    assert list(caps.values()) == [p.max_output_tokens]


def test_with_options_copy_of_a_wrapped_client_stays_metered(
        stack: Stack, keel: KeelClient) -> None:
    """``client.with_options(timeout=...)`` is the SDKs' idiom for per-call options;
    the copy it returns must still run under a permit."""
    client = keel.wrap(oai(stack, max_retries=0))
    headers = stack.provider.script("with-options", [chat_reply(USAGE)])
    mark = stack.mark()
    copy = client.with_options(timeout=5)
    chat(copy, headers)
    total, _, decided = booked(stack, mark)
    assert len(decided) == 1
    assert total == cost("openai", "gpt-4o-mini", REPORTED)


# -------------------------------------------------------------- concurrency
def test_one_wrapped_client_shared_by_threads_one_permit_per_call(
        stack: Stack, keel: KeelClient) -> None:
    client = keel.wrap(oai(stack, max_retries=0))
    headers = stack.provider.script("threads", [chat_reply(USAGE)])
    mark = stack.mark()
    n = 24
    with futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: chat(client, headers), range(n)))
    assert len(stack.provider.calls_of("threads")) == n
    total, outcomes, decided = booked(stack, mark)
    assert len(set(decided)) == n and outcomes == ["SUCCEEDED"] * n
    assert total == n * cost("openai", "gpt-4o-mini", REPORTED)


# ------------------------------------------------- closeout PERMIT_PENDING
class PendingSidecar(rpc.PolicyDecisionPointServicer):
    """Closeout answers CLOSEOUT_PERMIT_PENDING twice (a degraded permit its issuing
    sidecar has not journaled yet), then settles."""

    def __init__(self) -> None:
        self.closeouts = 0

    def Authorize(self, request: pb.AuthorizeRequest,
                  context: grpc.ServicerContext) -> pb.AuthorizeResponse:
        return pb.AuthorizeResponse(decision=pb.ALLOW, permit_id="pmt_dg", degraded=True,
                                    estimated_cost_micros=500)

    def Closeout(self, request: pb.CloseoutRequest,
                 context: grpc.ServicerContext) -> pb.CloseoutResponse:
        self.closeouts += 1
        if self.closeouts <= 2:
            return pb.CloseoutResponse(status=pb.CLOSEOUT_PERMIT_PENDING)
        return pb.CloseoutResponse(status=pb.SETTLED, actual_cost_micros=123)

    def Void(self, request: pb.VoidRequest,
             context: grpc.ServicerContext) -> pb.VoidResponse:
        return pb.VoidResponse(status=pb.VOIDED)


def test_closeout_of_a_pending_degraded_permit_is_retried() -> None:
    servicer = PendingSidecar()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    rpc.add_PolicyDecisionPointServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        fast = Retry(initial_backoff_s=0.001, max_backoff_s=0.01)
        with KeelClient(f"127.0.0.1:{port}", tenant="acme", workload="chat", retry=fast) as k, \
                k.permit("gpt-4o-mini", max_output_tokens=10) as p:
            p.record_usage(TokenUsage(input_tokens=100, output_tokens=10))
        assert servicer.closeouts == 3
        assert p.settlement is not None and p.settlement.status == "SETTLED"
    finally:
        server.stop(0)


# ------------------------------------------------------------------- streams
def sse_head() -> bytes:
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"connection: close\r\n\r\n")


def sse(*events: dict[str, Any], done: bool = False) -> bytes:
    """Server-sent events, each named by its ``type`` when it has one (Anthropic)."""
    out = b""
    for e in events:
        if "type" in e:
            out += f"event: {e['type']}\n".encode()
        out += f"data: {json.dumps(e)}\n\n".encode()
    return out + (b"data: [DONE]\n\n" if done else b"")


def chat_chunk(text: str | None = None, usage: dict[str, Any] | None = None,
               finish: str | None = None) -> dict[str, Any]:
    choices = [] if text is None and finish is None else [
        {"index": 0, "delta": {"content": text} if text is not None else {},
         "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini", "choices": choices, "usage": usage}


def message_start(input_tokens: int) -> dict[str, Any]:
    return {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}


def text_delta(text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": text}}


BLOCK_START = {"type": "content_block_start", "index": 0,
               "content_block": {"type": "text", "text": ""}}
PIECES = ["The ledger is append-only; ", "a correction is a new entry ",
          "that names the one it corrects. "]


def out_tokens(text: str) -> int:
    """The settlement rule's output estimate: ceil(text bytes / 4), capped at CAP."""
    return min(CAP, -(-len(text.encode()) // 4))


def settlement_of(stack: Stack, pid: str) -> tuple[str, int]:
    """(outcome, micro-USD) of the permit's one settlement event."""
    state = permit_state(stack.rdb, pid, timeout=1)
    assert state["state"] == "settled", state
    (ev,) = [e for e in stack.events_since("0-0", "settlement") if e["pid"] == pid]
    return ev["data"]["outcome"], int(ev["res"]["act"])


class Abandoned:
    """A stream the provider is still sending when the caller stops reading: the
    first ``read`` items, then a long pause (the rest of a long answer)."""

    def __init__(self, provider: str, name: str, stack: Stack) -> None:
        self.provider = provider
        steps: list[Step]
        if provider == "openai":
            steps = [sse_head() + sse(*(chat_chunk(t) for t in PIECES)), 30.0]
            self.read = 2  # two text chunks
            self.model, self.input_seen = "gpt-4o-mini", None
        else:
            steps = [sse_head() + sse(message_start(650), BLOCK_START,
                                      *(text_delta(t) for t in PIECES)), 30.0]
            self.read = 4  # message_start, the block's start, two text deltas
            self.model, self.input_seen = "claude-sonnet-4-5", 650
        self.headers = stack.provider.script(name, steps)

    def create_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"model": self.model, "stream": True,
                              "messages": [{"role": "user", "content": PROMPT}],
                              "extra_headers": self.headers}
        kw["max_completion_tokens" if self.provider == "openai" else "max_tokens"] = CAP
        return kw

    def endpoint(self, client: Any) -> Any:
        return client.chat.completions if self.provider == "openai" else client.messages

    def want(self, p: Any) -> int:
        """PARTIAL: the usage seen (Anthropic's message_start input, else Keel's input
        estimate), output = max(reported, the text read / 4), capped."""
        out = out_tokens("".join(PIECES[:2]))
        if self.input_seen is None:
            assert p.request.estimated_input_tokens == estimate(PROMPT)
            usage = TokenUsage(input_tokens=estimate(PROMPT), output_tokens=out)
        else:
            usage = TokenUsage(input_tokens=self.input_seen, output_tokens=max(1, out))
        return cost(self.provider, self.model, usage)


def sdk_client(stack: Stack, provider: str, asynchronous: bool) -> Any:
    if provider == "openai":
        cls: Any = openai.AsyncOpenAI if asynchronous else openai.OpenAI
        return cls(api_key="test", base_url=stack.base_url + "/v1", max_retries=0)
    cls = anthropic.AsyncAnthropic if asynchronous else anthropic.Anthropic
    return cls(api_key="test", base_url=stack.base_url, max_retries=0)


def wait_ended(p: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not p.ended and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.ended, f"permit {p.permit_id} still held {seconds}s after its stream was dropped"


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_dropped_stream_is_closed_out_partial_not_left_held(
        stack: Stack, keel: KeelClient, provider: str) -> None:
    """``for _ in stream: break`` and the stream dropped without close(): the caller
    stopped reading a call the provider is billing. The permit is closed out PARTIAL
    with what was read, not left held to expire with $0 booked."""
    case = Abandoned(provider, f"dropped-sync-{provider}", stack)
    client = keel.wrap(sdk_client(stack, provider, asynchronous=False))
    stream = case.endpoint(client).create(**case.create_kwargs())
    p = stream.permit
    for n, _ in enumerate(stream, 1):
        if n == case.read:
            break
    del stream
    gc.collect()
    wait_ended(p)
    assert p.settlement is not None and p.settlement.status == "SETTLED", p.settle_error
    assert settlement_of(stack, p.permit_id) == ("PARTIAL", case.want(p))


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_dropped_async_stream_is_closed_out_partial_on_its_loop(
        stack: Stack, provider: str) -> None:
    case = Abandoned(provider, f"dropped-async-{provider}", stack)
    async with AsyncKeelClient(stack.sidecar.target, tenant="acme", workload="chat",
                               timeout=5) as keel:
        client = keel.wrap(sdk_client(stack, provider, asynchronous=True))
        stream = await case.endpoint(client).create(**case.create_kwargs())
        p = stream.permit
        n = 0
        async for _ in stream:
            n += 1
            if n == case.read:
                break
        del stream
        gc.collect()
        for _ in range(500):  # the closeout is a task on this loop
            if p.ended:
                break
            await asyncio.sleep(0.02)
        assert p.ended, "permit still held after its stream was dropped"
    assert p.settlement is not None and p.settlement.status == "SETTLED", p.settle_error
    assert settlement_of(stack, p.permit_id) == ("PARTIAL", case.want(p))


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
@pytest.mark.parametrize("client", ["closed", "left-open"])
def test_an_async_stream_left_unclosed_when_asyncio_run_ends_is_closed_out(
        stack: Stack, provider: str, client: str) -> None:
    """The coroutine returns with its stream unfinished: the stream is dropped as
    ``asyncio.run`` winds down, after the client's channel is closed (``async with``)
    or while it is open and the closeout task scheduled on the loop is then cancelled
    with every task left. The permit is still closed out PARTIAL."""
    case = Abandoned(provider, f"dropped-run-{provider}-{client}", stack)

    async def main() -> Any:
        keel = AsyncKeelClient(stack.sidecar.target, tenant="acme", workload="chat",
                               timeout=5)
        async with keel if client == "closed" else contextlib.nullcontext(keel):
            wrapped = keel.wrap(sdk_client(stack, provider, asynchronous=True))
            stream = await case.endpoint(wrapped).create(**case.create_kwargs())
            n = 0
            async for _ in stream:
                n += 1
                if n == case.read:
                    break
            return stream.permit

    p = asyncio.run(main())
    gc.collect()
    wait_ended(p)
    assert p.settlement is not None and p.settlement.status == "SETTLED", p.settle_error
    assert settlement_of(stack, p.permit_id) == ("PARTIAL", case.want(p))


STREAMED_USAGE = {"prompt_tokens": 700, "completion_tokens": 40, "total_tokens": 740}


def full_chat_stream() -> list[Step]:
    return [sse_head() + sse(*(chat_chunk(t) for t in PIECES), chat_chunk(finish="stop"),
                             chat_chunk(usage=STREAMED_USAGE), done=True)]


def test_a_meter_iteration_held_past_the_permit_block_is_not_voided(
        stack: Stack, keel: KeelClient) -> None:
    """``p.meter(stream)`` still being read when the ``with`` block exits: the permit
    waits for that iteration and is closed out with the usage it then reads."""
    raw = sdk_client(stack, "openai", asynchronous=False)
    headers = stack.provider.script("meter-held", full_chat_stream())
    with keel.permit("gpt-4o-mini", provider="openai", estimated_input_tokens=estimate(PROMPT),
                     max_output_tokens=CAP) as p:
        events = p.meter(chat(raw, headers, stream=True,
                              stream_options={"include_usage": True}))
        next(events)
    assert not p.ended  # not voided under the iteration
    rest = list(events)
    assert len(rest) == len(PIECES) + 1
    assert p.settlement is not None and p.settlement.status == "SETTLED", p.settle_error
    assert settlement_of(stack, p.permit_id) == (
        "SUCCEEDED", cost("openai", "gpt-4o-mini", REPORTED))


def test_a_meter_iteration_dropped_after_the_permit_block_is_closed_out_partial(
        stack: Stack, keel: KeelClient) -> None:
    raw = sdk_client(stack, "openai", asynchronous=False)
    headers = stack.provider.script("meter-dropped", full_chat_stream())
    with keel.permit("gpt-4o-mini", provider="openai", estimated_input_tokens=estimate(PROMPT),
                     max_output_tokens=CAP) as p:
        events = p.meter(chat(raw, headers, stream=True))
        next(events)
        next(events)
    del events
    gc.collect()
    wait_ended(p)
    want = cost("openai", "gpt-4o-mini", TokenUsage(
        input_tokens=estimate(PROMPT), output_tokens=out_tokens("".join(PIECES[:2]))))
    assert settlement_of(stack, p.permit_id) == ("PARTIAL", want)


async def test_an_ameter_iteration_held_past_the_permit_block_is_not_voided(
        stack: Stack) -> None:
    raw = sdk_client(stack, "openai", asynchronous=True)
    headers = stack.provider.script("ameter-held", full_chat_stream())
    async with AsyncKeelClient(stack.sidecar.target, tenant="acme", workload="chat",
                               timeout=5) as keel:
        async with keel.permit("gpt-4o-mini", provider="openai",
                               estimated_input_tokens=estimate(PROMPT),
                               max_output_tokens=CAP) as p:
            events = p.ameter(await chat(raw, headers, stream=True,
                                         stream_options={"include_usage": True}))
            await anext(events)
        assert not p.ended
        rest = [e async for e in events]
        assert len(rest) == len(PIECES) + 1
    assert p.settlement is not None and p.settlement.status == "SETTLED", p.settle_error
    assert settlement_of(stack, p.permit_id) == (
        "SUCCEEDED", cost("openai", "gpt-4o-mini", REPORTED))


# ------------------------------------------------------- early usage in a chat stream
EARLY = {"prompt_tokens": 700, "completion_tokens": 1, "total_tokens": 701}
LATE_TEXT = ["Each entry names its period. "] * 12


def early_usage_stream() -> list[Step]:
    """Usage in the first chunk, then much more text, and no usage at the end."""
    return [sse_head() + sse(chat_chunk("The ", usage=EARLY),
                             *(chat_chunk(t) for t in LATE_TEXT),
                             chat_chunk(finish="stop"), done=True)]


def early_usage_want(text: str) -> int:
    """The early usage is what was seen so far: input as reported, output the larger
    of the reported count and the text's estimate (the mesh's rule)."""
    assert out_tokens(text) > EARLY["completion_tokens"]
    return cost("openai", "gpt-4o-mini", TokenUsage(
        input_tokens=EARLY["prompt_tokens"],
        output_tokens=max(EARLY["completion_tokens"], out_tokens(text))))


def assert_early_usage_booked(stack: Stack, p: Any, items: list[Any], how: str) -> None:
    """The permit of a chat stream with early usage is booked on the text it carried."""
    text = "".join(c.choices[0].delta.content or "" for c in items if c.choices)
    assert p.settlement is not None and p.settlement.status == "SETTLED", p.settle_error
    outcome = "SUCCEEDED" if how == "ends" else "PARTIAL"
    assert settlement_of(stack, p.permit_id) == (outcome, early_usage_want(text))


@pytest.mark.parametrize("how", ["ends", "breaks"])
def test_early_usage_in_a_chat_stream_does_not_hide_the_text_after_it(
        stack: Stack, keel: KeelClient, how: str) -> None:
    client = keel.wrap(sdk_client(stack, "openai", asynchronous=False))
    headers = stack.provider.script(f"early-usage-{how}", early_usage_stream())
    read = 1 + len(LATE_TEXT) if how == "ends" else 6
    with chat(client, headers, stream=True) as stream:
        items = []
        for item in stream:
            items.append(item)
            if how == "breaks" and len(items) == read:
                break
    assert_early_usage_booked(stack, client.last_permit, items, how)


@pytest.mark.parametrize("how", ["ends", "breaks"])
async def test_early_usage_in_an_async_chat_stream_does_not_hide_the_text_after_it(
        stack: Stack, how: str) -> None:
    headers = stack.provider.script(f"early-usage-async-{how}", early_usage_stream())
    async with AsyncKeelClient(stack.sidecar.target, tenant="acme", workload="chat",
                               timeout=5) as keel:
        client = keel.wrap(sdk_client(stack, "openai", asynchronous=True))
        items = []
        async with await chat(client, headers, stream=True) as stream:
            async for item in stream:
                items.append(item)
                if how == "breaks" and len(items) == 6:
                    break
        p = client.last_permit
    assert_early_usage_booked(stack, p, items, how)
