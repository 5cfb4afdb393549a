"""deploy/k8s/: valid against the Kubernetes schemas, and consistent with the CLI and each other.

Offline: Kubernetes kinds are checked against the bundled OpenAPI schemas of
``kubernetes-validate`` (strict: unknown fields fail); custom resources
(ServiceMonitor, Istio) and kustomizations are checked by structure. Container
arguments are parsed by the real ``keel-pdp`` argument parser, and ports,
mounts, selectors and the policy bundle must agree across files.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import pathlib
from collections.abc import Iterator
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from keel_pdp import cli
from keel_pdp.mesh.config import EXT_PROC_ROLE, H_ENFORCE, METADATA_NAMESPACE
from keel_pdp.policy.loader import load_bundle
from keel_pdp.server.tls import check_listen
from keel_pdp.settings import add_serve_arguments, serve_settings
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
VERSIONS = ("1.29", "1.33")  # native sidecar containers need 1.29+
CUSTOM = {"Kustomization", "ServiceMonitor", "EnvoyFilter", "ServiceEntry", "DestinationRule"}


def load_all() -> list[tuple[pathlib.Path, dict[str, Any]]]:
    out = []
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


DOCS = load_all()


def find(kind: str, name: str) -> dict[str, Any]:
    for _, doc in DOCS:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in deploy/k8s")


def pod_containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_containers(doc) if c["name"] == name)


def cli_parser(*modules: str) -> argparse.ArgumentParser:
    """The keel-pdp argument parser, built the way ``keel_pdp.cli.main`` builds it
    (``serve``, plus the sub-commands of the named command modules)."""
    parser = argparse.ArgumentParser(prog="keel-pdp")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_arguments(sub.add_parser("serve"))
    for name in modules:
        assert name in cli.COMMAND_MODULES
        importlib.import_module(name).register(sub)
    return parser


def port_of(text: str) -> int:
    return int(text.rpartition(":")[2])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("path", "doc"), [d for d in DOCS if d[1]["kind"] not in CUSTOM],
                         ids=lambda v: v.name if isinstance(v, pathlib.Path) else v["kind"])
def test_kubernetes_kinds_validate_strictly(path: pathlib.Path, doc: dict[str, Any],
                                            version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_rejects_an_unknown_field() -> None:
    bad = copy.deepcopy(find("Deployment", "chat-app"))
    bad["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[0], strict=True)


def test_every_kind_is_known_and_the_kustomizations_list_every_file() -> None:
    kinds = {d["kind"] for _, d in DOCS}
    assert kinds >= {"Deployment", "StatefulSet", "ConfigMap", "Service", "PodDisruptionBudget",
                     "ServiceMonitor", "EnvoyFilter", "NetworkPolicy"}
    for path, doc in DOCS:
        if doc["kind"] != "Kustomization":
            continue
        assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        listed = {path.parent / r for r in doc["resources"]}
        present = {p for p in path.parent.glob("*.yaml") if p.name != "kustomization.yaml"}
        assert listed == present, f"{path}: resources must list every manifest"


def test_sidecar_arguments_parse_with_the_real_cli_and_match_the_ports() -> None:
    app = find("Deployment", "chat-app")
    keel = container(app, "keel-pdp")
    assert keel.get("restartPolicy") == "Always"  # a native sidecar, started before the app
    ns = cli_parser().parse_args(keel["args"])
    assert ns.command == "serve"
    s = serve_settings(ns)
    check_listen(s.listen, None, s.allow_insecure_listen)  # what `serve` checks at start
    netpol = find("NetworkPolicy", "chat-app")
    admitted = {p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]}
    ports = {p["name"]: p["containerPort"] for p in keel["ports"]}
    assert ports["grpc"] not in admitted  # plaintext gRPC: no other pod may reach it
    assert port_of(s.listen) == ports["grpc"]
    assert s.metrics_port == ports["keel-metrics"]
    for probe in ("startupProbe", "readinessProbe"):
        assert keel[probe]["grpc"]["port"] == ports["grpc"]
    assert keel["livenessProbe"]["tcpSocket"]["port"] == ports["grpc"]
    mounts = {m["mountPath"]: m["name"] for m in keel["volumeMounts"]}
    volumes = {v["name"]: v for v in app["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts[s.policies]]["configMap"]["name"] == "keel-policies"
    redis_host = s.redis_url.split("//")[1].split(":")[0]
    redis_svc = find("Service", redis_host)
    assert port_of(s.redis_url.split("/")[2]) == redis_svc["spec"]["ports"][0]["port"]
    order = [c["name"] for c in app["spec"]["template"]["spec"]["initContainers"]]
    assert order.index("keel-pdp") < order.index("envoy")  # Keel ready before Envoy calls it


def test_ledger_writer_arguments_parse_and_read_the_store_from_a_secret() -> None:
    dep = find("Deployment", "keel-ledger")
    c = container(dep, "ledger")
    ns = cli_parser("keel_pdp.ledger.commands").parse_args(c["args"])
    assert ns.command == "ledger"
    assert ns.store == "$(KEEL_LEDGER_STORE)"  # expanded by the kubelet from the env below
    env = {e["name"]: e for e in c["env"]}
    assert env["KEEL_LEDGER_STORE"]["valueFrom"]["secretKeyRef"]["name"] == "keel-ledger-db"
    assert ns.redis_url.startswith("redis://keel-redis:6379/")
    assert ns.metrics_port == {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"]


def test_policies_configmap_is_a_valid_bundle(tmp_path: pathlib.Path) -> None:
    cm = find("ConfigMap", "keel-policies")
    for name, text in cm["data"].items():
        (tmp_path / name).write_text(text)
    snap = load_bundle(tmp_path)
    assert snap.policy_revision.startswith("k8s-example-r1")
    assert snap.budgets


def assert_keel_ext_procs(cap: dict[str, Any], closeout: dict[str, Any]) -> None:
    """The two ext_proc filters name their part and use the modes Keel expects."""
    for f, role in ((cap, "cap"), (closeout, "closeout")):
        meta = f["typed_config"]["grpc_service"]["initial_metadata"]
        assert {"key": EXT_PROC_ROLE, "value": role} in meta
        assert METADATA_NAMESPACE in f["typed_config"]["metadata_options"][
            "forwarding_namespaces"]["untyped"]
    c, o = cap["typed_config"], closeout["typed_config"]
    assert c["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert c["failure_mode_allow"] is False and c["allow_mode_override"] is True
    assert o["observability_mode"] is True and o["failure_mode_allow"] is True
    assert o["processing_mode"]["response_body_mode"] == "STREAMED"
    assert o["processing_mode"]["request_header_mode"] == "SEND"


def test_envoy_sidecar_and_istio_filter_call_keel_on_its_port() -> None:
    keel_port = port_of(serve_settings(cli_parser().parse_args(
        container(find("Deployment", "chat-app"), "keel-pdp")["args"])).listen)
    envoy = yaml.safe_load(find("ConfigMap", "keel-envoy")["data"]["envoy.yaml"])
    clusters = {c["name"]: c for c in envoy["static_resources"]["clusters"]}
    addr = clusters["keel"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert addr["endpoint"]["address"]["socket_address"]["port_value"] == keel_port
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    filters = {f["name"]: f for f in hcm["typed_config"]["http_filters"]}
    assert list(filters) == ["envoy.filters.http.ext_authz", "keel.cap", "keel.closeout",
                             "envoy.filters.http.router"]
    assert_keel_ext_procs(filters["keel.cap"], filters["keel.closeout"])
    # keel.cap runs only on the routes that match the header ext_authz sets.
    vhost = hcm["typed_config"]["route_config"]["virtual_hosts"][0]
    for route in vhost["routes"]:
        gated = any(h["name"] == H_ENFORCE for h in route["match"].get("headers", []))
        per = route.get("typed_per_filter_config", {}).get("keel.cap", {})
        assert per.get("disabled", False) is not gated
    assert "accept-encoding" in vhost["request_headers_to_remove"]

    ef = find("EnvoyFilter", "keel-pdp")
    assert ef["apiVersion"] == "networking.istio.io/v1alpha3"
    patches = ef["spec"]["configPatches"]
    (cluster,) = [p for p in patches if p["applyTo"] == "CLUSTER"]
    value = cluster["patch"]["value"]
    lb = value["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert lb["address"]["socket_address"]["port_value"] == keel_port
    inserted = [p["patch"]["value"] for p in patches if p["applyTo"] == "HTTP_FILTER"]
    assert [f["name"] for f in inserted] == ["envoy.filters.http.ext_authz", "keel.cap",
                                             "keel.closeout"]
    assert_keel_ext_procs(inserted[1], inserted[2])
    for f in inserted:
        assert f["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == value["name"]
    for p in patches:
        assert p["match"]["context"] == "SIDECAR_OUTBOUND"
        assert p["patch"]["operation"] in ("ADD", "INSERT_BEFORE")
    app_labels = find("Deployment", "chat-app")["spec"]["template"]["metadata"]["labels"]
    assert ef["spec"]["workloadSelector"]["labels"].items() <= app_labels.items()


def test_every_container_is_non_root_read_only_and_bounded() -> None:
    for _, doc in DOCS:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for c in pod_containers(doc):
            sc = c["securityContext"]
            where = f"{doc['metadata']['name']}/{c['name']}"
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc.get("runAsUser", pod["securityContext"].get("runAsUser", 0)) != 0, where
            for k in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][k]), where


def test_redis_persists_every_write_on_a_volume_claim() -> None:
    sts = find("StatefulSet", "keel-redis")
    args = container(sts, "redis")["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always"
    claim = sts["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] in {m["name"] for m in container(sts, "redis")
                                         ["volumeMounts"]}
    assert sts["spec"]["serviceName"] == "keel-redis"


def test_disruption_budget_and_service_monitor_select_real_things() -> None:
    app = find("Deployment", "chat-app")
    labels = app["spec"]["template"]["metadata"]["labels"]
    pdb = find("PodDisruptionBudget", "chat-app")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    sm = find("ServiceMonitor", "keel-pdp")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    want = sm["spec"]["selector"]["matchLabels"]
    services = [d for _, d in DOCS if d["kind"] == "Service"
                and want.items() <= d["metadata"].get("labels", {}).items()]
    assert {s["metadata"]["name"] for s in services} == {"chat-app", "keel-ledger"}
    port_names = {p["name"] for s in services for p in s["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names
        assert ep["path"] == "/metrics"
