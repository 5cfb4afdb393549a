"""A byte-scripted HTTP answer, for "providers" that misbehave on purpose.

A script is a list of steps played on the connection after the request was read:
bytes to write, a pause (float seconds), ``"reset"`` (abort with an RST, not a
FIN) or ``"close"`` (stop writing; the connection then closes cleanly). The
hostile mesh and client tests answer through it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

Step = bytes | float | str

_LINGER_ZERO = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # struct linger {on, 0 s}: RST on close


async def play(writer: asyncio.StreamWriter, steps: Sequence[Step]) -> None:
    """Play ``steps`` on ``writer``; returns after "reset" (the connection aborted),
    "close" or the last step."""
    for step in steps:
        if isinstance(step, bytes):
            writer.write(step)
            await writer.drain()
        elif isinstance(step, float):
            await asyncio.sleep(step)
        elif step == "reset":
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            writer.transport.abort()
            return
        elif step == "close":
            return
