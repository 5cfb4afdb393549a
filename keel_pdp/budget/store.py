"""The budget store: one typed async method per Lua script.

This is the only module that talks to Redis for holds. Each method is one
script call (one round trip); every key a script touches is passed in KEYS.
Any Redis failure or timeout surfaces as ``StoreUnavailable`` so the caller
can apply the budgets' fail modes.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from keel_pdp.budget.keys import KeySpace


class StoreUnavailable(Exception):
    """Redis did not answer, or answered with an error, within the store timeout."""


def _lua(name: str) -> str:
    return resources.files("keel_pdp.budget").joinpath("lua", name).read_text()


@dataclass(frozen=True, slots=True)
class HoldRequest:
    permit_id: str
    idempotency_key: str
    fingerprint: str
    now_ms: int
    expires_at_ms: int
    idempotency_ttl_s: int
    permit_retention_s: int
    input_pico: int
    output_price_pico: int
    output_tokens: int
    min_output_tokens: int
    allow_constrain: bool
    event_data: str
    permit_meta: str
    window_keys: tuple[str, ...]
    limits: tuple[int, ...]
    enforce: tuple[bool, ...]
    window_expire_at_s: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class PermitRecord:
    keys: tuple[str, ...]
    meta: dict[str, Any]
    state: str


def _decode(raw: Any) -> dict[str, Any]:
    text = raw.decode() if isinstance(raw, bytes | bytearray) else str(raw)
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StoreUnavailable(f"unexpected script answer {text[:80]!r}")
    # cjson encodes an empty Lua table as {} instead of [].
    for k in ("b", "shadow"):
        if value.get(k) == {}:
            value[k] = []
    return value


class BudgetStore:
    def __init__(self, client: aioredis.Redis, keys: KeySpace, timeout_s: float = 0.025) -> None:
        self.client = client
        self.keys = keys
        self.timeout_s = timeout_s
        self._authorize = client.register_script(_lua("authorize.lua"))
        self._closeout = client.register_script(_lua("closeout.lua"))
        self._release = client.register_script(_lua("release.lua"))
        self._record = client.register_script(_lua("record.lua"))

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "keel", timeout_s: float = 0.025,
                 max_connections: int = 64) -> BudgetStore:
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=max(timeout_s * 4, 0.25),
            socket_connect_timeout=max(timeout_s * 4, 0.25),
            max_connections=max_connections,
            health_check_interval=0,
            retry_on_timeout=False,
        )
        return cls(client, KeySpace(prefix), timeout_s)

    async def _run(self, coro: Any, timeout_s: float | None) -> Any:
        budget = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        try:
            return await asyncio.wait_for(coro, timeout=max(budget, 0.001))
        except (TimeoutError, RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def hold(self, r: HoldRequest, timeout_s: float | None = None) -> dict[str, Any]:
        keys = [r.idempotency_key, self.keys.permit(r.permit_id), self.keys.expiries,
                self.keys.stream, *r.window_keys]
        args: list[str | int] = [
            r.permit_id, r.fingerprint, r.now_ms, r.expires_at_ms, r.idempotency_ttl_s,
            r.permit_retention_s, r.input_pico, r.output_price_pico, r.output_tokens,
            r.min_output_tokens, 1 if r.allow_constrain else 0, r.event_data, r.permit_meta,
            len(r.window_keys),
        ]
        for limit, enforce, wx in zip(r.limits, r.enforce, r.window_expire_at_s, strict=True):
            args.extend((limit, 1 if enforce else 0, wx))
        return _decode(await self._run(self._authorize(keys=keys, args=args), timeout_s))

    async def settle(self, permit_id: str, window_keys: tuple[str, ...], now_ms: int,
                     actual_micros: int, event_data: str,
                     timeout_s: float | None = None) -> dict[str, Any]:
        keys = [self.keys.permit(permit_id), self.keys.stream, self.keys.expiries, *window_keys]
        args: list[str | int] = [permit_id, now_ms, actual_micros, event_data]
        return _decode(await self._run(self._closeout(keys=keys, args=args), timeout_s))

    async def release(self, permit_id: str, window_keys: tuple[str, ...], now_ms: int,
                      target: str, event_data: str,
                      timeout_s: float | None = None) -> dict[str, Any]:
        keys = [self.keys.permit(permit_id), self.keys.stream, self.keys.expiries, *window_keys]
        args: list[str | int] = [permit_id, now_ms, target, event_data]
        return _decode(await self._run(self._release(keys=keys, args=args), timeout_s))

    async def record(self, event_type: str, permit_id: str, ts_ms: int, event_data: str,
                     result: str, timeout_s: float | None = None, *,
                     settle_keys: tuple[str, ...] = (), settle_micros: int = 0,
                     expire_at_s: tuple[int, ...] = ()) -> str:
        args: list[str | int] = [event_type, permit_id, ts_ms, event_data, result, settle_micros]
        args.extend(expire_at_s)
        out = await self._run(
            self._record(keys=[self.keys.stream, *settle_keys], args=args), timeout_s)
        return out.decode() if isinstance(out, bytes) else str(out)

    async def permit(self, permit_id: str, timeout_s: float | None = None) -> PermitRecord | None:
        raw = await self._run(
            self.client.hmget(self.keys.permit(permit_id), "keys", "meta", "state"), timeout_s)
        if raw[0] is None:
            return None
        keys = tuple(raw[0].decode().split("\n")) if raw[0] else ()
        meta = json.loads(raw[1]) if raw[1] else {}
        return PermitRecord(keys, meta, raw[2].decode() if raw[2] else "")

    async def due_expiries(self, now_ms: int, limit: int = 200) -> list[str]:
        raw = await self._run(
            self.client.zrangebyscore(self.keys.expiries, "-inf", now_ms, start=0, num=limit),
            max(self.timeout_s, 1.0))
        return [r.decode() if isinstance(r, bytes) else str(r) for r in raw]

    async def window(self, key: str) -> tuple[int, int]:
        raw = await self.client.hmget(key, "s", "h")
        return int(raw[0] or 0), int(raw[1] or 0)

    async def ping(self) -> bool:
        try:
            await self._run(self.client.ping(), max(self.timeout_s, 0.5))
            return True
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        await self.client.aclose()


def now_ms() -> int:
    return time.time_ns() // 1_000_000
