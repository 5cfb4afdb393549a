"""The PolicyDecisionPoint servicer and the server that hosts it.

Health (grpc.health.v1) and reflection share the port. Health reports
NOT_SERVING until the first good policy bundle is loaded and again while
draining on SIGTERM.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.decision import InvalidRequest
from keel_pdp.engine import Engine
from keel_pdp.metrics import Metrics
from keel_pdp.server import convert

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PolicyDecisionPoint"].full_name


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 3600 else None


class PdpServicer(pb_grpc.PolicyDecisionPointServicer):
    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._lat_auth = metrics.rpc_latency.labels("Authorize")
        self._lat_close = metrics.rpc_latency.labels("Closeout")
        self._lat_void = metrics.rpc_latency.labels("Void")

    async def _invalid(self, method: str, context: Any, exc: InvalidRequest) -> None:
        self.metrics.rpc_errors.labels(method, "INVALID_ARGUMENT").inc()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    async def Authorize(
        self, request: pb.AuthorizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AuthorizeResponse:
        t0 = time.perf_counter()
        try:
            out = await self.engine.authorize(convert.authorize_input(request), _deadline(context))
            return convert.authorize_response(out)
        except InvalidRequest as exc:
            await self._invalid("Authorize", context, exc)
            raise  # unreachable: abort raises
        finally:
            self._lat_auth.observe(time.perf_counter() - t0)

    async def Closeout(
        self, request: pb.CloseoutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CloseoutResponse:
        t0 = time.perf_counter()
        try:
            has_cost = request.HasField("provider_cost_micros")
            cost = request.provider_cost_micros if has_cost else None
            out = await self.engine.closeout(
                request.permit_id, convert.usage(request.usage),
                convert.outcome_name(request.outcome), cost, _deadline(context))
            return convert.closeout_response(out)
        except InvalidRequest as exc:
            await self._invalid("Closeout", context, exc)
            raise
        finally:
            self._lat_close.observe(time.perf_counter() - t0)

    async def Void(
        self, request: pb.VoidRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.VoidResponse:
        t0 = time.perf_counter()
        try:
            out = await self.engine.void(request.permit_id, request.reason, _deadline(context))
            return convert.void_response(out)
        except InvalidRequest as exc:
            await self._invalid("Void", context, exc)
            raise
        finally:
            self._lat_void.observe(time.perf_counter() - t0)


class DiagnosticsServicer(pb_grpc.DiagnosticsServicer):
    async def Noop(
        self, request: pb.NoopRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.NoopResponse:
        return pb.NoopResponse()


class Health:
    """Wraps the standard health servicer; '' and our service share one status."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]

    async def set(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.servicer.set("", status)
        await self.servicer.set(SERVICE_NAME, status)


def build_server(engine: Engine, metrics: Metrics, listen: str, *,
                 extra_services: list[Any] | None = None,
                 reuse_port: bool = False,
                 credentials: grpc.ServerCredentials | None = None,
                 max_concurrent_rpcs: int | None = None) -> tuple[grpc.aio.Server, Health, int]:
    """``max_concurrent_rpcs``: beyond it, calls are refused at once with
    RESOURCE_EXHAUSTED instead of queueing (memory stays bounded)."""
    options = [("grpc.so_reuseport", 1 if reuse_port else 0)]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)
    pb_grpc.add_PolicyDecisionPointServicer_to_server(PdpServicer(engine, metrics), server)
    pb_grpc.add_DiagnosticsServicer_to_server(DiagnosticsServicer(), server)
    h = Health()
    health_pb2_grpc.add_HealthServicer_to_server(h.servicer, server)
    names = [SERVICE_NAME, pb.DESCRIPTOR.services_by_name["Diagnostics"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME]
    for add in extra_services or []:
        names.extend(add(server))
    reflection.enable_server_reflection(names, server)
    port = (server.add_secure_port(listen, credentials) if credentials is not None
            else server.add_insecure_port(listen))
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    return server, h, port
