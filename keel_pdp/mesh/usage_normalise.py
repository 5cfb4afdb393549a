"""Provider usage objects in Keel's one convention (``keel_pdp.pricing.TokenUsage``).

Shared by the mesh (``keel_pdp.mesh.usage`` reads usage from response bodies)
and the in-process client (``keel_pdp.client.usage``), so a token counts the
same way whichever path saw it. Per provider:

* OpenAI Chat Completions: ``prompt_tokens`` (cache reads included) -> input,
  ``prompt_tokens_details.cached_tokens`` -> cached input,
  ``completion_tokens`` -> output, ``completion_tokens_details.reasoning_tokens``
  -> reasoning. OpenAI has no separately priced cache writes.
* OpenAI Responses: ``input_tokens``, ``input_tokens_details.cached_tokens``,
  ``output_tokens``, ``output_tokens_details.reasoning_tokens``.
* Anthropic Messages: ``input_tokens`` counts only uncached input, so input =
  ``input_tokens + cache_read_input_tokens + cache_creation_input_tokens``;
  cached input = ``cache_read_input_tokens``; cache writes =
  ``cache_creation_input_tokens``, of which ``cache_creation.ephemeral_1h_input_tokens``
  are one-hour writes (billed at their own rate); output = ``output_tokens``
  (thinking included); web searches = ``server_tool_use.web_search_requests``.
  In a stream, ``message_start`` carries the input side and ``message_delta``
  the cumulative output; the later value of a field wins. Bedrock
  InvokeModel with an Anthropic body reports the same object (streamed as
  ``chunk`` frames whose ``bytes`` are these events).
* OpenAI / Azure embeddings: ``prompt_tokens`` -> input; no output.
* Gemini API / Vertex AI ``usageMetadata``: input = ``promptTokenCount`` +
  ``toolUsePromptTokenCount``; cached input = ``cachedContentTokenCount``
  (part of the prompt count); output = ``candidatesTokenCount`` +
  ``thoughtsTokenCount`` (thinking is billed as output); reasoning =
  ``thoughtsTokenCount``. Streams repeat a cumulative ``usageMetadata``; the one
  on the chunk with a ``finishReason`` is final.
* Bedrock Converse ``usage`` (JSON, or the ``metadata`` event of
  ConverseStream): ``inputTokens`` counts uncached input, so input =
  ``inputTokens + cacheReadInputTokens + cacheWriteInputTokens``; one-hour
  cache writes = the ``cacheDetails`` entries with ``ttl: 1h``; output =
  ``outputTokens``.
"""

from __future__ import annotations

from collections.abc import Mapping

from keel_pdp.mesh.apis import Api
from keel_pdp.pricing import TokenUsage


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def _get(d: Mapping[str, object], *path: str) -> int:
    cur: object = d
    for key in path:
        if not isinstance(cur, Mapping):
            return 0
        cur = cur.get(key)
    return _int(cur)


def _names_a_count(key: str) -> bool:
    return "token" in key.lower() or key.endswith("Count") or key.endswith("_requests")


def readable(usage: Mapping[str, object]) -> bool:
    """False when a token or request count in the usage object (or its ``*_details``,
    ``server_tool_use``) is not a non-negative integer: negative, a string, a float, a
    boolean. Such a count says nothing a closeout can book (``_int`` would read it as
    0 tokens or 0 searches, $0); ``None`` is an absent field."""
    for key, value in usage.items():
        if isinstance(value, Mapping):
            if key.endswith("_requests") or not readable(value):
                return False
        elif isinstance(value, list):
            # Per-modality breakdowns (Gemini ``promptTokensDetails``: [{"modality":
            # "TEXT", "tokenCount": 10}], Bedrock ``cacheDetails``): each entry is
            # read as a usage object of its own; a bare count in such a list is no
            # count Keel books (the totals beside it are). A count itself written as a
            # list (``"output_tokens": [1500]``, ``"web_search_requests": [3]``) has
            # no total beside it: no count (read as 0, it would book nothing).
            if _names_a_count(key) and not key.lower().endswith("details"):
                return False
            if any(isinstance(item, Mapping) and not readable(item) for item in value):
                return False
        elif value is None or not _names_a_count(key):
            continue
        elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return False
    return True


def consistent(input_tokens: int, cached: int, cache_write: int, output: int,
               reasoning: int, cache_write_1h: int = 0, web_search_calls: int = 0,
               ) -> TokenUsage:
    """A TokenUsage whose parts never exceed their totals (``problems()`` may still
    find a count implausibly large)."""
    cache_write = max(cache_write, cache_write_1h)
    input_tokens = max(input_tokens, cached + cache_write)
    output = max(output, reasoning)
    return TokenUsage(input_tokens, cached, cache_write, output, reasoning, cache_write_1h,
                      web_search_calls)


def _converse_1h(usage: Mapping[str, object]) -> int:
    """Bedrock Converse: the cache writes its ``cacheDetails`` list with a one-hour TTL."""
    details = usage.get("cacheDetails")
    if not isinstance(details, list):
        return 0
    return sum(_get(d, "inputTokens") for d in details
               if isinstance(d, Mapping) and d.get("ttl") == "1h")


def normalise(api: Api, usage: Mapping[str, object]) -> TokenUsage:
    """Provider usage object -> Keel's convention (module docstring)."""
    if api is Api.GENERATE_CONTENT or "promptTokenCount" in usage:
        thoughts = _get(usage, "thoughtsTokenCount")
        return consistent(
            _get(usage, "promptTokenCount") + _get(usage, "toolUsePromptTokenCount"),
            _get(usage, "cachedContentTokenCount"), 0,
            _get(usage, "candidatesTokenCount") + thoughts, thoughts)
    if api is Api.CONVERSE or "inputTokens" in usage:
        read = _get(usage, "cacheReadInputTokens")
        write = _get(usage, "cacheWriteInputTokens")
        return consistent(_get(usage, "inputTokens") + read + write, read, write,
                          _get(usage, "outputTokens"), 0, _converse_1h(usage))
    if "inputTokenCount" in usage:  # Bedrock's amazon-bedrock-invocationMetrics
        read = _get(usage, "cacheReadInputTokenCount")
        write = _get(usage, "cacheWriteInputTokenCount")
        return consistent(_get(usage, "inputTokenCount") + read + write, read, write,
                          _get(usage, "outputTokenCount"), 0)
    if api in (Api.MESSAGES, Api.INVOKE_MESSAGES) or "cache_read_input_tokens" in usage \
            or "cache_creation_input_tokens" in usage:
        fresh = _get(usage, "input_tokens")
        read = _get(usage, "cache_read_input_tokens")
        write = _get(usage, "cache_creation_input_tokens")
        return consistent(fresh + read + write, read, write, _get(usage, "output_tokens"), 0,
                          _get(usage, "cache_creation", "ephemeral_1h_input_tokens"),
                          _get(usage, "server_tool_use", "web_search_requests"))
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        return consistent(
            _get(usage, "prompt_tokens"), _get(usage, "prompt_tokens_details", "cached_tokens"),
            0, _get(usage, "completion_tokens"),
            _get(usage, "completion_tokens_details", "reasoning_tokens"))
    return consistent(
        _get(usage, "input_tokens"), _get(usage, "input_tokens_details", "cached_tokens"), 0,
        _get(usage, "output_tokens"), _get(usage, "output_tokens_details", "reasoning_tokens"))
