"""An independent month of provider exports and the matching internal ledger
export, with planted differences and the answer worked out here.

The shapes follow the providers' documented exports: OpenAI's Usage API
(``/v1/organization/usage/completions``, daily buckets of
``organization.usage.completions.result``) and Costs API
(``/v1/organization/costs``, ``amount.value`` a JSON number in dollars,
``line_item`` "<model snapshot>, <token type>"), paginated with ``has_more`` /
``next_page``; Anthropic's Admin API messages usage report and cost report
(``amount`` a decimal string in cents, ``token_type``, ``context_window``,
a null ``workspace_id`` for the default workspace).

Nothing here imports ``keel_pdp``: the card, every line amount, every
request's re-rated cost and the category of every difference are computed with
this module's own integer and ``Decimal`` arithmetic from what was planted.

Planted, March 2026 (US daylight saving starts on the 8th):

* OpenAI ``proj_acme_chat``: the gateway priced gpt-4o cached input at the full
  input rate (``cache_read_rate``); gpt-5.4 requests above 272k input tokens are
  billed on long-context lines the gateway did not know (``tier_breakpoint``),
  one request at exactly 272,000 is not; client-disconnected streams booked at
  $0 and billed (``failed_request_billing``); a promotional credit.
* OpenAI ``proj_globex_search``: gpt-4o-mini output went from $0.60 to $0.72 per
  1M tokens on the 17th and the ledger kept $0.60 (``unexplained``); rate-limited
  attempts booked at their estimate and never billed (``failed_request_billing``);
  three requests on the 12th the gateway never saw (``unexplained`` on the
  line); gpt-4.1-nano requests of a few tokens, the gateway rounding each token
  type up (``rounding``); a correction for February (``prior_period_correction``).
* OpenAI ``proj_initech_batch``: Batch API traffic only, billed on
  ``batch | ...`` line items at half price, booked at the batch price (no
  difference but rounding).
* Anthropic ``wrkspc_acme_support``: 1-hour cache writes booked at the 5-minute
  rate (``cache_read_rate``); requests above 200k input tokens billed on
  ``200k-1M`` lines (``tier_breakpoint``), one at exactly 200,000 is not;
  overloaded attempts booked and not billed (``failed_request_billing``).
* Anthropic default workspace (null ``workspace_id``): priced right.
* Tenant clocks: acme in New York, globex in Tokyo, initech on UTC; requests at
  both month boundaries, 23:59 local on the last day included (``clock_skew``),
  and requests outside both months that must be ignored.
* Pagination: the OpenAI usage pull in three page files, the costs pull in two;
  the Anthropic reports as JSON lists of pages.

``python -m tests.reconcile_independent.generate DIR`` writes one month.
"""

from __future__ import annotations

import csv
import json
import pathlib
import random
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_EVEN, Decimal
from typing import Any
from zoneinfo import ZoneInfo

PERIOD = "2026-03"
MONTH_START = datetime(2026, 3, 1, tzinfo=UTC)
MONTH_END = datetime(2026, 4, 1, tzinfo=UTC)
DAYS = [date(2026, 3, d) for d in range(1, 32)]

INPUT, CACHED, WRITE, WRITE_1H, OUTPUT = (
    "input", "cached_input", "cache_write", "cache_write_1h", "output")
TYPES = (INPUT, CACHED, WRITE, WRITE_1H, OUTPUT)
LONG = "long_context"
CATEGORIES = ("clock_skew", "cache_read_rate", "tier_breakpoint", "failed_request_billing",
              "credits", "prior_period_correction", "rounding", "unexplained")
# A per-type difference this small is the two sides rounding (the product's
# documented "a micro-dollar or two").
ROUNDING_MICROS = 2

ZONES = {"acme": "America/New_York", "globex": "Asia/Tokyo"}  # initech: UTC


@dataclass(frozen=True)
class Account:
    provider: str
    account: str  # project id / workspace id; "default" is Anthropic's null workspace
    tenant: str
    workload: str
    owner: str
    cost_center: str
    api_key: str


ACCOUNTS = {
    "proj_acme_chat": Account("openai", "proj_acme_chat", "acme", "chat", "Dana Ruiz",
                              "CC-110", "key_acme_chat"),
    "proj_globex_search": Account("openai", "proj_globex_search", "globex", "search",
                                  "Kenji Mori", "CC-210", "key_globex_search"),
    "proj_initech_batch": Account("openai", "proj_initech_batch", "initech", "batch-jobs",
                                  "Ana Silva", "CC-310", "key_initech_batch"),
    "wrkspc_acme_support": Account("anthropic", "wrkspc_acme_support", "acme", "support",
                                   "Dana Ruiz", "CC-120", "apikey_acme_support"),
    "default": Account("anthropic", "default", "globex", "internal-tools", "Kenji Mori",
                       "CC-220", "apikey_globex_tools"),
}

SNAPSHOT = {
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
    "gpt-5.4": "gpt-5.4-2026-03-05",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
}
DISPLAY = {"claude-sonnet-4-5": "Claude Sonnet 4.5", "claude-haiku-4-5": "Claude Haiku 4.5"}

D = Decimal
# USD per 1M tokens, which is micro-USD per token.
CARD: dict[tuple[str, str], dict[str, Decimal]] = {
    ("gpt-4o", ""): {INPUT: D("2.50"), CACHED: D("1.25"), OUTPUT: D("10.00")},
    ("gpt-4o-mini", ""): {INPUT: D("0.15"), CACHED: D("0.075"), OUTPUT: D("0.60")},
    ("gpt-4o-mini", "batch"): {INPUT: D("0.075"), CACHED: D("0.0375"), OUTPUT: D("0.30")},
    ("gpt-4.1-nano", ""): {INPUT: D("0.10"), CACHED: D("0.025"), OUTPUT: D("0.40")},
    ("gpt-5.4", ""): {INPUT: D("2.50"), CACHED: D("0.25"), OUTPUT: D("15.00")},
    ("gpt-5.4", LONG): {INPUT: D("5.00"), CACHED: D("0.50"), OUTPUT: D("22.50")},
    ("claude-sonnet-4-5", ""): {INPUT: D("3.00"), CACHED: D("0.30"), WRITE: D("3.75"),
                                WRITE_1H: D("6.00"), OUTPUT: D("15.00")},
    ("claude-sonnet-4-5", LONG): {INPUT: D("6.00"), CACHED: D("0.60"), WRITE: D("7.50"),
                                  WRITE_1H: D("12.00"), OUTPUT: D("22.50")},
    ("claude-haiku-4-5", ""): {INPUT: D("1.00"), CACHED: D("0.10"), WRITE: D("1.25"),
                               WRITE_1H: D("2.00"), OUTPUT: D("5.00")},
}
PRICE_CHANGE_DAY = date(2026, 3, 17)
PRICE_CHANGE = ("proj_globex_search", "gpt-4o-mini", OUTPUT, D("0.72"))
TIER_ABOVE = {"openai": 272_000, "anthropic": 200_000}
SHADOW_DAY = date(2026, 3, 12)


def round_even(x: Decimal) -> int:
    return int(x.quantize(D(1), rounding=ROUND_HALF_EVEN))


def round_up(x: Decimal) -> int:
    return int(x.quantize(D(1), rounding=ROUND_CEILING))


def provider_price(account: str, model: str, t: str, tier: str, day: date) -> Decimal:
    acct_tier = "batch" if account == "proj_initech_batch" else tier
    price = CARD[(model, acct_tier)][t]
    pa, pm, pt, new = PRICE_CHANGE
    if (account, model, t) == (pa, pm, pt) and day >= PRICE_CHANGE_DAY:
        return new
    return price


def gateway_price(account: str, model: str, t: str) -> Decimal:
    """The ledger's price table: no long-context tier, no price change, and two
    wrong rates."""
    if account == "proj_initech_batch":
        return CARD[(model, "batch")][t]
    if (account, model, t) == ("proj_acme_chat", "gpt-4o", CACHED):
        return CARD[(model, "")][INPUT]  # the cached-input discount not applied
    if (account, model, t) == ("wrkspc_acme_support", "claude-sonnet-4-5", WRITE_1H):
        return CARD[(model, "")][WRITE]  # 1-hour writes at the 5-minute rate
    return CARD[(model, "")][t]


@dataclass
class Req:
    rid: str
    account: str
    model: str
    ts: datetime  # UTC
    tokens: dict[str, int]
    in_internal: bool = True  # False: the gateway never saw it (shadow usage)
    billed: bool = True
    status: str = "ok"
    error_type: str = ""
    booked: dict[str, int] = field(default_factory=dict)
    rerated: dict[str, int] = field(default_factory=dict)
    planted: str = ""

    @property
    def acct(self) -> Account:
        return ACCOUNTS[self.account]

    @property
    def provider(self) -> str:
        return self.acct.provider

    @property
    def day(self) -> date:
        return self.ts.date()

    @property
    def total_input(self) -> int:
        return self.tokens[INPUT] + self.tokens[CACHED] + self.tokens[WRITE] + self.tokens[WRITE_1H]

    @property
    def tier(self) -> str:
        long_series = {("proj_acme_chat", "gpt-5.4"), ("wrkspc_acme_support", "claude-sonnet-4-5")}
        above = TIER_ABOVE[self.provider]
        long = (self.account, self.model) in long_series and self.total_input > above
        return LONG if long else ""

    @property
    def in_provider(self) -> bool:
        return MONTH_START <= self.ts < MONTH_END

    @property
    def in_ledger(self) -> bool:
        if not self.in_internal:
            return False
        zone = ZONES.get(self.acct.tenant)
        local = self.ts.astimezone(ZoneInfo(zone)) if zone else self.ts
        return (local.year, local.month) == (2026, 3)


class Month:
    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.reqs: list[Req] = []
        self.n = 0

    def toks(self, uncached: int, cached: int = 0, write: int = 0, write_1h: int = 0,
             output: int = 0) -> dict[str, int]:
        return {INPUT: uncached, CACHED: cached, WRITE: write, WRITE_1H: write_1h,
                OUTPUT: output}

    def add(self, account: str, model: str, ts: datetime, tokens: dict[str, int],
            **kw: Any) -> Req:
        self.n += 1
        r = Req(f"pmt_{self.n:05d}", account, model, ts, tokens, **kw)
        self.reqs.append(r)
        return r

    def when(self, day: date | None = None) -> datetime:
        d = day or self.rng.choice(DAYS)
        secs = self.rng.randrange(0, 86_400_000)
        return datetime(d.year, d.month, d.day, tzinfo=UTC) + timedelta(milliseconds=secs)

    def build(self) -> None:
        rng = self.rng
        # OpenAI, acme chat: gpt-4o with cache reads (discount not applied internally)
        for _ in range(220):
            total = rng.randint(800, 12_000)
            cached = rng.choice([0, 0, total * rng.randint(20, 80) // 100])
            self.add("proj_acme_chat", "gpt-4o", self.when(),
                     self.toks(total - cached, cached, output=rng.randint(40, 1_500)))
        for _ in range(6):  # client-disconnected streams: billed, booked at $0
            total = rng.randint(2_000, 9_000)
            self.add("proj_acme_chat", "gpt-4o", self.when(),
                     self.toks(total, output=rng.randint(100, 700)), status="failed",
                     error_type="client_disconnected", planted="booked_zero")
        # gpt-5.4: normal and long-context requests
        for _ in range(50):
            total = rng.randint(20_000, 200_000)
            cached = total * rng.randint(0, 60) // 100
            self.add("proj_acme_chat", "gpt-5.4", self.when(),
                     self.toks(total - cached, cached, output=rng.randint(500, 6_000)))
        for _ in range(10):
            total = rng.randint(280_000, 420_000)
            cached = total * rng.randint(0, 50) // 100
            self.add("proj_acme_chat", "gpt-5.4", self.when(),
                     self.toks(total - cached, cached, output=rng.randint(1_000, 8_000)))
        self.add("proj_acme_chat", "gpt-5.4", self.when(date(2026, 3, 20)),
                 self.toks(200_000, 72_000, output=3_000))  # exactly 272,000: not above
        # OpenAI, globex search: gpt-4o-mini (output price changes on the 17th)
        for _ in range(260):
            total = rng.randint(500, 8_000)
            cached = rng.choice([0, total * rng.randint(10, 60) // 100])
            self.add("proj_globex_search", "gpt-4o-mini", self.when(),
                     self.toks(total - cached, cached, output=rng.randint(200, 2_000)))
        for _ in range(5):  # rate-limited attempts booked at their estimate
            self.add("proj_globex_search", "gpt-4o-mini", self.when(),
                     self.toks(rng.randint(3_000, 9_000), output=rng.randint(500, 1_500)),
                     status="failed", error_type="rate_limit_error", billed=False)
        for _ in range(3):  # shadow usage: billed, the gateway never saw it
            self.add("proj_globex_search", "gpt-4o-mini", self.when(SHADOW_DAY),
                     self.toks(rng.randint(40_000, 90_000), output=rng.randint(2_000, 6_000)),
                     in_internal=False)
        for _ in range(400):  # many tiny requests, the gateway rounds each type up
            self.add("proj_globex_search", "gpt-4.1-nano", self.when(),
                     self.toks(rng.randint(3, 60), output=rng.randint(1, 25)))
        # OpenAI, initech: Batch API only
        for _ in range(60):
            total = rng.randint(10_000, 50_000)
            cached = rng.choice([0, total * rng.randint(10, 50) // 100])
            self.add("proj_initech_batch", "gpt-4o-mini", self.when(),
                     self.toks(total - cached, cached, output=rng.randint(1_000, 5_000)))
        self.add("proj_initech_batch", "gpt-4o-mini",
                 datetime(2026, 3, 31, 23, 59, 59, 500_000, tzinfo=UTC),
                 self.toks(12_000, output=800))  # last half second of the UTC month
        # Anthropic, acme support: sonnet with 5-minute and 1-hour cache writes
        for _ in range(180):
            write_1h = rng.choice([0, 0, rng.randint(500, 8_000)])
            self.add("wrkspc_acme_support", "claude-sonnet-4-5", self.when(),
                     self.toks(rng.randint(200, 20_000),
                               rng.choice([0, rng.randint(1_000, 60_000)]),
                               rng.choice([0, rng.randint(100, 5_000)]), write_1h,
                               rng.randint(100, 3_000)))
        for _ in range(8):
            self.add("wrkspc_acme_support", "claude-sonnet-4-5", self.when(),
                     self.toks(rng.randint(150_000, 250_000), rng.randint(30_000, 90_000),
                               rng.randint(0, 4_000), 0, rng.randint(1_000, 4_000)))
        self.add("wrkspc_acme_support", "claude-sonnet-4-5", self.when(date(2026, 3, 9)),
                 self.toks(150_000, 40_000, 10_000, 0, 2_000))  # exactly 200,000: not above
        for _ in range(4):  # overloaded: booked, not billed
            self.add("wrkspc_acme_support", "claude-sonnet-4-5", self.when(),
                     self.toks(rng.randint(2_000, 8_000), output=rng.randint(200, 900)),
                     status="failed", error_type="overloaded_error", billed=False)
        # Anthropic, default workspace: haiku, priced right
        for _ in range(180):
            self.add("default", "claude-haiku-4-5", self.when(),
                     self.toks(rng.randint(100, 15_000), rng.choice([0, rng.randint(500, 30_000)]),
                               rng.choice([0, rng.randint(100, 3_000)]), 0,
                               rng.randint(50, 2_000)))
        self.boundaries()
        self.price()

    def boundaries(self) -> None:
        ny, tokyo = ZoneInfo(ZONES["acme"]), ZoneInfo(ZONES["globex"])

        def local(zone: ZoneInfo, y: int, mo: int, d: int, h: int, mi: int, s: int = 0,
                  us: int = 0) -> datetime:
            return datetime(y, mo, d, h, mi, s, us, tzinfo=zone).astimezone(UTC)

        acme = [  # (local time, what it is)
            local(ny, 2026, 2, 28, 20, 30),            # UTC Mar 1 01:30: provider only
            local(ny, 2026, 2, 28, 18, 0),             # both February: ignored
            local(ny, 2026, 3, 31, 23, 59, 30),        # UTC Apr 1 03:59: ledger only
            local(ny, 2026, 3, 31, 20, 0),             # UTC Apr 1 00:00: ledger only
            local(ny, 2026, 3, 31, 19, 59, 59, 999_000),  # UTC Mar 31 23:59:59.999: both
        ]
        globex = [
            local(tokyo, 2026, 3, 1, 8, 30),           # UTC Feb 28 23:30: ledger only
            local(tokyo, 2026, 3, 1, 9, 0),            # UTC Mar 1 00:00: both
            local(tokyo, 2026, 4, 1, 8, 59, 59),       # UTC Mar 31 23:59:59: provider only
            local(tokyo, 2026, 4, 1, 9, 30),           # both April: ignored
        ]
        for ts in acme:
            self.add("proj_acme_chat", "gpt-4o", ts, self.toks(6_000, 2_000, output=900))
            self.add("wrkspc_acme_support", "claude-sonnet-4-5", ts,
                     self.toks(5_000, 8_000, 1_000, 500, 700))
        for ts in globex:
            self.add("proj_globex_search", "gpt-4o-mini", ts, self.toks(7_000, 3_000, output=1_200))
            self.add("default", "claude-haiku-4-5", ts, self.toks(4_000, 6_000, 800, 0, 600))

    def price(self) -> None:
        for r in self.reqs:
            ceil = (r.account, r.model) == ("proj_globex_search", "gpt-4.1-nano")
            for t in TYPES:
                n = r.tokens[t]
                if r.planted == "booked_zero":
                    r.booked[t] = 0
                else:
                    exact = n * gateway_price(r.account, r.model, t) if n else D(0)
                    r.booked[t] = round_up(exact) if ceil else round_even(exact)
                r.rerated[t] = (round_even(n * provider_price(r.account, r.model, t, r.tier,
                                                              r.day))
                                if n and r.billed and r.in_provider else 0)


# ---------------------------------------------------------------- the answer

Cell = tuple[str, str, str, str, str]  # day, account, model, token type, tier


def cell_of(r: Req, t: str) -> Cell:
    return (r.day.isoformat(), r.account, r.model, t, r.tier)


@dataclass
class Lines:
    """The provider's lines: exact amounts (USD) and tokens per cell."""

    usd: dict[Cell, Decimal] = field(default_factory=dict)
    tokens: dict[Cell, int] = field(default_factory=lambda: defaultdict(int))

    def micros(self, c: Cell) -> int:
        return round_even(self.usd[c] * 1_000_000)


def provider_lines(reqs: list[Req]) -> Lines:
    out = Lines()
    for r in reqs:
        if not (r.billed and r.in_provider):
            continue
        for t in TYPES:
            if r.tokens[t]:
                out.tokens[cell_of(r, t)] += r.tokens[t]
    for c, n in out.tokens.items():
        day = date.fromisoformat(c[0])
        out.usd[c] = n * provider_price(c[1], c[2], c[3], c[4], day) / 1_000_000
    return out


def expected(m: Month, provider: str, lines: Lines,
             adjustments: list[dict[str, Any]]) -> dict[str, Any]:
    reqs = [r for r in m.reqs if r.provider == provider]
    cats: dict[str, dict[Cell, int]] = {c: defaultdict(int) for c in CATEGORIES}
    ids: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    skew_provider_only: list[str] = []
    skew_ledger_only: list[str] = []
    internal_by_account: dict[str, int] = defaultdict(int)
    for r in reqs:
        if r.in_ledger:
            internal_by_account[r.account] += sum(r.booked.values())
        if not r.in_internal or not (r.in_provider or r.in_ledger):
            continue
        if r.in_provider != r.in_ledger:
            for t in TYPES:
                diff = r.rerated[t] if r.in_provider else -r.booked[t]
                if diff:
                    cats["clock_skew"][cell_of(r, t)] += diff
            ids["clock_skew"].append(r.rid)
            (skew_provider_only if r.in_provider else skew_ledger_only).append(r.rid)
            continue
        prov, booked = sum(r.rerated.values()), sum(r.booked.values())
        if r.status != "ok" and (prov > ROUNDING_MICROS) != (booked > ROUNDING_MICROS):
            category = "failed_request_billing"
        elif r.tier:
            category = "tier_breakpoint"
        else:
            category = ""
        if category:
            for t in TYPES:
                if r.rerated[t] != r.booked[t]:
                    cats[category][cell_of(r, t)] += r.rerated[t] - r.booked[t]
            ids[category].append(r.rid)
            continue
        for t in TYPES:
            diff = r.rerated[t] - r.booked[t]
            if diff == 0:
                continue
            if abs(diff) <= ROUNDING_MICROS:
                cats["rounding"][cell_of(r, t)] += diff
            elif t in (CACHED, WRITE, WRITE_1H):
                cats["cache_read_rate"][cell_of(r, t)] += diff
                if r.rid not in ids["cache_read_rate"]:
                    ids["cache_read_rate"].append(r.rid)
            else:
                cats["unexplained"][cell_of(r, t)] += diff
                if r.rid not in ids["unexplained"]:
                    ids["unexplained"].append(r.rid)
    # What each line carries beyond its requests re-rated: rounding, or the
    # usage the gateway never saw.
    rerated: dict[Cell, int] = defaultdict(int)
    shadow: set[Cell] = set()
    for r in reqs:
        for t in TYPES:
            if r.tokens[t] and r.billed and r.in_provider:
                if r.in_internal:
                    rerated[cell_of(r, t)] += r.rerated[t]
                else:
                    shadow.add(cell_of(r, t))
    for c in lines.usd:
        if c[1] not in {a.account for a in ACCOUNTS.values() if a.provider == provider}:
            continue
        rest = lines.micros(c) - rerated.get(c, 0)
        if rest:
            cats["unexplained" if c in shadow else "rounding"][c] += rest
    provider_by_account: dict[str, int] = defaultdict(int)
    for c in lines.usd:
        if ACCOUNTS[c[1]].provider == provider:
            provider_by_account[c[1]] += lines.micros(c)
    by_account: dict[str, dict[str, int]] = {}
    for a in sorted(a.account for a in ACCOUNTS.values() if a.provider == provider):
        by_account[a] = {"provider_micros": provider_by_account[a],
                         "internal_micros": internal_by_account[a]}
        for cat in CATEGORIES:
            by_account[a][cat] = sum(v for c, v in cats[cat].items() if c[1] == a)
    for adj in adjustments:
        by_account[adj["account"]]["provider_micros"] += adj["micros"]
        by_account[adj["account"]][adj["category"]] += adj["micros"]
    invoice = sum(v["provider_micros"] for v in by_account.values())
    internal = sum(v["internal_micros"] for v in by_account.values())
    net = {cat: sum(v[cat] for v in by_account.values()) for cat in CATEGORIES}
    assert sum(net.values()) == invoice - internal, "the generator's own identity"
    for v in by_account.values():
        assert sum(v[c] for c in CATEGORIES) == v["provider_micros"] - v["internal_micros"]
    return {
        "invoice_micros": invoice,
        "internal_micros": internal,
        "internal_requests": sum(1 for r in reqs if r.in_ledger),
        "categories": net,
        "by_account": by_account,
        "request_ids": {c: sorted(v) for c, v in ids.items() if v},
        "skew_provider_only": sorted(skew_provider_only),
        "skew_ledger_only": sorted(skew_ledger_only),
        "line_items": {cat: {"|".join(c): v for c, v in sorted(cells.items()) if v}
                       for cat, cells in cats.items()},
    }


# ---------------------------------------------------------------- the files

_NUMBER = re.compile(r'"#num:([-0-9.]+)"')


def dump_json(doc: Any) -> str:
    """JSON with exact decimals written as JSON numbers (never through a float)."""
    def fix(x: Any) -> Any:
        if isinstance(x, Decimal):
            return f"#num:{x:f}"
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return [fix(v) for v in x]
        return x
    return _NUMBER.sub(r"\1", json.dumps(fix(doc), indent=1))


def _epoch(d: date) -> int:
    return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())


def _rfc3339(d: date) -> str:
    return f"{d.isoformat()}T00:00:00Z"


def openai_pages(m: Month, lines: Lines) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    usage: dict[date, dict[tuple[str, str], dict[str, int]]] = defaultdict(dict)
    for r in m.reqs:
        if r.provider != "openai" or not (r.billed and r.in_provider):
            continue
        row = usage[r.day].setdefault((r.account, r.model), defaultdict(int))
        row["input_tokens"] += r.tokens[INPUT] + r.tokens[CACHED]
        row["input_cached_tokens"] += r.tokens[CACHED]
        row["output_tokens"] += r.tokens[OUTPUT]
        row["num_model_requests"] += 1
    usage_buckets = []
    for d in DAYS:
        results: list[dict[str, Any]] = []
        for (account, model), row in sorted(usage[d].items()):
            batch = account == "proj_initech_batch"
            results.append({"object": "organization.usage.completions.result", **row,
                            "input_audio_tokens": 0, "output_audio_tokens": 0,
                            "project_id": account, "user_id": None,
                            "api_key_id": ACCOUNTS[account].api_key,
                            "model": SNAPSHOT[model], "batch": batch,
                            "service_tier": "default"})
        usage_buckets.append({"object": "bucket", "start_time": _epoch(d),
                              "end_time": _epoch(d + timedelta(days=1)), "results": results})
    cost_buckets = []
    words = {INPUT: "input", CACHED: "cached input", OUTPUT: "output"}
    for d in DAYS:
        results = []
        for c in sorted(k for k in lines.usd if k[0] == d.isoformat()
                        and ACCOUNTS[k[1]].provider == "openai"):
            item = f"{SNAPSHOT[c[2]]}, {words[c[3]]}"
            if c[4] == LONG:
                item += ", long context"
            if c[1] == "proj_initech_batch":
                item = f"batch | {item}"
            results.append({"object": "organization.costs.result",
                            "amount": {"value": lines.usd[c], "currency": "usd"},
                            "line_item": item, "project_id": c[1]})
        cost_buckets.append({"object": "bucket", "start_time": _epoch(d),
                             "end_time": _epoch(d + timedelta(days=1)), "results": results})
    return (_paginate(usage_buckets, [10, 10, 11], "AAAAAGdGxdEu"),
            _paginate(cost_buckets, [15, 16], "AAAAAGdHc0st"))


def _paginate(buckets: list[dict[str, Any]], sizes: list[int], cursor: str
              ) -> list[dict[str, Any]]:
    out, at = [], 0
    for i, n in enumerate(sizes):
        last = i == len(sizes) - 1
        out.append({"object": "page", "data": buckets[at:at + n], "has_more": not last,
                    "next_page": None if last else f"{cursor}{i + 1:02d}="})
        at += n
    return out


def anthropic_pages(m: Month, lines: Lines) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    usage: dict[date, dict[tuple[str, str, str], dict[str, int]]] = defaultdict(dict)
    for r in m.reqs:
        if r.provider != "anthropic" or not (r.billed and r.in_provider):
            continue
        row = usage[r.day].setdefault((r.account, r.model, r.tier), defaultdict(int))
        for t in TYPES:
            row[t] += r.tokens[t]
    usage_buckets = []
    for d in DAYS:
        results: list[dict[str, Any]] = []
        for (account, model, tier), row in sorted(usage[d].items()):
            results.append({
                "uncached_input_tokens": row[INPUT], "cache_read_input_tokens": row[CACHED],
                "cache_creation": {"ephemeral_5m_input_tokens": row[WRITE],
                                   "ephemeral_1h_input_tokens": row[WRITE_1H]},
                "output_tokens": row[OUTPUT], "server_tool_use": {"web_search_requests": 0},
                "api_key_id": ACCOUNTS[account].api_key,
                "workspace_id": None if account == "default" else account,
                "model": SNAPSHOT[model], "service_tier": "standard",
                "context_window": "200k-1M" if tier else "0-200k"})
        usage_buckets.append({"starting_at": _rfc3339(d),
                              "ending_at": _rfc3339(d + timedelta(days=1)), "results": results})
    token_type = {INPUT: "uncached_input_tokens", CACHED: "cache_read_input_tokens",
                  WRITE: "cache_creation.ephemeral_5m_input_tokens",
                  WRITE_1H: "cache_creation.ephemeral_1h_input_tokens",
                  OUTPUT: "output_tokens"}
    label = {INPUT: "Input Tokens", CACHED: "Cache Read", WRITE: "Cache Write (5m)",
             WRITE_1H: "Cache Write (1h)", OUTPUT: "Output Tokens"}
    cost_buckets = []
    for d in DAYS:
        results = []
        for c in sorted(k for k in lines.usd if k[0] == d.isoformat()
                        and ACCOUNTS[k[1]].provider == "anthropic"):
            cents = lines.usd[c] * 100
            results.append({
                "currency": "USD", "amount": f"{cents:f}",
                "workspace_id": None if c[1] == "default" else c[1],
                "description": f"{DISPLAY[c[2]]} Usage - {label[c[3]]}"
                               + (" (Long Context)" if c[4] else ""),
                "cost_type": "tokens", "context_window": "200k-1M" if c[4] else "0-200k",
                "model": SNAPSHOT[c[2]], "service_tier": "standard",
                "token_type": token_type[c[3]], "inference_geo": None})
        cost_buckets.append({"starting_at": _rfc3339(d),
                             "ending_at": _rfc3339(d + timedelta(days=1)), "results": results})
    return (_paginate(usage_buckets, [16, 15], "page_dXNhZ2"),
            _paginate(cost_buckets, [16, 15], "page_Y29zdA"))


ADJUSTMENTS: list[dict[str, Any]] = [  # keyed in from the OpenAI invoice
    {"date": "2026-03-31", "account": "proj_acme_chat", "type": "Credit",
     "description": "Promotional credit (startup program)", "amount": "-5.00",
     "period": "", "category": "credits", "micros": -5_000_000},
    {"date": "2026-03-31", "account": "proj_globex_search", "type": "Adjustment",
     "description": "Billing correction for 2026-02: output tokens under-billed",
     "amount": "3.74", "period": "2026-02", "category": "prior_period_correction",
     "micros": 3_740_000},
]

COLUMN_MAP = """\
apiVersion: keel.pdp/v1
kind: ColumnMap
provider: openai
currency: USD
amount_unit: usd
columns:
  date: Invoice date
  account: Project
  kind: Line type
  description: Description
  cost: Amount (USD)
  currency: Currency
  belongs_to: Service period
kinds: {"Credit": credit, "Adjustment": correction}
"""


def mapping_yaml() -> str:
    lines = ["apiVersion: keel.pdp/v1", "kind: ReconcileMapping",
             "finance_owner: Morgan Lee", "ai_program_lead: Ravi Shah", "accounts:"]
    for a in ACCOUNTS.values():
        lines += [f"  - provider: {a.provider}", f"    account: {a.account}",
                  f"    tenant: {a.tenant}", f"    workload: {a.workload}"]
    lines.append("workloads:")
    seen = set()
    for a in ACCOUNTS.values():
        if (a.tenant, a.workload) not in seen:
            seen.add((a.tenant, a.workload))
            lines += [f"  - tenant: {a.tenant}", f"    workload: {a.workload}",
                      f"    engineering_owner: {a.owner}", f"    cost_center: {a.cost_center}"]
    lines.append("tenants:")
    for tenant, zone in ZONES.items():
        lines.append(f"  - {{tenant: {tenant}, timezone: {zone}}}")
    return "\n".join(lines) + "\n"


INTERNAL_COLUMNS = ("ts", "tenant", "workload", "provider", "account", "model", "input_tokens",
                    "cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens",
                    "output_tokens", "cost_micros", "input_cost_micros",
                    "cached_input_cost_micros", "cache_write_cost_micros",
                    "cache_write_1h_cost_micros", "output_cost_micros", "status",
                    "error_type", "permit_id")


def internal_rows(m: Month) -> list[dict[str, str]]:
    rows = []
    for r in sorted(m.reqs, key=lambda x: (x.ts, x.rid)):
        if not r.in_internal:
            continue
        a = r.acct
        zone = ZONES.get(a.tenant)
        local = r.ts.astimezone(ZoneInfo(zone)) if zone else r.ts
        b = r.booked
        rows.append({
            "ts": local.isoformat(timespec="milliseconds"), "tenant": a.tenant,
            "workload": a.workload, "provider": a.provider, "account": "", "model": r.model,
            "input_tokens": str(r.total_input), "cached_input_tokens": str(r.tokens[CACHED]),
            "cache_write_tokens": str(r.tokens[WRITE] + r.tokens[WRITE_1H]),
            "cache_write_1h_tokens": str(r.tokens[WRITE_1H]),
            "output_tokens": str(r.tokens[OUTPUT]), "cost_micros": str(sum(b.values())),
            "input_cost_micros": str(b[INPUT]), "cached_input_cost_micros": str(b[CACHED]),
            "cache_write_cost_micros": str(b[WRITE] + b[WRITE_1H]),
            "cache_write_1h_cost_micros": str(b[WRITE_1H]),
            "output_cost_micros": str(b[OUTPUT]), "status": r.status,
            "error_type": r.error_type, "permit_id": r.rid})
    return rows


def write_csv(path: pathlib.Path, columns: tuple[str, ...] | list[str],
              rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        w.writerows(rows)


def generate(out: pathlib.Path, seed: int = 7) -> dict[str, Any]:
    """Write one month under ``out``; return (and write as ``answer.json``) the answer."""
    out.mkdir(parents=True, exist_ok=True)
    m = Month(seed)
    m.build()
    lines = provider_lines(m.reqs)
    answer: dict[str, Any] = {"period": PERIOD, "internal": "internal_usage.csv",
                              "mapping": "mapping.yaml", "providers": {}}
    write_csv(out / "internal_usage.csv", INTERNAL_COLUMNS, internal_rows(m))
    (out / "mapping.yaml").write_text(mapping_yaml())

    usage, costs = openai_pages(m, lines)
    exports = []
    for i, page in enumerate(usage, start=1):
        (out / f"openai_usage_completions_p{i}.json").write_text(dump_json(page))
        exports.append(f"openai_usage_completions_p{i}.json")
    for i, page in enumerate(costs, start=1):
        (out / f"openai_costs_p{i}.json").write_text(dump_json(page))
        exports.append(f"openai_costs_p{i}.json")
    write_csv(out / "openai_invoice_adjustments.csv",
              ["Invoice date", "Project", "Line type", "Description", "Amount (USD)",
               "Currency", "Service period"],
              [{"Invoice date": a["date"], "Project": a["account"], "Line type": a["type"],
                "Description": a["description"], "Amount (USD)": a["amount"],
                "Currency": "USD", "Service period": a["period"]} for a in ADJUSTMENTS])
    (out / "openai_invoice_adjustments.columns.yaml").write_text(COLUMN_MAP)
    exports.append("openai_invoice_adjustments.csv")
    answer["providers"]["openai"] = {
        "exports": exports, "column_map": "openai_invoice_adjustments.columns.yaml",
        **expected(m, "openai", lines, ADJUSTMENTS)}

    usage, costs = anthropic_pages(m, lines)
    (out / "anthropic_usage_report_messages.json").write_text(dump_json(usage))
    (out / "anthropic_cost_report.json").write_text(dump_json(costs))
    answer["providers"]["anthropic"] = {
        "exports": ["anthropic_usage_report_messages.json", "anthropic_cost_report.json"],
        "column_map": None, **expected(m, "anthropic", lines, [])}
    (out / "answer.json").write_text(json.dumps(answer, indent=1, sort_keys=True))
    return answer


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.reconcile_independent.generate DIR")
    generate(pathlib.Path(sys.argv[1]))
