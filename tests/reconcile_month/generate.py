"""Generate one month of two providers' traffic, both sides of it, and the answer.

The simulation is the ground truth: every request has a time, a tenant whose
telemetry runs on its own clock, an account (OpenAI project / Anthropic
workspace), a model, tokens by type and an outcome. From it the generator writes

- the gateway's internal usage export (local timestamps with their offset, the
  cost the gateway booked per token type, rounded up to the micro-dollar, with
  the gateway's own card: no long-context tier, cache reads at the full input
  rate on one account per provider, client-disconnected streams sometimes
  booked at $0, overloaded / rate-limited attempts booked at their input cost);
- the provider's exports in their documented shapes: the OpenAI Costs API
  (``organization.costs.result``, amounts as JSON numbers, ``line_item``
  "<model snapshot>, <token type>[, long context]") and Usage API
  (``organization.usage.completions.result``); the Anthropic Admin API cost
  report (amounts as decimal strings in cents, ``token_type``,
  ``context_window``) and messages usage report; invoice credits and a
  prior-period correction keyed into a CSV with a column map;
- ``expected.json``: each category's exact amount per provider and per
  account, with the request ids behind it, computed here from the simulated
  requests (the provider bills each request exactly; a line's amount is the
  exact sum of its requests, rounded the way the provider rounds it, plus the
  planted unexplained amount).

Precedence of a request's difference (one category each): clock skew (the
provider's UTC month is not the ledger's tenant-local month) > failed attempt
> long-context tier > cache rate. What is left is rounding.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo

YEAR, MONTH = 2026, 1
PERIOD = f"{YEAR:04d}-{MONTH:02d}"
START = datetime(YEAR, MONTH, 1, tzinfo=UTC)
END = datetime(YEAR, MONTH + 1, 1, tzinfo=UTC)
MARGIN = timedelta(hours=20)  # traffic simulated either side of the month
MILLION = Decimal(1_000_000)
TYPES = ("input", "cached_input", "cache_write", "cache_write_1h", "output")

# Tenants and their clocks: west and east of UTC, and one on UTC.
TENANTS = {"acme": "America/Los_Angeles", "globex": "Asia/Tokyo", "initech": None}

# USD per 1M tokens as the providers publish them.
CARDS: dict[str, dict[str, str]] = {
    "gpt-5": {"input": "1.25", "cached_input": "0.125", "cache_write": "1.25",
              "cache_write_1h": "1.25", "output": "10.00"},
    "gpt-4o-mini": {"input": "0.15", "cached_input": "0.075", "cache_write": "0.15",
                    "cache_write_1h": "0.15", "output": "0.60"},
    "claude-sonnet-4-5": {"input": "3.00", "cached_input": "0.30", "cache_write": "3.75",
                          "cache_write_1h": "6.00", "output": "15.00"},
    "claude-haiku-4-5": {"input": "1.00", "cached_input": "0.10", "cache_write": "1.25",
                         "cache_write_1h": "2.00", "output": "5.00"},
}
# Long-context rates (the whole request, when its input is above the threshold).
LONG: dict[str, tuple[int, dict[str, str]]] = {
    "gpt-5": (272_000, {"input": "2.50", "cached_input": "0.25", "cache_write": "2.50",
                        "cache_write_1h": "2.50", "output": "15.00"}),
    "claude-sonnet-4-5": (200_000, {"input": "6.00", "cached_input": "0.60",
                                    "cache_write": "7.50", "cache_write_1h": "12.00",
                                    "output": "22.50"}),
}
SNAPSHOT = {"gpt-5": "gpt-5-2025-08-07", "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
            "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
            "claude-haiku-4-5": "claude-haiku-4-5-20251001"}


@dataclass(frozen=True)
class Account:
    provider: str
    account: str
    tenant: str
    workload: str
    owner: str
    models: tuple[str, ...]
    long_context: bool = False  # sends prompts above the model's threshold
    cache_at_input_rate: bool = False  # the gateway's card bug on this account


ACCOUNTS = (
    Account("openai", "proj_support", "acme", "support-bot", "Dana Ruiz",
            ("gpt-5", "gpt-4o-mini"), cache_at_input_rate=True),
    Account("openai", "proj_search", "globex", "search-rank", "Lee Park",
            ("gpt-5", "gpt-4o-mini"), long_context=True),
    Account("openai", "proj_batch", "initech", "batch-jobs", "Ana Silva", ("gpt-4o-mini",)),
    Account("anthropic", "wrkspc_support", "acme", "support-agent", "Dana Ruiz",
            ("claude-sonnet-4-5", "claude-haiku-4-5"), cache_at_input_rate=True),
    Account("anthropic", "wrkspc_research", "globex", "research", "Omar Haddad",
            ("claude-sonnet-4-5",), long_context=True),
    Account("anthropic", "wrkspc_ops", "initech", "ops-triage", "Ana Silva",
            ("claude-haiku-4-5",)),
)
FINANCE_OWNER = "Priya Natarajan"
AI_PROGRAM_LEAD = "Sam Okafor"
# What each provider calls an attempt it rejected before generating anything.
REJECTED = {"openai": "rate_limit_error", "anthropic": "overloaded_error"}
CREDIT = {"openai": Decimal("-250.00"), "anthropic": Decimal("-120.00")}
CORRECTION = {"openai": Decimal("37.40"), "anthropic": Decimal("12.05")}
# A line that rose with no usage behind it: (account, day, model, token type, USD).
PLANTED = {"openai": ("proj_support", 17, "gpt-5", "output", Decimal("123.45")),
           "anthropic": ("wrkspc_ops", 9, "claude-haiku-4-5", "input", Decimal("58.20"))}


@dataclass
class Request:
    rid: str
    ts: datetime  # UTC
    acct: Account
    model: str
    tokens: dict[str, int]
    error: str = ""  # "", "client_disconnected", or the provider's rejection class
    booked_zero: bool = False  # the gateway booked a disconnected stream at $0
    provider_cost: dict[str, Decimal] = field(default_factory=dict)  # exact USD
    booked_micros: dict[str, int] = field(default_factory=dict)

    @property
    def input_total(self) -> int:
        return (self.tokens["input"] + self.tokens["cached_input"] + self.tokens["cache_write"]
                + self.tokens["cache_write_1h"])

    @property
    def long(self) -> bool:
        rule = LONG.get(self.model)
        return rule is not None and self.input_total > rule[0]

    @property
    def provider_month(self) -> str:
        return f"{self.ts.year:04d}-{self.ts.month:02d}"

    @property
    def ledger_month(self) -> str:
        zone = TENANTS[self.acct.tenant]
        local = self.ts.astimezone(ZoneInfo(zone)) if zone else self.ts
        return f"{local.year:04d}-{local.month:02d}"

    @property
    def billed(self) -> bool:
        return self.error != REJECTED[self.acct.provider]

    def local_stamp(self) -> str:
        zone = TENANTS[self.acct.tenant]
        local = self.ts.astimezone(ZoneInfo(zone)) if zone else self.ts
        text = local.isoformat(timespec="milliseconds")
        return text.replace("+00:00", "Z")


def _rate(model: str, token_type: str, long: bool) -> Decimal:
    table = LONG[model][1] if long else CARDS[model]
    return Decimal(table[token_type]) / MILLION  # USD per token


def _simulate(provider: str, n: int, rng: random.Random) -> list[Request]:
    accounts = [a for a in ACCOUNTS if a.provider == provider]
    span = (END - START) + 2 * MARGIN
    out: list[Request] = []
    for i in range(n):
        acct = rng.choice(accounts)
        model = rng.choice(acct.models)
        ts = START - MARGIN + timedelta(milliseconds=rng.randrange(int(span.total_seconds()
                                                                       * 1000)))
        if acct.long_context and model in LONG and rng.random() < 0.04:
            total_in = rng.randint(LONG[model][0] + 5_000, LONG[model][0] + 300_000)
        else:
            total_in = min(int(rng.expovariate(1 / 6_000)) + 200, 150_000)
        cached = 0
        if total_in >= 2_000 and rng.random() < 0.4:
            cached = rng.randint(1_000, total_in - 500)
        write = 0
        if provider == "anthropic" and total_in - cached >= 2_000 and rng.random() < 0.2:
            write = rng.randint(1_000, total_in - cached - 500)
        output = rng.randint(50, 4_000)
        error = ""
        roll = rng.random()
        booked_zero = False
        if roll < 0.02:
            error = "client_disconnected"
            output = rng.randint(20, 1_500)  # generated before the client went away
            booked_zero = rng.random() < 0.67
        elif roll < 0.04:
            error = REJECTED[provider]
            output = 0
        # A third of the cache writes use the 1-hour lifetime (its own rate).
        write_1h = write if write and rng.random() < 0.33 else 0
        tokens = {"input": total_in - cached - write, "cached_input": cached,
                  "cache_write": write - write_1h, "cache_write_1h": write_1h,
                  "output": output}
        req = Request(f"pm-{provider[:2]}-{i:06d}", ts, acct, model, tokens, error, booked_zero)
        long = req.long
        for t in TYPES:
            # The provider bills every request exactly, at its card (long-context
            # rates for the whole request above the threshold).
            req.provider_cost[t] = (tokens[t] * _rate(model, t, long)) if req.billed \
                else Decimal(0)
            # The gateway's card: no tier; cache reads at the input rate on one account.
            booked_rate = _rate(model, "input" if (t == "cached_input"
                                                   and acct.cache_at_input_rate) else t, False)
            micros = (tokens[t] * booked_rate * MILLION).to_integral_value(ROUND_CEILING)
            req.booked_micros[t] = 0 if booked_zero else int(micros)
        out.append(req)
    out.sort(key=lambda r: (r.ts, r.rid))
    return out


# ----------------------------------------------------------------- provider exports


def _day_key(ts: datetime) -> int:
    return int(datetime(ts.year, ts.month, ts.day, tzinfo=UTC).timestamp())


LineKey = tuple[int, str, str, str, bool]  # day epoch, account, model, token type, long


def _lines(reqs: list[Request]) -> dict[LineKey, Decimal]:
    lines: dict[LineKey, Decimal] = defaultdict(Decimal)
    for r in reqs:
        if r.provider_month != PERIOD or not r.billed:
            continue
        for t in TYPES:
            if r.tokens[t]:
                lines[(_day_key(r.ts), r.acct.account, r.model, t, r.long)] += r.provider_cost[t]
    return lines


def _planted_key(provider: str) -> LineKey:
    account, day, model, token_type, _ = PLANTED[provider]
    return (int(datetime(YEAR, MONTH, day, tzinfo=UTC).timestamp()), account, model,
            token_type, False)


_OPENAI_LABEL = {"input": "input", "cached_input": "cached input", "output": "output"}
_ANTHROPIC_TYPE = {"input": "uncached_input_tokens", "cached_input": "cache_read_input_tokens",
                   "cache_write": "cache_creation.ephemeral_5m_input_tokens",
                   "cache_write_1h": "cache_creation.ephemeral_1h_input_tokens",
                   "output": "output_tokens"}


def _pages(buckets: dict[int, list[dict[str, Any]]], start_key: str, end_key: str,
           per_page: int, iso: bool) -> list[dict[str, Any]]:
    def stamp(epoch: int) -> Any:
        if not iso:
            return epoch
        return datetime.fromtimestamp(epoch, tz=UTC).isoformat().replace("+00:00", "Z")

    days = sorted(buckets)
    pages = []
    for i in range(0, len(days), per_page):
        chunk = days[i:i + per_page]
        more = i + per_page < len(days)
        data = [{start_key: stamp(d), end_key: stamp(d + 86_400), "results": buckets[d]}
                for d in chunk]
        if not iso:
            data = [{"object": "bucket", **b} for b in data]
            pages.append({"object": "page", "data": data, "has_more": more,
                          "next_page": f"page_{i // per_page + 2}" if more else None})
        else:
            pages.append({"data": data, "has_more": more,
                          "next_page": f"page_{i // per_page + 2}" if more else None})
    return pages


def _write_openai(out: pathlib.Path, reqs: list[Request], amounts: dict[LineKey, Decimal]
                  ) -> list[str]:
    costs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for (day, account, model, t, long), amount in sorted(amounts.items()):
        label = f"{SNAPSHOT[model]}, {_OPENAI_LABEL[t]}" + (", long context" if long else "")
        costs[day].append({"object": "organization.costs.result",
                           "amount": {"value": f"@@{amount}@@", "currency": "usd"},
                           "line_item": label, "project_id": account})
    usage: dict[tuple[int, str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in reqs:
        if r.provider_month != PERIOD or not r.billed:
            continue
        row = usage[(_day_key(r.ts), r.acct.account, r.model)]
        row["input_tokens"] += r.input_total
        row["input_cached_tokens"] += r.tokens["cached_input"]
        row["output_tokens"] += r.tokens["output"]
        row["num_model_requests"] += 1
    ubuckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for (day, account, model), row in sorted(usage.items()):
        ubuckets[day].append({"object": "organization.usage.completions.result",
                              "project_id": account, "api_key_id": None, "user_id": None,
                              "model": SNAPSHOT[model], "batch": None,
                              "input_audio_tokens": 0, "output_audio_tokens": 0, **row})
    costs_path = out / "openai_costs.json"
    text = json.dumps(_pages(costs, "start_time", "end_time", 31, False), indent=1)
    costs_path.write_text(text.replace('"@@', "").replace('@@"', ""))
    usage_path = out / "openai_usage_completions.json"
    usage_path.write_text(json.dumps(_pages(ubuckets, "start_time", "end_time", 31, False),
                                     indent=1))
    return [costs_path.name, usage_path.name]


def _write_anthropic(out: pathlib.Path, reqs: list[Request], amounts: dict[LineKey, Decimal],
                     analytics: bool = False) -> list[str]:
    costs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for (day, account, model, t, long), amount in sorted(amounts.items()):
        cents = (amount * 100).quantize(Decimal("0.0001" if analytics else "0.01"))
        costs[day].append({
            "currency": "USD", "amount": f"{cents:f}", "workspace_id": account,
            "description": f"{model} {t}" + (" long context" if long else ""),
            "cost_type": "tokens", "context_window": "200k-1M" if long else "0-200k",
            "model": SNAPSHOT[model], "service_tier": "standard",
            "token_type": _ANTHROPIC_TYPE[t]})
    usage: dict[tuple[int, str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in reqs:
        if r.provider_month != PERIOD or not r.billed:
            continue
        row = usage[(_day_key(r.ts), r.acct.account, r.model)]
        row["uncached_input_tokens"] += r.tokens["input"]
        row["cache_read_input_tokens"] += r.tokens["cached_input"]
        row["cache_write_5m"] += r.tokens["cache_write"]
        row["cache_write_1h"] += r.tokens["cache_write_1h"]
        row["output_tokens"] += r.tokens["output"]
    ubuckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for (day, account, model), row in sorted(usage.items()):
        ubuckets[day].append({
            "uncached_input_tokens": row["uncached_input_tokens"],
            "cache_read_input_tokens": row["cache_read_input_tokens"],
            "cache_creation": {"ephemeral_5m_input_tokens": row["cache_write_5m"],
                               "ephemeral_1h_input_tokens": row["cache_write_1h"]},
            "output_tokens": row["output_tokens"],
            "server_tool_use": {"web_search_requests": 0},
            "api_key_id": None, "workspace_id": account, "model": SNAPSHOT[model],
            "service_tier": "standard", "context_window": None})
    cost_path = out / "anthropic_cost_report.json"
    cost_path.write_text(json.dumps(_pages(costs, "starting_at", "ending_at", 31, True),
                                    indent=1))
    if analytics:
        # The cost analytics export: one item per row, amounts in fractional cents,
        # list (pre-discount) beside the amount charged.
        items = []
        for day, rows in sorted(costs.items()):
            for row in rows:
                fractional = str(row["amount"])
                items.append({
                    "starting_at": datetime.fromtimestamp(day, tz=UTC).isoformat()
                    .replace("+00:00", "Z"),
                    "ending_at": datetime.fromtimestamp(day + 86_400, tz=UTC).isoformat()
                    .replace("+00:00", "Z"),
                    "group": {"workspace_id": row["workspace_id"], "model": row["model"],
                              "cost_type": "tokens", "token_type": row["token_type"],
                              "context_window": row["context_window"],
                              "service_tier": "standard"},
                    "cost": {"amount": fractional, "list_amount": fractional,
                             "currency": "USD",
                             "requests": None}})
        cost_path.unlink()
        cost_path = out / "anthropic_cost_analytics.json"
        cost_path.write_text(json.dumps({"data": items, "has_more": False,
                                         "next_page": None}, indent=1))
    usage_path = out / "anthropic_usage_report.json"
    usage_path.write_text(json.dumps(_pages(ubuckets, "starting_at", "ending_at", 31, True),
                                     indent=1))
    return [cost_path.name, usage_path.name]


def _write_adjustments(out: pathlib.Path, provider: str) -> list[str]:
    accounts = [a.account for a in ACCOUNTS if a.provider == provider]
    csv_path = out / f"{provider}_invoice_adjustments.csv"
    with csv_path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["Date", "Project", "Type", "Description", "Amount", "Currency",
                    "Service period"])
        w.writerow([f"{PERIOD}-31", accounts[0], "Credit", "Promotional credit",
                    f"{CREDIT[provider]:f}", "USD", ""])
        w.writerow([f"{PERIOD}-31", accounts[1], "Adjustment",
                    "Billing correction: output tokens under-billed",
                    f"{CORRECTION[provider]:f}", "USD", "2025-12"])
    map_path = out / f"{provider}_invoice_adjustments.columns.yaml"
    map_path.write_text(
        "apiVersion: keel.pdp/v1\nkind: ColumnMap\n"
        f"provider: {provider}\n"
        "columns:\n  date: Date\n  account: Project\n  kind: Type\n"
        "  description: Description\n  cost: Amount\n  currency: Currency\n"
        "  belongs_to: Service period\n"
        "kinds:\n  Credit: credit\n  Adjustment: correction\n")
    return [csv_path.name, map_path.name]


def _write_internal(out: pathlib.Path, reqs: list[Request]) -> str:
    path = out / "internal_usage.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["ts", "tenant", "workload", "provider", "model", "input_tokens",
                    "cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens",
                    "output_tokens", "cost_micros", "input_cost_micros",
                    "cached_input_cost_micros", "cache_write_cost_micros",
                    "cache_write_1h_cost_micros", "output_cost_micros", "status",
                    "error_type", "permit_id"])
        for r in reqs:
            b = r.booked_micros
            w.writerow([r.local_stamp(), r.acct.tenant, r.acct.workload, r.acct.provider,
                        r.model, r.input_total, r.tokens["cached_input"],
                        r.tokens["cache_write"] + r.tokens["cache_write_1h"],
                        r.tokens["cache_write_1h"], r.tokens["output"], sum(b.values()),
                        b["input"], b["cached_input"], b["cache_write"] + b["cache_write_1h"],
                        b["cache_write_1h"], b["output"], "failed" if r.error else "ok",
                        r.error, r.rid])
    return path.name


def _write_mapping(out: pathlib.Path) -> str:
    lines = ["apiVersion: keel.pdp/v1", "kind: ReconcileMapping",
             f"finance_owner: {FINANCE_OWNER}", f"ai_program_lead: {AI_PROGRAM_LEAD}",
             "tenants:"]
    for tenant, zone in TENANTS.items():
        if zone:
            lines.append(f"  - {{tenant: {tenant}, timezone: {zone}}}")
    lines.append("accounts:")
    for a in ACCOUNTS:
        lines.append(f"  - {{provider: {a.provider}, account: {a.account}, tenant: {a.tenant}, "
                     f"workload: {a.workload}}}")
    lines.append("workloads:")
    seen = set()
    for a in ACCOUNTS:
        if (a.tenant, a.workload) not in seen:
            seen.add((a.tenant, a.workload))
            lines.append(f"  - {{tenant: {a.tenant}, workload: {a.workload}, "
                         f"engineering_owner: {a.owner}, cost_center: CC-{len(seen)}00}}")
    path = out / "mapping.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path.name


# ----------------------------------------------------------------- the answer


def _micros(usd: Decimal) -> str:
    return f"{(usd * MILLION).normalize():f}"


def _expected(provider: str, reqs: list[Request], exact: dict[LineKey, Decimal],
              written: dict[LineKey, Decimal]) -> dict[str, Any]:
    cats = ("clock_skew", "cache_read_rate", "tier_breakpoint", "failed_request_billing",
            "credits", "prior_period_correction", "rounding", "unexplained")
    per: dict[str, dict[str, Decimal]] = defaultdict(lambda: {c: Decimal(0) for c in cats})
    ids: dict[str, list[str]] = {c: [] for c in cats}
    totals = {"provider": Decimal(0), "internal": Decimal(0)}
    per_totals: dict[str, dict[str, Decimal]] = defaultdict(
        lambda: {"provider": Decimal(0), "internal": Decimal(0)})
    for r in reqs:
        in_p, in_l = r.provider_month == PERIOD, r.ledger_month == PERIOD
        acct = r.acct.account
        prov = sum(r.provider_cost.values(), Decimal(0))
        booked = Decimal(sum(r.booked_micros.values())) / MILLION
        if in_l:
            totals["internal"] += booked
            per_totals[acct]["internal"] += booked
        if in_p and not in_l:
            per[acct]["clock_skew"] += prov
            if prov:
                ids["clock_skew"].append(r.rid)
        elif in_l and not in_p:
            per[acct]["clock_skew"] -= booked
            if booked:
                ids["clock_skew"].append(r.rid)
        elif in_p and in_l:
            if r.error and (r.booked_zero or not r.billed):
                # Billed and booked at $0, or booked and not billed.
                per[acct]["failed_request_billing"] += prov - booked
                ids["failed_request_billing"].append(r.rid)
            elif r.long:
                per[acct]["tier_breakpoint"] += prov - booked
                ids["tier_breakpoint"].append(r.rid)
            else:
                for t in TYPES:
                    diff = r.provider_cost[t] - Decimal(r.booked_micros[t]) / MILLION
                    if t == "cached_input" and r.acct.cache_at_input_rate and r.tokens[t]:
                        per[acct]["cache_read_rate"] += diff
                        if r.rid not in ids["cache_read_rate"]:
                            ids["cache_read_rate"].append(r.rid)
                    else:
                        per[acct]["rounding"] += diff
    planted = _planted_key(provider)
    for key, amount in written.items():
        acct = key[1]
        totals["provider"] += amount
        per_totals[acct]["provider"] += amount
        extra = PLANTED[provider][4] if key == planted else Decimal(0)
        per[acct]["rounding"] += amount - exact.get(key, Decimal(0)) - extra
        per[acct]["unexplained"] += extra
    accounts = [a.account for a in ACCOUNTS if a.provider == provider]
    for kind, amount, acct in (("credits", CREDIT[provider], accounts[0]),
                               ("prior_period_correction", CORRECTION[provider], accounts[1])):
        per[acct][kind] += amount
        totals["provider"] += amount
        per_totals[acct]["provider"] += amount
    categories = {c: _micros(sum((per[a][c] for a in per), Decimal(0))) for c in cats}
    return {
        "provider_micros": _micros(totals["provider"]),
        "internal_micros": _micros(totals["internal"]),
        "categories": categories,
        "by_account": {a: {**{c: _micros(v) for c, v in per[a].items()},
                           "provider_micros": _micros(per_totals[a]["provider"]),
                           "internal_micros": _micros(per_totals[a]["internal"])}
                       for a in sorted(per)},
        "request_ids": {c: sorted(v) for c, v in ids.items() if v},
        "unexplained_line": {"account": PLANTED[provider][0],
                             "day": f"{PERIOD}-{PLANTED[provider][1]:02d}",
                             "model": PLANTED[provider][2],
                             "token_type": PLANTED[provider][3],
                             "micros": _micros(PLANTED[provider][4])},
        "requests": len(reqs),
    }


def generate(out: pathlib.Path, seed: int, requests: int = 20_000,
             anthropic_analytics: bool = False) -> dict[str, Any]:
    """Write a month into ``out`` and return the expected reconciliation.

    ``anthropic_analytics``: Anthropic's costs as the cost analytics export
    (fractional cents) instead of the cost report (cents to two places)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    every: list[Request] = []
    answer: dict[str, Any] = {"period": PERIOD, "seed": seed, "providers": {}}
    files: dict[str, list[str]] = {}
    for provider, share in (("openai", 0.55), ("anthropic", 0.45)):
        reqs = _simulate(provider, int(requests * share), rng)
        every += reqs
        exact = _lines(reqs)
        written: dict[LineKey, Decimal] = {}
        planted = _planted_key(provider)
        if planted not in exact:
            raise RuntimeError(f"seed {seed}: no traffic on the planted line {planted}")
        for key, amount in exact.items():
            amount += PLANTED[provider][4] if key == planted else Decimal(0)
            # OpenAI amounts: JSON numbers to 1e-8 USD; Anthropic: cents to two places
            # (cost report) or to four (analytics export).
            step = Decimal("1e-8") if provider == "openai" else (
                Decimal("1e-6") if anthropic_analytics else Decimal("1e-4"))
            written[key] = amount.quantize(step, rounding=ROUND_HALF_EVEN)
        if provider == "openai":
            exports = _write_openai(out, reqs, written)
        else:
            exports = _write_anthropic(out, reqs, written, anthropic_analytics)
        adjustments = _write_adjustments(out, provider)
        files[provider] = exports + adjustments[:1]
        answer["providers"][provider] = _expected(provider, reqs, exact, written)
        answer["providers"][provider]["exports"] = files[provider]
        answer["providers"][provider]["column_map"] = adjustments[1]
    every.sort(key=lambda r: (r.ts, r.rid))
    answer["internal"] = _write_internal(out, every)
    answer["mapping"] = _write_mapping(out)
    (out / "expected.json").write_text(json.dumps(answer, indent=1, sort_keys=True))
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=20_000)
    ns = parser.parse_args()
    answer = generate(ns.out, ns.seed, ns.requests)
    print(json.dumps({p: v["categories"] for p, v in answer["providers"].items()}, indent=1))


if __name__ == "__main__":
    main()
