"""Money, periods, the internal export, the mapping file, price splits and the
categorisation rules one at a time."""

from __future__ import annotations

import json
import pathlib
from dataclasses import replace
from datetime import UTC, date, datetime
from decimal import Decimal
from fractions import Fraction

import pytest

from keel_pdp.reconcile.errors import InputError, ReconcileError
from keel_pdp.reconcile.internal import FileInternalSource, InternalUsageLine
from keel_pdp.reconcile.mapping import Mapping, MappingDoc, load_mapping
from keel_pdp.reconcile.model import ProviderLine
from keel_pdp.reconcile.money import (
    decimal_str,
    quantum_micros,
    round_fraction,
    split_exact,
    to_micros,
    usd,
)
from keel_pdp.reconcile.period import Period
from keel_pdp.reconcile.prices import load_prices, split_cost
from keel_pdp.reconcile.report import build_report
from keel_pdp.reconcile.variance import (
    CACHE_RATE,
    CLOCK_SKEW,
    ROUNDING,
    TIER,
    UNEXPLAINED,
    reconcile,
)
from tests.unit.test_reconcile_bad_exports import FIXTURES, args
from tests.unit.test_reconcile_e2e import main

JAN = Period(2026, 1)


def test_money_is_exact_integers() -> None:
    assert to_micros(Decimal("0.8958740000000000")) == 895_874
    assert to_micros(Decimal("123.78912"), 10_000) == 1_237_891  # cents, half-even
    assert to_micros(Decimal("0.0000005")) == 0 and to_micros(Decimal("0.0000015")) == 2
    assert quantum_micros(Decimal("0.05")) == 10_000
    assert quantum_micros(Decimal("0.895874")) == 1
    assert round_fraction(Fraction(5, 2)) == 2 and round_fraction(Fraction(7, 2)) == 4
    assert round_fraction(Fraction(-7, 2)) == -4
    assert split_exact(100, [1, 1, 1]) == [34, 33, 33]
    assert split_exact(-100, [2, 1, 0]) == [-67, -33, 0]
    assert split_exact(5, [0, 0]) == [3, 2]
    assert decimal_str(-1_500_000) == "-1.500000"
    assert usd(48_200_000_000) == "$48,200.00"
    assert usd(-1_641) == "-$0.001641"
    assert usd(4_700_000_000, signed=True) == "+$4,700.00"


def test_periods_are_utc_months() -> None:
    assert Period.parse("2026-12").next() == Period(2027, 1)
    assert Period.parse("2026-01").previous() == Period(2025, 12)
    assert JAN.last_day == date(2026, 1, 31) and len(JAN.days()) == 31
    with pytest.raises(ValueError, match="YYYY-MM"):
        Period.parse("2026-13")


def test_internal_csv_reads_local_timestamps_in_the_given_zone(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "usage.csv"
    path.write_text(
        "ts,tenant,workload,provider,model,input_tokens,output_tokens,cost_usd\n"
        "2026-02-01T00:30:00,acme,bot,openai,gpt-4o,10,5,0.000075\n"
        "2026-01-31T23:30:00+00:00,acme,bot,openai,gpt-4o,10,5,0.000075\n")
    local = FileInternalSource(path, "Europe/Berlin").lines_for_month(JAN)
    assert len(local) == 2  # 00:30 in Berlin is 23:30 UTC on the 31st
    utc = FileInternalSource(path).lines_for_month(JAN)
    assert len(utc) == 1
    padded = FileInternalSource(path).lines_for_month(JAN, pad_ms=3_600_000)
    assert len(padded) == 2
    assert padded[0].cost_micros == 75


def test_internal_export_problems_name_the_row(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "usage.csv"
    path.write_text("ts_ms,tenant,workload,provider,model,input_tokens,cached_input_tokens,"
                    "output_tokens,cost_micros\n"
                    "1767571200000,acme,bot,openai,gpt-4o,10,20,5,100\n")
    with pytest.raises(InputError, match=r"usage\.csv: row 2: cached_input_tokens"):
        FileInternalSource(path).lines_for_month(JAN)
    path.write_text("ts_ms,tenant,workload,provider,model,input_tokens,output_tokens\n")
    with pytest.raises(InputError, match="missing a cost column"):
        FileInternalSource(path).lines_for_month(JAN)


def test_a_total_only_line_needs_a_price_table() -> None:
    line = InternalUsageLine(ts_ms=JAN.start_ms, tenant="t", workload="w", provider="openai",
                             model="gpt-4o", input_tokens=1_000_000, cached_input_tokens=0,
                             output_tokens=100_000, cost_micros=3_500_000, permit_id="p1")
    with pytest.raises(ReconcileError, match="pass --prices"):
        line.costs_by_type(None, "gpt-4o")
    book = load_prices(FIXTURES / "prices.yaml")
    assert line.costs_by_type(book, "gpt-4o") == {"input": 2_500_000, "output": 1_000_000}


def test_price_history_and_context_tiers_pick_the_rate_in_effect(
        tmp_path: pathlib.Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(
        "apiVersion: keel.pdp/v1\nkind: PriceTable\nrevision: r1\nproviders:\n"
        "  anthropic:\n    claude-sonnet-4-5:\n"
        "      - {input: '3.00', output: '15.00', effective_from: 2025-01-01,\n"
        "         tiers: [{above_input_tokens: 200000, input: '6.00', output: '22.50'}]}\n"
        "      - {input: '2.00', output: '10.00', effective_from: 2026-01-15}\n")
    book = load_prices(path)
    early = int(datetime(2026, 1, 3, tzinfo=UTC).timestamp() * 1000)
    late = int(datetime(2026, 1, 20, tzinfo=UTC).timestamp() * 1000)

    def input_rate(ts: int, tokens: int) -> int:
        price = book.price_for("anthropic", "claude-sonnet-4-5", ts, tokens)
        assert price is not None
        return price.input

    assert input_rate(early, 1000) == 3_000_000
    assert input_rate(early, 300_000) == 6_000_000  # above the context tier
    assert input_rate(late, 300_000) == 2_000_000  # the later price has no tiers
    assert book.price_for("anthropic", "claude-opus-4-1", early, 10) is None
    price = book.price_for("anthropic", "claude-sonnet-4-5", early, 10)
    assert price is not None
    assert split_cost(17, price, {"input": 1, "output": 1}) == {"input": 3, "output": 14}


def test_the_mapping_file_rejects_a_workload_without_an_owner(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "mapping.yaml"
    path.write_text("accounts:\n  - {provider: openai, account: p1, tenant: a, workload: w}\n"
                    "workloads:\n  - {tenant: a, workload: other, engineering_owner: X}\n")
    with pytest.raises(InputError, match="no entry under workloads"):
        load_mapping(path)


def test_a_workload_on_two_accounts_needs_the_account_on_each_line() -> None:
    doc = MappingDoc.model_validate({
        "accounts": [{"provider": "openai", "account": "p1", "tenant": "a", "workload": "w"},
                     {"provider": "openai", "account": "p2", "tenant": "a", "workload": "w"}],
        "workloads": [{"tenant": "a", "workload": "w", "engineering_owner": "X"}]})
    with pytest.raises(InputError, match="several openai accounts"):
        Mapping(doc).account_for("openai", "a", "w")


# ------------------------------------------------------------------ categorisation rules

MAPPING = Mapping(MappingDoc.model_validate({
    "accounts": [{"provider": "openai", "account": "p1", "tenant": "a", "workload": "w"}],
    "workloads": [{"tenant": "a", "workload": "w", "engineering_owner": "Owner"}]}))


def pline(day: int, token_type: str, tokens: int | None, micros: int | None,
          account: str = "p1", precision: int = 1) -> ProviderLine:
    return ProviderLine(day=date(2026, 1, day), account=account, model="gpt-4o",
                        token_type=token_type, tokens=tokens, cost_micros=micros,
                        precision_micros=precision)


def iline(day: int, hour: int, costs: dict[str, int], tokens: dict[str, int],
          minute: int = 0) -> InternalUsageLine:
    ts = int(datetime(2026, 1, day, hour, minute, tzinfo=UTC).timestamp() * 1000) \
        if day > 0 else int(datetime(2025, 12, 31, hour, minute, tzinfo=UTC).timestamp() * 1000)
    return InternalUsageLine(
        ts_ms=ts, tenant="a", workload="w", provider="openai", model="gpt-4o",
        input_tokens=tokens.get("input", 0) + tokens.get("cached_input", 0),
        cached_input_tokens=tokens.get("cached_input", 0),
        output_tokens=tokens.get("output", 0), cost_micros=sum(costs.values()),
        input_cost_micros=costs.get("input", 0),
        cached_input_cost_micros=costs.get("cached_input", 0), cache_write_cost_micros=0,
        output_cost_micros=costs.get("output", 0))


def test_cache_reads_priced_at_the_input_rate_are_the_cache_category() -> None:
    # The provider bills cache reads at half the input rate all month; the gateway
    # priced them at the full input rate on this account.
    provider = [pline(d, t, None, m) for d in (5, 6, 7)
                for t, m in (("input", 1_000_000), ("cached_input", 250_000))]
    internal = [iline(d, 10, {"input": 1_000_000, "cached_input": 500_000},
                      {"input": 400_000, "cached_input": 200_000}) for d in (5, 6, 7)]
    rec = reconcile(JAN, "openai", provider, internal, MAPPING)
    assert rec.category_net(CACHE_RATE) == -750_000
    assert rec.category_net(UNEXPLAINED) == 0
    assert len(rec.evidence.requests[CACHE_RATE]) == 3


def test_a_rate_that_differs_all_month_is_not_a_tier_breakpoint() -> None:
    provider = [pline(d, "output", 100_000, 1_200_000) for d in (3, 4, 5)]
    internal = [iline(d, 9, {"output": 1_000_000}, {"output": 100_000}) for d in (3, 4, 5)]
    rec = reconcile(JAN, "openai", provider, internal, MAPPING)
    assert rec.category_net(TIER) == 0
    assert rec.category_net(UNEXPLAINED) == 600_000
    note = rec.cells_in(UNEXPLAINED)[0].notes[UNEXPLAINED]
    assert "same tokens" in note and "check the price table" in note


def test_a_tenant_west_of_utc_is_skewed_at_both_boundaries() -> None:
    # Los Angeles: 2026-01-01 02:00 UTC is still December there (provider only);
    # 2026-02-01 03:00 UTC is still January there (ledger only).
    mapping = Mapping(MappingDoc.model_validate({
        **MAPPING.doc.model_dump(), "tenants": [{"tenant": "a", "timezone":
                                                 "America/Los_Angeles"}]}))
    early = replace(iline(1, 2, {"output": 1_000_000}, {"output": 100_000}), permit_id="e")
    late = replace(iline(31, 12, {"output": 700_000}, {"output": 70_000}), permit_id="l",
                   ts_ms=int(datetime(2026, 2, 1, 3, tzinfo=UTC).timestamp() * 1000))
    mid = [iline(d, 12, {"output": 1_000_000}, {"output": 100_000}) for d in (1, 2, 3)]
    provider = [pline(1, "output", None, 2_000_000), pline(2, "output", None, 1_000_000),
                pline(3, "output", None, 1_000_000)]
    rec = reconcile(JAN, "openai", provider, [early, late, *mid], mapping)
    assert rec.category_net(CLOCK_SKEW) == 1_000_000 - 700_000
    assert rec.category_gross(CLOCK_SKEW) == 1_700_000
    assert rec.evidence.skew_provider_only == ["e"]
    assert rec.evidence.skew_ledger_only == ["l"]
    assert rec.category_net(UNEXPLAINED) == 0
    utc = reconcile(JAN, "openai", provider, [early, late, *mid], mapping, ledger_clock="utc")
    assert utc.category_net(CLOCK_SKEW) == 0


def test_unmapped_provider_accounts_are_unexplained_and_charged_to_unmapped() -> None:
    provider = [pline(4, "output", 10, 500_000, account="p-unknown")]
    rec = reconcile(JAN, "openai", provider, [], MAPPING)
    assert rec.unmapped_accounts == ["p-unknown"]
    assert "not in the mapping" in rec.cells_in(UNEXPLAINED)[0].notes[UNEXPLAINED]
    report = build_report(rec, MAPPING, Decimal("1"))
    assert report.status == "blocked"
    assert [(r.tenant, r.workload, r.amount_micros) for r in report.chargeback] == [
        ("(unmapped)", "p-unknown", 500_000)]


def test_rounding_allows_half_the_provider_step_per_line() -> None:
    # Lines in whole cents: 0.4 cent beyond the requests is rounding, 0.6 is not.
    provider = [pline(d, "output", None, 1_000_000, precision=10_000) for d in range(2, 12)]
    provider += [pline(12, "output", None, 1_004_000, precision=10_000),
                 pline(13, "output", None, 1_006_000, precision=10_000)]
    internal = [iline(d, 9, {"output": 1_000_000}, {"output": 100_000}) for d in range(2, 14)]
    rec = reconcile(JAN, "openai", provider, internal, MAPPING)
    assert rec.category_net(ROUNDING) == 4_000
    assert rec.category_net(UNEXPLAINED) == 6_000


def test_the_sample_files_reconcile_through_the_cli(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = [*args(out, FIXTURES / "openai" / "usage_dashboard.csv",
                  FIXTURES / "openai" / "costs_dashboard.csv")]
    assert main(argv) == 0, capsys.readouterr().err
    memo = json.loads((out / "2026-01" / "openai" / "memo.json").read_text())
    cats = {c["category"]: c for c in memo["categories"]}
    assert memo["totals"]["invoice_micros"] == 7_473_500
    # The failed attempt the gateway booked; the web search fee it never saw.
    assert cats["failed_request_billing"]["net_micros"] == -50_000
    assert cats["unexplained"]["net_micros"] == 350_000
    assert cats["unexplained"]["line_items"][0]["token_type"] == "web_search_tool_calls"
    assert cats["unexplained"]["decision"] == "accepted"  # inside the 5% given
    assert memo["status"] == "ready-for-signoff"
    assert sum(r["amount_micros"] for r in memo["chargeback"]) == 7_473_500
    # With the default 1% the same gap is escalated and blocks posting.
    argv[argv.index("--tolerance-pct") + 1] = "1.0"
    assert main(argv) == 2  # a different memo: the draft is not replaced silently
    assert "not replaced silently" in capsys.readouterr().err
    assert main([*argv, "--replace"]) == 1
    assert "posting is blocked" in capsys.readouterr().err


def test_the_commands_are_wired_into_the_cli() -> None:
    from keel_pdp.cli import COMMAND_MODULES

    assert "keel_pdp.reconcile.commands" in COMMAND_MODULES


def test_one_hour_cache_writes_priced_at_the_five_minute_rate_are_the_cache_category(
        ) -> None:
    # The provider bills 1-hour writes at $6/M and 5-minute writes at $3.75/M; the
    # gateway's card has one write rate, so it booked both at $3.75/M.
    def write_line(day: int) -> InternalUsageLine:
        ts = int(datetime(2026, 1, day, 9, tzinfo=UTC).timestamp() * 1000)
        return InternalUsageLine(
            ts_ms=ts, tenant="a", workload="w", provider="openai", model="gpt-4o",
            input_tokens=300_000, cache_write_tokens=300_000, cache_write_1h_tokens=100_000,
            cost_micros=1_125_000, input_cost_micros=0, cached_input_cost_micros=0,
            cache_write_cost_micros=1_125_000, output_cost_micros=0, permit_id=f"w{day}")
    provider = [pline(d, t, None, m) for d in (5, 6, 7)
                for t, m in (("cache_write", 750_000), ("cache_write_1h", 600_000))]
    rec = reconcile(JAN, "openai", provider, [write_line(d) for d in (5, 6, 7)], MAPPING)
    assert rec.category_net(CACHE_RATE) == 3 * (600_000 - 375_000)
    assert rec.category_net(UNEXPLAINED) == 0
    assert sorted(rec.evidence.requests[CACHE_RATE]) == ["w5", "w6", "w7"]
    figures = rec.evidence.figures[CACHE_RATE]["cache_write_1h"]
    assert (figures.tokens, figures.provider_micros, figures.internal_micros) == (
        300_000, 1_800_000, 1_125_000)


def test_a_price_card_per_account_splits_that_accounts_totals(tmp_path: pathlib.Path) -> None:
    from keel_pdp.reconcile.prices import load_cards

    card = ("apiVersion: keel.pdp/v1\nkind: PriceTable\nrevision: r\nproviders:\n  openai:\n"
            "    gpt-4o: {{input: \"2.50\", cached_input: \"{cached}\", output: \"10.00\"}}\n")
    (tmp_path / "default.yaml").write_text(card.format(cached="1.25"))
    (tmp_path / "p2.yaml").write_text(card.format(cached="2.50"))  # cache reads at full rate
    mapping = Mapping(MappingDoc.model_validate({
        "accounts": [{"provider": "openai", "account": "p1", "tenant": "a", "workload": "w"},
                     {"provider": "openai", "account": "p2", "tenant": "a", "workload": "v"}],
        "workloads": [{"tenant": "a", "workload": "w", "engineering_owner": "Owner"},
                      {"tenant": "a", "workload": "v", "engineering_owner": "Owner"}]}))

    def total_only(day: int, workload: str, cost: int) -> InternalUsageLine:
        ts = int(datetime(2026, 1, day, 9, tzinfo=UTC).timestamp() * 1000)
        return InternalUsageLine(ts_ms=ts, tenant="a", workload=workload, provider="openai",
                                 model="gpt-4o", input_tokens=200_000,
                                 cached_input_tokens=100_000, cost_micros=cost,
                                 permit_id=f"{workload}{day}")
    # p1 booked with the right card (0.25 + 0.125), p2 with cache reads at 2.50.
    internal = [total_only(d, "w", 375_000) for d in (3, 4, 5)]
    internal += [total_only(d, "v", 500_000) for d in (3, 4, 5)]
    provider = [pline(d, t, None, m, account=a) for d in (3, 4, 5) for a in ("p1", "p2")
                for t, m in (("input", 250_000), ("cached_input", 125_000))]
    cards = load_cards([str(tmp_path / "default.yaml"), f"p2={tmp_path / 'p2.yaml'}"])
    rec = reconcile(JAN, "openai", provider, internal, mapping, cards)
    assert rec.category_net(CACHE_RATE) == -3 * 125_000
    assert rec.category_net(UNEXPLAINED) == 0
    assert sorted(rec.evidence.requests[CACHE_RATE]) == ["v3", "v4", "v5"]
    # With one card for both, p2's total is split the wrong way: nothing explains it.
    single = load_cards([str(tmp_path / "default.yaml")])
    rec = reconcile(JAN, "openai", provider, internal, mapping, single)
    assert rec.category_net(UNEXPLAINED) != 0
    with pytest.raises(InputError, match="two default price cards"):
        load_cards([str(tmp_path / "default.yaml"), str(tmp_path / "p2.yaml")])


def test_requests_the_gateway_missed_are_unexplained_not_a_cache_rate() -> None:
    # The provider's usage export counts 10 requests a day; the gateway recorded 9.
    # The card comes from the provider's own token counts, so the missing request
    # stays on its lines and no cache-rate difference is invented.
    tokens = {"input": 100_000, "cached_input": 50_000}
    provider = []
    for d in (3, 4, 5):
        for t, rate in (("input", 25), ("cached_input", 125)):
            n = 10 * tokens[t]
            provider.append(pline(d, t, n, None))
            provider.append(pline(d, t, None, n * rate // 10))
    internal = [replace(iline(d, 9 + i, {"input": 250_000, "cached_input": 625_000}, tokens),
                        permit_id=f"r{d}-{i}") for d in (3, 4, 5) for i in range(9)]
    rec = reconcile(JAN, "openai", provider, internal, MAPPING)
    assert rec.category_net(CACHE_RATE) == 0
    assert rec.category_net(UNEXPLAINED) == 3 * (250_000 + 625_000)
    notes = {c.notes[UNEXPLAINED] for c in rec.cells_in(UNEXPLAINED)}
    assert any("provider 1,000,000 tokens vs internal 900,000" in n for n in notes)


def test_a_line_priced_impossibly_against_its_own_tokens_is_a_unit_error() -> None:
    from keel_pdp.reconcile.units import check_units

    # 10,000 output tokens for "$80.00": $8,000 per 1M tokens, cents read as dollars.
    bad = replace(pline(4, "output", 10_000, 80_000_000), source="usage.csv", where="row 7")
    with pytest.raises(InputError, match=r"usage\.csv: row 7: .*8000 USD per 1M tokens.*"
                                         r"cents read as dollars"):
        check_units("openai", [bad], [], JAN)
    tiny = replace(bad, cost_micros=5)  # $0.0005 per 1M tokens
    with pytest.raises(InputError, match="dollars read as cents"):
        check_units("openai", [tiny], [], JAN)
    check_units("openai", [replace(bad, cost_micros=80_000)], [], JAN)  # $8 per 1M: fine


def test_a_mid_month_provider_rate_change_is_unexplained_with_its_date() -> None:
    # Output at $10/M until the 10th, $8/M from the 11th; the gateway kept $10/M.
    provider = [pline(d, "output", None, 1_000_000 if d <= 10 else 800_000)
                for d in range(1, 21)]
    internal = [iline(d, 12, {"output": 1_000_000}, {"output": 100_000}) for d in range(1, 21)]
    rec = reconcile(JAN, "openai", provider, internal, MAPPING)
    assert rec.category_net(TIER) == 0
    assert rec.category_net(UNEXPLAINED) == -10 * 200_000
    note = rec.cells_in(UNEXPLAINED)[0].notes[UNEXPLAINED]
    assert "$10.00 to $8.00 per 1M tokens on 2026-01-11" in note
    # A single day off the rate is not a rate change: it stays on its line.
    provider[4] = pline(5, "output", None, 1_300_000)
    rec = reconcile(JAN, "openai", provider, internal, MAPPING)
    five = [c for c in rec.cells_in(UNEXPLAINED) if c.key.day == date(2026, 1, 5)]
    assert [c.alloc[UNEXPLAINED] for c in five] == [300_000]
