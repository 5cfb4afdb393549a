"""An OpenAI- or Anthropic-style HTTP request, read the way Authorize needs it.

Pure functions: no gRPC, no Envoy types. ``read_request`` turns the method,
path, headers and body of a provider call into an ``LlmRequest`` (API, provider,
model, output cap, input-token estimate) or raises ``BadRequest`` with a message
the caller can act on.

Input-token estimate (deterministic, no tokenizer download)::

    tokens = ceil(prompt_text_bytes / 4)
             + 4 per message (role and separators)
             + 3 (reply priming)
             + 1000 per image part + 1000 per inline file or document part

``prompt_text_bytes`` is the UTF-8 length of every string the model reads:
message contents (plain strings and text parts), tool-call arguments, tool
results, the system prompt / ``instructions``, and the compact JSON of
``tools``, ``functions`` and ``response_format`` / ``text`` (schemas are part of
the prompt). Base64 payloads are not counted as text; each such part counts a
flat figure instead. About four bytes per token is the usual figure for English
text and JSON; the hold this estimate feeds is corrected at closeout with the
provider's own count.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import urllib.parse
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

BYTES_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3
IMAGE_TOKENS = 1000
FILE_TOKENS = 1000
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_TOKENS_LIMIT = 2_000_000


class BadRequest(ValueError):
    """The request cannot be read; the message says which field and why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Api(StrEnum):
    CHAT = "chat.completions"
    RESPONSES = "responses"
    MESSAGES = "messages"
    EMBEDDINGS = "embeddings"
    GENERATE_CONTENT = "generate_content"  # Gemini API and Vertex AI
    CONVERSE = "converse"  # Bedrock Converse / ConverseStream
    INVOKE_MESSAGES = "invoke.messages"  # Bedrock InvokeModel with an Anthropic body


# Path suffix -> (API, provider when nothing else names one). Suffixes, so a
# gateway prefix (/openai/v1/chat/completions) still matches.
_PATHS: tuple[tuple[str, Api, str], ...] = (
    ("/chat/completions", Api.CHAT, "openai"),
    ("/v1/responses", Api.RESPONSES, "openai"),
    ("/v1/messages", Api.MESSAGES, "anthropic"),
    ("/v1/embeddings", Api.EMBEDDINGS, "openai"),
)
# Azure OpenAI: the deployment in the path names the model (docs/mesh-azure.md).
_AZURE = re.compile(r"/openai/deployments/([^/]{1,256})/(chat/completions|responses|embeddings)$")
_AZURE_API = {"chat/completions": Api.CHAT, "responses": Api.RESPONSES,
              "embeddings": Api.EMBEDDINGS}
# Gemini API (/v1beta/models/M:op) and Vertex AI (/v1/projects/P/locations/L/
# publishers/google/models/M:op).
_GOOGLE = re.compile(r"/models/([^/:]{1,256}):(generateContent|streamGenerateContent)$")
# Bedrock Runtime: /model/{modelId}/{converse|converse-stream|invoke|invoke-with-response-stream}
_BEDROCK = re.compile(r"/model/([^/]{1,2048})/(converse|converse-stream|invoke|"
                      r"invoke-with-response-stream)$")

# Which body field carries the output cap, in order of preference (a dotted
# name is a nested field).
CAP_FIELDS: dict[Api, tuple[str, ...]] = {
    Api.CHAT: ("max_completion_tokens", "max_tokens"),
    Api.RESPONSES: ("max_output_tokens",),
    Api.MESSAGES: ("max_tokens",),
    Api.EMBEDDINGS: (),
    Api.GENERATE_CONTENT: ("generationConfig.maxOutputTokens",
                           "generation_config.max_output_tokens"),
    Api.CONVERSE: ("inferenceConfig.maxTokens",),
    Api.INVOKE_MESSAGES: ("max_tokens",),
}
# The field written when the body names no cap and one must be enforced.
CAP_FIELD_TO_ADD: dict[Api, str] = {
    Api.CHAT: "max_completion_tokens",
    Api.RESPONSES: "max_output_tokens",
    Api.MESSAGES: "max_tokens",
    Api.EMBEDDINGS: "",
    Api.GENERATE_CONTENT: "generationConfig.maxOutputTokens",
    Api.CONVERSE: "inferenceConfig.maxTokens",
    Api.INVOKE_MESSAGES: "max_tokens",
}
# APIs whose requests are SigV4-signed: a body Keel changes must be re-signed.
SIGNED_APIS = frozenset({Api.CONVERSE, Api.INVOKE_MESSAGES})


@dataclass(frozen=True, slots=True)
class Route:
    """What the method and path say about a metered call."""

    api: Api
    provider: str  # the provider when no header, context extension or host names one
    path_model: str = ""  # the model the path names (Gemini, Vertex, Bedrock)
    deployment: str = ""  # the Azure OpenAI deployment
    stream: bool = False  # the path asks for a stream (Gemini, Bedrock)

_IMAGE_TYPES = frozenset({"image_url", "image", "input_image"})
_FILE_TYPES = frozenset({"file", "input_file", "document", "input_audio"})
_SKIP_KEYS = frozenset({"role", "type", "id", "tool_call_id", "tool_use_id", "cache_control"})


@dataclass(frozen=True, slots=True)
class LlmRequest:
    api: Api
    provider: str
    model: str
    max_output_tokens: int  # 0: the body names no cap
    cap_field: str  # the body field that carried the cap ("" if none)
    estimated_input_tokens: int
    stream: bool
    partial: bool = False  # read from a truncated body (model and cap by pattern)
    include_usage: bool = False  # an OpenAI chat stream that asks for its usage chunk


def route_for(method: str, path: str) -> Route | None:
    """The metered API a request goes to, or None."""
    if method.upper() != "POST":
        return None
    clean = urllib.parse.unquote(path.split("?", 1)[0].split("#", 1)[0]).rstrip("/")
    m = _AZURE.search(clean)
    if m is not None:
        return Route(_AZURE_API[m.group(2)], "azure", deployment=m.group(1))
    m = _GOOGLE.search(clean)
    if m is not None:
        provider = "vertex" if "/projects/" in clean else "gemini"
        return Route(Api.GENERATE_CONTENT, provider, path_model=m.group(1),
                     stream=m.group(2) == "streamGenerateContent")
    m = _BEDROCK.search(clean)
    if m is not None:
        op = m.group(2)
        api = Api.CONVERSE if op.startswith("converse") else Api.INVOKE_MESSAGES
        if api is Api.INVOKE_MESSAGES and "anthropic." not in m.group(1):
            return None  # InvokeModel bodies are per model family; Keel reads Anthropic's
        return Route(api, "bedrock", path_model=m.group(1), stream=op.endswith("stream"))
    for suffix, api, provider in _PATHS:
        if clean.endswith(suffix):
            return Route(api, provider)
    return None


class DeploymentMap(Protocol):
    """The policy bundle's ``kind: Deployments`` (``PolicySnapshot``)."""

    def deployment_model(self, provider: str, deployment: str) -> str | None: ...


# Where the model of a call comes from (``path_model``), in words.
FROM_PATH = "the request path"
FROM_BUNDLE = "the bundle's Deployments map"
FROM_ENV = "KEEL_MESH_AZURE_DEPLOYMENTS"
FROM_NAME = "the deployment's own name (not mapped)"
FROM_BODY = "the body's model"


def path_model(route: Route, provider: str, bundle: DeploymentMap | None,
               fallback: Iterable[tuple[str, str]] = ()) -> tuple[str, str]:
    """The model the path names, and where it came from; ("", FROM_BODY) when
    only the body names it.

    An Azure deployment resolves through the serving bundle's Deployments map
    under ``provider`` first, then the ``fallback`` pairs (the sidecar's
    KEEL_MESH_AZURE_DEPLOYMENTS), else to a model named after the deployment
    (which fails closed as UNKNOWN_MODEL_PRICE when nothing prices that name).
    """
    if route.path_model:
        return route.path_model, FROM_PATH
    if not route.deployment:
        return "", FROM_BODY
    mapped = bundle.deployment_model(provider, route.deployment) if bundle else None
    if mapped:
        return mapped, FROM_BUNDLE
    for dep, model in fallback:
        if dep == route.deployment:
            return model, FROM_ENV
    return route.deployment, FROM_NAME


@dataclass(frozen=True, slots=True)
class Resolved:
    """A metered call's API, provider and (where the path decides it) model."""

    route: Route
    provider: str
    model: str  # "" when the body names the model
    model_source: str


def resolve(method: str, path: str, host: str, named_provider: str,
            hosts: Iterable[tuple[str, str]], bundle: DeploymentMap | None,
            fallback: Iterable[tuple[str, str]] = ()) -> Resolved | None:
    """What the mesh resolves a call to before reading its body (None: not metered).

    ``named_provider``: the provider a context extension or header names.
    The ext_authz check, ``keel-pdp mesh route`` and ``keel-pdp policy explain
    --path`` all resolve through here.
    """
    route = route_for(method, path)
    if route is None:
        return None
    provider = provider_for(route.provider, host, named_provider, hosts)
    model, source = path_model(route, provider, bundle, fallback)
    return Resolved(route, provider, model, source)


def match_path(method: str, path: str) -> tuple[Api, str] | None:
    """The metered API a request goes to, with its default provider, or None."""
    route = route_for(method, path)
    return None if route is None else (route.api, route.provider)


def provider_for(default: str, host: str, header_value: str,
                 hosts: Iterable[tuple[str, str]]) -> str:
    if header_value:
        return header_value.strip()
    low = host.lower()
    for sub, provider in hosts:
        if sub in low:
            return provider
    return default


def decode_body(body: bytes, content_encoding: str) -> bytes:
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


class _Counter:
    __slots__ = ("files", "images", "text_bytes")

    def __init__(self) -> None:
        self.text_bytes = 0
        self.images = 0
        self.files = 0

    def walk(self, value: object, depth: int = 0) -> None:
        if depth > 64:
            return
        if isinstance(value, str):
            if value.startswith("data:") and ";base64," in value[:128]:
                self.files += 1
            else:
                self.text_bytes += len(value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, list):
            for item in value:
                self.walk(item, depth + 1)
        elif isinstance(value, dict):
            kind = value.get("type")
            if isinstance(kind, str) and kind in _IMAGE_TYPES:
                self.images += 1
                return
            if isinstance(kind, str) and kind in _FILE_TYPES:
                self.files += 1
                return
            for key, item in value.items():
                if key in _SKIP_KEYS or key == "data":
                    continue
                self.walk(item, depth + 1)

    def schema(self, value: object) -> None:
        if value is not None:
            self.text_bytes += len(json.dumps(value, ensure_ascii=False, separators=(",", ":"))
                                   .encode("utf-8", "surrogatepass"))


def _embedding_tokens(inp: object) -> int:
    """Embeddings input: text by bytes / 4 (each string rounded up); token arrays counted."""
    if isinstance(inp, str):
        return -(-len(inp.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN)
    if isinstance(inp, list):
        if inp and all(isinstance(x, int) and not isinstance(x, bool) for x in inp):
            return len(inp)
        return sum(_embedding_tokens(x) for x in inp)
    return 0


_GOOGLE_FILE_KEYS = frozenset({"inlineData", "inline_data", "fileData", "file_data"})
_CONVERSE_IMAGE_KEYS = frozenset({"image"})
_CONVERSE_FILE_KEYS = frozenset({"document", "video"})


def _blocks(c: _Counter, blocks: object) -> None:
    """Gemini parts and Converse content blocks: media by flat figures, the rest as text."""
    if not isinstance(blocks, list):
        c.walk(blocks)
        return
    for block in blocks:
        if isinstance(block, dict):
            keys = set(block)
            if keys & _GOOGLE_FILE_KEYS:
                data = block.get("inlineData") or block.get("inline_data") or {}
                mime = data.get("mimeType", data.get("mime_type", "")) if isinstance(
                    data, dict) else ""
                if isinstance(mime, str) and mime.startswith("image/"):
                    c.images += 1
                else:
                    c.files += 1
                continue
            if keys & _CONVERSE_IMAGE_KEYS:
                c.images += 1
                continue
            if keys & _CONVERSE_FILE_KEYS:
                c.files += 1
                continue
        c.walk(block)


def estimate_input_tokens(api: Api, body: Mapping[str, object]) -> int:
    """The documented heuristic (module docstring); deterministic for a given body."""
    c = _Counter()
    messages = 0
    if api is Api.EMBEDDINGS:
        return _embedding_tokens(body.get("input"))
    if api is Api.GENERATE_CONTENT:
        contents = body.get("contents")
        items = contents if isinstance(contents, list) else [contents] if contents else []
        messages = len(items)
        for item in items:
            _blocks(c, item.get("parts") if isinstance(item, dict) else item)
        system = body.get("systemInstruction", body.get("system_instruction"))
        if system is not None:
            messages += 1
            _blocks(c, system.get("parts") if isinstance(system, dict) else system)
        c.schema(body.get("tools"))
        return (-(-c.text_bytes // BYTES_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS * messages
                + REPLY_PRIMING_TOKENS + IMAGE_TOKENS * c.images + FILE_TOKENS * c.files)
    if api is Api.CONVERSE:
        msgs = body.get("messages")
        for msg in msgs if isinstance(msgs, list) else []:
            messages += 1
            _blocks(c, msg.get("content") if isinstance(msg, dict) else msg)
        system = body.get("system")
        if system is not None:
            messages += 1
            _blocks(c, system)
        c.schema(body.get("toolConfig"))
        return (-(-c.text_bytes // BYTES_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS * messages
                + REPLY_PRIMING_TOKENS + IMAGE_TOKENS * c.images + FILE_TOKENS * c.files)
    if api is Api.INVOKE_MESSAGES:
        api = Api.MESSAGES
    if api is Api.RESPONSES:
        inp = body.get("input")
        if isinstance(inp, list):
            messages = len(inp)
        elif inp is not None:
            messages = 1
        c.walk(inp)
        c.walk(body.get("instructions"))
        c.schema(body.get("text"))
    else:
        msgs = body.get("messages")
        if isinstance(msgs, list):
            messages = len(msgs)
        c.walk(msgs)
        if api is Api.MESSAGES:
            system = body.get("system")
            if system is not None:
                messages += 1
                c.walk(system)
        else:
            c.schema(body.get("response_format"))
            c.schema(body.get("functions"))
    c.schema(body.get("tools"))
    text_tokens = -(-c.text_bytes // BYTES_PER_TOKEN)
    return (text_tokens + MESSAGE_OVERHEAD_TOKENS * messages + REPLY_PRIMING_TOKENS
            + IMAGE_TOKENS * c.images + FILE_TOKENS * c.files)


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
                      include_usage=include)


_MODEL_RE = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,256})"')
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
    return LlmRequest(api, provider, model, cap, cap_field,
                      -(-total // BYTES_PER_TOKEN) + REPLY_PRIMING_TOKENS,
                      _STREAM_RE.search(prefix) is not None or path_stream, partial=True,
                      include_usage=_INCLUDE_USAGE_RE.search(prefix) is not None)


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


class UsageChunkStripper:
    """Removes, from an OpenAI chat SSE stream, the usage chunk Keel asked for.

    The chunk (``"choices": []`` with a ``usage`` object) is dropped; every other
    event passes byte for byte. A chunk of the stream may end inside an event:
    that tail is held back until its end arrives (or the stream ends).
    """

    def __init__(self) -> None:
        self._held = bytearray()
        self.stripped = 0

    def feed(self, chunk: bytes, end: bool = False) -> bytes:
        self._held += chunk
        buf = bytes(self._held)
        if end:
            cut = len(buf)
        else:
            lf, crlf = buf.rfind(b"\n\n"), buf.rfind(b"\r\n\r\n")
            cut = max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)
        ready, rest = buf[:cut], buf[cut:]
        self._held = bytearray(rest)
        if b'"usage"' not in ready:
            return ready
        out = []
        for event in re.split(rb"(?<=\n\n)|(?<=\r\n\r\n)", ready):
            if event and self._is_usage_chunk(event):
                self.stripped += 1
                continue
            out.append(event)
        return b"".join(out)

    @staticmethod
    def _is_usage_chunk(event: bytes) -> bool:
        if b'"usage"' not in event:
            return False
        data = b"\n".join(line[5:].strip() for line in event.splitlines()
                          if line.startswith(b"data:"))
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return False
        return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(
            obj.get("usage"), dict)
