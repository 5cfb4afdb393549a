"""Validation of an Authorize request: every field within its limits, names usable."""

from __future__ import annotations

import re

from keel_pdp.decision.model import (
    MAX_LABEL_KEY_BYTES,
    MAX_LABEL_VALUE_BYTES,
    MAX_LABELS,
    MAX_NAME_BYTES,
    MAX_REQUEST_ID_BYTES,
    AuthorizeInput,
)
from keel_pdp.errors import InvalidRequest
from keel_pdp.pricing import (
    CACHE_TTLS,
    MAX_TOKENS,
    MAX_WEB_SEARCH_CALLS,
    WEB_SEARCH_UNBOUNDED,
    tier_problem,
)

DIMENSION_NAMES = ("tenant", "workload", "model", "provider")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _utf8_len(value: str) -> int:
    # At most 4 bytes a character: short strings need no encoding to be checked.
    return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))


def check_name(field_name: str, value: str, *, required: bool = True) -> None:
    if not value:
        if required:
            raise InvalidRequest(f"{field_name} is required")
        return
    if value == "*":
        raise InvalidRequest(f"{field_name} must not be '*' (the policy wildcard)")
    if len(value) * 4 > MAX_NAME_BYTES and _utf8_len(value) > MAX_NAME_BYTES:
        raise InvalidRequest(f"{field_name} is longer than {MAX_NAME_BYTES} bytes")
    if _CONTROL.search(value):
        raise InvalidRequest(f"{field_name} contains control characters")


def validate(req: AuthorizeInput) -> None:
    if not req.request_id:
        raise InvalidRequest("request_id is required (the caller's idempotency key)")
    if _utf8_len(req.request_id) > MAX_REQUEST_ID_BYTES:
        raise InvalidRequest(f"request_id is longer than {MAX_REQUEST_ID_BYTES} bytes")
    check_name("tenant", req.tenant)
    check_name("workload", req.workload)
    check_name("model", req.model)
    check_name("provider", req.provider, required=False)
    for name, value in (("estimated_input_tokens", req.estimated_input_tokens),
                        ("max_output_tokens", req.max_output_tokens)):
        if value < 0:
            raise InvalidRequest(f"{name} must not be negative (got {value})")
        if value > MAX_TOKENS:
            raise InvalidRequest(f"{name} exceeds the maximum of {MAX_TOKENS} (got {value})")
    if req.service_tier:
        problem = tier_problem(req.service_tier)
        if problem is not None:
            raise InvalidRequest(f"service_tier {req.service_tier[:40]!r} {problem}")
    searches = req.max_web_search_calls
    if searches < WEB_SEARCH_UNBOUNDED:
        raise InvalidRequest(f"max_web_search_calls must be 0 (no web search), a bound of 1 "
                             f"to {MAX_WEB_SEARCH_CALLS}, or -1 (a search tool without a "
                             f"bound); got {searches}")
    if searches > MAX_WEB_SEARCH_CALLS:
        raise InvalidRequest(f"max_web_search_calls exceeds the maximum of "
                             f"{MAX_WEB_SEARCH_CALLS} (got {searches}); send "
                             f"{MAX_WEB_SEARCH_CALLS} for a larger bound")
    if req.cache_write_ttl and req.cache_write_ttl not in CACHE_TTLS:
        raise InvalidRequest(f"cache_write_ttl {req.cache_write_ttl[:20]!r} must be \"5m\", "
                             "\"1h\" or empty (no cache breakpoint)")
    if len(req.labels) > MAX_LABELS:
        raise InvalidRequest(f"labels has {len(req.labels)} entries; at most {MAX_LABELS}")
    for key, text in req.labels:
        if not key or len(key.encode("utf-8", "surrogatepass")) > MAX_LABEL_KEY_BYTES:
            raise InvalidRequest(f"labels key {key[:40]!r} must be 1..{MAX_LABEL_KEY_BYTES} bytes")
        if len(text.encode("utf-8", "surrogatepass")) > MAX_LABEL_VALUE_BYTES:
            raise InvalidRequest(
                f"labels[{key[:40]!r}] is longer than {MAX_LABEL_VALUE_BYTES} bytes")
