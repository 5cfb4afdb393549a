from __future__ import annotations

import pathlib

import pytest

from keel_pdp.policy.loader import PolicyError, load_bundle
from tests.conftest import POLICIES
from tests.helpers import budget, write_bundle


def test_example_bundle_loads_with_revision_and_hash() -> None:
    snap = load_bundle(POLICIES)
    assert snap.revision == "2026-11-r1"
    assert len(snap.content_hash) == 64
    assert snap.policy_revision.startswith("2026-11-r1@")
    assert ("openai", "gpt-4o-mini") in snap.prices
    assert ("anthropic", "claude-sonnet-4-5") in snap.prices


def test_budget_matching_uses_wildcards_and_exact_scopes() -> None:
    snap = load_bundle(POLICIES)
    ids = [b.id for b in snap.match_budgets("acme", "support-bot", "gpt-4o-mini", "openai")]
    assert ids == ["acme-monthly", "acme-support-bot.daily", "acme-support-bot.hourly",
                   "org-monthly", "tenant-daily-default"]
    ids = [b.id for b in snap.match_budgets("globex", "research-agent", "claude-opus-4-1",
                                            "anthropic")]
    assert "globex-research-opus-daily" in ids and "acme-monthly" not in ids
    ids = [b.id for b in snap.match_budgets("globex", "research-agent", "o3", "openai")]
    assert "globex-research-opus-daily" not in ids


def _problems(tmp_path: pathlib.Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_bundle(tmp_path)
    return [str(p) for p in info.value.problems]


def test_float_cap_and_price_are_rejected_with_file_and_field(tmp_path: pathlib.Path) -> None:
    write_bundle(tmp_path, [{"id": "b1", "cap_usd": 10.5, "window": "daily"}],
                 prices={"openai": {"m": {"input": 1.0, "output": "2"}}})
    problems = _problems(tmp_path)
    assert any(p.startswith("budgets.yaml: budgets.0.cap_usd") for p in problems), problems
    assert any(p.startswith("prices.yaml: providers.openai.m.input") for p in problems), problems


def test_unknown_exception_path_duplicate_id_and_bad_timezone(tmp_path: pathlib.Path) -> None:
    write_bundle(tmp_path, [
        budget("b1", "10", exception_path="nope"),
        budget("b1", "10"),
        budget("b2", "10", timezone="Mars/Olympus"),
    ])
    text = "\n".join(_problems(tmp_path))
    assert "budgets.0.exception_path" in text and "'nope'" in text
    assert "budgets.1.id" in text and "already defined" in text
    assert "budgets.2.timezone" in text
    write_bundle(tmp_path, [budget("b3", "10", window="weekly")])
    assert any("budgets.0.window" in p for p in _problems(tmp_path))


def test_missing_bundle_document_and_bad_yaml(tmp_path: pathlib.Path) -> None:
    write_bundle(tmp_path, [budget("b1", "1")])
    (tmp_path / "bundle.yaml").unlink()
    (tmp_path / "broken.yaml").write_text("apiVersion: keel.pdp/v1\nkind: [\n")
    text = "\n".join(_problems(tmp_path))
    assert "broken.yaml" in text and "not valid YAML" in text
    assert "no file with kind: Bundle" in text


def test_unknown_field_is_named(tmp_path: pathlib.Path) -> None:
    write_bundle(tmp_path, [{"id": "b1", "cap_usd": "1", "window": "daily", "capp": "2"}])
    assert any("budgets.0.capp" in p for p in _problems(tmp_path))


def test_content_hash_changes_with_content(tmp_path: pathlib.Path) -> None:
    write_bundle(tmp_path, [budget("b1", "1")])
    h1 = load_bundle(tmp_path).content_hash
    write_bundle(tmp_path, [budget("b1", "2")])
    assert load_bundle(tmp_path).content_hash != h1
