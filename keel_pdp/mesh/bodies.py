"""Reading and rewriting the JSON body of a metered provider call.

Pure functions: no gRPC, no Envoy types. ``parse_body`` turns a whole body (and
``parse_partial`` a prefix Envoy cut at ``max_request_bytes``) into an
``LlmRequest`` (model, output cap, input-token estimate, stream) or raises
``BadRequest`` with a message the caller can act on; ``decode_body`` and
``decode_prefix`` undo a content-encoding first. Both also read the web searches
the call may make (``keel_pdp.mesh.websearch``) and the prompt-cache breakpoints
it marks (``keel_pdp.mesh.cache_marks``). ``rewrite_cap`` writes the
output cap (and a reroute's model, and a chat stream's usage request) back into
the body. ``request_id`` and ``body_digest`` give the call its idempotency key
and fingerprint.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Iterable, Mapping

from keel_pdp.mesh.apis import (
    CAP_FIELD_TO_ADD,
    CAP_FIELDS,
    MAX_BODY_BYTES,
    MAX_TOKENS_LIMIT,
    TIER_APIS,
    Api,
    BadRequest,
    LlmRequest,
)
from keel_pdp.mesh.cache_marks import cache_write_ttl, partial_cache_ttl
from keel_pdp.mesh.estimate import BYTES_PER_TOKEN, REPLY_PRIMING_TOKENS, estimate_input_tokens
from keel_pdp.mesh.websearch import partial_bound, request_bound
from keel_pdp.pricing import tier_problem


def decode_body(body: bytes, content_encoding: str) -> bytes:
    """The body with its content-encoding undone (gzip, deflate or none), at most 64 MiB."""
    enc = content_encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    try:
        if enc in ("gzip", "x-gzip"):
            out = gzip.decompress(body)
        elif enc == "deflate":
            out = zlib.decompress(body)
        else:
            raise BadRequest(f"content-encoding {enc!r} is not supported (use gzip, deflate "
                             "or none)", status=415)
    except (OSError, EOFError, zlib.error) as exc:
        raise BadRequest(f"request body is not valid {enc}: {exc}") from exc
    if len(out) > MAX_BODY_BYTES:
        raise BadRequest("request body is larger than 64 MiB once decompressed", status=413)
    return out


def decode_prefix(body: bytes, content_encoding: str) -> bytes:
    """As much of a truncated body as can be decoded (a gzip/deflate prefix inflates)."""
    enc = content_encoding.strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "x-gzip", "deflate"):
        raise BadRequest(f"content-encoding {enc!r} is not supported (use gzip, deflate "
                         "or none)", status=415)
    inflate = zlib.decompressobj(47)
    try:
        return inflate.decompress(body, MAX_BODY_BYTES)
    except zlib.error as exc:
        raise BadRequest(f"request body is not valid {enc}: {exc}") from exc


BODY_LABEL = "body_hash"


def body_digest(raw: bytes, content_length: str = "") -> str:
    """A short digest of the body as sent (with its declared length, for a cut body)."""
    h = hashlib.blake2b(raw, digest_size=12)
    h.update(b"|" + content_length.encode("ascii", "replace")[:20])
    return h.hexdigest()


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be a positive integer (got {json.dumps(value)[:40]})")
    if value < 1:
        raise BadRequest(f"{name} must be a positive integer (got {value})")
    if value > MAX_TOKENS_LIMIT:
        raise BadRequest(f"{name} must be at most {MAX_TOKENS_LIMIT} (got {value})")
    return value


def _field(body: Mapping[str, object], dotted: str) -> object:
    cur: object = body
    for part in dotted.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def _cap(api: Api, body: Mapping[str, object]) -> tuple[int, str]:
    for name in CAP_FIELDS[api]:
        value = _field(body, name)
        if value is not None:
            return _positive_int(name, value), name
    return 0, ""


def _service_tier(api: Api, body: Mapping[str, object]) -> str:
    """The tier the call asks for ("" not set); BadRequest for a value that is no tier
    name (the provider would refuse it too)."""
    if api not in TIER_APIS:
        return ""
    value = body.get("service_tier")
    if value is None:
        return ""
    problem = tier_problem(value)
    if problem is not None or not value:
        shown = json.dumps(value)[:40] if not isinstance(value, str) else repr(value[:40])
        raise BadRequest(f"service_tier {shown} {problem or 'must not be empty'} (a tier "
                         "such as \"auto\", \"default\", \"flex\" or \"priority\")")
    assert isinstance(value, str)
    return value


def parse_body(api: Api, provider: str, raw: bytes, path_model: str = "",
               path_stream: bool = False) -> LlmRequest:
    """``path_model``: the model the path (or an Azure deployment) names; it wins
    over the body's. ``path_stream``: the path asks for a stream."""
    if not raw.strip():
        raise BadRequest("request body is empty; expected a JSON object with a model")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    model = path_model or body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model is required (a non-empty string in the request body)")
    cap, cap_field = _cap(api, body)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("stream must be true or false")
    opts = body.get("stream_options")
    include = isinstance(opts, dict) and opts.get("include_usage") is True
    return LlmRequest(api, provider, model, cap, cap_field,
                      estimate_input_tokens(api, body), bool(stream) or path_stream,
                      include_usage=include, service_tier=_service_tier(api, body),
                      max_web_search_calls=request_bound(api, model, body),
                      cache_write_ttl=cache_write_ttl(api, body))


_MODEL_RE = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
_TIER_RE = re.compile(rb'"service_tier"\s*:\s*"([A-Za-z0-9_.\-]{1,64})"')
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')


def parse_partial(api: Api, provider: str, prefix: bytes, content_length: int,
                  path_model: str = "", path_stream: bool = False) -> LlmRequest:
    """Read a body Envoy truncated at ``max_request_bytes``.

    The model and the cap are taken by pattern from the prefix that arrived; the
    input estimate is the whole body's length (``content_length``: from the
    content-length header, scaled by the compression ratio for a compressed
    body; the prefix's length when the header is absent) divided by four, an
    over-estimate of a text prompt that the closeout corrects.
    """
    m = _MODEL_RE.search(prefix)
    if path_model:
        model = path_model
    elif m is None:
        raise BadRequest("request body was truncated before the model field; raise "
                         "with_request_body.max_request_bytes or put model first", status=413)
    else:
        model = json.loads(b'"' + m.group(1) + b'"')
    cap, cap_field = 0, ""
    for name in CAP_FIELDS[api]:
        leaf = name.rsplit(".", 1)[-1]
        cm = re.search(rb'"' + leaf.encode() + rb'"\s*:\s*(\d{1,9})\b', prefix)
        if cm is not None:
            cap, cap_field = _positive_int(name, int(cm.group(1))), name
            break
    total = max(content_length, len(prefix))
    # A tier past the cut (or unreadable) is not set: held as "auto" is.
    tm = _TIER_RE.search(prefix) if api in TIER_APIS else None
    return LlmRequest(api, provider, model, cap, cap_field,
                      -(-total // BYTES_PER_TOKEN) + REPLY_PRIMING_TOKENS,
                      _STREAM_RE.search(prefix) is not None or path_stream, partial=True,
                      include_usage=_INCLUDE_USAGE_RE.search(prefix) is not None,
                      service_tier=tm.group(1).decode() if tm is not None else "",
                      max_web_search_calls=partial_bound(api, model, prefix),
                      cache_write_ttl=partial_cache_ttl(api, prefix))


def request_id(header_value: str, envoy_id: str, parts: Iterable[bytes]) -> str:
    """The caller's idempotency key: the request-id header, Envoy's stream id, or a hash."""
    for candidate in (header_value, envoy_id):
        if candidate and len(candidate.encode()) <= 128:
            return candidate
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return "h-" + h.hexdigest()


def _set_field(body: dict[str, object], dotted: str, value: int) -> None:
    *parents, leaf = dotted.split(".")
    cur = body
    for part in parents:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt
    cur[leaf] = value


def rewrite_cap(api: Api, raw: bytes, cap: int, model: str = "",
                request_usage: bool = False) -> bytes | None:
    """The body with its output cap lowered to ``cap`` (None if nothing changes).

    Every cap field the body names is lowered; a body that names none gets the
    API's field added. With ``model`` (a reroute decided by Keel) the body's
    model is replaced too. With ``request_usage`` (a chat stream) the body asks
    for the final usage chunk (``stream_options.include_usage``). Key order and
    all other fields are kept.
    """
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    changed = False
    named = False
    for name in CAP_FIELDS[api]:
        value = _field(body, name)
        if isinstance(value, int) and not isinstance(value, bool):
            named = True
            if value > cap:
                _set_field(body, name, cap)
                changed = True
    if not named and CAP_FIELD_TO_ADD[api]:
        _set_field(body, CAP_FIELD_TO_ADD[api], cap)
        changed = True
    if request_usage and body.get("stream") is True:
        opts = body.get("stream_options")
        if not isinstance(opts, dict):
            opts = {}
            body["stream_options"] = opts
        if opts.get("include_usage") is not True:
            opts["include_usage"] = True
            changed = True
    if model and "model" in body and body.get("model") != model:
        body["model"] = model
        changed = True
    if not changed:
        return None
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
