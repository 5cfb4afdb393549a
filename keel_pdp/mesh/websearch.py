"""Web searches: how many a provider call may make, and how many it made.

Pure code: no gRPC, no Envoy types. Providers bill server-side web search per
call, on top of the tokens (README "Server-tool fees"):

* Anthropic Messages: a tool whose ``type`` is ``web_search_<date>`` in ``tools``;
  its ``max_uses`` bounds the searches of the call. The answer's
  ``usage.server_tool_use.web_search_requests`` counts the searches billed (a
  failed search is not billed); each search is also a ``server_tool_use`` content
  block named ``web_search`` (a stream starts one per search).
* OpenAI Responses: a tool whose ``type`` starts with ``web_search``
  (``web_search``, ``web_search_preview`` and their dated versions);
  ``max_tool_calls`` bounds every built-in tool call of the response, searches
  included. The answer lists one ``web_search_call`` output item per call; those
  whose ``action`` is a search are billed (``open_page`` and ``find_in_page``
  actions are not).
* OpenAI Chat Completions: the search models (``gpt-4o-search-preview``,
  ``gpt-4o-mini-search-preview``, ``gpt-5-search-api``, dated versions) search on
  every call, and ``web_search_options`` configures them; the answer does not
  say how many searches it made, so an answer is booked as one (the fewest such a
  call makes) and the monthly reconciliation books the rest.

``request_bound`` reads the bound a request body allows (``partial_bound`` from a
body Envoy cut); ``answer_searches`` counts the searches of a finished answer and
``SearchCounter`` those of a stream, item by item, never counting an item twice
(an item seen when added and again when done, or listed again in the response a
stream completes with).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from keel_pdp.mesh.apis import Api
from keel_pdp.pricing import MAX_WEB_SEARCH_CALLS, WEB_SEARCH_UNBOUNDED

# OpenAI's Chat Completions search models.
SEARCH_MODEL = re.compile(r"-search-(?:preview|api)\b")
ANTHROPIC_APIS = frozenset({Api.MESSAGES, Api.INVOKE_MESSAGES})
SEARCH_APIS = frozenset({Api.CHAT, Api.RESPONSES, *ANTHROPIC_APIS})


def is_search_tool(tool: object) -> bool:
    """A request's tool entry that is the provider's web search tool."""
    if not isinstance(tool, Mapping):
        return False
    kind = tool.get("type")
    return isinstance(kind, str) and kind.startswith("web_search")


def bound_of(value: object) -> int:
    """A bound a request names (``max_uses``, ``max_tool_calls``), as held: a positive
    integer up to MAX_WEB_SEARCH_CALLS as it is, a larger one as MAX_WEB_SEARCH_CALLS;
    anything else (absent, null, 0, negative, a float, a string, a boolean: the
    provider would refuse the call or search without a bound) is no bound."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return WEB_SEARCH_UNBOUNDED
    return min(value, MAX_WEB_SEARCH_CALLS)


def is_search_model(model: str) -> bool:
    return SEARCH_MODEL.search(model.lower()) is not None


def request_bound(api: Api, model: str, body: Mapping[str, object]) -> int:
    """The most web searches the request allows: 0 when it offers no search tool,
    ``WEB_SEARCH_UNBOUNDED`` when it offers one without a (readable) bound."""
    if api not in SEARCH_APIS:
        return 0
    if api is Api.CHAT:
        searching = is_search_model(model) or body.get("web_search_options") is not None
        return WEB_SEARCH_UNBOUNDED if searching else 0
    tools = body.get("tools")
    found = [t for t in tools if is_search_tool(t)] if isinstance(tools, list) else []
    if not found:
        return 0
    if api is Api.RESPONSES:
        return bound_of(body.get("max_tool_calls"))
    total = 0
    for tool in found:
        assert isinstance(tool, Mapping)
        bound = bound_of(tool.get("max_uses"))
        if bound == WEB_SEARCH_UNBOUNDED:
            return WEB_SEARCH_UNBOUNDED
        total += bound
    return min(total, MAX_WEB_SEARCH_CALLS)


_SEARCH_TOOL_RE = re.compile(rb'"type"\s*:\s*"web_search[A-Za-z0-9_.\-]*"')
_MAX_USES_RE = re.compile(rb'"max_uses"\s*:\s*(\d{1,12})\b')
_MAX_TOOL_CALLS_RE = re.compile(rb'"max_tool_calls"\s*:\s*(\d{1,12})\b')
_OPTIONS_RE = re.compile(rb'"web_search_options"\s*:')


def partial_bound(api: Api, model: str, prefix: bytes) -> int:
    """``request_bound`` of a body Envoy cut, by pattern from the prefix that arrived:
    a search tool past the cut is not seen (the closeout books the searches made)."""
    if api not in SEARCH_APIS:
        return 0
    if api is Api.CHAT:
        searching = is_search_model(model) or _OPTIONS_RE.search(prefix) is not None
        return WEB_SEARCH_UNBOUNDED if searching else 0
    if _SEARCH_TOOL_RE.search(prefix) is None:
        return 0
    if api is Api.RESPONSES:
        m = _MAX_TOOL_CALLS_RE.search(prefix)
    else:
        m = _MAX_USES_RE.search(prefix) if len(_SEARCH_TOOL_RE.findall(prefix)) == 1 else None
    return bound_of(int(m.group(1))) if m is not None else WEB_SEARCH_UNBOUNDED


def _billed_openai(item: Mapping[str, object]) -> bool:
    action = item.get("action")
    kind = action.get("type") if isinstance(action, Mapping) else None
    # No readable action (an older answer, or one still in progress): counted.
    return kind not in ("open_page", "find_in_page")


def reported(usage: Mapping[str, object] | None) -> int | None:
    """Anthropic's count of the searches billed (``server_tool_use.web_search_requests``);
    None when the usage object does not say (or says something that is no count)."""
    if usage is None:
        return None
    tools = usage.get("server_tool_use")
    value = tools.get("web_search_requests") if isinstance(tools, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _key(value: object) -> str | int | None:
    """An item's id or index as a key; None for one that is none (a list, an object:
    unhashable, and no id a provider writes), so an odd answer is counted, never
    stops the reading of the call's usage."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return None


class SearchCounter:
    """The web searches of one answer, read item by item (stream events, or the items
    of a finished answer). Each item is counted once, by its id."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self._items: dict[object, bool] = {}
        self._listed: int | None = None  # a complete list of the answer's items
        self._chat_search = False
        self._answered = False

    def _item(self, key: object, billed: bool) -> None:
        if key is None:
            key = ("#", len(self._items))
        self._items[key] = billed

    def block(self, block: object) -> None:
        """An Anthropic content block (a stream's ``content_block_start``)."""
        if isinstance(block, Mapping) and block.get("type") == "server_tool_use" \
                and block.get("name") == "web_search":
            self._item(_key(block.get("id")), True)

    def output_item(self, item: object, index: object = None) -> None:
        """An OpenAI Responses output item (``response.output_item.added`` / ``.done``)."""
        if isinstance(item, Mapping) and item.get("type") == "web_search_call":
            key = _key(item.get("id"))
            self._item(key if key is not None else ("out", _key(index)), _billed_openai(item))

    def listing(self, items: object) -> None:
        """Every item of the answer: Anthropic's ``content``, OpenAI's ``output``."""
        if not isinstance(items, list):
            return
        n = 0
        for x in items:
            if not isinstance(x, Mapping):
                continue
            if self.api is Api.RESPONSES:
                n += x.get("type") == "web_search_call" and _billed_openai(x)
            else:
                n += x.get("type") == "server_tool_use" and x.get("name") == "web_search"
        self._listed = max(self._listed or 0, n)

    def chat(self, obj: Mapping[str, object]) -> None:
        """A Chat Completions answer or chunk: a search model's answer is one search."""
        model = obj.get("model")
        if isinstance(model, str) and is_search_model(model):
            self._chat_search = True
        if isinstance(obj.get("choices"), list) and obj.get("choices"):
            self._answered = True

    @property
    def count(self) -> int:
        if self._chat_search:
            return 1 if self._answered else 0
        seen = sum(1 for billed in self._items.values() if billed)
        return max(self._listed or 0, seen)


def answer_searches(api: Api, body: Mapping[str, object]) -> int:
    """The searches a finished answer (a JSON body, an SDK object dumped) made, by
    the rules of the module docstring (Anthropic's reported count first)."""
    usage = body.get("usage")
    told = reported(usage) if isinstance(usage, Mapping) else None
    if told is not None and api in ANTHROPIC_APIS:
        return told
    counter = SearchCounter(api)
    if api is Api.CHAT:
        counter.chat(body)
    elif api is Api.RESPONSES:
        counter.listing(body.get("output"))
    elif api in ANTHROPIC_APIS:
        counter.listing(body.get("content"))
    return counter.count
