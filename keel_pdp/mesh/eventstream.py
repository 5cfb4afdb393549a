"""AWS event-stream binary frames (Bedrock ConverseStream, InvokeModelWithResponseStream).

Pure code. A frame is::

    total length (u32) | headers length (u32) | prelude CRC32 (u32)
    headers | payload | message CRC32 (u32, over everything before it)

all big-endian. ``FrameDecoder`` is fed response chunks of any size (a frame
may straddle ext_proc chunks) and returns each complete frame once both CRCs
check. A bad prelude CRC, a bad message CRC or an impossible length marks the
stream corrupt: nothing after it is trusted (the settlement then treats the
response as broken).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from keel_pdp.errors import FrameError as FrameError

MAX_FRAME_BYTES = 16 * 1024 * 1024
PRELUDE_BYTES = 12
MIN_FRAME_BYTES = 16

# Header value types and the size of their fixed-width values (None: u16 length first).
_FIXED = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}
_VARIABLE = (6, 7)




@dataclass(frozen=True, slots=True)
class Frame:
    headers: dict[str, str]  # string headers (":event-type", ":message-type", ...)
    payload: bytes


def parse_headers(raw: bytes) -> dict[str, str]:
    """The string-valued headers of a frame; other types are checked and skipped."""
    out: dict[str, str] = {}
    i = 0
    while i < len(raw):
        n = raw[i]
        i += 1
        if n == 0 or i + n + 1 > len(raw):
            raise FrameError("header name runs past the headers")
        name = raw[i:i + n].decode("utf-8", "replace")
        i += n
        kind = raw[i]
        i += 1
        if kind in _VARIABLE:
            if i + 2 > len(raw):
                raise FrameError("header value length runs past the headers")
            (size,) = struct.unpack_from(">H", raw, i)
            i += 2
            if i + size > len(raw):
                raise FrameError("header value runs past the headers")
            if kind == 7:
                out[name] = raw[i:i + size].decode("utf-8", "replace")
            i += size
        elif kind in _FIXED:
            i += _FIXED[kind]
            if i > len(raw):
                raise FrameError("header value runs past the headers")
        else:
            raise FrameError(f"unknown header value type {kind}")
    return out


class FrameDecoder:
    """Complete, CRC-checked frames out of chunks of any size."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.corrupt = ""  # why the stream stopped being trusted ("" while it is)
        self.frames = 0

    def feed(self, chunk: bytes) -> list[Frame]:
        if self.corrupt:
            return []
        self._buf += chunk
        out: list[Frame] = []
        while len(self._buf) >= PRELUDE_BYTES:
            total, hlen, prelude_crc = struct.unpack_from(">III", self._buf, 0)
            if zlib.crc32(bytes(self._buf[:8])) != prelude_crc:
                return self._fail(out, "prelude CRC mismatch")
            if total < MIN_FRAME_BYTES or total > MAX_FRAME_BYTES \
                    or hlen > total - MIN_FRAME_BYTES:
                return self._fail(out, f"impossible frame length {total} (headers {hlen})")
            if len(self._buf) < total:
                break
            frame = bytes(self._buf[:total])
            (msg_crc,) = struct.unpack_from(">I", frame, total - 4)
            if zlib.crc32(frame[:total - 4]) != msg_crc:
                return self._fail(out, "message CRC mismatch")
            try:
                headers = parse_headers(frame[PRELUDE_BYTES:PRELUDE_BYTES + hlen])
            except FrameError as exc:
                return self._fail(out, str(exc))
            del self._buf[:total]
            self.frames += 1
            out.append(Frame(headers, frame[PRELUDE_BYTES + hlen:total - 4]))
        return out

    def _fail(self, out: list[Frame], why: str) -> list[Frame]:
        self.corrupt = why
        self._buf.clear()
        return out

    @property
    def pending(self) -> int:
        """Bytes of a frame not yet complete (a stream that ends here was cut)."""
        return len(self._buf)
