"""kind: Deployments: the Azure deployment -> model map in the policy bundle.

Provoked here: the map read from the bundle (expected pairs read from the YAML
by this test, not by the loader), the bundle winning over the sidecar's
KEEL_MESH_AZURE_DEPLOYMENTS fallback, a deployment neither maps, a provider
named by header that has its own map, a reload that remaps a deployment and a
broken map that is rejected while the last good one keeps serving, and
`keel-pdp policy explain --path` / `keel-pdp mesh route` resolving through it.
The rejected-bundle messages (unknown model, duplicate deployment, a name that
is not one path segment) are tests/fixtures/invalid_bundles/deployment-*.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from keel_pdp.mesh.config import MeshConfig
from keel_pdp.mesh.request import FROM_BODY, FROM_BUNDLE, FROM_ENV, FROM_NAME, FROM_PATH
from keel_pdp.policy.commands import diff_snapshots
from keel_pdp.policy.loader import PolicyError, load_bundle
from keel_pdp.policy.reload import PolicyHolder
from tests.conftest import POLICIES

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
MESH_POLICIES = ROOT / "tests" / "fixtures" / "mesh_policies"
AZURE_CHAT = "/openai/deployments/{}/chat/completions?api-version=2024-10-21"


def yaml_map(directory: pathlib.Path) -> dict[tuple[str, str], str]:
    doc = yaml.safe_load((directory / "deployments.yaml").read_text())
    return {(doc.get("provider", "azure"), d["name"]): d["model"] for d in doc["deployments"]}


@pytest.mark.parametrize("directory", [POLICIES, MESH_POLICIES], ids=["policies", "mesh"])
def test_the_bundle_map_is_the_yaml_map_and_every_model_is_priced(
        directory: pathlib.Path) -> None:
    snap = load_bundle(directory)
    expected = yaml_map(directory)
    assert expected and snap.deployments == expected
    for (provider, _), model in expected.items():
        assert snap.price_for(provider, model) is not None


def test_bundle_wins_then_the_env_fallback_then_the_deployment_name() -> None:
    snap = load_bundle(MESH_POLICIES)
    cfg = MeshConfig.from_env({"KEEL_MESH_AZURE_DEPLOYMENTS":
                               "chat-prod=gpt-4o-mini,legacy=gpt-4.1-mini"})
    res = cfg.resolve("POST", AZURE_CHAT.format("chat-prod"), "r.openai.azure.com", "", snap)
    assert res is not None
    assert (res.provider, res.model, res.model_source) == ("azure", "gpt-4.1-mini", FROM_BUNDLE)
    res = cfg.resolve("POST", AZURE_CHAT.format("legacy"), "", "", snap)
    assert res is not None and (res.model, res.model_source) == ("gpt-4.1-mini", FROM_ENV)
    res = cfg.resolve("POST", AZURE_CHAT.format("gpt-4.1-mini"), "", "", snap)
    assert res is not None and (res.model, res.model_source) == ("gpt-4.1-mini", FROM_NAME)
    # No bundle loaded yet: the fallback alone.
    res = cfg.resolve("POST", AZURE_CHAT.format("chat-prod"), "", "", None)
    assert res is not None and (res.model, res.model_source) == ("gpt-4o-mini", FROM_ENV)
    # Other APIs: the path's model, or the body's.
    res = cfg.resolve("POST", "/v1beta/models/gemini-2.5-flash:generateContent", "", "", snap)
    assert res is not None and (res.model, res.model_source) == ("gemini-2.5-flash", FROM_PATH)
    res = cfg.resolve("POST", "/v1/chat/completions", "", "", snap)
    assert res is not None and (res.model, res.model_source) == ("", FROM_BODY)
    assert cfg.resolve("POST", "/openai/deployments/chat-prod/audio/speech", "", "", snap) is None


def test_a_provider_named_by_header_resolves_through_its_own_map(
        tmp_path: pathlib.Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(MESH_POLICIES, bundle)
    prices = yaml.safe_load((bundle / "prices.yaml").read_text())
    prices["providers"]["azure-eu"] = {"gpt-4.1-mini-eu": {"input": "0.44", "output": "1.76"}}
    (bundle / "prices.yaml").write_text(yaml.safe_dump(prices))
    (bundle / "deployments-eu.yaml").write_text(yaml.safe_dump({
        "apiVersion": "keel.pdp/v1", "kind": "Deployments", "provider": "azure-eu",
        "deployments": [{"name": "chat-prod", "model": "gpt-4.1-mini-eu"}]}))
    snap = load_bundle(bundle)
    cfg = MeshConfig()
    eu = cfg.resolve("POST", AZURE_CHAT.format("chat-prod"), "", "azure-eu", snap)
    us = cfg.resolve("POST", AZURE_CHAT.format("chat-prod"), "", "", snap)
    assert eu is not None and (eu.provider, eu.model) == ("azure-eu", "gpt-4.1-mini-eu")
    assert us is not None and (us.provider, us.model) == ("azure", "gpt-4.1-mini")


def test_a_reload_remaps_and_a_broken_map_keeps_the_last_good_one(
        tmp_path: pathlib.Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(MESH_POLICIES, bundle)
    holder = PolicyHolder(bundle)
    assert holder.reload(force=True)
    cfg = MeshConfig()

    def model() -> str:
        res = cfg.resolve("POST", AZURE_CHAT.format("chat-prod"), "", "", holder.current)
        assert res is not None
        return res.model

    assert model() == "gpt-4.1-mini"
    doc = yaml.safe_load((bundle / "deployments.yaml").read_text())
    doc["deployments"][0]["model"] = "gpt-4o-mini"
    (bundle / "deployments.yaml").write_text(yaml.safe_dump(doc))
    assert holder.reload()
    assert model() == "gpt-4o-mini"
    serving = holder.current
    doc["deployments"].append({"name": "chat-prod", "model": "gpt-4.1-mini"})
    (bundle / "deployments.yaml").write_text(yaml.safe_dump(doc))
    assert not holder.reload()
    assert holder.current is serving and model() == "gpt-4o-mini"
    assert holder.last_error is not None
    assert "deployments.yaml: deployments.2.name: deployment 'chat-prod' of provider 'azure' " \
        "is already mapped in deployments.yaml" in str(holder.last_error)


@pytest.mark.parametrize(("bad", "where"), [
    ({"name": "x", "model": "no-such-model"}, "deployments.0.model: unknown model"),
    ({"name": "", "model": "gpt-4.1-mini"}, "deployments.0.name: Value error"),
    ({"name": "a b", "model": "gpt-4.1-mini"}, "deployments.0.name: Value error"),
    ({"name": "x", "model": "gpt-4.1-mini", "modle": "typo"},
     "deployments.0.modle: Extra inputs are not permitted"),
    ({"name": "x"}, "deployments.0.model: Field required"),
])
def test_a_bad_entry_is_named_by_file_and_field(tmp_path: pathlib.Path, bad: dict[str, str],
                                                where: str) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(MESH_POLICIES, bundle)
    (bundle / "deployments.yaml").write_text(yaml.safe_dump({
        "apiVersion": "keel.pdp/v1", "kind": "Deployments", "deployments": [bad]}))
    with pytest.raises(PolicyError) as info:
        load_bundle(bundle)
    assert any(str(p).startswith(f"deployments.yaml: {where}") for p in info.value.problems), \
        [str(p) for p in info.value.problems]


def test_policy_diff_names_remapped_deployments(tmp_path: pathlib.Path) -> None:
    new = tmp_path / "new"
    shutil.copytree(MESH_POLICIES, new)
    doc = yaml.safe_load((new / "deployments.yaml").read_text())
    doc["deployments"] = [{"name": "chat-prod", "model": "gpt-4o-mini"},
                          {"name": "chat-new", "model": "gpt-4.1-mini"}]
    (new / "deployments.yaml").write_text(yaml.safe_dump(doc))
    lines = diff_snapshots(load_bundle(MESH_POLICIES), load_bundle(new))
    assert "Deployment azure/chat-prod: now serves gpt-4o-mini (was gpt-4.1-mini)." in lines
    assert "Deployment azure/chat-new added: serves gpt-4.1-mini." in lines
    assert any(line.startswith("Deployment azure/embed removed") for line in lines)


def _cli(*args: str) -> tuple[int, str]:
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", *args], capture_output=True,
                         text=True, timeout=60, cwd=ROOT, env={**os.environ,
                                                              "KEEL_MESH_AZURE_DEPLOYMENTS": ""})
    return res.returncode, res.stdout + res.stderr


def _explain(*args: str) -> tuple[int, str]:
    return _cli("policy", "explain", "--policies", str(POLICIES), "--tenant", "acme",
                "--workload", "chat", *args)


def test_explain_path_resolves_an_azure_deployment_through_the_bundle() -> None:
    model = yaml_map(POLICIES)[("azure", "chat-prod")]
    code, out = _explain("--path", AZURE_CHAT.format("chat-prod"), "--host",
                         "myres.openai.azure.com", "--model", "gpt-4o")
    assert code == 0, out
    first = out.splitlines()[0]
    assert first == (f"Route: POST myres.openai.azure.com/openai/deployments/chat-prod/chat/"
                     f"completions resolves to API chat.completions, provider azure, model "
                     f"{model} from {FROM_BUNDLE} (Azure deployment 'chat-prod').")
    assert "The body's model 'gpt-4o' is ignored: the deployment decides." in out
    assert f"Requested model azure/{model}: input 0.4" in out
    assert "budget acme-monthly" in out


def test_explain_path_for_body_model_apis_and_unmetered_paths() -> None:
    code, out = _explain("--path", "/v1/chat/completions")
    assert code == 1 and "The body names the model on this API: give --model." in out
    code, out = _explain("--path", "/v1/chat/completions", "--model", "gpt-4.1-mini")
    assert code == 0 and "provider openai, model gpt-4.1-mini from the body (--model)" in out
    assert "Requested model openai/gpt-4.1-mini" in out
    code, out = _explain("--path", "/v1/projects/p/locations/us-central1/publishers/"
                         "google/models/gemini-2.5-pro:streamGenerateContent?alt=sse")
    assert code == 0 and "API generate_content, provider vertex, model gemini-2.5-pro " \
        "from the request path" in out
    code, out = _explain("--path", "/openai/deployments/chat-prod/images/generations")
    assert code == 1 and "is not an API Keel meters" in out


def test_mesh_route_uses_the_bundle_map() -> None:
    model = yaml_map(POLICIES)[("azure", "chat-prod")]
    code, out = _cli("mesh", "route", AZURE_CHAT.format("chat-prod"), "--policies",
                     str(POLICIES))
    assert code == 0, out
    assert f"model:    {model}  (Azure deployment chat-prod, from {FROM_BUNDLE})" in out
    assert "price:    USD per million tokens: input 0.4," in out
