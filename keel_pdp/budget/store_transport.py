"""The transports of the budget store: what it needs from a Redis client
(``Transport``, ``WaitingTransport`` for ``WAIT`` after a script) and redis-py
(or fakeredis) behind that interface. The RESP client and the cluster client
implement it as they are.

Kept apart from the store so the interface is read in one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis

from keel_pdp.budget.resp_pack import Shared
from keel_pdp.budget.store_types import Arg


class Transport(Protocol):
    """What the store needs from a Redis client: scripts, plain commands, close."""

    def script(self, source: str) -> Any: ...

    async def eval_script(self, script: Any, keys: Sequence[str], args: Sequence[Arg],
                          timeout_s: float, shared: Shared | None = None) -> Any: ...

    async def command(self, *args: Arg, timeout_s: float) -> Any: ...

    async def close(self) -> None: ...


class WaitingTransport(Transport, Protocol):
    """A transport that can send ``WAIT`` right after a script on its connection."""

    async def eval_script_wait(self, script: Any, keys: Sequence[str], args: Sequence[Arg],
                               timeout_s: float, shared: Shared | None, replicas: int,
                               wait_ms: int) -> tuple[Any, int]: ...


class RedisPyTransport:
    """redis-py (or fakeredis) behind the transport interface."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    def script(self, source: str) -> Any:
        return self.client.register_script(source)

    async def eval_script(self, script: Any, keys: Sequence[str], args: Sequence[Arg],
                          timeout_s: float, shared: Shared | None = None) -> Any:
        every_arg: list[Any] = list(args)
        if shared is not None:
            keys, every_arg = [*keys, *shared.keys], [*shared.args, *args]
        return await asyncio.wait_for(script(keys=keys, args=every_arg), timeout=timeout_s)

    async def command(self, *args: Arg, timeout_s: float) -> Any:
        return await asyncio.wait_for(
            self.client.execute_command(*args),  # type: ignore[no-untyped-call]
            timeout=timeout_s)

    async def close(self) -> None:
        await self.client.aclose()
