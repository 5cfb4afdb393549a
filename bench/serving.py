"""Shared by the benchmarks' own gRPC servers: listen, announce, stop on a signal."""

from __future__ import annotations

import asyncio
import signal

import grpc


async def serve_until_signalled(server: grpc.aio.Server, port: int, label: str) -> None:
    """Listen on 127.0.0.1:``port``, print the line the harness waits for, and
    serve until SIGTERM or SIGINT."""
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    print(f"gRPC listening on 127.0.0.1:{port} ({label})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(1)
