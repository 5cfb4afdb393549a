"""The PolicyDecisionPoint servicer and the server that hosts it.

Health (grpc.health.v1) and reflection share the port. Health reports
NOT_SERVING until the first good policy bundle is loaded and again while
draining on SIGTERM.
"""

from __future__ import annotations

import logging
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
from keel_pdp.server.guard import FIRST_MESSAGE_TIMEOUT_S, ServerGuard

log = logging.getLogger("keel_pdp.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PolicyDecisionPoint"].full_name


def _deadline(context: grpc.aio.ServicerContext[Any, Any]) -> float | None:
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 3600 else None


class PdpServicer(pb_grpc.PolicyDecisionPointServicer):
    """Latency, status counts, admission and undecodable requests are the
    interceptor's (``guard.ServerGuard``); here: proto <-> domain, and every
    failure made a decision."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics

    def _failed(self, method: str) -> None:
        log.exception("%s failed unexpectedly; answering with the fail-mode decision", method)
        self.metrics.child(self.metrics.internal_errors, method).inc()

    async def Authorize(
        self, request: pb.AuthorizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.AuthorizeResponse:
        inp = convert.authorize_input(request)
        try:
            out = await self.engine.authorize(inp, _deadline(context))
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise  # unreachable: abort raises
        except Exception:
            # Invariant 7: each budget's fail mode decides, as for a store outage.
            self._failed("Authorize")
            out = self.engine.decide_on_failure(inp)
        return convert.authorize_response(out)

    async def Closeout(
        self, request: pb.CloseoutRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CloseoutResponse:
        has_cost = request.HasField("provider_cost_micros")
        cost = request.provider_cost_micros if has_cost else None
        try:
            out = await self.engine.closeout(
                request.permit_id, convert.usage(request.usage),
                convert.outcome_name(request.outcome), cost, _deadline(context),
                service_tier=request.service_tier)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        except Exception:
            # Nothing was booked by this call that a retry would book twice
            # (Closeout is idempotent by permit): ask for the retry.
            self._failed("Closeout")
            return pb.CloseoutResponse(status=pb.CLOSEOUT_STORE_UNAVAILABLE)
        return convert.closeout_response(out)

    async def Void(
        self, request: pb.VoidRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.VoidResponse:
        try:
            out = await self.engine.void(request.permit_id, request.reason, _deadline(context))
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise
        except Exception:
            self._failed("Void")
            return pb.VoidResponse(status=pb.VOID_STORE_UNAVAILABLE)
        return convert.void_response(out)


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
                 max_concurrent_rpcs: int | None = None,
                 first_message_timeout_s: float = FIRST_MESSAGE_TIMEOUT_S,
                 interceptors: list[Any] | None = None,
                 ) -> tuple[grpc.aio.Server, Health, int]:
    """``max_concurrent_rpcs``: beyond it, calls whose request has arrived are refused
    at once with RESOURCE_EXHAUSTED instead of queueing (memory stays bounded); calls
    still waiting for their request are not counted (see ``guard``), and health
    checks are never refused. One HTTP/2 connection may open twice that many streams
    (at least 100): enough that a caller is refused by admission rather than queued
    by its own connection, few enough that one connection cannot hold unbounded idle
    streams."""
    options: list[tuple[str, Any]] = [("grpc.so_reuseport", 1 if reuse_port else 0)]
    if max_concurrent_rpcs is not None:
        options.append(("grpc.max_concurrent_streams", max(100, 2 * max_concurrent_rpcs)))
    guard = ServerGuard(metrics, max_concurrent_rpcs=max_concurrent_rpcs,
                        first_message_timeout_s=first_message_timeout_s)
    # ``interceptors`` (the caller identity checks) run inside the guard, next to
    # the servicers, whose unary handlers they wrap.
    server = grpc.aio.server(options=options, interceptors=[guard, *(interceptors or ())])
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
