"""End to end: a generated month of traffic with a seeded variance of every
category, reconciled through the CLI; each variance must be found, put in its
category and sized to the cent.

The generator below writes both sides from the same simulated requests: the
internal usage export (what the gateway recorded, with its bugs) and the
provider exports (what the provider billed, in the provider's own format). It
also returns the exact size of every seeded variance, computed from the
simulated requests rather than from the exports.
"""

from __future__ import annotations

import csv
import json
import pathlib
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import pytest

from keel_pdp.reconcile import commands


def main(argv: list[str]) -> int:
    """The reconcile and signoff sub-commands, parsed as ``keel-pdp`` parses them."""
    import argparse

    parser = argparse.ArgumentParser(prog="keel-pdp")
    commands.register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return int(ns.func(ns))

PERIOD = "2026-01"
START = datetime(2026, 1, 1, tzinfo=UTC)
END = datetime(2026, 2, 1, tzinfo=UTC)
HALF_CENT = 5_000  # micro-USD: "sized to the cent"

# USD per 1M tokens: input, cached input, cache write, output (the gateway's table).
PRICES: dict[str, dict[str, tuple[str, str, str, str]]] = {
    "openai": {
        "gpt-4o": ("2.50", "1.25", "2.50", "10.00"),
        "gpt-4o-mini": ("0.15", "0.075", "0.15", "0.60"),
    },
    "anthropic": {
        "claude-sonnet-4-5": ("3.00", "0.30", "3.75", "15.00"),
        "claude-haiku-4-5": ("1.00", "0.10", "1.25", "5.00"),
    },
}
# The dated names the provider reports.
PROVIDER_MODEL = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
}
TYPES = ("input", "cached_input", "cache_write", "output")
ACCOUNTS = {
    "openai": {"support": "proj_support", "search": "proj_search", "shared": "proj_shared"},
    "anthropic": {"support": "wrkspc_support", "search": "wrkspc_search",
                  "shared": "wrkspc_shared"},
}
WORKLOADS = {
    "support": [("acme", "support-bot")],
    "search": [("acme", "search-rank")],
    "shared": [("globex", "summarizer"), ("globex", "translator")],
}
OWNERS = {
    ("acme", "support-bot"): ("Dana Ruiz", "CC-100"),
    ("acme", "search-rank"): ("Lee Park", "CC-200"),
    ("globex", "summarizer"): ("Ana Silva", "CC-300"),
    ("globex", "translator"): ("Omar Haddad", "CC-310"),
}
TIER_FROM_DAY = 20
TIER_FACTOR = Decimal("0.8")


def pico_rate(text: str) -> int:
    return int(Decimal(text) * 1_000_000)


def micros_half_even(pico: int) -> int:
    return int((Decimal(pico) / 1_000_000).to_integral_value(rounding=ROUND_HALF_EVEN))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class Req:
    ts_ms: int
    stamp_ms: int  # what the internal telemetry wrote down
    group: str  # support | search | shared
    workload: tuple[str, str]
    model: str
    tokens: dict[str, int]  # fresh input, cached, cache write, output
    failed: bool = False
    flag_cache: bool = True  # the gateway separated cache reads
    in_internal: bool = True
    billed: bool = True
    permit_id: str = ""


@dataclass
class Month:
    provider: str
    reqs: list[Req] = field(default_factory=list)
    expected: dict[str, int] = field(default_factory=dict)
    credit_micros: int = -25_000_000
    correction_micros: int = 3_740_000

    def rates(self, model: str) -> dict[str, int]:
        r = PRICES[self.provider][model]
        return {t: pico_rate(v) for t, v in zip(TYPES, r, strict=True)}

    def provider_rate(self, req: Req, token_type: str) -> int:
        rate = self.rates(req.model)[token_type]
        day = datetime.fromtimestamp(req.ts_ms / 1000, tz=UTC).day
        if (req.group == "support" and req.model == self.models[0] and token_type == "output"
                and day >= TIER_FROM_DAY):
            rate = int(Decimal(rate) * TIER_FACTOR)
        return rate

    @property
    def models(self) -> list[str]:
        return list(PRICES[self.provider])

    def internal_tokens(self, req: Req) -> dict[str, int]:
        t = dict(req.tokens)
        if not req.flag_cache:
            t["input"] += t["cached_input"]
            t["cached_input"] = 0
        return t

    def internal_costs(self, req: Req) -> dict[str, int]:
        rates = self.rates(req.model)
        return {k: ceil_div(n * rates[k], 1_000_000)
                for k, n in self.internal_tokens(req).items()}


def generate(provider: str, seed: int = 7, big_unexplained: bool = False) -> Month:
    rnd = random.Random(seed)
    month = Month(provider)
    a, b = month.models
    n = 0

    def add(ts: datetime, group: str, model: str, *, workload: tuple[str, str] | None = None,
            tokens: dict[str, int] | None = None, **kw: Any) -> Req:
        nonlocal n
        n += 1
        work = workload or rnd.choice(WORKLOADS[group])
        if tokens is None:
            prompt = rnd.randint(5_000, 120_000)
            cached = prompt * rnd.randint(0, 70) // 100
            write = (prompt - cached) * rnd.randint(0, 30) // 100 if provider == "anthropic" else 0
            tokens = {"input": prompt - cached - write, "cached_input": cached,
                      "cache_write": write, "output": rnd.randint(100, 4_000)}
        ms = int(ts.timestamp() * 1000)
        req = Req(ts_ms=ms, stamp_ms=ms, group=group, workload=work, model=model,
                  tokens=tokens, permit_id=f"pmt_{n:06d}", **kw)
        month.reqs.append(req)
        return req

    # Ordinary traffic, plus traffic just outside the month that the internal
    # export carries but this invoice does not bill.
    for day_index in range(-1, 32):
        day = START + timedelta(days=day_index)
        for group in ("support", "search", "shared"):
            for model in (a, b):
                count = rnd.randint(10, 18) if 0 <= day_index < 31 else 3
                for _ in range(count):
                    if day_index == -1:
                        ts = day + timedelta(hours=rnd.randint(20, 23), minutes=rnd.randint(0, 59))
                    elif day_index == 31:
                        ts = day + timedelta(hours=rnd.randint(1, 3), minutes=rnd.randint(0, 59))
                    else:
                        ts = day + timedelta(seconds=rnd.randint(0, 86_000))
                    # Keep the seeded boundary cases the only calls near those midnights.
                    if group == "search" and model == a and day_index == 30:
                        ts = min(ts, day + timedelta(hours=22))
                    if group == "shared" and model == a and day_index in (14, 15):
                        ts = day + timedelta(hours=rnd.randint(1, 22))
                    heavy = group == "search" and model == a
                    tokens = None
                    if heavy:
                        prompt = rnd.randint(60_000, 120_000)
                        cached = prompt * rnd.randint(60, 85) // 100
                        tokens = {"input": prompt - cached, "cached_input": cached,
                                  "cache_write": 0, "output": rnd.randint(200, 2_000)}
                    flag = not (heavy and 8 <= day_index + 1 <= 14)
                    add(ts, group, model, tokens=tokens, flag_cache=flag,
                        billed=0 <= day_index < 31)

    exact: dict[str, int] = {k: 0 for k in ("clock_skew", "cache_rate", "tier_breakpoint",
                                            "failed_requests", "unexplained")}

    # 1. Clock skew: the search gateway flushed its last 47 minutes after midnight,
    #    stamping those calls into the next month.
    for minute in (13, 25, 38, 51, 59):
        r = add(END - timedelta(hours=1) + timedelta(minutes=minute), "search", a,
                tokens={"input": 80_000, "cached_input": 20_000, "cache_write": 0,
                        "output": 4_000})
        r.stamp_ms = r.ts_ms + 3_600_000
    #    ...and one call that straddled a midnight inside the month (net zero).
    mid = add(datetime(2026, 1, 15, 23, 59, 58, tzinfo=UTC), "shared", a,
              workload=("globex", "summarizer"))
    mid.stamp_ms = int(datetime(2026, 1, 16, 0, 0, 3, tzinfo=UTC).timestamp() * 1000)

    # 4. Failed attempts the gateway booked and the provider did not bill.
    for day_number in (3, 9, 21):
        for hour in (10, 15):
            add(datetime(2026, 1, day_number, hour, 7, tzinfo=UTC), "shared", a,
                workload=("globex", "translator"), failed=True, billed=False,
                tokens={"input": 90_000, "cached_input": 0, "cache_write": 0, "output": 0})

    # 7. Unexplained: traffic on a key that bypassed the gateway.
    shadow_tokens = {"input": 40_000, "cached_input": 0, "cache_write": 0, "output": 3_000}
    for i in range(60 if big_unexplained else 4):
        add(datetime(2026, 1, 5, 12, i, tzinfo=UTC), "shared", a, tokens=dict(shadow_tokens),
            workload=("globex", "summarizer"), in_internal=False)

    # Exact expected sizes from the simulated requests.
    for r in month.reqs:
        if not START.timestamp() * 1000 <= r.ts_ms < END.timestamp() * 1000:
            continue
        rates = month.rates(r.model)
        if r.billed and r.in_internal and r.stamp_ms >= END.timestamp() * 1000:
            exact["clock_skew"] += sum(r.tokens[t] * month.provider_rate(r, t) for t in TYPES)
        if not r.flag_cache:
            exact["cache_rate"] += r.tokens["cached_input"] * (
                rates["cached_input"] - rates["input"])
        if month.provider_rate(r, "output") != rates["output"] and r.in_internal and r.billed:
            exact["tier_breakpoint"] += r.tokens["output"] * (
                month.provider_rate(r, "output") - rates["output"])
        if r.failed:
            exact["failed_requests"] -= sum(month.internal_costs(r).values()) * 1_000_000
        if not r.in_internal:
            exact["unexplained"] += sum(r.tokens[t] * month.provider_rate(r, t) for t in TYPES)
    month.expected = {k: micros_half_even(v) for k, v in exact.items()}
    month.expected["credits"] = month.credit_micros
    month.expected["prior_period_correction"] = month.correction_micros
    return month


# ----------------------------------------------------------------------------- writers


def _cells(month: Month) -> dict[tuple[date, str, str, str], tuple[int, int]]:
    """Provider usage per (day, account, provider model, token type): tokens, pico."""
    out: dict[tuple[date, str, str, str], list[int]] = {}
    for r in month.reqs:
        if not r.billed or not START.timestamp() * 1000 <= r.ts_ms < END.timestamp() * 1000:
            continue
        day = datetime.fromtimestamp(r.ts_ms / 1000, tz=UTC).date()
        account = ACCOUNTS[month.provider][r.group]
        for t in TYPES:
            if t == "cache_write" and month.provider == "openai":
                continue
            cell = out.setdefault((day, account, PROVIDER_MODEL[r.model], t), [0, 0])
            cell[0] += r.tokens[t]
            cell[1] += r.tokens[t] * month.provider_rate(r, t)
    return {k: (v[0], v[1]) for k, v in out.items()}


def invoice_micros(month: Month) -> int:
    usage = sum(micros_half_even(pico) for _, pico in _cells(month).values())
    return usage + month.credit_micros + month.correction_micros


def internal_micros(month: Month) -> int:
    return sum(sum(month.internal_costs(r).values()) for r in month.reqs
               if r.in_internal and START.timestamp() * 1000 <= r.stamp_ms
               < END.timestamp() * 1000)


def _dec(pico: int, scale: int) -> str:
    value = Decimal(pico) / Decimal(scale)
    return f"{value:f}"


def _raw_numbers(obj: Any) -> str:
    return re.sub(r'"__num__([-0-9.]+)"', r"\1", json.dumps(obj, indent=1))


def write_openai(month: Month, folder: pathlib.Path) -> list[pathlib.Path]:
    cells = _cells(month)
    days = sorted({k[0] for k in cells})
    usage_buckets, cost_buckets = [], []
    for day in days:
        start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
        usage_results, cost_results = [], []
        groups = sorted({(k[1], k[2]) for k in cells if k[0] == day})
        for account, model in groups:
            tok = {t: cells.get((day, account, model, t), (0, 0)) for t in TYPES}
            usage_results.append({
                "object": "organization.usage.completions.result",
                "input_tokens": tok["input"][0] + tok["cached_input"][0],
                "output_tokens": tok["output"][0],
                "input_cached_tokens": tok["cached_input"][0],
                "input_audio_tokens": 0, "output_audio_tokens": 0,
                "num_model_requests": 1, "project_id": account, "user_id": None,
                "api_key_id": f"key_{account[5:]}", "model": model, "batch": False,
                "service_tier": "default"})
            for t, label in (("input", "input"), ("cached_input", "cached input"),
                             ("output", "output")):
                if tok[t][1]:
                    cost_results.append({
                        "object": "organization.costs.result",
                        "amount": {"value": f"__num__{_dec(tok[t][1], 10**12)}",
                                   "currency": "usd"},
                        "line_item": f"{model}, {label}", "project_id": account})
        usage_buckets.append({"object": "bucket", "start_time": start,
                              "end_time": start + 86_400, "results": usage_results})
        cost_buckets.append({"object": "bucket", "start_time": start,
                             "end_time": start + 86_400, "results": cost_results})
    usage = folder / "openai_usage_completions.json"
    # Two pages, as a paginated pull saves them.
    usage.write_text(_raw_numbers([
        {"object": "page", "data": usage_buckets[:16], "has_more": True, "next_page": "p2"},
        {"object": "page", "data": usage_buckets[16:], "has_more": False, "next_page": None}]))
    costs = folder / "openai_costs.json"
    costs.write_text(_raw_numbers({"object": "page", "data": cost_buckets, "has_more": False,
                                   "next_page": None}))
    return [usage, costs]


def write_anthropic(month: Month, folder: pathlib.Path) -> list[pathlib.Path]:
    cells = _cells(month)
    days = sorted({k[0] for k in cells})
    token_names = {"input": "uncached_input_tokens", "cached_input": "cache_read_input_tokens",
                   "cache_write": "cache_creation.ephemeral_5m_input_tokens",
                   "output": "output_tokens"}
    usage_data, cost_data = [], []
    for day in days:
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        bounds = {"starting_at": start.isoformat().replace("+00:00", "Z"),
                  "ending_at": (start + timedelta(days=1)).isoformat().replace("+00:00", "Z")}
        usage_results, cost_results = [], []
        for account, model in sorted({(k[1], k[2]) for k in cells if k[0] == day}):
            tok = {t: cells.get((day, account, model, t), (0, 0)) for t in TYPES}
            usage_results.append({
                "api_key_id": f"apikey_{account[7:]}", "workspace_id": account, "model": model,
                "service_tier": "standard", "context_window": "0-200k",
                "uncached_input_tokens": tok["input"][0],
                "cache_read_input_tokens": tok["cached_input"][0],
                "cache_creation": {"ephemeral_5m_input_tokens": tok["cache_write"][0],
                                   "ephemeral_1h_input_tokens": 0},
                "output_tokens": tok["output"][0],
                "server_tool_use": {"web_search_requests": 0}})
            for t in TYPES:
                if tok[t][1]:
                    cost_results.append({
                        "amount": _dec(tok[t][1], 10**10), "currency": "USD",
                        "cost_type": "tokens", "context_window": "0-200k",
                        "description": f"{model} usage - {t}", "model": model,
                        "service_tier": "standard", "token_type": token_names[t],
                        "workspace_id": account})
        usage_data.append({**bounds, "results": usage_results})
        cost_data.append({**bounds, "results": cost_results})
    usage = folder / "anthropic_usage_report.json"
    usage.write_text(json.dumps({"data": usage_data, "has_more": False, "next_page": None}))
    costs = folder / "anthropic_cost_report.json"
    costs.write_text(json.dumps({"data": cost_data, "has_more": False, "next_page": None}))
    return [usage, costs]


def write_invoice_lines(month: Month, folder: pathlib.Path) -> tuple[pathlib.Path,
                                                                     pathlib.Path]:
    """Credits and corrections, keyed in from the invoice (generic CSV)."""
    path = folder / "invoice_adjustments.csv"
    search = ACCOUNTS[month.provider]["search"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Date", "Project", "Type", "Description", "Amount", "Currency",
                    "Service period"])
        w.writerow(["2026-01-31", "", "Credit", "Promotional credit (startup program)",
                    "-25.00", "USD", ""])
        w.writerow(["2026-01-31", search, "Adjustment",
                    "Billing correction: output tokens under-billed", "3.74", "USD", "2025-12"])
    cmap = folder / "invoice_columns.yaml"
    cmap.write_text(
        "apiVersion: keel.pdp/v1\nkind: ColumnMap\n"
        f"provider: {month.provider}\n"
        "columns:\n  date: Date\n  account: Project\n  kind: Type\n"
        "  description: Description\n  cost: Amount\n  currency: Currency\n"
        "  belongs_to: Service period\n"
        "kinds:\n  Credit: credit\n  Adjustment: correction\n")
    return path, cmap


def write_internal(month: Month, folder: pathlib.Path) -> pathlib.Path:
    path = folder / "internal_usage.csv"
    cols = ["ts", "tenant", "workload", "provider", "model", "input_tokens",
            "cached_input_tokens", "cache_write_tokens", "output_tokens", "cost_micros",
            "input_cost_micros", "cached_input_cost_micros", "cache_write_cost_micros",
            "output_cost_micros", "status", "permit_id"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in sorted(month.reqs, key=lambda x: x.stamp_ms):
            if not r.in_internal:
                continue
            t = month.internal_tokens(r)
            c = month.internal_costs(r)
            stamp = datetime.fromtimestamp(r.stamp_ms / 1000, tz=UTC)
            w.writerow([stamp.isoformat().replace("+00:00", "Z"), r.workload[0], r.workload[1],
                        month.provider, r.model,
                        t["input"] + t["cached_input"] + t["cache_write"], t["cached_input"],
                        t["cache_write"], t["output"], sum(c.values()), c["input"],
                        c["cached_input"], c["cache_write"], c["output"],
                        "failed" if r.failed else "ok", r.permit_id])
    return path


def write_mapping(month: Month, folder: pathlib.Path) -> pathlib.Path:
    lines = ["apiVersion: keel.pdp/v1", "kind: ReconcileMapping",
             "finance_owner: Priya Natarajan", "ai_program_lead: Sam Okafor", "accounts:"]
    for group, account in ACCOUNTS[month.provider].items():
        for tenant, workload in WORKLOADS[group]:
            lines += [f"  - provider: {month.provider}", f"    account: {account}",
                      f"    tenant: {tenant}", f"    workload: {workload}"]
    lines.append("workloads:")
    for (tenant, workload), (owner, cc) in OWNERS.items():
        lines += [f"  - tenant: {tenant}", f"    workload: {workload}",
                  f"    engineering_owner: {owner}", f"    cost_center: {cc}"]
    path = folder / "mapping.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Setup:
    month: Month
    args: list[str]
    out: pathlib.Path


def build(tmp_path: pathlib.Path, provider: str, **kw: Any) -> Setup:
    month = generate(provider, **kw)
    src = tmp_path / "in"
    src.mkdir()
    exports = write_openai(month, src) if provider == "openai" else write_anthropic(month, src)
    invoice, cmap = write_invoice_lines(month, src)
    out = tmp_path / "out"
    args = ["reconcile", "--internal", str(write_internal(month, src)), "--period", PERIOD,
            "--provider", provider, "--mapping", str(write_mapping(month, src)),
            "--out", str(out), "--column-map", str(cmap)]
    for path in [*exports, invoice]:
        args += ["--export", str(path)]
    return Setup(month, args, out)


def memo(setup: Setup) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((setup.out / PERIOD / "memo.json").read_text())
    return data


def by_category(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["category"]: c for c in data["categories"]}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_every_seeded_variance_is_found_categorised_and_sized_to_the_cent(
        tmp_path: pathlib.Path, provider: str, capsys: pytest.CaptureFixture[str]) -> None:
    setup = build(tmp_path, provider)
    assert main(setup.args) == 0, capsys.readouterr().err
    data = memo(setup)
    cats = by_category(data)
    month = setup.month

    invoice = invoice_micros(month)
    internal = internal_micros(month)
    assert data["totals"]["invoice_micros"] == invoice
    assert data["totals"]["internal_micros"] == internal
    # The categories explain the whole gap, to the micro-dollar.
    assert sum(c["net_micros"] for c in data["categories"]) == invoice - internal

    for name, expected in month.expected.items():
        found = cats[name]["net_micros"]
        assert abs(found - expected) <= HALF_CENT, (name, found, expected)
        assert expected != 0 and found != 0, name
    rounding_expected = invoice - internal - sum(month.expected.values())
    assert abs(cats["rounding"]["net_micros"] - rounding_expected) <= HALF_CENT
    assert cats["rounding"]["net_micros"] != 0
    assert cats["rounding"]["decision"] == "accepted"

    # Clock skew: the month-end flush, plus the call that straddled a midnight
    # inside the month (offsetting, so gross exceeds net).
    skew_days = {li["day"] for li in cats["clock_skew"]["line_items"]}
    assert {"2026-01-31", "2026-01-15", "2026-01-16"} <= skew_days
    assert cats["clock_skew"]["gross_micros"] > abs(cats["clock_skew"]["net_micros"])
    # Cache rate: only the search account's first model, on the days the flag was lost.
    cache_items = cats["cache_rate"]["line_items"]
    assert {li["account"] for li in cache_items} == {ACCOUNTS[provider]["search"]}
    assert {li["day"] for li in cache_items} == {f"2026-01-{d:02d}" for d in range(8, 15)}
    # Tier: support, first model, output, from the breakpoint day on.
    tier_items = cats["tier_breakpoint"]["line_items"]
    assert {(li["account"], li["token_type"]) for li in tier_items} == {
        (ACCOUNTS[provider]["support"], "output")}
    assert min(li["day"] for li in tier_items) == f"2026-01-{TIER_FROM_DAY}"
    # Failed attempts on the three seeded days.
    assert {li["day"] for li in cats["failed_requests"]["line_items"]} == {
        "2026-01-03", "2026-01-09", "2026-01-21"}
    # Unexplained: the bypassing traffic, with its line items.
    unexplained = cats["unexplained"]["line_items"]
    assert {li["day"] for li in unexplained} == {"2026-01-05"}
    assert all(li["account"] == ACCOUNTS[provider]["shared"] for li in unexplained)
    assert cats["unexplained"]["decision"] == "accepted"
    assert cats["credits"]["decision"] == "recorded"
    assert cats["prior_period_correction"]["line_items"][0]["belongs_to"] == "2025-12"
    # The cache variance is large: escalated to the search workload's owner,
    # which does not block posting (it is explained).
    assert cats["cache_rate"]["decision"] == "escalated"
    assert any("Lee Park" in e for e in cats["cache_rate"]["escalate_to"])
    assert data["status"] == "ready-for-signoff"

    # Chargeback: posts the invoice total; the correction names its period.
    rows = data["chargeback"]
    assert sum(r["amount_micros"] for r in rows) == invoice
    adjust = [r for r in rows if r["kind"] == "prior_period_adjustment"]
    assert adjust and {r["belongs_to"] for r in adjust} == {"2025-12"}
    assert {r["workload"] for r in adjust} == {"search-rank"}
    assert sum(r["amount_micros"] for r in rows if r["kind"] == "credit") == -25_000_000
    assert {(r["tenant"], r["workload"]) for r in rows if r["kind"] == "usage"} == set(OWNERS)

    # The memo: one paragraph per category, past tense, with figures.
    text = (setup.out / PERIOD / "memo.md").read_text()
    for title in ("Clock skew at window boundaries", "Cache-read tokens at a different rate",
                  "Tier breakpoints", "Failed-request billing",
                  "Credits and promotional balances",
                  "Provider corrections that belong to a prior period", "Rounding",
                  "Unexplained"):
        assert f"### {title}" in text
    assert "Provider rate applied." in text and "Escalated to Lee Park" in text
    assert "2025-12" in text


def test_the_four_document_set_is_written_with_hashes(tmp_path: pathlib.Path) -> None:
    setup = build(tmp_path, "openai")
    assert main(setup.args) == 0
    folder = setup.out / PERIOD
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"provider_export.csv", "internal_usage.csv", "chargeback.csv", "memo.md",
            "memo.json", "line_items.csv", "provider_original/openai_costs.json",
            "provider_original/openai_usage_completions.json",
            "provider_original/invoice_adjustments.csv"} <= names
    data = memo(setup)
    import hashlib

    for name, digest in data["documents"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    # The internal export covers exactly the UTC month.
    with (folder / "internal_usage.csv").open() as fh:
        stamps = [row["ts"] for row in csv.DictReader(fh)]
    assert stamps and all(s.startswith("2026-01-") for s in stamps)
    # No leftovers from the atomic write.
    assert [p.name for p in setup.out.iterdir()] == [PERIOD]
    # Re-running unchanged inputs reproduces the memo byte for byte.
    before = (folder / "memo.md").read_bytes()
    assert main(setup.args) == 0
    assert (folder / "memo.md").read_bytes() == before


def test_an_unexplained_gap_above_tolerance_blocks_posting(
        tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    setup = build(tmp_path, "openai", big_unexplained=True)
    assert main(setup.args) == 1
    assert "posting is blocked" in capsys.readouterr().err
    data = memo(setup)
    cats = by_category(data)
    assert data["status"] == "blocked"
    assert cats["unexplained"]["decision"] == "escalated"
    assert cats["unexplained"]["blocks_posting"] is True
    assert cats["unexplained"]["gross_micros"] > data["tolerance"]["micros"]
    assert any("Ana Silva" in e for e in cats["unexplained"]["escalate_to"])
    assert abs(cats["unexplained"]["net_micros"]
               - setup.month.expected["unexplained"]) <= HALF_CENT
    folder = str(setup.out / PERIOD)
    for role, name in (("engineering-owner", "Ana Silva"), ("finance-owner", "Priya Natarajan"),
                       ("ai-program-lead", "Sam Okafor")):
        assert main(["signoff", "--dir", folder, "--role", role, "--name", name]) == 0
    assert not (setup.out / PERIOD / "posted.json").exists()
    assert "not posted" in capsys.readouterr().out
