"""Provider usage, read from a response body as it streams past.

Pure code: no gRPC, no Envoy types. ``ResponseMeter`` is fed the response body
chunk by chunk (a JSON body or a server-sent-event stream, gzip or not) and
keeps what a closeout needs: the provider's usage once it is seen, the usage
fields seen so far (a broken stream still reports what it had), and the number
of generated-text bytes (the basis of an estimate when no usage arrives).
Usage is normalised to Keel's convention by ``keel_pdp.mesh.usage_normalise``
(per provider field, in that module's docstring); ``normalise`` and
``consistent`` are re-exported here. Web searches are counted by the rules of
``keel_pdp.mesh.websearch``: Anthropic's reported count when the final usage
carries one, else the answer's search items, each once.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, replace

from keel_pdp.mesh.apis import TIER_APIS, Api
from keel_pdp.mesh.estimate import BYTES_PER_TOKEN
from keel_pdp.mesh.eventstream import FrameDecoder
from keel_pdp.mesh.jsonstream import MAX_EVENT_BYTES, JsonElements
from keel_pdp.mesh.usage_normalise import consistent, normalise, readable
from keel_pdp.mesh.websearch import ANTHROPIC_APIS, SearchCounter, reported
from keel_pdp.pricing import TokenUsage, reported_tier

__all__ = ["MAX_SSE_EVENT_BYTES", "Reading", "ResponseMeter", "consistent", "normalise"]

MAX_SSE_EVENT_BYTES = MAX_EVENT_BYTES


def _text_len(value: object) -> int:
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


@dataclass(frozen=True, slots=True)
class Reading:
    """What the meter knows when the response ends (or breaks)."""

    usage: TokenUsage | None  # the provider's final usage, if it arrived
    partial_usage: TokenUsage | None  # usage fields seen so far (Anthropic message_start)
    text_bytes: int  # generated text seen (SSE deltas), or the body size (JSON)
    body_bytes: int
    error: bool  # the body reported an error (SSE error event, JSON error object)
    incomplete: bool  # the provider said the answer was cut short (max tokens...)
    # The service tier the provider reports it used (OpenAI's service_tier; "" not
    # reported; ``pricing.UNREADABLE_TIER`` for a value that is no tier name).
    service_tier: str = ""
    # The web searches the answer's items show so far (what an estimated closeout
    # books; the usage carries the count a closeout with the provider's usage books).
    web_search_calls: int = 0

    def estimated_output_tokens(self) -> int:
        return -(-self.text_bytes // BYTES_PER_TOKEN)


class ResponseMeter:
    """Reads usage from a response body fed chunk by chunk."""

    def __init__(self, api: Api, content_type: str = "", content_encoding: str = "",
                 max_body_bytes: int = 32 * 1024 * 1024) -> None:
        self.api = api
        ctype = content_type.lower()
        self.sse = "text/event-stream" in ctype
        # Bedrock's streaming APIs: AWS event-stream frames.
        self.frames = FrameDecoder() if "amazon.eventstream" in ctype else None
        # Gemini / Vertex answers (one JSON object, or a JSON array streamed an
        # element at a time) are read element by element, so a broken stream
        # still tells what it had.
        self.elements = JsonElements() if (api is Api.GENERATE_CONTENT and not self.sse
                                             and self.frames is None) else None
        enc = content_encoding.strip().lower()
        self._inflate = zlib.decompressobj(47) if enc in ("gzip", "x-gzip", "deflate") else None
        self._opaque = enc not in ("", "identity", "gzip", "x-gzip", "deflate")
        self._max = max_body_bytes
        self._buf = bytearray()
        self._overflow = False
        self.body_bytes = 0
        self.text_bytes = 0
        self.error = False
        self.incomplete = False
        self._final: dict[str, object] | None = None
        self._partial: dict[str, object] = {}
        self._event = ""
        self._data: list[bytes] = []
        self._metrics: dict[str, object] | None = None
        self.service_tier = ""
        self.searches = SearchCounter(api)

    # ------------------------------------------------------------------ input
    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._inflate is not None:
            try:
                chunk = self._inflate.decompress(chunk)
            except zlib.error:
                self._inflate = None
                self._opaque = True
        self.body_bytes += len(chunk)
        if self._opaque:
            return
        if self.frames is not None:
            for frame in self.frames.feed(chunk):
                self._frame(frame.headers, frame.payload)
            if self.frames.corrupt:
                self.error = True
        elif self.elements is not None:
            for raw in self.elements.feed(chunk):
                self._element(raw)
        elif self.sse:
            self._feed_sse(chunk)
        elif not self._overflow:
            if len(self._buf) + len(chunk) > self._max:
                self._overflow = True
                self._buf.clear()
            else:
                self._buf += chunk

    def feed_event(self, obj: Mapping[str, object], event: str = "") -> None:
        """One stream event already parsed (an SDK's stream item, as a mapping), read
        exactly as the same event arriving in a server-sent-event body.
        ``keel_pdp.client`` meters the SDKs' chat streams with it, so both paths read a
        chat stream by one rule (usage followed by more text, for one)."""
        self._sse_object(event, dict(obj))

    def _feed_sse(self, chunk: bytes) -> None:
        self._buf += chunk
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > MAX_SSE_EVENT_BYTES:
                    self._buf.clear()
                return
            line = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[:nl + 1]
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(b":"):
            return
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._data.append(value)
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")

    def _dispatch(self) -> None:
        data, event = b"\n".join(self._data), self._event
        self._data, self._event = [], ""
        if not data or data == b"[DONE]":
            return
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if isinstance(obj, dict):
            self._sse_object(event, obj)

    def _element(self, raw: bytes) -> None:
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if isinstance(obj, dict):
            self._google(obj)

    def _google(self, obj: Mapping[str, object]) -> None:
        """One GenerateContentResponse (a JSON answer, an SSE event or an array element)."""
        if "error" in obj:
            self.error = True
            return
        usage = obj.get("usageMetadata")
        if isinstance(usage, dict):
            self._partial = dict(usage)
        candidates = obj.get("candidates")
        finished = False
        for cand in candidates if isinstance(candidates, list) else []:
            if not isinstance(cand, dict):
                continue
            content = cand.get("content")
            parts = content.get("parts") if isinstance(content, dict) else None
            for part in parts if isinstance(parts, list) else []:
                if isinstance(part, dict):
                    self.text_bytes += _text_len(part.get("text"))
                    call = part.get("functionCall")
                    if isinstance(call, dict):
                        self.text_bytes += len(json.dumps(call.get("args", {})))
            reason = cand.get("finishReason")
            if isinstance(reason, str) and reason:
                finished = True
                if reason == "MAX_TOKENS":
                    self.incomplete = True
        if finished and self._partial:
            self._final = dict(self._partial)

    def _frame(self, headers: Mapping[str, str], payload: bytes) -> None:
        """One Bedrock event-stream frame (ConverseStream or InvokeModelWithResponseStream)."""
        if headers.get(":message-type", "event") != "event":
            self.error = True  # an exception frame (throttling, validation, model error)
            return
        try:
            obj = json.loads(payload) if payload else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if not isinstance(obj, dict):
            return
        kind = headers.get(":event-type", "")
        if kind == "chunk":
            try:
                inner = json.loads(base64.b64decode(str(obj.get("bytes", "")), validate=True))
            except (binascii.Error, ValueError):
                return
            if isinstance(inner, dict):
                metrics = inner.get("amazon-bedrock-invocationMetrics")
                if isinstance(metrics, dict) and self._final is None:
                    self._metrics = metrics
                self._sse_object("", inner)
        elif kind == "contentBlockDelta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                self.text_bytes += _text_len(delta.get("text"))
                for key in ("toolUse", "reasoningContent"):
                    inner_delta = delta.get(key)
                    if isinstance(inner_delta, dict):
                        self.text_bytes += _text_len(inner_delta.get("input"))
                        self.text_bytes += _text_len(inner_delta.get("text"))
        elif kind == "metadata":
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self._final = usage
        elif kind == "messageStop" and obj.get("stopReason") == "max_tokens":
            self.incomplete = True

    def _sse_object(self, event: str, obj: dict[str, object]) -> None:
        if self.api is Api.GENERATE_CONTENT:
            self._google(obj)
            return
        kind = obj.get("type") if isinstance(obj.get("type"), str) else event
        if kind == "error" or event == "error" or (self.api is Api.CHAT and "error" in obj):
            self.error = True
            return
        if self.api is Api.CHAT:
            self._tier(obj)
            self.searches.chat(obj)
            choices = obj.get("choices")
            if isinstance(choices, list):
                for ch in choices:
                    if not isinstance(ch, dict):
                        continue
                    delta = ch.get("delta")
                    if isinstance(delta, dict):
                        self._count_delta(delta)
                    if ch.get("finish_reason") == "length":
                        self.incomplete = True
            # After this chunk's text: a usage object counts the chunk it comes with.
            usage = obj.get("usage")
            if isinstance(usage, dict):
                self._final = usage
        elif self.api is Api.RESPONSES:
            if isinstance(kind, str) and kind.endswith(".delta"):
                self.text_bytes += _text_len(obj.get("delta"))
            elif kind in ("response.output_item.added", "response.output_item.done"):
                self.searches.output_item(obj.get("item"), obj.get("output_index"))
            elif kind in ("response.completed", "response.incomplete", "response.failed"):
                resp = obj.get("response")
                # Only the response as it ended says which tier served it (the one
                # as created repeats the tier asked for).
                self._tier(resp)
                if isinstance(resp, dict):
                    self.searches.listing(resp.get("output"))
                if isinstance(resp, dict) and isinstance(resp.get("usage"), dict):
                    self._final = resp["usage"]
                if kind == "response.incomplete":
                    self.incomplete = True
                if kind == "response.failed":
                    self.error = True
        else:
            if kind == "message_start":
                msg = obj.get("message")
                if isinstance(msg, dict) and isinstance(msg.get("usage"), dict):
                    # The searches as the message starts (none yet) are no count of
                    # its searches: only message_delta's is.
                    self._partial.update({k: v for k, v in msg["usage"].items()
                                          if k != "server_tool_use"})
            elif kind == "content_block_start":
                self.searches.block(obj.get("content_block"))
            elif kind == "content_block_delta":
                delta = obj.get("delta")
                if isinstance(delta, dict):
                    for key in ("text", "partial_json", "thinking"):
                        self.text_bytes += _text_len(delta.get(key))
            elif kind == "message_delta":
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    self._partial.update({k: v for k, v in usage.items() if v is not None})
                    self._final = dict(self._partial)
                delta = obj.get("delta")
                if isinstance(delta, dict) and delta.get("stop_reason") == "max_tokens":
                    self.incomplete = True

    def _tier(self, obj: object) -> None:
        """The tier a chat chunk or answer, or a finished response object, reports
        (the last one reported wins)."""
        if isinstance(obj, Mapping) and "service_tier" in obj:
            tier = reported_tier(obj["service_tier"])
            if tier:
                self.service_tier = tier

    def _count_delta(self, delta: Mapping[str, object]) -> None:
        before = self.text_bytes
        for key in ("content", "reasoning_content", "refusal"):
            self.text_bytes += _text_len(delta.get(key))
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    self.text_bytes += _text_len(fn.get("arguments"))
        if self.text_bytes > before and self._final is not None:
            # Text after a usage object: that usage was not the final count (usage in
            # every chunk, or an early one). It is what was seen so far; the output is
            # then the larger of it and the text's estimate.
            self._partial, self._final = dict(self._final), None

    # ----------------------------------------------------------------- output
    def reading(self, complete: bool = True) -> Reading:
        """What is known now; ``complete``: the body ended normally."""
        if self.frames is not None or self.elements is not None:
            text = self.text_bytes
            if self.frames is not None and self.frames.pending and complete:
                self.error = True  # the stream ended inside a frame
            if self._final is None and self._metrics is not None:
                self._final = {"input_tokens": self._metrics.get("inputTokenCount"),
                               "cache_read_input_tokens":
                                   self._metrics.get("cacheReadInputTokenCount", 0),
                               "cache_creation_input_tokens":
                                   self._metrics.get("cacheWriteInputTokenCount", 0),
                               "output_tokens": self._metrics.get("outputTokenCount")}
            if self.elements is not None and complete and self._final is None \
                    and self._partial and not self.error:
                self._final = dict(self._partial)  # a complete answer with no finishReason
        elif self.sse:
            if complete:  # a last line / event with no newline after it
                if self._buf:
                    self._line(bytes(self._buf).rstrip(b"\r"))
                    self._buf.clear()
                self._line(b"")
            text = self.text_bytes
        else:
            text = self.body_bytes
            if complete and not self._overflow and not self._opaque and self._buf:
                self._json_body(bytes(self._buf))
        if self.sse and self.api is Api.GENERATE_CONTENT and complete and self._final is None \
                and self._partial and not self.error:
            self._final = dict(self._partial)
        # A count the provider wrote that is no count (negative, a string, a float) is
        # not booked as 0 tokens: the usage is unreadable and the call is estimated.
        final = normalise(self.api, self._final) if self._final is not None \
            and readable(self._final) else None
        partial = normalise(self.api, self._partial) if self._partial \
            and readable(self._partial) else None
        seen = self.searches.count
        if final is not None and not (self.api in ANTHROPIC_APIS
                                      and reported(self._final) is not None):
            final = replace(final, web_search_calls=seen)
        if partial is not None:
            partial = replace(partial, web_search_calls=max(partial.web_search_calls, seen))
        return Reading(final, partial, text, self.body_bytes, self.error, self.incomplete,
                       self.service_tier, seen)

    def _json_body(self, raw: bytes) -> None:
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return
        if not isinstance(obj, dict):
            return
        if obj.get("error") or obj.get("type") == "error":
            self.error = True
        if self.api in TIER_APIS:
            self._tier(obj)
        if self.api is Api.CHAT:
            self.searches.chat(obj)
        elif self.api is Api.RESPONSES:
            self.searches.listing(obj.get("output"))
        elif self.api in ANTHROPIC_APIS:
            self.searches.listing(obj.get("content"))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._final = usage
        if obj.get("stop_reason") == "max_tokens" or obj.get("status") == "incomplete" \
                or obj.get("stopReason") == "max_tokens":
            self.incomplete = True
