"""A hostile provider behind a real Envoy with the documented bootstrap.

The upstream here is scripted byte for byte (``ScriptedUpstream``): each test
registers what the "provider" writes for one call (status line, headers, body
pieces, pauses, a reset) and checks that the permit ends as docs/mesh.md's
settlement rule says, once, at figures the test computes from the price table:

* usage the provider reports that cannot be read (negative, strings, floats)
  is not booked as zero tokens: the call settles on Keel's estimate;
* usage impossible for the permit (10^18 tokens, far above the cap) does not
  leave the hold to expire unbooked: the call is booked at its hold;
* an upstream that resets after it read the request but before it answered
  is booked at the hold (the provider may have billed), not voided;
* HTML error pages, empty and truncated bodies, repeated usage chunks, a
  client that leaves mid-stream and Envoy's upstream timeout end by the rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from keel_pdp.mesh.request import Api, estimate_input_tokens
from keel_pdp.policy.loader import load_bundle
from keel_pdp.pricing import Price
from tests.conftest import RedisServer
from tests.integration.envoy_fixture import (
    MESH_POLICIES,
    MeshStack,
    events,
    permit_state,
    redis_client,
    window_figures,
)
from tests.scripted_http import Step, play
from tools.mockprovider import read_request

SNAPSHOT = load_bundle(MESH_POLICIES)
ROUTE_TIMEOUT_S = 2


@dataclass
class Stats:
    calls: list[dict[str, Any]] = field(default_factory=list)


class ScriptedUpstream:
    """A "provider" that answers each call with the steps registered under its
    ``x-script`` request header. Same surface as the mock the fixture starts."""

    def __init__(self) -> None:
        self.stats = Stats()
        self.scripts: dict[str, list[Step]] = {}
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._conn, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            req = await read_request(reader)
            if req is None:
                return
            keel = {k: v for k, v in req.headers.items() if k.startswith("x-keel-")}
            self.stats.calls.append({"path": req.path, "keel": keel, "body": req.body})
            await play(writer, self.scripts.get(req.headers.get("x-script", ""), [b""]))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} X"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def json_reply(obj: object, status: int = 200) -> bytes:
    body = json.dumps(obj).encode()
    return head(status, {"content-type": "application/json",
                         "content-length": str(len(body))}) + body


def sse_head() -> bytes:
    return head(200, {"content-type": "text/event-stream", "transfer-encoding": "chunked"})


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def sse(obj: object) -> bytes:
    return chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")


END = b"0\r\n\r\n"


@pytest.fixture(scope="module")
def mesh(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[MeshStack]:
    stack = MeshStack(redis_server, tmp_path_factory.mktemp("envoy"), "split",
                      route_timeout_s=ROUTE_TIMEOUT_S)
    stack.mock = ScriptedUpstream()  # type: ignore[assignment]
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def rdb(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    yield from redis_client(redis_server)


def upstream(mesh: MeshStack) -> ScriptedUpstream:
    up = mesh.mock
    assert isinstance(up, ScriptedUpstream)
    return up


PRICE: Price = SNAPSHOT.price_for("openai", "gpt-4.1-mini").price  # type: ignore[union-attr]
MAX_TOKENS = 200


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4.1-mini", "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": "Summarise the ledger rules."}], **extra}


def cost(input_tokens: int, output_tokens: int, cached: int = 0) -> int:
    """Micro-USD from the fixture's price table, by this test's own arithmetic:
    per-million prices, rounded up once."""
    pico = ((input_tokens - cached) * PRICE.input + cached * PRICE.cached_input
            + output_tokens * PRICE.output)
    return -(-pico // 1_000_000)


def call(mesh: MeshStack, script: str, steps: list[Step], body: dict[str, Any] | None = None,
         timeout: float = 10) -> tuple[int, str, bytes]:
    """One call through Envoy; (status, permit id, body). Status 0: the reply broke."""
    upstream(mesh).scripts[script] = steps
    n = len(upstream(mesh).stats.calls)
    conn = http.client.HTTPConnection("127.0.0.1", mesh.port, timeout=timeout)
    status, data = 0, b""
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body or chat()),
                     headers={"x-keel-tenant": "acme", "x-keel-workload": "chat",
                              "content-type": "application/json", "x-script": script})
        resp = conn.getresponse()
        status = resp.status
        try:
            data = resp.read()
        except (http.client.IncompleteRead, ConnectionError):
            status = 0
    except (ConnectionError, http.client.RemoteDisconnected):
        status = 0
    finally:
        conn.close()
    calls = upstream(mesh).stats.calls
    assert len(calls) == n + 1, "the call did not reach the upstream"
    return status, calls[-1]["keel"]["x-keel-permit-id"], data


def settlement(rdb: redis.Redis, pid: str) -> dict[str, Any]:
    rec = permit_state(rdb, pid)
    assert rec["state"] == "settled", rec
    (ev,) = events(rdb, pid, "settlement")
    time.sleep(0.05)
    assert len(events(rdb, pid, "settlement")) == 1
    assert window_figures(rdb, "tenant-daily") == (int(rec["act"]), 0)
    out: dict[str, Any] = {**ev["data"], "act": int(rec["act"]), "amount": int(rec["amount"])}
    return out


EST_IN = estimate_input_tokens(Api.CHAT, chat())
HOLD = cost(EST_IN, MAX_TOKENS)



def completion(usage: object) -> bytes:
    """A whole chat completion (JSON) carrying ``usage`` as given."""
    return json.dumps({"id": "c1", "object": "chat.completion", "model": "gpt-4.1-mini",
                       "choices": [{"index": 0, "message": {"role": "assistant",
                                                            "content": "ok"},
                                    "finish_reason": "stop"}], "usage": usage}).encode()


def json_200(body: bytes) -> bytes:
    return head(200, {"content-type": "application/json",
                      "content-length": str(len(body))}) + body


def delta(text: str) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


def usage_chunk(prompt: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
                      "total_tokens": prompt + completion_tokens}}


# Ten chunks of ten 4-byte tokens: 400 bytes of generated text, 100 tokens by the estimate.
TEXT = [sse(delta("tok " * 10)) for _ in range(10)]
TEXT_TOKENS = 100
DONE = chunk(b"data: [DONE]\n\n")


# ------------------------------------------------------------------ findings

@pytest.mark.parametrize("usage", [
    {"prompt_tokens": "900", "completion_tokens": "150"},
    {"prompt_tokens": -900, "completion_tokens": -150},
    {"prompt_tokens": 900.5, "completion_tokens": 150.0},
    {"prompt_tokens": 900, "completion_tokens": 150,
     "completion_tokens_details": {"reasoning_tokens": -5}},
], ids=["strings", "negative", "floats", "negative-detail"])
def test_usage_counts_that_are_no_counts_settle_on_the_estimate_not_at_zero(
        mesh: MeshStack, rdb: redis.Redis, usage: dict[str, Any]) -> None:
    """The provider answered (it billed); its usage cannot be read. Before the fix each
    field read as 0 tokens and the call was booked at $0 as "provider usage"."""
    body = completion(usage)
    status, pid, _ = call(mesh, "bad-usage", [json_200(body)])
    assert status == 200
    got = settlement(rdb, pid)
    # The rule for a response with no readable usage: input = Keel's estimate, output =
    # the body's bytes / 4 (rounded up), capped at the permit's max tokens.
    out = min(-(-len(body) // 4), MAX_TOKENS)
    assert got["outcome"] == "SUCCEEDED"
    assert got["usage"]["in"] == EST_IN and got["usage"]["out"] == out
    assert got["act"] == cost(EST_IN, out) > 0


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 10**18, "completion_tokens": 10**18},
    {"prompt_tokens": 10, "completion_tokens": 100_000},  # $0.16: past 4 x hold + $0.05
], ids=["1e18-tokens", "above-the-overrun-ceiling"])
def test_usage_impossible_for_the_permit_is_booked_at_the_hold_not_left_held(
        mesh: MeshStack, rdb: redis.Redis, usage: dict[str, Any]) -> None:
    """The store refuses the figure (nothing impossible moves a budget); before the fix
    the permit then stayed held until the sweeper expired it with nothing booked."""
    assert usage["completion_tokens"] * PRICE.output > (4 * HOLD + 50_000) * 1_000_000
    status, pid, _ = call(mesh, "impossible-usage", [json_200(completion(usage))])
    assert status == 200
    got = settlement(rdb, pid)
    assert got["usage"] == {"in": EST_IN, "cached": 0, "cw": 0, "out": MAX_TOKENS, "rsn": 0}
    assert got["act"] == got["amount"] == HOLD


@pytest.mark.parametrize("end", ["reset", "close"])
def test_upstream_gone_after_the_request_went_out_is_booked_at_the_hold(
        mesh: MeshStack, rdb: redis.Redis, end: str) -> None:
    """The provider read the request, then the connection reset (or closed) before any
    answer: Envoy answers 503 itself. The provider may have processed and billed the
    call, as after a 504; before the fix Keel read Envoy's 503 as the provider's and
    voided the permit."""
    status, pid, data = call(mesh, f"gone-{end}", [0.2, end])
    assert status == 503 and b"reset before headers" in data
    got = settlement(rdb, pid)
    assert got["outcome"] == "FAILED"
    assert got["usage"] == {"in": EST_IN, "cached": 0, "cw": 0, "out": MAX_TOKENS, "rsn": 0}
    assert got["act"] == HOLD
    assert events(rdb, pid, "void") == []


def test_the_providers_own_503_is_still_voided(mesh: MeshStack, rdb: redis.Redis) -> None:
    status, pid, _ = call(mesh, "own-503", [json_reply({"error": {"message": "down"}}, 503)])
    assert status == 503
    assert permit_state(rdb, pid)["state"] == "voided"
    assert len(events(rdb, pid, "void")) == 1 and events(rdb, pid, "settlement") == []
    assert window_figures(rdb, "tenant-daily") == (0, 0)


@pytest.mark.parametrize("end", ["break", "end"])
def test_usage_in_an_earlier_chunk_does_not_hide_the_text_streamed_after_it(
        mesh: MeshStack, rdb: redis.Redis, end: str) -> None:
    """A usage object early in a chat stream (1 output token), then 100 tokens of text.
    Before the fix that early usage was booked as the final count (1 token)."""
    tail: list[Step] = [0.2, "reset"] if end == "break" else [DONE, END]
    status, pid, _ = call(mesh, f"early-usage-{end}",
                          [sse_head(), sse(usage_chunk(EST_IN, 1)), *TEXT, *tail],
                          body=chat(stream=True, stream_options={"include_usage": True}))
    assert status == (0 if end == "break" else 200)
    got = settlement(rdb, pid)
    assert got["outcome"] == ("PARTIAL" if end == "break" else "SUCCEEDED")
    assert got["usage"]["in"] == EST_IN and got["usage"]["out"] == TEXT_TOKENS
    assert got["act"] == cost(EST_IN, TEXT_TOKENS)


# ------------------------------------------------------------- held up (coverage)

def test_usage_chunk_sent_twice_is_counted_once(mesh: MeshStack, rdb: redis.Redis) -> None:
    status, pid, _ = call(mesh, "usage-twice", [
        sse_head(), *TEXT, sse(usage_chunk(900, 80)), sse(usage_chunk(900, 80)), DONE, END],
        body=chat(stream=True, stream_options={"include_usage": True}))
    assert status == 200
    got = settlement(rdb, pid)
    assert got["outcome"] == "SUCCEEDED" and got["usage"]["out"] == 80
    assert got["act"] == cost(900, 80)


def test_html_error_page_with_200_is_estimated_from_its_size(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    page = b"<html><body>" + b"upstream busy " * 20 + b"</body></html>"
    status, pid, _ = call(mesh, "html", [head(200, {"content-type": "text/html",
                                                      "content-length": str(len(page))})
                                           + page])
    assert status == 200
    got = settlement(rdb, pid)
    out = min(-(-len(page) // 4), MAX_TOKENS)
    assert got["usage"]["in"] == EST_IN and got["usage"]["out"] == out
    assert got["act"] == cost(EST_IN, out)


def test_empty_200_books_the_input_estimate(mesh: MeshStack, rdb: redis.Redis) -> None:
    status, pid, _ = call(mesh, "empty", [head(200, {"content-type": "application/json",
                                                       "content-length": "0"})])
    assert status == 200
    got = settlement(rdb, pid)
    assert got["usage"]["in"] == EST_IN and got["usage"]["out"] == 0
    assert got["act"] == cost(EST_IN, 0)


def test_json_body_cut_short_settles_partial_on_what_arrived(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    prefix = b'{"id":"c1","choices":[{"message":{"content":"' + b"x" * 60
    status, pid, _ = call(mesh, "cut-json", [
        head(200, {"content-type": "application/json", "content-length": "4000"}) + prefix,
        0.2, "reset"])
    assert status == 0  # the client's reply broke too
    got = settlement(rdb, pid)
    out = -(-len(prefix) // 4)
    assert got["outcome"] == "PARTIAL"
    assert got["usage"]["in"] == EST_IN and got["usage"]["out"] == out
    assert got["act"] == cost(EST_IN, out)


def test_envoy_upstream_timeout_books_the_hold(mesh: MeshStack, rdb: redis.Redis) -> None:
    status, pid, _ = call(mesh, "slow", [ROUTE_TIMEOUT_S + 2.0])
    assert status == 504
    got = settlement(rdb, pid)
    assert got["outcome"] == "FAILED" and got["act"] == HOLD


def test_client_leaving_mid_stream_books_the_text_it_was_sent(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    up = upstream(mesh)
    up.scripts["leave"] = [sse_head(), *TEXT[:5], 3.0, *TEXT[5:], DONE, END]
    n = len(up.stats.calls)
    body = json.dumps(chat(stream=True, stream_options={"include_usage": True})).encode()
    with socket.create_connection(("127.0.0.1", mesh.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                  b"x-keel-tenant: acme\r\nx-keel-workload: chat\r\nx-script: leave\r\n"
                  b"content-type: application/json\r\ncontent-length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        seen = b""
        while seen.count(b"tok ") < 50:
            data = s.recv(65536)
            assert data
            seen += data
    pid = up.stats.calls[n]["keel"]["x-keel-permit-id"]
    got = settlement(rdb, pid)
    assert got["outcome"] == "PARTIAL"
    assert got["usage"]["in"] == EST_IN and got["usage"]["out"] == 50
    assert got["act"] == cost(EST_IN, 50)


def test_one_request_id_sent_four_times_at_once_reaches_the_provider_once(
        mesh: MeshStack, rdb: redis.Redis) -> None:
    up = upstream(mesh)
    up.scripts["same-rid"] = [0.3, json_200(completion({"prompt_tokens": 20,
                                                        "completion_tokens": 30}))]
    n = len(up.stats.calls)
    statuses: list[int] = []

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", mesh.port, timeout=10)
        try:
            conn.request("POST", "/v1/chat/completions", body=json.dumps(chat()),
                         headers={"x-keel-tenant": "acme", "x-keel-workload": "chat",
                                  "x-request-id": "hostile-rid-1", "x-script": "same-rid",
                                  "content-type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            statuses.append(resp.status)
        finally:
            conn.close()

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    assert sorted(statuses) == [200, 409, 409, 409]
    assert len(up.stats.calls) == n + 1
    got = settlement(rdb, up.stats.calls[n]["keel"]["x-keel-permit-id"])
    assert got["act"] == cost(20, 30)
