"""Builders for test policy bundles and engines."""

from __future__ import annotations

import binascii
import pathlib
import time
from typing import Any

import grpc
import redis.asyncio as aioredis
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keel_pdp.budget.keys import KeySpace, shape_copy_key
from keel_pdp.budget.replies import hold_reply
from keel_pdp.budget.resp import RespClient
from keel_pdp.budget.store import BudgetStore
from keel_pdp.engine import Engine
from keel_pdp.events import entry_shape, entry_with_shape
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder

# A script that keeps Redis busy for ARGV[1] ms: every command queued behind it
# (an Authorize's hold script included) runs after the sidecar gave up waiting.
BUSY_LUA = """
local t0 = redis.call('TIME')
local start = t0[1] * 1000000 + t0[2]
repeat
  local t = redis.call('TIME')
until t[1] * 1000000 + t[2] - start >= tonumber(ARGV[1]) * 1000
return 1
"""


PRICES: dict[str, Any] = {
    "openai": {
        "gpt-4o-mini": {"input": "0.15", "cached_input": "0.075", "output": "0.60",
                        "max_output_tokens": 1000},
        "gpt-4.1": {"input": "2.00", "cached_input": "0.50", "output": "8.00",
                    "max_output_tokens": 1000},
    },
    "anthropic": {
        "claude-sonnet-4-5": {"input": "3.00", "cached_input": "0.30", "cache_write": "3.75",
                              "output": "15.00", "max_output_tokens": 1000},
    },
}


def write_bundle(directory: pathlib.Path, budgets: list[dict[str, Any]], *,
                 settings: dict[str, Any] | None = None,
                 routes: list[dict[str, Any]] | None = None,
                 prices: dict[str, Any] | None = None, revision: str = "test-r1",
                 exception_paths: list[dict[str, Any]] | None = None) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    bundle: dict[str, Any] = {"apiVersion": "keel.pdp/v1", "kind": "Bundle",
                              "revision": revision,
                              "settings": {"min_output_tokens": 10, **(settings or {})},
                              "exception_paths": exception_paths or [{"name": "finance-overage"}]}
    (directory / "bundle.yaml").write_text(yaml.safe_dump(bundle))
    (directory / "prices.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "keel.pdp/v1", "kind": "PriceTable", "revision": "p1",
         "providers": prices or PRICES}))
    (directory / "budgets.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "keel.pdp/v1", "kind": "Budgets", "budgets": budgets}))
    if routes is not None:
        (directory / "routes.yaml").write_text(yaml.safe_dump(
            {"apiVersion": "keel.pdp/v1", "kind": "Routes", "rules": routes}))
    return directory


def budget(bid: str, cap_usd: str, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": bid, "cap_usd": cap_usd, "window": kw.pop("window", "daily")}
    out.update(kw)
    return out


def make_engine(client: aioredis.Redis, bundle_dir: pathlib.Path,
                timeout_s: float = 1.0, *, stored_shapes: bool = True) -> Engine:
    holder = PolicyHolder(bundle_dir)
    holder.set(load_bundle(bundle_dir))
    resp_url = getattr(client, "keel_resp_url", None)  # tests.conftest.RESP_URL_ATTR
    if resp_url:
        # The production transport for the scripts; the test's redis-py client for the
        # administrative reads, as `keel-pdp serve` would build them lazily.
        store = BudgetStore(client, KeySpace("t"), timeout_s,
                            transport=RespClient.from_url(resp_url), stored_shapes=stored_shapes)
    else:
        store = BudgetStore(client, KeySpace("t"), timeout_s, stored_shapes=stored_shapes)
    return Engine(holder, store, Metrics())


def wait_serving(channel: grpc.Channel, timeout: float = 20) -> None:
    """Until the sidecar's health service answers SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError("sidecar never became SERVING")


def wait_ready(port: int) -> None:
    """Until the sidecar on 127.0.0.1:``port`` answers SERVING."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        wait_serving(channel)


def stop_processes(procs: list[Any]) -> None:
    """SIGTERM every process still running, then wait for each (kill after 20 s)."""
    import signal
    import subprocess

    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate(timeout=5)


def reference_slot(key: str | bytes) -> int:
    """Redis Cluster's key slot, written from the specification with the standard
    library's CRC-CCITT (XMODEM): an independent second opinion on
    ``keel_pdp.budget.cluster.key_slot``. A str key is taken as UTF-8."""
    raw = key.encode() if isinstance(key, str) else key
    s = raw.find(b"{")
    if s != -1:
        e = raw.find(b"}", s + 1)
        if e != -1 and e != s + 1:
            raw = raw[s + 1:e]
    return binascii.crc_hqx(raw, 0) % 16384


async def window_sum(engine: Engine, field: str = "h") -> int:
    """Micro-USD held ("h") or settled ("s") now in the windows of the bundle's one
    budget "all" (key space "t", as make_engine builds it)."""
    client: Any = engine.store.client
    total = 0
    async for key in client.scan_iter(match="t:{pdp}:b:all:*"):
        total += int(await client.hget(key, field) or 0)
    return total


# --------------------------------------------------------------- stream readers
# Decisions written by the authorize script refer to a stored copy of their
# shape's members; these read a stream as the ledger writer does, with each copy
# read in (an entry whose copy is missing is left as it is).
def _copy_key(stream: str, fields: Any) -> tuple[str, str] | None:
    """(digest, key) of the shape copy an entry refers to; None when it has none."""
    digest = entry_shape(fields)
    return None if digest is None else (digest, shape_copy_key(stream, digest))


def _with_copies(stream: str, entries: Any, read: Any) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    for eid, fields in entries:
        ref = _copy_key(stream, fields)
        if ref is not None and (copy := read(ref[1])) is not None:
            fields = entry_with_shape(fields, ref[0], copy, ref[1])
        out.append((eid, fields))
    return out


async def read_stream(client: Any, stream: str, **kwargs: Any) -> list[tuple[Any, Any]]:
    """XRANGE of ``stream`` (async client), shape copies read in."""
    entries = await client.xrange(stream, **kwargs)
    keys = {ref[1] for _, f in entries if (ref := _copy_key(stream, f)) is not None}
    copies = {key: await client.get(key) for key in keys}
    return _with_copies(stream, entries, copies.get)


def read_stream_sync(client: Any, stream: str, **kwargs: Any) -> list[tuple[Any, Any]]:
    """XRANGE of ``stream`` (redis-py client), shape copies read in."""
    return with_copies_sync(client, stream, client.xrange(stream, **kwargs))


def with_copies_sync(client: Any, stream: str, entries: Any) -> list[tuple[Any, Any]]:
    """Entries read from ``stream`` (redis-py client), shape copies read in."""
    return _with_copies(stream, entries, client.get)


def record_authorize_calls(engine: Engine) -> list[str]:
    """What each of the engine's authorize script calls answered from now on
    ("lease", "shape", "replay", ... or "decided"), in order."""
    answers: list[str] = []
    store = engine.store
    original = store.transport.eval_script

    async def recorded(script: Any, *args: Any, **kw: Any) -> Any:
        reply = await original(script, *args, **kw)
        if script is store._authorize:
            answers.append(hold_reply(reply).outcome)
        return reply

    store.transport.eval_script = recorded  # type: ignore[method-assign]
    return answers
