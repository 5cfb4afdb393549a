"""A mock LLM provider (OpenAI, Azure OpenAI, Anthropic, Gemini/Vertex, Bedrock), for tests.

Standard library only (asyncio). Serves, over HTTP/1.1 with keep-alive:

* OpenAI / Azure OpenAI embeddings (``.../embeddings``), Azure deployment paths;
* Gemini API and Vertex AI ``models/M:generateContent`` and
  ``:streamGenerateContent`` (SSE with ``alt=sse``, else a JSON array streamed
  an element at a time);
* Bedrock Runtime ``/model/M/converse``, ``converse-stream``, ``invoke`` and
  ``invoke-with-response-stream`` (Anthropic bodies), the streams as AWS
  event-stream frames with their CRCs (``x-mock-bad-crc: 1`` corrupts one);

* ``POST .../chat/completions`` (OpenAI Chat Completions; ``stream`` with
  ``stream_options.include_usage`` sends the final usage chunk),
* ``POST .../v1/responses`` (OpenAI Responses; streamed as typed events),
* ``POST .../v1/messages`` (Anthropic Messages; streamed as message_start,
  content_block_delta, message_delta with usage, message_stop),
* ``GET /_mock/stats`` (calls seen, JSON) and ``POST /_mock/reset``.

Usage is deterministic: input tokens = Keel's documented estimate of the body
(``keel_pdp.mesh.request.estimate_input_tokens``) unless ``x-mock-input-tokens``
says otherwise; output tokens = ``x-mock-output-tokens`` (default 24), cut to the
request's cap; cached / cache-write / reasoning tokens from ``x-mock-cached-tokens``,
``x-mock-cache-write-tokens``, ``x-mock-reasoning-tokens``. Each output token is
the four bytes ``"tok "``, so text length / 4 is exactly the token count.

OpenAI answers (chat, responses) report the service tier that served them when the
request names one (``service_tier``): "auto" is served at "default", any other tier
at itself; ``x-mock-service-tier`` reports that tier instead, and
``x-mock-service-tier-json`` reports a raw JSON value (a number, a long string) as
a misbehaving provider would. A chat stream reports it on every chunk, a Responses
stream on the response it completes with (the one it is created with repeats the
tier asked for).

Web search (billed per call): ``x-mock-web-searches: N`` makes an Anthropic
Messages or OpenAI Responses answer use its request's web search tool N times (at
most the tool's ``max_uses`` / the request's ``max_tool_calls``; none without a
search tool): Anthropic answers carry N ``server_tool_use`` / ``web_search_tool_result``
blocks (a stream starts a block for each) and ``usage.server_tool_use.web_search_requests``
= N (``x-mock-web-searches-json`` reports a raw JSON value there instead, as a
misbehaving provider would); Responses answers list N ``web_search_call`` items
whose action is a search (a stream adds and completes each) and
``x-mock-web-search-opens: K`` K more whose action is ``open_page`` (not billed).
``x-mock-cache-write-1h-tokens`` reports that many of the cache writes of an
Anthropic answer as one-hour writes (``cache_creation``).

``x-mock-split: N`` writes a stream in pieces of N bytes, so events and frames
straddle chunks. Modes (``--mode`` for every call, ``x-mock-mode`` per call): ``ok``; ``break``
(sends half the answer, then drops the connection); ``stream-error`` (half the
stream, then the provider's in-stream error event or exception frame);
``error500``; ``error429``;
``hang`` (never answers, until the client gives up).

Run: ``python -m tools.mockprovider --port 8081``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import signal
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from keel_pdp.mesh.request import CAP_FIELDS, Api, estimate_input_tokens, route_for

TOKEN = "tok "  # noqa: S105 - one output token of text, not a secret
MAX_BODY = 64 * 1024 * 1024
MAX_CALLS_KEPT = 1000
BREAK_PAUSE_S = 0.05


@dataclass
class Options:
    mode: str = "ok"
    chunk_delay_s: float = 0.0
    tokens_per_chunk: int = 4
    output_tokens: int = 24


@dataclass
class Stats:
    requests: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)

    def record(self, call: dict[str, Any]) -> None:
        self.requests += 1
        self.calls.append(call)
        del self.calls[:-MAX_CALLS_KEPT]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class BadHttp(Exception):
    pass


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError as exc:
        raise BadHttp("request head too large") from exc
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadHttp(f"bad request line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            total += size
            if total > MAX_BODY:
                raise BadHttp("body too large")
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    elif headers.get("content-length"):
        n = int(headers["content-length"])
        if n > MAX_BODY:
            raise BadHttp("body too large")
        body = await reader.readexactly(n)
    return Request(parts[0], parts[1], headers, body)


def _head(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_response(status: int, reason: str, obj: object) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _head(status, reason, [("content-type", "application/json"),
                                  ("content-length", str(len(body)))]) + body


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@dataclass(frozen=True)
class Plan:
    api: Api
    model: str
    stream: bool
    include_usage: bool
    input_tokens: int
    cached: int
    cache_write: int
    output_tokens: int
    reasoning: int
    sse: bool = True  # Gemini streams: SSE (alt=sse) or a JSON array
    # OpenAI: the service_tier the answer reports; NO_TIER: the answer has none.
    service_tier: Any = None
    asked_tier: Any = None  # the request's service_tier (a Responses stream echoes it first)
    searches: int = 0  # web searches the answer made (Anthropic Messages, OpenAI Responses)
    opens: int = 0  # Responses: web_search_call items that open a page (not billed)
    searches_json: Any = None  # Anthropic: a raw web_search_requests value, when set
    cache_write_1h: int = 0  # Anthropic: of the cache writes, the one-hour ones


ANTHROPIC_LIKE = (Api.MESSAGES, Api.INVOKE_MESSAGES)


def _dig(body: dict[str, Any], dotted: str) -> Any:
    cur: Any = body
    for part in dotted.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


NO_TIER = None
TIER_APIS = (Api.CHAT, Api.RESPONSES)


def served_tier(api: Api, body: dict[str, Any], headers: dict[str, str]) -> Any:
    """The service tier an OpenAI answer reports (module docstring); None: none."""
    if api not in TIER_APIS:
        return NO_TIER
    if "x-mock-service-tier-json" in headers:
        return json.loads(headers["x-mock-service-tier-json"])
    if "x-mock-service-tier" in headers:
        return headers["x-mock-service-tier"]
    asked = body.get("service_tier")
    if not isinstance(asked, str):
        return NO_TIER
    return "default" if asked == "auto" else asked


def body_caps(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k in CAP_FIELDS[api] if (v := _dig(body, k)) is not None}


def _hint(headers: dict[str, str], name: str, default: int) -> int:
    raw = headers.get(name, "")
    return int(raw) if raw.isdigit() else default


def searches_made(api: Api, body: dict[str, Any], wanted: int) -> int:
    """How many of ``wanted`` searches the request's web search tool lets the answer
    make: none without the tool, at most its max_uses / the max_tool_calls."""
    tools = body.get("tools")
    found = [t for t in tools if isinstance(t, dict) and str(t.get("type", "")).startswith(
        "web_search")] if isinstance(tools, list) else []
    if api not in (Api.MESSAGES, Api.RESPONSES) or not found:
        return 0
    bound = body.get("max_tool_calls") if api is Api.RESPONSES else found[0].get("max_uses")
    if isinstance(bound, int) and not isinstance(bound, bool) and bound > 0:
        return min(wanted, bound)
    return wanted


def plan_for(api: Api, body: dict[str, Any], headers: dict[str, str], opts: Options,
             model: str = "", stream: bool = False, sse: bool = True) -> Plan:
    cap = 0
    for name in CAP_FIELDS[api]:
        if isinstance(_dig(body, name), int):
            cap = _dig(body, name)
            break
    out = 0 if api is Api.EMBEDDINGS else _hint(headers, "x-mock-output-tokens",
                                                  opts.output_tokens)
    if cap:
        out = min(out, cap)
    inp = _hint(headers, "x-mock-input-tokens", estimate_input_tokens(api, body))
    cached = min(_hint(headers, "x-mock-cached-tokens", 0), inp)
    write = min(_hint(headers, "x-mock-cache-write-tokens", 0), inp - cached)
    opts_ = body.get("stream_options")
    include = isinstance(opts_, dict) and opts_.get("include_usage") is True
    return Plan(api, model or str(body.get("model", "")), body.get("stream") is True or stream,
                include, inp, cached, write, out,
                min(_hint(headers, "x-mock-reasoning-tokens", 0), out), sse,
                served_tier(api, body, headers), body.get("service_tier"),
                searches_made(api, body, _hint(headers, "x-mock-web-searches", 0)),
                searches_made(api, body, _hint(headers, "x-mock-web-search-opens", 0)),
                json.loads(headers["x-mock-web-searches-json"])
                if "x-mock-web-searches-json" in headers else None,
                min(_hint(headers, "x-mock-cache-write-1h-tokens", 0), write))


def _tiered(p: Plan, obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with the plan's service tier, when it reports one."""
    return obj if p.service_tier is NO_TIER else obj | {"service_tier": p.service_tier}


def usage_object(p: Plan) -> dict[str, Any]:
    """The usage object the real provider would send for this plan."""
    if p.api is Api.EMBEDDINGS:
        return {"prompt_tokens": p.input_tokens, "total_tokens": p.input_tokens}
    if p.api is Api.GENERATE_CONTENT:
        # candidatesTokenCount excludes thinking; thoughtsTokenCount is billed as output.
        return {"promptTokenCount": p.input_tokens, "cachedContentTokenCount": p.cached,
                "candidatesTokenCount": p.output_tokens - p.reasoning,
                "thoughtsTokenCount": p.reasoning,
                "totalTokenCount": p.input_tokens + p.output_tokens}
    if p.api is Api.CONVERSE:
        return {"inputTokens": p.input_tokens - p.cached - p.cache_write,
                "cacheReadInputTokens": p.cached, "cacheWriteInputTokens": p.cache_write,
                "outputTokens": p.output_tokens,
                "totalTokens": p.input_tokens + p.output_tokens}
    if p.api in ANTHROPIC_LIKE:
        out: dict[str, Any] = {
            "input_tokens": p.input_tokens - p.cached - p.cache_write,
            "cache_creation_input_tokens": p.cache_write,
            "cache_read_input_tokens": p.cached, "output_tokens": p.output_tokens}
        if p.cache_write_1h:
            out["cache_creation"] = {"ephemeral_5m_input_tokens":
                                     p.cache_write - p.cache_write_1h,
                                     "ephemeral_1h_input_tokens": p.cache_write_1h}
        if p.searches or p.searches_json is not None:
            out["server_tool_use"] = {"web_search_requests": p.searches
                                      if p.searches_json is None else p.searches_json,
                                      "web_fetch_requests": 0}
        return out
    if p.api is Api.RESPONSES:
        return {"input_tokens": p.input_tokens,
                "input_tokens_details": {"cached_tokens": p.cached},
                "output_tokens": p.output_tokens,
                "output_tokens_details": {"reasoning_tokens": p.reasoning},
                "total_tokens": p.input_tokens + p.output_tokens}
    return {"prompt_tokens": p.input_tokens, "completion_tokens": p.output_tokens,
            "total_tokens": p.input_tokens + p.output_tokens,
            "prompt_tokens_details": {"cached_tokens": p.cached},
            "completion_tokens_details": {"reasoning_tokens": p.reasoning}}


def full_body(p: Plan) -> dict[str, Any]:
    text = TOKEN * p.output_tokens
    now = int(time.time())
    if p.api is Api.EMBEDDINGS:
        return {"object": "list", "model": p.model, "usage": usage_object(p),
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0] * 8}]}
    if p.api is Api.GENERATE_CONTENT:
        return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                "finishReason": "STOP", "index": 0}],
                "usageMetadata": usage_object(p), "modelVersion": p.model}
    if p.api is Api.CONVERSE:
        return {"output": {"message": {"role": "assistant", "content": [{"text": text}]}},
                "stopReason": "end_turn", "usage": usage_object(p),
                "metrics": {"latencyMs": 1}}
    if p.api in ANTHROPIC_LIKE:
        return {"id": "msg_mock", "type": "message", "role": "assistant", "model": p.model,
                "content": [*(b for i in range(p.searches) for b in search_blocks(i)),
                            {"type": "text", "text": text}], "stop_reason": "end_turn",
                "stop_sequence": None, "usage": usage_object(p)}
    if p.api is Api.RESPONSES:
        return _tiered(p, {
            "id": "resp_mock", "object": "response", "created_at": now, "model": p.model,
            "status": "completed", "output": [*search_items(p), {
                "type": "message", "id": "msg_mock", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": usage_object(p)})
    return _tiered(p, {
        "id": "chatcmpl-mock", "object": "chat.completion", "created": now, "model": p.model,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": text}}],
        "usage": usage_object(p)})


def search_blocks(i: int) -> list[dict[str, Any]]:
    """One Anthropic web search: the server tool call and its result."""
    return [{"type": "server_tool_use", "id": f"srvtoolu_mock{i}", "name": "web_search",
             "input": {"query": f"query {i}"}},
            {"type": "web_search_tool_result", "tool_use_id": f"srvtoolu_mock{i}",
             "content": [{"type": "web_search_result", "url": f"https://example.com/{i}",
                          "title": f"result {i}", "encrypted_content": "e",
                          "page_age": None}]}]


def search_items(p: Plan) -> list[dict[str, Any]]:
    """OpenAI Responses web_search_call items: the searches, then the page opens."""
    return ([{"type": "web_search_call", "id": f"ws_mock{i}", "status": "completed",
              "action": {"type": "search", "query": f"query {i}"}} for i in range(p.searches)]
            + [{"type": "web_search_call", "id": f"ws_open{i}", "status": "completed",
                "action": {"type": "open_page", "url": f"https://example.com/{i}"}}
               for i in range(p.opens)])


def _sse(obj: dict[str, Any], event: str | None = None) -> bytes:
    data = json.dumps(obj, separators=(",", ":"))
    return ((f"event: {event}\n" if event else "") + f"data: {data}\n\n").encode()


def frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream frame (string headers), with both CRCs."""
    hdr = b""
    for k, v in headers.items():
        kb, vb = k.encode(), v.encode()
        hdr += bytes([len(kb)]) + kb + b"\x07" + struct.pack(">H", len(vb)) + vb
    total = 12 + len(hdr) + len(payload) + 4
    prelude = struct.pack(">II", total, len(hdr))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + hdr + payload
    return body + struct.pack(">I", zlib.crc32(body))


def _event_frame(kind: str, obj: dict[str, Any]) -> bytes:
    return frame({":event-type": kind, ":content-type": "application/json",
                  ":message-type": "event"}, json.dumps(obj, separators=(",", ":")).encode())


def error_event(p: Plan) -> bytes:
    """The provider's own in-stream error (an overloaded model), in the stream's format."""
    if p.api in (Api.CONVERSE, Api.INVOKE_MESSAGES):
        return frame({":message-type": "exception", ":exception-type":
                      "modelStreamErrorException", ":content-type": "application/json"},
                     b'{"message":"The model is overloaded"}')
    if p.api is Api.GENERATE_CONTENT:
        obj = json.dumps({"error": {"code": 503, "message": "The model is overloaded",
                                    "status": "UNAVAILABLE"}}).encode()
        return b"data: " + obj + b"\r\n\r\n" if p.sse else b",\r\n" + obj + b"]"
    if p.api in (Api.MESSAGES, Api.RESPONSES):
        kind = "overloaded_error" if p.api is Api.MESSAGES else "server_error"
        return _sse({"type": "error", "error": {"type": kind, "message": "Overloaded"}},
                    "error")
    return _sse({"error": {"type": "server_error", "message": "The model is overloaded"}})


def stream_content_type(p: Plan) -> str:
    if p.api in (Api.CONVERSE, Api.INVOKE_MESSAGES):
        return "application/vnd.amazon.eventstream"
    if p.api is Api.GENERATE_CONTENT and not p.sse:
        return "application/json"
    return "text/event-stream"


def stream_events(p: Plan, tokens_per_chunk: int) -> list[bytes]:
    """Every event (SSE event, JSON array element, event-stream frame) of the streamed
    answer, in order."""
    pieces = [TOKEN * min(tokens_per_chunk, p.output_tokens - i)
              for i in range(0, p.output_tokens, tokens_per_chunk)]
    ev: list[bytes] = []
    if p.api is Api.GENERATE_CONTENT:
        first = {"promptTokenCount": p.input_tokens, "cachedContentTokenCount": p.cached}
        objs: list[dict[str, Any]] = [
            {"candidates": [{"content": {"role": "model", "parts": [{"text": t}]},
                             "index": 0}], "usageMetadata": first, "modelVersion": p.model}
            for t in pieces]
        objs.append({"candidates": [{"content": {"role": "model", "parts": [{"text": ""}]},
                                     "finishReason": "STOP", "index": 0}],
                     "usageMetadata": usage_object(p), "modelVersion": p.model})
        if p.sse:
            return [b"data: " + json.dumps(o, separators=(",", ":")).encode() + b"\r\n\r\n"
                    for o in objs]
        out = [(b"[" if i == 0 else b",\r\n") + json.dumps(o).encode()
               for i, o in enumerate(objs)]
        out[-1] += b"]"
        return out
    if p.api is Api.CONVERSE:
        ev.append(_event_frame("messageStart", {"role": "assistant"}))
        ev += [_event_frame("contentBlockDelta", {"contentBlockIndex": 0,
                                                  "delta": {"text": t}}) for t in pieces]
        ev.append(_event_frame("contentBlockStop", {"contentBlockIndex": 0}))
        ev.append(_event_frame("messageStop", {"stopReason": "end_turn"}))
        ev.append(_event_frame("metadata", {"usage": usage_object(p),
                                            "metrics": {"latencyMs": 1}}))
        return ev
    if p.api is Api.INVOKE_MESSAGES:
        inner = stream_events(Plan(Api.MESSAGES, p.model, True, False, p.input_tokens,
                                   p.cached, p.cache_write, p.output_tokens, 0),
                              tokens_per_chunk)
        out = []
        for raw in inner:
            obj = json.loads(raw.split(b"data: ", 1)[1])
            if obj.get("type") == "message_stop":
                obj["amazon-bedrock-invocationMetrics"] = {
                    "inputTokenCount": p.input_tokens - p.cached - p.cache_write,
                    "cacheReadInputTokenCount": p.cached,
                    "cacheWriteInputTokenCount": p.cache_write,
                    "outputTokenCount": p.output_tokens, "invocationLatency": 1,
                    "firstByteLatency": 1}
            payload = base64.b64encode(json.dumps(obj).encode()).decode()
            out.append(_event_frame("chunk", {"bytes": payload}))
        return out
    if p.api is Api.MESSAGES:
        start_usage = usage_object(p) | {"output_tokens": 1}
        ev.append(_sse({"type": "message_start", "message": {
            "id": "msg_mock", "type": "message", "role": "assistant", "model": p.model,
            "content": [], "stop_reason": None, "usage": start_usage}}, "message_start"))
        blocks = [b for i in range(p.searches) for b in search_blocks(i)]
        for n, block in enumerate(blocks):
            ev.append(_sse({"type": "content_block_start", "index": n,
                            "content_block": block}, "content_block_start"))
            ev.append(_sse({"type": "content_block_stop", "index": n}, "content_block_stop"))
        text_at = len(blocks)
        ev.append(_sse({"type": "content_block_start", "index": text_at,
                        "content_block": {"type": "text", "text": ""}}, "content_block_start"))
        ev += [_sse({"type": "content_block_delta", "index": text_at,
                     "delta": {"type": "text_delta", "text": t}}, "content_block_delta")
               for t in pieces]
        ev.append(_sse({"type": "content_block_stop", "index": text_at}, "content_block_stop"))
        end_usage: dict[str, Any] = {"output_tokens": p.output_tokens}
        if "server_tool_use" in usage_object(p):
            end_usage["server_tool_use"] = usage_object(p)["server_tool_use"]
        ev.append(_sse({"type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": end_usage}, "message_delta"))
        ev.append(_sse({"type": "message_stop"}, "message_stop"))
        return ev
    if p.api is Api.RESPONSES:
        created: dict[str, Any] = {"id": "resp_mock", "status": "in_progress", "model": p.model}
        if p.asked_tier is not None:
            created["service_tier"] = p.asked_tier  # as asked; the completed one says
        ev.append(_sse({"type": "response.created", "response": created}, "response.created"))
        items = search_items(p)
        for n, item in enumerate(items):
            started = {k: v for k, v in item.items() if k != "action"} | {
                "status": "in_progress"}
            ev.append(_sse({"type": "response.output_item.added", "output_index": n,
                            "item": started}, "response.output_item.added"))
            ev.append(_sse({"type": "response.output_item.done", "output_index": n,
                            "item": item}, "response.output_item.done"))
        ev += [_sse({"type": "response.output_text.delta", "item_id": "msg_mock",
                     "output_index": len(items), "content_index": 0, "delta": t},
                    "response.output_text.delta") for t in pieces]
        ev.append(_sse({"type": "response.completed", "response": full_body(p)},
                       "response.completed"))
        return ev
    base = _tiered(p, {"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                       "model": p.model})
    ev.append(_sse(base | {"choices": [{"index": 0, "delta": {"role": "assistant"},
                                        "finish_reason": None}]}))
    ev += [_sse(base | {"choices": [{"index": 0, "delta": {"content": t},
                                     "finish_reason": None}]}) for t in pieces]
    ev.append(_sse(base | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    if p.include_usage:
        ev.append(_sse(base | {"choices": [], "usage": usage_object(p)}))
    ev.append(b"data: [DONE]\n\n")
    return ev


class MockProvider:
    def __init__(self, opts: Options | None = None) -> None:
        self.opts = opts or Options()
        self.stats = Stats()
        self._server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = await asyncio.start_server(self._conn, host, port, limit=1 << 20)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    req = await read_request(reader)
                except (BadHttp, ValueError, asyncio.LimitOverrunError) as exc:
                    writer.write(_json_response(400, "Bad Request", {"error": str(exc)}))
                    await writer.drain()
                    return
                if req is None:
                    return
                keep = await self._handle(req, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, req: Request, w: asyncio.StreamWriter) -> bool:
        path = req.path.split("?", 1)[0]
        if path == "/_mock/stats":
            w.write(_json_response(200, "OK", {"requests": self.stats.requests,
                                               "calls": self.stats.calls}))
            await w.drain()
            return True
        if path == "/_mock/reset":
            self.stats = Stats()
            w.write(_json_response(200, "OK", {"ok": True}))
            await w.drain()
            return True
        if path == "/healthz":
            w.write(_json_response(200, "OK", {"ok": True}))
            await w.drain()
            return True
        keel = {k: v for k, v in req.headers.items() if k.startswith("x-keel-")}
        route = route_for(req.method, req.path)
        if route is None:
            self.stats.record({"path": path, "method": req.method, "keel": keel})
            w.write(_json_response(404, "Not Found", {"error": {
                "type": "not_found", "message": f"{req.method} {path} is not served"}}))
            await w.drain()
            return True
        api = route.api
        try:
            raw = req.body
            if req.headers.get("content-encoding", "").lower() in ("gzip", "deflate"):
                raw = zlib.decompress(raw, 47)
            body = json.loads(raw or b"{}")
            if not isinstance(body, dict):
                raise ValueError("body is not an object")
        except (ValueError, zlib.error) as exc:
            w.write(_json_response(400, "Bad Request", {"error": {
                "type": "invalid_request_error", "message": str(exc)}}))
            await w.drain()
            return True
        mode = req.headers.get("x-mock-mode", self.opts.mode)
        caps = body_caps(api, body)
        model = route.path_model or route.deployment or str(body.get("model", ""))
        self.stats.record({"path": path, "method": req.method, "api": str(api),
                           "model": model, "stream": body.get("stream") is True or route.stream,
                           "mode": mode, "caps": caps, "keel": keel,
                           "include_usage": isinstance(body.get("stream_options"), dict)
                           and body["stream_options"].get("include_usage") is True,
                           "headers": {k: v for k, v in req.headers.items()
                                       if k in ("authorization", "api-key", "x-amz-date",
                                                "x-amz-content-sha256", "x-goog-api-key")},
                           "body_sha256": hashlib.sha256(req.body).hexdigest()})
        if mode == "hang":
            await asyncio.sleep(3600)
            return False
        if mode in ("error500", "error429"):
            status = 500 if mode == "error500" else 429
            w.write(_json_response(status, "Error", {"type": "error", "error": {
                "type": "api_error" if status == 500 else "rate_limit_error",
                "message": "mock provider failure"}}))
            await w.drain()
            return True
        p = plan_for(api, body, req.headers, self.opts, model, route.stream,
                     sse="alt=sse" in req.path)
        if p.stream:
            return await self._stream(p, w, breaks=mode == "break", fails=mode == "stream-error",
                                      split=_hint(req.headers, "x-mock-split", 0),
                                      bad_crc=req.headers.get("x-mock-bad-crc") == "1")
        data = json.dumps(full_body(p), separators=(",", ":")).encode()
        head = _head(200, "OK", [("content-type", "application/json"),
                                 ("content-length", str(len(data)))])
        if mode == "break":
            w.write(head + data[: len(data) // 2])
            await w.drain()
            await asyncio.sleep(BREAK_PAUSE_S)
            w.transport.abort()
            return False
        w.write(head + data)
        await w.drain()
        return True

    async def _stream(self, p: Plan, w: asyncio.StreamWriter, breaks: bool, split: int = 0,
                      bad_crc: bool = False, fails: bool = False) -> bool:
        w.write(_head(200, "OK", [("content-type", stream_content_type(p)),
                                  ("cache-control", "no-cache"),
                                  ("transfer-encoding", "chunked")]))
        events = stream_events(p, self.opts.tokens_per_chunk)
        if fails:
            # Half the answer, then the provider's in-stream error; the stream ends cleanly.
            events = [*events[: len(events) // 2], error_event(p)]
            if p.api is Api.GENERATE_CONTENT and not p.sse:
                events[0] = events[0] if events[0].startswith(b"[") else b"[" + events[0]
        stop_at = len(events) // 2 if breaks else len(events)
        if bad_crc and len(events) > 2:
            # Flip one payload byte of the second event: its message CRC no longer checks.
            bad = bytearray(events[1])
            bad[-6] ^= 0x01
            events[1] = bytes(bad)
        if split > 0:
            # Re-cut the answer into pieces of ``split`` bytes: events straddle chunks.
            whole = b"".join(events[:stop_at])
            pieces = [whole[i:i + split] for i in range(0, len(whole), split)]
            events, stop_at = pieces + ([b""] if breaks else []), len(pieces)
        for i, ev in enumerate(events):
            if i == stop_at:
                # A provider dies mid-answer: what was sent gets through first.
                await w.drain()
                await asyncio.sleep(BREAK_PAUSE_S)
                w.transport.abort()
                return False
            w.write(_chunk(ev))
            await w.drain()
            if self.opts.chunk_delay_s or split:
                # Split pieces are paused apart so they reach Envoy as separate reads.
                await asyncio.sleep(self.opts.chunk_delay_s or 0.002)
        w.write(b"0\r\n\r\n")
        await w.drain()
        return True


async def serve(host: str, port: int, opts: Options,
                ready: Callable[[int], Awaitable[None]] | None = None) -> None:
    mock = MockProvider(opts)
    bound = await mock.start(host, port)
    print(f"mock provider listening on http://{host}:{bound} (mode {opts.mode})", flush=True)
    if ready is not None:
        await ready(bound)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await mock.close()


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = p or argparse.ArgumentParser(prog="python -m tools.mockprovider",
                                          description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--mode", default="ok",
                        choices=["ok", "break", "stream-error", "error500", "error429", "hang"])
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0,
                        help="pause between streamed events")
    parser.add_argument("--tokens-per-chunk", type=int, default=4)
    parser.add_argument("--output-tokens", type=int, default=24,
                        help="output tokens per answer unless x-mock-output-tokens says")
    return parser


def run(ns: argparse.Namespace) -> int:
    opts = Options(ns.mode, ns.chunk_delay_ms / 1000, max(1, ns.tokens_per_chunk),
                   max(0, ns.output_tokens))
    asyncio.run(serve(ns.host, ns.port, opts))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
