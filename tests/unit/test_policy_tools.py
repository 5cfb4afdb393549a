"""`keel-pdp policy check | diff | explain` as a finance owner or CI sees them."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import yaml

from keel_pdp.policy.commands import diff_snapshots, explain_lines
from keel_pdp.policy.loader import load_bundle
from tests.conftest import POLICIES


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "keel_pdp.cli", "policy", *args],
                          capture_output=True, text=True, timeout=60)


def _edit(path: pathlib.Path, fn: object) -> None:
    doc = yaml.safe_load(path.read_text())
    fn(doc)  # type: ignore[operator]
    path.write_text(yaml.safe_dump(doc))


def test_diff_speaks_of_caps_prices_routes_and_exceptions(tmp_path: pathlib.Path) -> None:
    new = tmp_path / "new"
    shutil.copytree(POLICIES, new)

    def budgets(doc: dict[str, list[dict[str, object]]]) -> None:
        for b in doc["budgets"]:
            if b["id"] == "acme-monthly":
                b["cap_usd"] = "25000.00"
            if b["id"] == "initech-monthly":
                b["mode"] = "observe"
        doc["budgets"] = [b for b in doc["budgets"] if b["id"] != "globex-research-opus-daily"]

    def prices(doc: dict[str, dict[str, dict[str, object]]]) -> None:
        doc["providers"]["openai"]["gpt-4.1"]["output"] = "6.00"  # type: ignore[index]

    def routes(doc: dict[str, list[dict[str, object]]]) -> None:
        doc["rules"][0]["allowed_models"] = ["openai/gpt-4o-mini"]
        doc["rules"][1]["mode"] = "prefer-cheap"

    def bundle(doc: dict[str, list[dict[str, object]]]) -> None:
        doc["exception_paths"][0]["max_overage_usd"] = "7500.00"

    _edit(new / "budgets.yaml", budgets)
    _edit(new / "prices.yaml", prices)
    _edit(new / "routes.yaml", routes)
    _edit(new / "bundle.yaml", bundle)
    lines = diff_snapshots(load_bundle(POLICIES), load_bundle(new))
    text = "\n".join(lines)
    assert ("Budget acme-monthly: cap raised from $20,000.00 to $25,000.00 per month (+25.0%)."
            in lines)
    assert "Budget initech-monthly: now observed only (was enforced)." in lines
    assert "Budget globex-research-opus-daily removed" in text
    assert ("Price of openai/gpt-4.1: output from 8 to 6 USD per 1M tokens (-25.0%)." in lines)
    assert ("Routing rule support-bot-models: no longer allows anthropic/claude-haiku-4-5, "
            "openai/gpt-4.1-mini." in lines)
    assert "Routing rule code-review-models: mode changed from enforce to prefer-cheap." in lines
    assert ("Exception path finance-overage: maximum overage from $5,000.00 to $7,500.00."
            in lines)
    res = _cli("diff", str(POLICIES), str(new))
    assert res.returncode == 0
    assert "cap raised" in res.stdout
    same = _cli("diff", str(POLICIES), str(POLICIES))
    assert "No change" in same.stdout


def test_diff_of_a_broken_bundle_exits_1_naming_the_file(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(POLICIES, bad)
    (bad / "prices.yaml").write_text("apiVersion: keel.pdp/v1\nkind: PriceTable\n")
    res = _cli("diff", str(POLICIES), str(bad))
    assert res.returncode == 1
    assert "prices.yaml" in res.stderr


def test_explain_names_rule_prices_and_every_matching_budget() -> None:
    snap = load_bundle(POLICIES)
    lines = explain_lines(snap, "acme", "support-bot", "gpt-4.1-mini", "", 2000, 500)
    text = "\n".join(lines)
    assert "Routing rule support-bot-models applies" in text
    assert "Requested model openai/gpt-4.1-mini: input 0.4" in text
    assert "Downgrade option 1 openai/gpt-4o-mini" in text
    for bid in ("acme-monthly", "acme-support-bot.hourly", "acme-support-bot.daily",
                "org-monthly", "tenant-daily-default"):
        assert f"budget {bid}:" in text
    assert "counter for tenant=acme" in text
    denied = explain_lines(snap, "acme", "support-bot", "o3", "", 10, 10)
    assert any("MODEL_NOT_ALLOWED" in line for line in denied)
    cheap = "\n".join(explain_lines(snap, "initech", "batch-summarizer", "gpt-4.1", "", 10, 10))
    assert "the prefer-cheap rule picks openai/gpt-4o-mini-batch" in cheap
    res = _cli("explain", "--policies", str(POLICIES), "--tenant", "globex", "--workload",
               "research-agent", "--model", "claude-opus-4-1")
    assert res.returncode == 0
    assert "globex-research-opus-daily" in res.stdout
