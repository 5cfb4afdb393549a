"""The input-token estimate a hold is sized on before the provider counts.

Deterministic, no tokenizer download::

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

It has its own module because three readers share it: the mesh (request bodies),
the in-process client wrapper and the mock provider of the tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from keel_pdp.mesh.apis import Api

BYTES_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3
IMAGE_TOKENS = 1000
FILE_TOKENS = 1000
_IMAGE_TYPES = frozenset({"image_url", "image", "input_image"})
_FILE_TYPES = frozenset({"file", "input_file", "document", "input_audio"})
_SKIP_KEYS = frozenset({"role", "type", "id", "tool_call_id", "tool_use_id", "cache_control"})

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
