"""Usage readers for the official ``openai`` and ``anthropic`` Python SDKs.

An application hands Keel the provider's own answer and never parses usage
itself. ``read_usage`` takes a finished response (OpenAI ``ChatCompletion`` or
``Response``, Anthropic ``Message``), its ``usage`` object, or the same as a
plain mapping (``response.model_dump()``, a JSON body). ``UsageMeter`` is fed
the items of a stream one by one (OpenAI ``ChatCompletionChunk`` and Responses
stream events, Anthropic ``RawMessageStreamEvent``) and keeps the final usage
once it is seen, the usage seen so far, and the generated-text bytes (the
basis of an estimate when a stream breaks before its usage arrives).

The normalisation is Keel's one convention (``keel_pdp.mesh.usage.normalise``,
shared with the Envoy adapter): input counts cache reads and cache writes,
output counts reasoning. A usage object with a count that is no count (a string,
a float, a negative number: ``usage_normalise.readable``) is read as no usage,
never as 0 tokens: the call is then settled on Keel's estimate, as on the mesh.
Anthropic's ``output_tokens_details.thinking_tokens`` is read as reasoning
tokens. Web searches are counted as the mesh counts them
(``keel_pdp.mesh.websearch``): Anthropic's ``server_tool_use.web_search_requests``,
OpenAI's ``web_search_call`` output items, one per answer of a search model. The
readers import neither SDK: they read any pydantic model by ``model_dump()`` and
anything else as a mapping, so they work with whichever SDK versions the
application pins.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from keel_pdp.mesh.request import Api
from keel_pdp.mesh.usage import Reading, ResponseMeter, consistent, normalise
from keel_pdp.mesh.usage_normalise import readable
from keel_pdp.mesh.websearch import ANTHROPIC_APIS, SearchCounter, answer_searches, reported
from keel_pdp.pricing import TokenUsage, reported_tier

__all__ = ["UsageMeter", "api_of", "as_mapping", "read_service_tier", "read_usage"]


def as_mapping(obj: object) -> Mapping[str, Any] | None:
    """An SDK object (pydantic) or a mapping as a mapping; None for anything else."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj
    dump = getattr(obj, "model_dump", None)
    if callable(dump):
        out = dump()
        return out if isinstance(out, Mapping) else None
    return None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def api_of(body: Mapping[str, Any]) -> Api | None:
    """Which API a response body or stream item belongs to, from its own type fields."""
    obj = body.get("object")
    if obj in ("chat.completion", "chat.completion.chunk"):
        return Api.CHAT
    if obj == "response":
        return Api.RESPONSES
    kind = body.get("type")
    if kind == "message":
        return Api.MESSAGES
    if isinstance(kind, str) and kind.startswith("response."):
        return Api.RESPONSES
    if isinstance(kind, str) and kind.startswith(("message_", "content_block_")):
        return Api.MESSAGES
    return None


def _usage_api(usage: Mapping[str, Any]) -> Api:
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return Api.CHAT
    if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
        return Api.MESSAGES
    return Api.RESPONSES


def _thinking(usage: Mapping[str, Any]) -> int:
    details = usage.get("output_tokens_details")
    return _int(details.get("thinking_tokens")) if isinstance(details, Mapping) else 0


def normalise_usage(api: Api, usage: Mapping[str, Any]) -> TokenUsage | None:
    """A provider usage object in Keel's convention (reasoning read for every API);
    None when one of its counts cannot be read (it would book as 0 tokens)."""
    if not readable(usage):
        return None
    out = normalise(api, usage)
    if api is Api.MESSAGES:
        thinking = _thinking(usage)
        if thinking:
            out = consistent(out.input_tokens, out.cached_input_tokens, out.cache_write_tokens,
                             out.output_tokens, thinking, out.cache_write_1h_tokens,
                             out.web_search_calls)
    return out


def _with_searches(api: Api, body: Mapping[str, Any], usage: TokenUsage | None,
                   ) -> TokenUsage | None:
    """A finished answer's usage with the web searches the answer shows (its
    reported count, its search items, one for a search model's answer)."""
    if usage is None:
        return None
    return replace(usage, web_search_calls=answer_searches(api, body))


def read_usage(response: object) -> TokenUsage | None:
    """The usage of a finished provider answer, or None when it carries none (or
    none that can be read).

    Accepts an OpenAI ``ChatCompletion`` or ``Response``, an Anthropic ``Message``,
    any of their ``usage`` objects, or the same as mappings.
    """
    body = as_mapping(response)
    if body is None:
        raise TypeError(f"cannot read usage from {type(response).__name__}: expected an "
                        "openai/anthropic response, its usage object or a mapping")
    api = api_of(body)
    if api is None:
        if any(k in body for k in ("prompt_tokens", "input_tokens", "output_tokens",
                                   "completion_tokens")):
            return normalise_usage(_usage_api(body), body)
        usage = as_mapping(body.get("usage"))
        return None if usage is None else normalise_usage(_usage_api(usage), usage)
    usage = as_mapping(body.get("usage"))
    return None if usage is None else _with_searches(api, body, normalise_usage(api, usage))


def read_service_tier(response: object) -> str:
    """The service tier a finished OpenAI answer (``ChatCompletion``, ``Response``, or
    the same as a mapping) reports it was served at: "" when it says none;
    ``pricing.UNREADABLE_TIER`` when what it says is no tier name."""
    body = as_mapping(response)
    if body is None or api_of(body) not in (Api.CHAT, Api.RESPONSES):
        return ""
    return reported_tier(body.get("service_tier"))


class UsageMeter:
    """Reads usage from the items of a provider stream, fed one by one.

    * OpenAI Chat Completions: the final chunk's ``usage`` (sent when the request
      asked ``stream_options={"include_usage": True}``; the wrapper asks for it).
      Chunks are read by the mesh's ``ResponseMeter``: a usage object that more
      text follows is only the usage seen so far, and the output is then booked
      as the larger of it and the text's estimate.
    * OpenAI Responses: the ``usage`` of the response carried by
      ``response.completed`` (or ``response.incomplete`` / ``response.failed``).
    * Anthropic Messages: ``message_start`` carries the input side,
      ``message_delta`` the cumulative output; the later value of a field wins.

    OpenAI answers also report the service tier that served them (``service_tier``
    of a chat chunk or answer, of the response a Responses stream ends with).
    """

    def __init__(self) -> None:
        self.api: Api | None = None
        self.final: TokenUsage | None = None
        self._partial: dict[str, Any] = {}
        self._seen: TokenUsage | None = None  # a chat stream's usage seen before more text
        self._chat_stream: ResponseMeter | None = None
        self.text_bytes = 0
        self.items = 0
        self.error = False
        self.incomplete = False
        self.unreadable = False  # a usage object came whose counts cannot be read
        self.service_tier = ""  # as the provider reported it ("" not yet)
        self._searches: SearchCounter | None = None
        self._reported_searches = False  # the final usage says how many searches

    def _read(self, api: Api, usage: Mapping[str, Any]) -> TokenUsage | None:
        out = normalise_usage(api, usage)
        self.unreadable = self.unreadable or out is None
        return out

    def _whole(self, body: Mapping[str, Any]) -> None:
        """A finished (non-streamed) answer: its size is the basis of the output
        estimate when its usage cannot be read (as the mesh reads a JSON body)."""
        self.text_bytes += len(json.dumps(body, default=str).encode())

    def feed(self, item: object) -> None:
        body = as_mapping(item)
        if body is None:
            return
        self.items += 1
        api = api_of(body) or self.api
        if api is None:
            return
        self.api = api
        if self._searches is None:
            self._searches = SearchCounter(api)
        if api is Api.CHAT:
            self._chat(body)
        elif api is Api.RESPONSES:
            self._responses(body)
        else:
            self._messages(body)

    def _text(self, value: object) -> None:
        if isinstance(value, str):
            self.text_bytes += len(value.encode("utf-8", "surrogatepass"))

    def _tier(self, body: Mapping[str, Any]) -> None:
        if "service_tier" in body:
            tier = reported_tier(body.get("service_tier"))
            if tier:
                self.service_tier = tier

    def _chat(self, body: Mapping[str, Any]) -> None:
        self._tier(body)
        usage = as_mapping(body.get("usage"))
        if body.get("object") == "chat.completion":  # a finished answer handed to the meter
            assert self._searches is not None
            self._searches.chat(body)
            for choice in body.get("choices") or ():
                if isinstance(choice, Mapping) and choice.get("finish_reason") == "length":
                    self.incomplete = True
            self._whole(body)
            if usage is not None:
                self.final = self._read(Api.CHAT, usage)
            return
        # A stream chunk: read by the mesh's meter, so a usage object followed by more
        # text (usage in an early chunk, or in every chunk) is what was seen so far,
        # not the final count, exactly as on the mesh path.
        if self._chat_stream is None:
            self._chat_stream = ResponseMeter(Api.CHAT, "text/event-stream")
        self._chat_stream.feed_event(body)
        if usage is not None and not readable(usage):
            self.unreadable = True
        r = self._chat_stream.reading(complete=False)
        self.final, self._seen, self.text_bytes = r.usage, r.partial_usage, r.text_bytes
        self.error, self.incomplete = r.error, r.incomplete
        self._searches = self._chat_stream.searches

    def _responses(self, body: Mapping[str, Any]) -> None:
        kind = body.get("type")
        searches = self._searches
        assert searches is not None
        if kind in ("response.output_text.delta", "response.refusal.delta",
                    "response.reasoning_text.delta"):
            self._text(body.get("delta"))
        elif kind in ("response.output_item.added", "response.output_item.done"):
            searches.output_item(as_mapping(body.get("item")), body.get("output_index"))
        elif kind == "error":
            self.error = True
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self.error = self.error or kind == "response.failed"
            self.incomplete = self.incomplete or kind == "response.incomplete"
            response = as_mapping(body.get("response")) or {}
            self._tier(response)
            searches.listing(_items(response.get("output")))
            usage = as_mapping(response.get("usage"))
            if usage is not None:
                self.final = self._read(Api.RESPONSES, usage)
        elif body.get("object") == "response":
            self._tier(body)
            searches.listing(_items(body.get("output")))
            self._whole(body)
            usage = as_mapping(body.get("usage"))
            if usage is not None:
                self.final = self._read(Api.RESPONSES, usage)

    def _merge(self, usage: Mapping[str, Any] | None, start: bool = False) -> None:
        for key, value in (usage or {}).items():
            # The searches as a message starts (none yet) are no count of its searches.
            if value is not None and not (start and key == "server_tool_use"):
                self._partial[key] = value

    def _messages(self, body: Mapping[str, Any]) -> None:
        kind = body.get("type")
        searches = self._searches
        assert searches is not None
        if kind == "content_block_start":
            searches.block(as_mapping(body.get("content_block")))
        elif kind == "content_block_delta":
            delta = as_mapping(body.get("delta")) or {}
            self._text(delta.get("text"))
            self._text(delta.get("thinking"))
            self._text(delta.get("partial_json"))
        elif kind == "message_start":
            self._merge(as_mapping((as_mapping(body.get("message")) or {}).get("usage")),
                        start=True)
        elif kind == "message_delta":
            self._merge(as_mapping(body.get("usage")))
            delta = as_mapping(body.get("delta")) or {}
            if delta.get("stop_reason") == "max_tokens":
                self.incomplete = True
        elif kind == "message_stop":
            self.final = self._read(Api.MESSAGES, self._partial) if self._partial else None
            self._reported_searches = reported(self._partial) is not None
        elif kind == "error":
            self.error = True
        elif kind == "message":  # a finished Message handed to the meter
            self._whole(body)
            searches.listing(_items(body.get("content")))
            usage = as_mapping(body.get("usage"))
            if usage is not None:
                self.final = self._read(Api.MESSAGES, usage)
                self._reported_searches = reported(usage) is not None

    @property
    def web_search_calls(self) -> int:
        """The web searches the items show so far (each once)."""
        return self._searches.count if self._searches is not None else 0

    @property
    def usage(self) -> TokenUsage | None:
        """The provider's final usage, once the stream has reported it (its web
        searches: Anthropic's reported count, else the items seen)."""
        final = self.final
        if final is None or (self.api in ANTHROPIC_APIS and self._reported_searches):
            return final
        return replace(final, web_search_calls=self.web_search_calls)

    @property
    def partial_usage(self) -> TokenUsage | None:
        """Usage seen so far, before the end: Anthropic's message_start, or a chat
        usage object that more text followed."""
        if self.final is not None:
            return self.usage
        seen = self._seen
        if seen is None and self._partial:
            seen = normalise_usage(Api.MESSAGES, self._partial)
        if seen is None:
            return None
        return replace(seen, web_search_calls=max(seen.web_search_calls,
                                                  self.web_search_calls))

    def reading(self) -> Reading:
        """What the meter knows, in the shape the settlement rule reads."""
        return Reading(self.usage, self.partial_usage, self.text_bytes, self.text_bytes,
                       self.error, self.incomplete, self.service_tier, self.web_search_calls)


def _items(value: object) -> list[Any] | None:
    """A list of SDK objects or mappings, as mappings (an answer's output/content)."""
    if not isinstance(value, list):
        return None
    return [as_mapping(x) for x in value]
