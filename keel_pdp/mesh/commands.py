"""``keel-pdp mesh ...``: print an Envoy bootstrap, run the mock provider.

Imported by the CLI on every start: the Envoy and YAML code loads only when a command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} must be HOST:PORT")
    return host, int(port)


def _envoy_config(ns: argparse.Namespace) -> int:
    import yaml

    from keel_pdp.mesh.envoyconf import EnvoySetup, bootstrap

    setup = EnvoySetup(listen_port=ns.listen_port, keel=ns.keel, upstream=ns.upstream,
                       admin_port=ns.admin_port, plain_port=ns.plain_port,
                       authz_timeout_s=ns.authz_timeout_ms / 1000, mode=ns.mode,
                       aws_sign_region=ns.aws_sign_region)
    yaml.safe_dump(bootstrap(setup), sys.stdout, sort_keys=False)
    return 0


def _mock(ns: argparse.Namespace) -> int:
    from keel_pdp.mesh import mockprovider

    return mockprovider.run(ns)


def register(sub: Any) -> None:
    p = sub.add_parser("mesh", help="Envoy integration helpers")
    msub = p.add_subparsers(dest="mesh_command", required=True)
    ec = msub.add_parser("envoy-config",
                         help="print an Envoy bootstrap with Keel as ext_authz and ext_proc")
    ec.add_argument("--listen-port", type=int, default=10000)
    ec.add_argument("--keel", type=_hostport, default=("127.0.0.1", 50051),
                    help="the sidecar's gRPC HOST:PORT")
    ec.add_argument("--upstream", type=_hostport, default=("127.0.0.1", 8081),
                    help="the provider (plain HTTP) HOST:PORT")
    ec.add_argument("--admin-port", type=int, default=9901)
    ec.add_argument("--plain-port", type=int, default=0,
                    help="also a listener without Keel (0: none)")
    ec.add_argument("--authz-timeout-ms", type=int, default=250)
    ec.add_argument("--mode", choices=("split", "split-ungated", "single"), default="split",
                    help="filter shape (docs/mesh.md): cap + observability-mode closeout "
                    "(default), the same with the cap on every route, or one ext_proc")
    ec.add_argument("--aws-sign-region", default="",
                    help="re-sign requests (SigV4, Bedrock) after Keel's filters for this "
                    "region; run the sidecar with KEEL_MESH_RESIGN_SIGNED=true")
    ec.set_defaults(func=_envoy_config)
    mp = msub.add_parser("mock-provider",
                         help="run the mock LLM provider (OpenAI, Azure, Anthropic, Gemini, "
                         "Vertex, Bedrock formats)")
    from keel_pdp.mesh.mockprovider import build_parser

    build_parser(mp)
    mp.set_defaults(func=_mock)
