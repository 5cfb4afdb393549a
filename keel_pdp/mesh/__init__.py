"""Service-mesh integration: Envoy ext_authz before the provider call, ext_proc after it.

``keel-pdp serve`` calls ``services(engine, metrics)`` and adds what it returns
to its gRPC server, so Envoy (or an Istio sidecar) reaches both services on
the sidecar's one port:

* ``envoy.service.auth.v3.Authorization`` (keel_pdp.mesh.authz): Authorize.
* ``envoy.service.ext_proc.v3.ExternalProcessor`` (keel_pdp.mesh.extproc):
  output-cap enforcement on the request body, Closeout or Void on the response.

This module imports nothing heavy; Envoy's protobuf types load when a server
is built. See docs/mesh.md for the Envoy configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

    from keel_pdp.engine import Engine
    from keel_pdp.mesh.config import MeshConfig
    from keel_pdp.metrics import Metrics

__all__ = ["services"]


def services(engine: Engine, metrics: Metrics, cfg: MeshConfig | None = None
             ) -> list[Callable[[grpc.aio.Server], list[str]]]:
    """Callables that each add one Envoy-facing servicer and return its full service name."""
    from keel_pdp.mesh import envoy_types as et
    from keel_pdp.mesh.authz import AuthorizationServicer
    from keel_pdp.mesh.config import MeshConfig
    from keel_pdp.mesh.extproc import ExternalProcessorServicer
    from keel_pdp.mesh.metrics import MeshMetrics
    from keel_pdp.mesh.watch import PermitWatch

    conf = cfg if cfg is not None else MeshConfig.from_env()
    mesh_metrics = MeshMetrics(metrics)
    watch = PermitWatch(engine, mesh_metrics, conf.unseen_permit_s)
    authz = AuthorizationServicer(engine, mesh_metrics, conf, watch)
    proc = ExternalProcessorServicer(engine, mesh_metrics, conf, watch)

    def add_authz(server: grpc.aio.Server) -> list[str]:
        et.auth_grpc.add_AuthorizationServicer_to_server(authz, server)
        return [et.AUTHZ_SERVICE]

    def add_ext_proc(server: grpc.aio.Server) -> list[str]:
        et.proc_grpc.add_ExternalProcessorServicer_to_server(proc, server)
        return [et.EXT_PROC_SERVICE]

    return [add_authz, add_ext_proc]
