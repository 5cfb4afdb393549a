"""Envoy's API types (PyPI ``xds-protos``), imported in one place.

The package ships no type information, so its modules are typed ``Any`` here
and nowhere else. Importing this module costs about 0.1 s; the mesh package's
``__init__`` does not import it until a server is built.
"""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2 as _base  # type: ignore[import-untyped]
from envoy.extensions.filters.http.ext_proc.v3 import (  # type: ignore[import-untyped]
    processing_mode_pb2 as _mode,
)
from envoy.service.auth.v3 import (  # type: ignore[import-untyped]
    external_auth_pb2 as _auth,
)
from envoy.service.auth.v3 import external_auth_pb2_grpc as _auth_grpc
from envoy.service.ext_proc.v3 import (  # type: ignore[import-untyped]
    external_processor_pb2 as _proc,
)
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as _proc_grpc
from envoy.type.v3 import http_status_pb2 as _status  # type: ignore[import-untyped]
from google.protobuf import struct_pb2
from google.rpc import status_pb2 as _rpc_status  # type: ignore[import-untyped]

base: Any = _base
mode: Any = _mode
auth: Any = _auth
auth_grpc: Any = _auth_grpc
proc: Any = _proc
proc_grpc: Any = _proc_grpc
http_status: Any = _status
rpc_status: Any = _rpc_status
Struct = struct_pb2.Struct

AUTHZ_SERVICE: str = _auth.DESCRIPTOR.services_by_name["Authorization"].full_name
EXT_PROC_SERVICE: str = _proc.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name

OVERWRITE: int = _base.HeaderValueOption.HeaderAppendAction.Value("OVERWRITE_IF_EXISTS_OR_ADD")
BODY_NONE: int = _mode.ProcessingMode.BodySendMode.Value("NONE")
BODY_STREAMED: int = _mode.ProcessingMode.BodySendMode.Value("STREAMED")
BODY_BUFFERED: int = _mode.ProcessingMode.BodySendMode.Value("BUFFERED")
HEADERS_SEND: int = _mode.ProcessingMode.HeaderSendMode.Value("SEND")
HEADERS_SKIP: int = _mode.ProcessingMode.HeaderSendMode.Value("SKIP")


def header_option(key: str, value: str) -> Any:
    """A header to set (replacing any value the client sent), for ext_authz."""
    return _base.HeaderValueOption(header=_base.HeaderValue(key=key, value=value),
                                   append_action=OVERWRITE)


def raw_header_option(key: str, value: str) -> Any:
    """A header to set for ext_proc, which reads values from ``raw_value``."""
    return _base.HeaderValueOption(
        header=_base.HeaderValue(key=key, raw_value=value.encode("utf-8")),
        append_action=OVERWRITE)


def header_map(headers: Any) -> dict[str, str]:
    """An Envoy HeaderMap (ext_proc, or ext_authz with encode_raw_headers) as a dict."""
    out: dict[str, str] = {}
    for h in headers.headers:
        value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        key = h.key.lower()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out
