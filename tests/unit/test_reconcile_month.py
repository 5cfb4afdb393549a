"""A realistic month, generated apart from the code under test, reconciled
through the CLI: every category and the planted unexplained amount to the cent,
per provider and per project, the identity exact, and the request ids behind
each request-level category.

The month comes from ``tests.reconcile_month.generate`` (its own simulation and
Decimal arithmetic, never importing ``keel_pdp.reconcile``): ~20,000 requests
over two providers, tenants west and east of UTC whose ledger month is their
local month, both month boundaries, long-context tier lines, a cache-read rate
the gateway got wrong all month on one account per provider, client-disconnected
streams billed and booked at $0, rejected attempts booked and not billed,
credits, a prior-period correction and one provider line that rose with no
usage behind it.
"""

from __future__ import annotations

import csv
import json
import pathlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from tests.reconcile_month.generate import generate
from tests.unit.test_reconcile_e2e import main

CENT_HALF = Decimal(5_000)  # micro-USD: "to the cent"
CATEGORIES = ("clock_skew", "cache_read_rate", "tier_breakpoint", "failed_request_billing",
              "credits", "prior_period_correction", "rounding", "unexplained")


def _run(month: pathlib.Path, answer: dict[str, Any], provider: str, out: pathlib.Path,
         *extra: str) -> int:
    ex = answer["providers"][provider]
    args = ["reconcile", "--internal", str(month / answer["internal"]), "--period",
            answer["period"], "--provider", provider, "--mapping",
            str(month / answer["mapping"]), "--out", str(out),
            "--column-map", str(month / ex["column_map"]), *extra]
    for name in ex["exports"]:
        args += ["--export", str(month / name)]
    return main(args)


def _memo(out: pathlib.Path, period: str, provider: str) -> dict[str, Any]:
    found = sorted(out.rglob("memo.json"))
    mine = [p for p in found if json.loads(p.read_text())["provider"] == provider
            and json.loads(p.read_text())["period"] == period]
    assert len(mine) == 1, found
    data: dict[str, Any] = json.loads(mine[0].read_text())
    return data


# The third month gives Anthropic's costs as the cost analytics export
# (fractional cents, list amounts) instead of the cost report.
@pytest.fixture(scope="module", params=[(1, False), (2, False), (3, True)],
                ids=["seed1", "seed2", "seed3-analytics"])
def month(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[pathlib.Path, dict[str, Any], dict[str, dict[str, Any]]]:
    seed, analytics = request.param
    root = tmp_path_factory.mktemp(f"month{seed}")
    answer = generate(root / "in", seed=seed, requests=20_000, anthropic_analytics=analytics)
    memos = {}
    for provider in ("openai", "anthropic"):
        code = _run(root / "in", answer, provider, root / "out")
        assert code == 1  # the planted unexplained amount blocks posting
        memos[provider] = _memo(root / "out", answer["period"], provider)
    return root, answer, memos


def test_the_month_is_realistic(month: tuple[pathlib.Path, dict[str, Any],
                                             dict[str, dict[str, Any]]]) -> None:
    root, answer, _ = month
    assert sum(p["requests"] for p in answer["providers"].values()) >= 15_000
    # clock skew at both month boundaries, from tenants west and east of UTC
    skewed = {i for p in answer["providers"].values() for i in p["request_ids"]["clock_skew"]}
    with (root / "in" / answer["internal"]).open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["permit_id"] in skewed]
    utc_days = {datetime.fromisoformat(r["ts"].replace("Z", "+00:00")).astimezone(UTC)
                .date().isoformat() for r in rows}
    assert {"2025-12-31", "2026-01-01", "2026-01-31", "2026-02-01"} <= utc_days
    assert {r["tenant"] for r in rows} == {"acme", "globex"}  # Los Angeles and Tokyo
    for provider in ("openai", "anthropic"):
        ids = answer["providers"][provider]["request_ids"]
        # every request-level category is seeded, and clock skew on both sides
        for cat in ("clock_skew", "cache_read_rate", "tier_breakpoint",
                    "failed_request_billing"):
            assert len(ids[cat]) >= 20, (provider, cat)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_every_category_to_the_cent(month: tuple[pathlib.Path, dict[str, Any],
                                                 dict[str, dict[str, Any]]],
                                    provider: str) -> None:
    _, answer, memos = month
    expected = answer["providers"][provider]
    memo = memos[provider]
    got = {c["category"]: c["net_micros"] for c in memo["categories"]}
    assert list(got) == list(CATEGORIES)
    for cat in CATEGORIES:
        want = Decimal(expected["categories"][cat])
        assert abs(got[cat] - want) < CENT_HALF, (cat, got[cat], want)
    assert memo["totals"]["internal_micros"] == Decimal(expected["internal_micros"])
    # OpenAI amounts carry sub-micro digits: each line is read once, half-even
    assert abs(memo["totals"]["invoice_micros"] - Decimal(expected["provider_micros"])) < 1_000
    # the identity, exactly
    assert sum(got.values()) == memo["totals"]["invoice_micros"] - memo["totals"][
        "internal_micros"]


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_every_project_to_the_cent_and_its_identity_exact(
        month: tuple[pathlib.Path, dict[str, Any], dict[str, dict[str, Any]]],
        provider: str) -> None:
    _, answer, memos = month
    expected = answer["providers"][provider]["by_account"]
    got = memos[provider]["by_account"]
    assert sorted(got) == sorted(expected)
    for account, row in expected.items():
        mine = got[account]
        assert abs(mine["provider_micros"] - Decimal(row["provider_micros"])) < 1_000
        assert mine["internal_micros"] == Decimal(row["internal_micros"])
        for cat in CATEGORIES:
            assert abs(mine.get(cat, 0) - Decimal(row[cat])) < CENT_HALF, (account, cat)
        assert sum(mine.get(c, 0) for c in CATEGORIES) == (
            mine["provider_micros"] - mine["internal_micros"]), account


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_the_request_ids_behind_each_category(
        month: tuple[pathlib.Path, dict[str, Any], dict[str, dict[str, Any]]],
        provider: str) -> None:
    _, answer, memos = month
    expected = answer["providers"][provider]["request_ids"]
    cats = {c["category"]: c for c in memos[provider]["categories"]}
    for cat in ("clock_skew", "cache_read_rate", "tier_breakpoint", "failed_request_billing"):
        assert sorted(cats[cat]["request_ids"]) == expected[cat], cat
    assert cats["unexplained"]["request_ids"] == []
    skew = cats["clock_skew"]
    both = skew["provider_month_only_ids"] + skew["ledger_month_only_ids"]
    assert sorted(both) == expected["clock_skew"]
    assert skew["provider_month_only_ids"] and skew["ledger_month_only_ids"]
    planted = answer["providers"][provider]["unexplained_line"]
    items = cats["unexplained"]["line_items"]
    assert [(i["day"], i["account"], i["model"], i["token_type"]) for i in items] == [
        (planted["day"], planted["account"], planted["model"], planted["token_type"])]
    assert cats["unexplained"]["line_ids"], "the unexplained line names its source"
    assert len(cats["credits"]["line_ids"]) == 1
    assert len(cats["prior_period_correction"]["line_ids"]) == 1
    # the tier category is never merged into the normal lines
    tiers = {i["tier"] for i in cats["tier_breakpoint"]["line_items"]}
    assert tiers == {"long_context"}


def test_the_memo_shows_both_sides_for_the_token_type(
        month: tuple[pathlib.Path, dict[str, Any], dict[str, dict[str, Any]]]) -> None:
    _, _, memos = month
    cats = {c["category"]: c for c in memos["anthropic"]["categories"]}
    cache = cats["cache_read_rate"]
    assert "cached_input" in cache["by_token_type"]
    fig = cache["by_token_type"]["cached_input"]
    assert fig["internal_micros"] > fig["provider_micros"] > 0
    assert "cached_input" in cache["paragraph"] and "provider $" in cache["paragraph"]
    assert "rate change" not in cats["tier_breakpoint"]["paragraph"]
    failed = cats["failed_request_billing"]["paragraph"]
    assert "booked at $0.00" in failed and "it does not bill" in failed


def test_a_utc_ledger_clock_moves_the_skew(
        month: tuple[pathlib.Path, dict[str, Any], dict[str, dict[str, Any]]],
        tmp_path: pathlib.Path) -> None:
    root, answer, memos = month
    _run(root / "in", answer, "openai", tmp_path / "utc", "--ledger-clock", "utc")
    memo = _memo(tmp_path / "utc", answer["period"], "openai")
    cats = {c["category"]: c for c in memo["categories"]}
    assert cats["clock_skew"]["net_micros"] == 0
    assert cats["clock_skew"]["request_ids"] == []
    assert memo["totals"]["internal_micros"] != memos["openai"]["totals"]["internal_micros"]
