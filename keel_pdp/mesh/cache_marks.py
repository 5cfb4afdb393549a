"""Prompt-cache breakpoints a request marks, and the longest lifetime among them.

Pure code. A request that marks breakpoints asks the provider to write its prompt
to the cache, billed at the cache-write rate of the lifetime (Anthropic: 1.25x
input for five minutes, 2x for one hour), so Authorize holds its estimated input
at that rate (README "Cost arithmetic"):

* Anthropic Messages (and Bedrock InvokeModel with an Anthropic body): a
  ``cache_control`` object on the request itself (automatic caching), on a
  ``system`` block, a tool, or a content block of a message (tool results'
  content included); ``ttl`` ``"1h"`` is one hour, anything else five minutes.
* Bedrock Converse: a ``cachePoint`` block in ``system``, a message's
  ``content`` or ``toolConfig.tools``; ``ttl`` ``"1h"`` is one hour.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from keel_pdp.mesh.apis import Api

_MARK = {Api.MESSAGES: "cache_control", Api.INVOKE_MESSAGES: "cache_control",
         Api.CONVERSE: "cachePoint"}
# The members a mark may sit under; nothing else is walked (a tool's input schema
# may well have a property named cache_control).
_WALK = frozenset({"system", "tools", "messages", "content", "toolConfig"})
_MAX_DEPTH = 8


def cache_write_ttl(api: Api, body: Mapping[str, object]) -> str:
    """"1h", "5m", or "" when the request marks no cache breakpoint."""
    mark = _MARK.get(api)
    if mark is None:
        return ""
    found: set[str] = set()

    def visit(node: object, depth: int) -> None:
        if depth > _MAX_DEPTH or "1h" in found:
            return
        if isinstance(node, list):
            for x in node:
                visit(x, depth + 1)
            return
        if not isinstance(node, Mapping):
            return
        value = node.get(mark)
        if isinstance(value, Mapping):
            found.add("1h" if value.get("ttl") == "1h" else "5m")
        for key in _WALK:
            child = node.get(key)
            if isinstance(child, list | Mapping):
                visit(child, depth + 1)

    visit(body, 0)
    return "1h" if "1h" in found else ("5m" if found else "")


_MARK_RE = re.compile(rb'"(?:cache_control|cachePoint)"\s*:\s*\{')
_ONE_HOUR_RE = re.compile(rb'"(?:cache_control|cachePoint)"\s*:\s*\{[^{}]*"ttl"\s*:\s*"1h"')


def partial_cache_ttl(api: Api, prefix: bytes) -> str:
    """``cache_write_ttl`` of a body Envoy cut, by pattern from what arrived."""
    if api not in _MARK:
        return ""
    if _ONE_HOUR_RE.search(prefix):
        return "1h"
    return "5m" if _MARK_RE.search(prefix) else ""
