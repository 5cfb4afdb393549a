"""Import adapters on sample exports that follow the providers' field names."""

from __future__ import annotations

import pathlib
from collections import defaultdict

import pytest

from keel_pdp.reconcile.adapters import anthropic, generic, openai
from keel_pdp.reconcile.adapters.classify import classify
from keel_pdp.reconcile.adapters.common import DuplicateGuard
from keel_pdp.reconcile.adapters.imports import import_exports
from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.model import CORRECTION, CREDIT, USAGE, ProviderLine, normalise_model
from keel_pdp.reconcile.period import Period

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "reconcile"
JAN = Period(2026, 1)


def totals(lines: list[ProviderLine]) -> dict[tuple[str, str, str, str], list[int]]:
    """(day, account, model, token type) -> [tokens, micros]."""
    out: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0])
    for ln in lines:
        cell = out[(ln.day.isoformat(), ln.account, ln.model, ln.token_type)]
        cell[0] += ln.tokens or 0
        cell[1] += ln.cost_micros or 0
    return dict(out)


def load(provider: str, *names: str, column_map: str | None = None) -> list[ProviderLine]:
    cmap = generic.load_column_map(FIXTURES / column_map) if column_map else None
    return import_exports(provider, [FIXTURES / n for n in names], JAN, {}, cmap).lines


def test_model_names_are_normalised_across_snapshots_and_display_names() -> None:
    assert normalise_model("gpt-4o-2024-08-06") == "gpt-4o"
    assert normalise_model("gpt-4.1-2025-04-14") == "gpt-4.1"
    assert normalise_model("claude-sonnet-4-5-20250929") == "claude-sonnet-4-5"
    assert normalise_model("Claude Sonnet 4.5") == "claude-sonnet-4-5"
    assert normalise_model("ft:custom", {"ft:custom": "gpt-4o"}) == "gpt-4o"


def test_openai_usage_and_costs_pages_give_tokens_and_money_per_token_type() -> None:
    cells = totals(load("openai", "openai/usage_completions.json", "openai/costs.json"))
    # input_tokens includes cached tokens: fresh input is the difference.
    assert cells[("2026-01-05", "proj_search", "gpt-4o", "input")] == [500_000, 1_250_000]
    assert cells[("2026-01-05", "proj_search", "gpt-4o", "cached_input")] == [1_500_000,
                                                                             1_875_000]
    assert cells[("2026-01-05", "proj_support", "gpt-4o-mini", "output")] == [150_000, 90_000]
    # A non-token line item keeps its own type and has no model.
    assert cells[("2026-01-06", "proj_search", "", "web_search_tool_calls")] == [0, 350_000]
    assert sum(c[1] for c in cells.values()) == 7_473_500


def test_openai_dashboard_csv_exports_match_the_api_pages() -> None:
    api = totals(load("openai", "openai/usage_completions.json", "openai/costs.json"))
    csv = totals(load("openai", "openai/usage_dashboard.csv", "openai/costs_dashboard.csv"))
    assert csv == api


def test_openai_costs_amount_numbers_never_pass_through_float() -> None:
    lines = load("openai", "openai/costs.json")
    cached = [ln for ln in lines if ln.token_type == "cached_input" and ln.model == "gpt-4o"]
    assert [ln.cost_micros for ln in cached] == [1_875_000, 1_500_000]
    assert all(isinstance(ln.cost_micros, int) for ln in lines)


def test_anthropic_usage_and_cost_reports_read_cents_and_cache_writes() -> None:
    lines = load("anthropic", "anthropic/usage_report.json", "anthropic/cost_report.json")
    cells = totals(lines)
    ws = "wrkspc_01JwQvzr7rXLA5AGx3HKfFUJ"
    # amount is a decimal string in cents: "37.5" is $0.375; the two write lifetimes
    # are separate token types with their own rates (5m at $3.75/M, 1h at $6/M).
    assert cells[("2026-01-05", ws, "claude-sonnet-4-5", "cache_write")] == [100_000, 375_000]
    assert cells[("2026-01-05", ws, "claude-sonnet-4-5", "cache_write_1h")] == [20_000, 120_000]
    assert cells[("2026-01-05", ws, "claude-sonnet-4-5", "input")] == [300_000, 900_000]
    assert cells[("2026-01-05", ws, "", "web_search")] == [12, 120_000]
    # A null workspace is the default workspace.
    assert cells[("2026-01-05", "default", "claude-haiku-4-5", "output")] == [20_000, 100_000]


def test_anthropic_console_csvs_resolve_names_through_the_mapping() -> None:
    from keel_pdp.reconcile.mapping import load_mapping

    mapping = load_mapping(FIXTURES / "mapping.yaml")
    lines = load("anthropic", "anthropic/console_usage.csv", "anthropic/console_cost.csv")
    cells = totals(lines)
    assert cells[("2026-01-05", "Support", "claude-sonnet-4-5", "cached_input")] == [900_000,
                                                                                    270_000]
    assert mapping.canonical_account("anthropic", "Support") == \
        "wrkspc_01JwQvzr7rXLA5AGx3HKfFUJ"
    assert mapping.canonical_account("anthropic", "default") == "default"
    # Console costs are dollars rounded to the cent: the file's precision says so.
    assert {ln.precision_micros for ln in lines if ln.cost_micros is not None} == {10_000}


def test_console_and_api_reports_agree_within_console_rounding() -> None:
    api = totals(load("anthropic", "anthropic/usage_report.json", "anthropic/cost_report.json"))
    console = totals(load("anthropic", "anthropic/console_usage.csv",
                          "anthropic/console_cost.csv"))
    names = {"Support": "wrkspc_01JwQvzr7rXLA5AGx3HKfFUJ", "default": "default"}
    for (day, account, model, token_type), (tokens, micros) in console.items():
        tok, mic = api[(day, names[account], model, token_type)]
        assert tok == tokens
        assert abs(mic - micros) <= 5_000


def test_generic_csv_wide_format_with_a_column_map() -> None:
    lines = load("csv", "generic/usage_by_deployment.csv",
                 column_map="generic/usage_by_deployment.columns.yaml")
    cells = totals(lines)
    assert cells[("2026-01-05", "search-westeu", "gpt-4o", "cached_input")] == [1_500_000,
                                                                               1_875_000]
    assert cells[("2026-01-06", "support-eastus", "gpt-4o-mini", "input")] == [600_000, 90_000]


def test_generic_csv_long_format_carries_credits_and_prior_period_corrections() -> None:
    lines = load("openai", "openai/costs.json", "generic/invoice_adjustments.csv",
                 column_map="generic/invoice_adjustments.columns.yaml")
    kinds = {(ln.kind, ln.belongs_to, ln.cost_micros) for ln in lines if ln.kind != USAGE}
    assert kinds == {(CREDIT, "", -25_000_000), (CORRECTION, "2025-12", 3_740_000)}


def test_credit_and_correction_text_is_recognised() -> None:
    assert classify("Promotional credit grant", -5_000_000, False, JAN) == (CREDIT, "")
    assert classify("Billing adjustment for 2025-11 usage", 1, False, JAN) == (
        CORRECTION, "2025-11")
    # A correction naming the current period is not a prior-period correction.
    assert classify("Billing adjustment for 2026-01", 1, False, JAN)[0] == USAGE
    assert classify("gpt-4o, input", 10, True, JAN) == (USAGE, "")


def test_openai_priority_and_modality_line_items() -> None:
    text = ('{"object": "page", "data": [{"object": "bucket", "start_time": 1767571200, '
            '"end_time": 1767657600, "results": [{"object": "organization.costs.result", '
            '"amount": {"value": 0.5, "currency": "usd"}, '
            '"line_item": "priority | gpt-5-2025-08-07, output, long context", '
            '"project_id": null}, {"object": "organization.costs.result", "amount": '
            '{"value": 0.25, "currency": "usd"}, "line_item": '
            '"gpt-audio-mini-2025-12-15 audio, input", "project_id": "p"}]}]}')
    lines = openai.parse(pathlib.Path("costs.json"), text, "costs-json", JAN, {},
                         DuplicateGuard())
    assert [(ln.account, ln.model, ln.token_type) for ln in lines] == [
        ("default", "gpt-5", "output"), ("p", "gpt-audio-mini", "audio_input")]


def test_formats_are_detected_by_content() -> None:
    def text(name: str) -> str:
        return (FIXTURES / name).read_text()

    assert openai.detect(FIXTURES, text("openai/usage_completions.json")) == "usage-json"
    assert openai.detect(FIXTURES, text("openai/costs.json")) == "costs-json"
    assert openai.detect(FIXTURES, text("openai/usage_dashboard.csv")) == "usage-csv"
    assert openai.detect(FIXTURES, text("openai/costs_dashboard.csv")) == "costs-csv"
    assert anthropic.detect(FIXTURES, text("anthropic/usage_report.json")) == "usage-json"
    assert anthropic.detect(FIXTURES, text("anthropic/cost_report.json")) == "cost-json"
    assert anthropic.detect(FIXTURES, text("anthropic/console_usage.csv")) == "usage-csv"
    assert anthropic.detect(FIXTURES, text("anthropic/console_cost.csv")) == "cost-csv"
    assert openai.detect(FIXTURES, text("anthropic/cost_report.json")) is None


def test_an_export_of_the_other_provider_is_rejected_by_name() -> None:
    with pytest.raises(InputError, match=r"cost_report\.json: not a recognised openai export"):
        load("openai", "anthropic/cost_report.json")


def test_usage_without_any_cost_export_is_rejected() -> None:
    with pytest.raises(InputError, match="no amounts in the exports"):
        load("openai", "openai/usage_completions.json")


def test_the_cost_analytics_export_in_both_shapes(tmp_path: pathlib.Path) -> None:
    import json

    group = {"workspace_id": "wrkspc_a", "model": "claude-sonnet-4-5-20250929",
             "cost_type": "tokens", "token_type": "output_tokens", "context_window": "200k-1M"}
    cost = {"amount": "123.456789", "list_amount": "150.00", "currency": "USD"}
    item = {"starting_at": "2026-01-05T00:00:00Z", "ending_at": "2026-01-06T00:00:00Z",
            "group": group, "cost": cost}
    flat = tmp_path / "analytics.json"
    flat.write_text(json.dumps({"data": [item], "has_more": False, "next_page": None}))
    bucketed = tmp_path / "analytics_bucketed.json"
    bucketed.write_text(json.dumps({"data": [{
        "starting_at": "2026-01-06T00:00:00Z", "ending_at": "2026-01-07T00:00:00Z",
        "results": [{**group, **cost, "context_window": "0-200k"}]}]}))
    lines = import_exports("anthropic", [flat, bucketed], JAN, {}, None).lines
    assert [(ln.day.day, ln.account, ln.model, ln.token_type, ln.cost_micros, ln.tier)
            for ln in lines] == [
        (5, "wrkspc_a", "claude-sonnet-4-5", "output", 1_234_568, "long_context"),
        (6, "wrkspc_a", "claude-sonnet-4-5", "output", 1_234_568, "")]
    assert "list 150.00 cents" in lines[0].description
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"data": [{"starting_at": "2026-01-05T00:00:00Z",
                                            "list_amount": "1", "group": {}}]}))
    with pytest.raises(InputError, match=r"broken\.json: data\[0\]\.cost: an item needs"):
        import_exports("anthropic", [broken], JAN, {}, None)
