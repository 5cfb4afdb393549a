"""``serve --worker-ports`` settings and the Envoy cluster that balances over the workers."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import pytest
import yaml

from keel_pdp import cli
from keel_pdp.mesh import commands
from keel_pdp.mesh.envoyconf import EnvoySetup, bootstrap, keel_ports
from keel_pdp.settings import SettingsError, serve_settings


def settings(*argv: str, env: dict[str, str] | None = None) -> Any:
    ns = cli.build_parser().parse_args(["serve", *argv])
    return serve_settings(ns, env or {})


def keel_cluster(config: dict[str, Any]) -> dict[str, Any]:
    clusters = config["static_resources"]["clusters"]
    found: dict[str, Any] = next(c for c in clusters if c["name"] == "keel")
    return found


def endpoint_ports(cluster: dict[str, Any]) -> list[int]:
    eps = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return [e["endpoint"]["address"]["socket_address"]["port_value"] for e in eps]


def test_worker_ports_default_off_and_set_by_flag_or_environment() -> None:
    assert settings().worker_ports is False
    assert settings("--worker-ports", "--workers", "4").worker_ports is True
    assert settings(env={"KEEL_WORKER_PORTS": "true"}).worker_ports is True


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.1:65534"])
def test_worker_ports_need_a_fixed_listen_port_with_room_above_it(listen: str) -> None:
    with pytest.raises(SettingsError) as exc:
        settings("--worker-ports", "--workers", "2", "--listen", listen)
    msg = str(exc.value)
    assert "--worker-ports" in msg and "KEEL_WORKER_PORTS" in msg
    assert listen.rpartition(":")[2] in msg


def test_worker_ports_bad_boolean_is_refused_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="KEEL_WORKER_PORTS"):
        settings(env={"KEEL_WORKER_PORTS": "sometimes"})


def test_envoy_cluster_balances_round_robin_over_the_workers_own_ports() -> None:
    setup = EnvoySetup(listen_port=10000, keel=("127.0.0.1", 50051),
                       upstream=("127.0.0.1", 8081), keel_workers=3)
    assert keel_ports(setup) == (50052, 50053, 50054)
    cluster = keel_cluster(bootstrap(setup))
    assert endpoint_ports(cluster) == [50052, 50053, 50054]
    assert cluster["lb_policy"] == "ROUND_ROBIN"
    # HTTP/2 to every endpoint, as for the one shared port.
    opts = cluster["typed_extension_protocol_options"]
    assert "http2_protocol_options" in str(opts)


def test_envoy_cluster_without_workers_is_the_one_shared_port() -> None:
    setup = EnvoySetup(listen_port=10000, keel=("127.0.0.1", 50051),
                       upstream=("127.0.0.1", 8081))
    cluster = keel_cluster(bootstrap(setup))
    assert endpoint_ports(cluster) == [50051]
    assert "lb_policy" not in cluster


def test_envoy_config_command_takes_the_worker_count() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["mesh", "envoy-config", "--keel", "127.0.0.1:7000",
                         "--keel-workers", "2"])
    assert code == 0
    assert endpoint_ports(keel_cluster(yaml.safe_load(out.getvalue()))) == [7001, 7002]
    assert commands is not None
