"""keel_pdp.mesh as the CLI uses it: a cheap import, and services that reflection lists."""

from __future__ import annotations

import subprocess
import sys

import fakeredis
import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from keel_pdp.mesh import services
from keel_pdp.mesh.config import MeshConfig
from keel_pdp.metrics import Metrics
from keel_pdp.server.service import build_server
from tests.conftest import ROOT
from tests.helpers import make_engine


def test_importing_the_package_loads_no_grpc_or_envoy_types() -> None:
    code = ("import sys, keel_pdp.mesh; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'envoy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


async def test_services_register_authorization_and_ext_proc_for_reflection() -> None:
    engine = make_engine(fakeredis.FakeAsyncRedis(), ROOT / "tests" / "fixtures" /
                         "mesh_policies")
    adders = services(engine, Metrics(), MeshConfig())
    assert len(adders) == 2
    server, _, port = build_server(engine, engine.metrics, "127.0.0.1:0", extra_services=adders)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)

            async def ask() -> list[str]:
                req = reflection_pb2.ServerReflectionRequest(list_services="")
                async for resp in stub.ServerReflectionInfo(iter([req])):
                    return [s.name for s in resp.list_services_response.service]
                return []

            names = await ask()
        assert "envoy.service.auth.v3.Authorization" in names
        assert "envoy.service.ext_proc.v3.ExternalProcessor" in names
    finally:
        await server.stop(0)
