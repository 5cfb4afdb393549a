"""``keel-pdp mesh ...``: print an Envoy bootstrap, run the mock provider.

Imported by the CLI on every start: the Envoy and YAML code loads only when a command runs.
"""

from __future__ import annotations

import argparse
import pathlib
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
                       aws_sign_region=ns.aws_sign_region, keel_workers=ns.keel_workers)
    yaml.safe_dump(bootstrap(setup), sys.stdout, sort_keys=False)
    return 0


def _route(ns: argparse.Namespace) -> int:
    """Which API, provider and model a provider call resolves to, and its price."""
    from keel_pdp.mesh.config import MeshConfig
    from keel_pdp.mesh.request import CAP_FIELDS

    cfg = MeshConfig.from_env()
    snap = None
    if ns.policies:
        from keel_pdp.policy.loader import PolicyError, load_bundle

        try:
            snap = load_bundle(ns.policies)
        except PolicyError as exc:
            print(f"error: {ns.policies}: {exc}", file=sys.stderr)
            return 1
    host = ns.host or ""
    res = cfg.resolve(ns.method, ns.path, host, ns.provider, snap)
    if res is None:
        listed = cfg.listed_unmetered(host, ns.path)
        verdict = ("passed unmetered (KEEL_MESH_UNMETERED_ROUTES)" if listed else
                   "refused: 403 NOT_METERED" + (" (a provider host)"
                                                 if cfg.is_provider_host(host) else ""))
        print(f"{ns.method} {host}{ns.path.split('?', 1)[0]}: not a metered API; {verdict}")
        return 0 if listed else 1
    route, provider = res.route, res.provider
    model = res.model or ns.model or "(the body's model)"
    where = ""
    if route.deployment:
        where = f"  (Azure deployment {route.deployment}, from {res.model_source}" + (
            "; give --policies for the bundle's map)" if snap is None else ")")
    print(f"api:      {route.api}")
    print(f"provider: {provider}")
    print(f"model:    {model}{where}")
    print(f"cap:      {', '.join(CAP_FIELDS[route.api]) or '(none: input only)'}")
    print(f"stream:   {'by path' if route.stream else 'by the body'}")
    if snap is not None and not model.startswith("("):
        from decimal import Decimal

        found = snap.price_for(provider, model)
        if found is None:
            print("price:    none: refused as UNKNOWN_MODEL_PRICE")
        else:
            per_m = {k: Decimal(getattr(found.price, k)) / 1_000_000
                     for k in ("input", "cached_input", "cache_write", "output")}
            print("price:    USD per million tokens: " + ", ".join(
                f"{k} {v.normalize():f}" for k, v in per_m.items())
                + (f"; {len(found.tiers)} long-context tier(s)" if found.tiers else "")
                + ("; service tiers " + ", ".join(n for n, _ in found.service_tiers)
                   if found.service_tiers else ""))
    return 0


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
    ec.add_argument("--keel-workers", type=int, default=0, metavar="N",
                    help="Keel runs --workers N --worker-ports: balance over the workers' "
                         "own ports (--keel's port + 1 .. + N) instead of the shared one")
    ec.add_argument("--mode", choices=("split", "split-ungated", "single"), default="split",
                    help="filter shape (docs/mesh.md): cap + observability-mode closeout "
                    "(default), the same with the cap on every route, or one ext_proc")
    ec.add_argument("--aws-sign-region", default="",
                    help="re-sign requests (SigV4, Bedrock) after Keel's filters for this "
                    "region; run the sidecar with KEEL_MESH_RESIGN_SIGNED=true")
    ec.set_defaults(func=_envoy_config)
    rt = msub.add_parser("route", help="which API, provider and model a provider call "
                         "resolves to on the Envoy path (and its price with --policies)")
    rt.add_argument("path", help="the request path, e.g. /v1beta/models/gemini-2.5-pro:"
                    "generateContent")
    rt.add_argument("--method", default="POST")
    rt.add_argument("--host", default="", help="the :authority the call goes to")
    rt.add_argument("--provider", default="", help="as x-keel-provider would name it")
    rt.add_argument("--model", default="", help="the body's model, where the path has none")
    rt.add_argument("--policies", type=pathlib.Path, default=None,
                    help="a bundle directory: resolve Azure deployments through its "
                    "Deployments map and print the price the model resolves to")
    rt.set_defaults(func=_route)
