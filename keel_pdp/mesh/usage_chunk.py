"""The usage chunk Keel asks an OpenAI chat stream for, taken back out.

When a chat stream does not ask for its usage, ``keel_pdp.mesh.bodies.rewrite_cap``
asks for it (``stream_options.include_usage``) so the closeout settles on the
provider's count; the client did not ask for that chunk, so ext_proc strips it
from the response on its way back (``KEEL_MESH_STREAM_USAGE=strip``).
"""

from __future__ import annotations

import json
import re


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
