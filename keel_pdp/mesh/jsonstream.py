"""Top-level JSON objects out of a byte stream, as each one closes.

Gemini's ``streamGenerateContent`` without ``alt=sse`` streams one JSON array an
element at a time; reading element by element lets a broken stream still tell
what it had. Like ``keel_pdp.mesh.eventstream`` (AWS frames), this is framing
only: what an element means is ``keel_pdp.mesh.usage``'s business.
"""

from __future__ import annotations

# The most one element (or one SSE event, in keel_pdp.mesh.usage) may hold.
MAX_EVENT_BYTES = 4 * 1024 * 1024


class JsonElements:
    """Top-level JSON objects out of a byte stream: one object, or the elements of a
    JSON array (Gemini's streamGenerateContent without ``alt=sse``), as each closes."""

    __slots__ = ("_buf", "_depth", "_esc", "_start", "_str", "_top")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._str = False
        self._esc = False
        self._start = -1
        self._top = 0  # the depth objects are elements at: 0 (one object) or 1 (array)

    def feed(self, chunk: bytes) -> list[bytes]:
        out: list[bytes] = []
        base = len(self._buf)
        self._buf += chunk
        buf = self._buf
        for i in range(base, len(buf)):
            ch = buf[i]
            if self._str:
                if self._esc:
                    self._esc = False
                elif ch == 0x5C:  # backslash
                    self._esc = True
                elif ch == 0x22:
                    self._str = False
                continue
            if ch == 0x22:
                self._str = True
            elif ch in (0x7B, 0x5B):  # { [
                if self._depth == 0 and ch == 0x5B:
                    self._top = 1
                if ch == 0x7B and self._depth == self._top:
                    self._start = i
                self._depth += 1
            elif ch in (0x7D, 0x5D):  # } ]
                self._depth = max(0, self._depth - 1)
                if ch == 0x7D and self._depth == self._top and self._start >= 0:
                    out.append(bytes(buf[self._start:i + 1]))
                    self._start = -1
        # Keep only the element being read.
        if self._start < 0:
            self._buf.clear()
        elif self._start > 0:
            del self._buf[:self._start]
            self._start = 0
        if len(self._buf) > MAX_EVENT_BYTES:
            self._buf.clear()
            self._start = -1
        return out
