"""A third, independent month for `keel-pdp reconcile`, written from the providers'
documented export shapes and the variance categories finance uses, never from the
reconciler: nothing here imports ``keel_pdp``.

Money is integer arithmetic throughout. A price of $X per million tokens is
X micro-USD per token; it is kept as pico-USD per token (an integer), so every
request's exact cost per token type is an integer number of pico-USD, rounded
once, half to even, to micro-USD. Provider line amounts are the exact sums,
written as decimal text: OpenAI Costs API amounts in dollars (JSON numbers),
Anthropic cost report amounts in cents (decimal strings).

The month (March 2026, 31 days, the US clock change on the 8th) has, per provider:
several projects or workspaces, one of them shared by two workloads through API
keys; tenants west (America/Los_Angeles) and east (Asia/Tokyo) of UTC and one on
UTC, each with requests on both sides of both month boundaries; cached reads and
5-minute and 1-hour cache writes; a gateway that prices one cache type wrongly all
month; long-context requests above the tier breakpoint (one exactly at it, one
above it only through cache reads); failed attempts the provider billed and the
gateway booked at $0, and the reverse; a failed attempt both sides charged;
batch, priority and flex service tiers; web search calls; usage the gateway
never saw; a gateway that rounds each token type up; empty days; paginated pulls
(``has_more`` / ``next_page``); a credit and a prior-period correction keyed in
from the invoice. ``expected`` holds each category's net, the request ids
behind it and the totals, computed here.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

PERIOD = "2026-03"
MONTH_START = datetime(2026, 3, 1, tzinfo=UTC)
MONTH_END = datetime(2026, 4, 1, tzinfo=UTC)
PICO_PER_MICRO = 1_000_000

CATEGORIES = ("clock_skew", "cache_read_rate", "tier_breakpoint", "failed_request_billing",
              "credits", "prior_period_correction", "rounding", "unexplained")

# Provider token types (disjoint): fresh input, cache read, 5-minute and 1-hour
# cache writes, output.
TYPES = ("input", "cached", "w5m", "w1h", "output")

ZONES = {"acme": "America/Los_Angeles", "globex": "Asia/Tokyo"}  # initech: UTC


def usd_per_m(text: str) -> int:
    """$X per million tokens -> pico-USD per token, exactly."""
    value = Decimal(text) * PICO_PER_MICRO
    assert value == value.to_integral_value(), text
    return int(value)


def card(inp: str, cached: str, out: str, w5m: str = "0", w1h: str = "0") -> dict[str, int]:
    return {"input": usd_per_m(inp), "cached": usd_per_m(cached), "w5m": usd_per_m(w5m),
            "w1h": usd_per_m(w1h), "output": usd_per_m(out)}


def rhe(num: int, den: int) -> int:
    """num / den rounded half to even (den > 0)."""
    q, r = divmod(num, den)
    twice = 2 * r
    if twice > den or (twice == den and q % 2 == 1):
        q += 1
    return q


def ceil_div(num: int, den: int) -> int:
    return -((-num) // den)


def pico_text(pico: int, scale: int) -> str:
    """An exact decimal: pico-USD in units of 10**scale pico (12: dollars, 10: cents)."""
    text = format(Decimal(pico).scaleb(-scale).normalize(), "f")
    return text


# The provider's cards (what it bills). Keyed by (export model, service tier, long context).
CARDS: dict[tuple[str, str, bool], dict[str, int]] = {
    ("gpt-4o-mini-2024-07-18", "default", False): card("0.15", "0.075", "0.60"),
    ("gpt-4o-mini-2024-07-18", "batch", False): card("0.075", "0.0375", "0.30"),
    ("gpt-4o-2024-08-06", "priority", False): card("4.25", "2.125", "17.00"),
    ("gpt-4o-2024-08-06", "default", False): card("2.50", "1.25", "10.00"),
    ("gpt-5.4-2026-03-05", "default", False): card("2.50", "0.25", "15.00"),
    ("gpt-5.4-2026-03-05", "default", True): card("5.00", "0.50", "22.50"),
    ("o4-mini-2025-04-16", "flex", False): card("0.55", "0.1375", "2.20"),
    ("claude-sonnet-4-5-20250929", "standard", False):
        card("3.00", "0.30", "15.00", "3.75", "6.00"),
    ("claude-sonnet-4-5-20250929", "standard", True):
        card("6.00", "0.60", "22.50", "7.50", "12.00"),
    ("claude-sonnet-4-5-20250929", "batch", False):
        card("1.50", "0.15", "7.50", "1.875", "3.00"),
    ("claude-haiku-4-5-20251001", "batch", False): card("0.50", "0.05", "2.50", "0.625", "1.00"),
}
TIER_ABOVE = {"openai": 272_000, "anthropic": 200_000}


@dataclass(frozen=True)
class Workload:
    provider: str
    tenant: str
    workload: str
    account: str  # project id / workspace id ("default": Anthropic's default workspace)
    api_key: str
    model: str  # the gateway's model name
    export_model: str
    service: str
    owner: str
    cost_center: str
    # the gateway's own price per type where it differs from the card (a bug)
    gateway_override: tuple[tuple[str, int], ...] = ()
    gateway_rounds_up: bool = False


@dataclass
class Req:
    rid: str
    w: Workload
    ts: datetime  # UTC
    tokens: dict[str, int]
    status: str = "ok"
    error_type: str = ""
    billed: bool = True
    booked_zero: bool = False
    note: str = ""
    # filled by price()
    long_context: bool = False
    provider_pico: dict[str, int] = field(default_factory=dict)
    provider_micros: dict[str, int] = field(default_factory=dict)
    booked: dict[str, int] = field(default_factory=dict)

    @property
    def input_total(self) -> int:
        return sum(self.tokens[t] for t in ("input", "cached", "w5m", "w1h"))

    def ledger_month(self) -> str:
        zone = ZONES.get(self.w.tenant)
        local = self.ts.astimezone(ZoneInfo(zone)) if zone else self.ts
        return f"{local.year:04d}-{local.month:02d}"

    def provider_month(self) -> str:
        return f"{self.ts.year:04d}-{self.ts.month:02d}"

    @property
    def in_provider(self) -> bool:
        return self.billed and self.provider_month() == PERIOD

    @property
    def in_ledger(self) -> bool:
        return self.ledger_month() == PERIOD

    @property
    def p_total(self) -> int:
        return sum(self.provider_micros.values()) if self.in_provider else 0

    @property
    def l_total(self) -> int:
        return sum(self.booked.values()) if self.in_ledger else 0


def price(r: Req) -> None:
    w = r.w
    r.long_context = r.input_total > TIER_ABOVE[w.provider]
    has_tier = (w.export_model, w.service, True) in CARDS
    c = CARDS[(w.export_model, w.service, r.long_context and has_tier)]
    r.long_context = r.long_context and has_tier
    r.provider_pico = {t: r.tokens[t] * c[t] for t in TYPES}
    r.provider_micros = {t: rhe(p, PICO_PER_MICRO) for t, p in r.provider_pico.items()}
    # The gateway prices at the standard (non-tier) card, with its own bugs.
    g = dict(CARDS[(w.export_model, w.service, False)])
    g.update(dict(w.gateway_override))
    if r.booked_zero:
        r.booked = dict.fromkeys(TYPES, 0)
    elif w.gateway_rounds_up:
        r.booked = {t: ceil_div(r.tokens[t] * g[t], PICO_PER_MICRO) for t in TYPES}
    else:
        r.booked = {t: rhe(r.tokens[t] * g[t], PICO_PER_MICRO) for t in TYPES}


# --------------------------------------------------------------------------- the month


MIXED = {
    # A second service tier on an account and model that already carry another:
    # the provider bills each tier at its own rate on its own line.
    "openai": Workload("openai", "globex", "realtime-standard", "proj_rt", "key_rtstd01",
                       "gpt-4o", "gpt-4o-2024-08-06", "default", "Aiko Sato", "CC-310"),
    "anthropic": Workload("anthropic", "acme", "support-batch", "wrkspc_01SupportQvzr7rXLA5AG",
                          "apikey_01SupportBatchKey", "claude-sonnet-4-5",
                          "claude-sonnet-4-5-20250929", "batch", "Dana Ruiz", "CC-100"),
}


def _workloads(provider: str, mixed: bool = False) -> list[Workload]:
    if mixed:
        return [*_workloads(provider), MIXED[provider]]
    if provider == "openai":
        return [
            Workload("openai", "acme", "support-bot", "proj_support", "key_support01",
                     "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "default", "Dana Ruiz", "CC-100",
                     gateway_override=(("cached", usd_per_m("0.15")),)),
            Workload("openai", "acme", "agent-assist", "proj_support", "key_assist01",
                     "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "default", "Omar Haddad",
                     "CC-110"),
            Workload("openai", "globex", "research", "proj_research", "key_research01",
                     "gpt-5.4", "gpt-5.4-2026-03-05", "default", "Kenji Mori", "CC-300"),
            Workload("openai", "globex", "research-flex", "proj_research", "key_flex01",
                     "o4-mini", "o4-mini-2025-04-16", "flex", "Kenji Mori", "CC-300"),
            Workload("openai", "globex", "realtime", "proj_rt", "key_rt01",
                     "gpt-4o", "gpt-4o-2024-08-06", "priority", "Aiko Sato", "CC-310"),
            Workload("openai", "initech", "nightly-batch", "proj_batch", "key_batch01",
                     "gpt-4o-mini", "gpt-4o-mini-2024-07-18", "batch", "Bill Lumbergh",
                     "CC-900", gateway_rounds_up=True),
        ]
    return [
        Workload("anthropic", "acme", "support-bot", "wrkspc_01SupportQvzr7rXLA5AG",
                 "apikey_01SupportKey", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929",
                 "standard", "Dana Ruiz", "CC-100",
                 gateway_override=(("w1h", usd_per_m("3.75")),)),
        Workload("anthropic", "acme", "triage", "wrkspc_01SupportQvzr7rXLA5AG",
                 "apikey_01TriageKey", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929",
                 "standard", "Omar Haddad", "CC-110"),
        Workload("anthropic", "globex", "doc-analyzer", "wrkspc_01DocsHKfFUJx3Hh9A",
                 "apikey_01DocsKey", "claude-sonnet-4-5", "claude-sonnet-4-5-20250929",
                 "standard", "Kenji Mori", "CC-300"),
        Workload("anthropic", "initech", "internal-tools", "default", "apikey_01InternalKey",
                 "claude-haiku-4-5", "claude-haiku-4-5-20251001", "batch", "Bill Lumbergh",
                 "CC-900"),
    ]


EMPTY_DAYS = {"openai": (14, 15), "anthropic": (21, 22)}
NEVER_SEEN_DAY = 17  # usage billed on this day that no gateway recorded


def _tokens(rng: random.Random, w: Workload, round_cache: bool) -> dict[str, int]:
    t = dict.fromkeys(TYPES, 0)
    t["input"] = rng.randint(2_000, 90_000)
    t["output"] = rng.randint(100, 8_000)
    if rng.random() < 0.6:
        c = rng.randint(1, 90) * 1000 if round_cache else rng.randint(500, 90_000)
        t["cached"] = c
    if w.provider == "anthropic" and rng.random() < 0.4:
        t["w5m"] = rng.randint(1, 30) * 1000
        if rng.random() < 0.5:
            t["w1h"] = rng.randint(1, 30) * 1000
    return t


def _at(day: int, hour: int, minute: int, second: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, minute, second, tzinfo=UTC)


def _local(zone: str, y: int, mo: int, d: int, h: int, mi: int) -> datetime:
    """A wall-clock time on a tenant's clock, as UTC."""
    return datetime(y, mo, d, h, mi, tzinfo=ZoneInfo(zone)).astimezone(UTC)


def build(provider: str, seed: int = 7, mixed: bool = False) -> list[Req]:
    rng = random.Random(f"{provider}-{seed}")
    ws = {(w.tenant, w.workload): w for w in _workloads(provider, mixed)}
    reqs: list[Req] = []
    n = 0

    def add(w: Workload, ts: datetime, tokens: dict[str, int], **kw: Any) -> Req:
        nonlocal n
        n += 1
        r = Req(f"{provider[:2]}-{n:05d}", w, ts, tokens, **kw)
        reqs.append(r)
        return r

    def toks(**kw: int) -> dict[str, int]:
        t = dict.fromkeys(TYPES, 0)
        t.update(kw)
        return t

    # Ordinary traffic. Day 1 and day 31 only at hours that are the same month on
    # every tenant clock; the boundary requests are planted below.
    for day in range(1, 32):
        if day in EMPTY_DAYS[provider]:
            continue
        hours = range(10, 20) if day == 1 else range(8, 14) if day == 31 else range(24)
        for w in ws.values():
            for _ in range(rng.randint(2, 4)):
                exact = day == NEVER_SEEN_DAY and w.account in ("proj_support",
                                                               "wrkspc_01SupportQvzr7rXLA5AG")
                t = _tokens(rng, w, round_cache=bool(w.gateway_override) or exact)
                if exact:  # whole micro-dollars, so that day's line has no residue
                    t = {k: (v // 1000 + 1) * 1000 if v else 0 for k, v in t.items()}
                add(w, _at(day, rng.choice(list(hours)), rng.randint(0, 59),
                           rng.randint(0, 59)), t)

    la, tokyo = ZONES["acme"], ZONES["globex"]
    if provider == "openai":
        # (acme/agent-assist and globex/research-flex: ordinary traffic only)
        sup, res = ws["acme", "support-bot"], ws["globex", "research"]
        rt, batch = ws["globex", "realtime"], ws["initech", "nightly-batch"]
        # Month edges on both sides of UTC.
        add(sup, _local(la, 2026, 2, 28, 21, 15), toks(input=3100, cached=2000, output=410),
            note="la-feb28-evening")  # provider March, ledger February
        add(sup, _local(la, 2026, 3, 31, 22, 30), toks(input=5200, cached=4000, output=300),
            note="la-mar31-evening")  # provider April, ledger March (cache bug too)
        add(sup, _local(la, 2026, 3, 1, 0, 30), toks(input=1500, output=200),
            note="la-mar1-early")  # both March
        add(res, _local(tokyo, 2026, 3, 1, 4, 0), toks(input=9000, cached=1000, output=700),
            note="tokyo-mar1-early")  # provider February, ledger March
        add(res, _local(tokyo, 2026, 4, 1, 1, 30), toks(input=150_000, cached=140_000,
                                                         output=5000),
            note="tokyo-apr1-early-long")  # provider March, ledger April, long context
        add(res, _local(tokyo, 2026, 3, 31, 23, 0), toks(input=4000, output=900),
            note="tokyo-mar31-late")  # both March
        add(batch, _at(31, 23, 59, 58), toks(input=7777, cached=3333, output=1111),
            note="utc-last-second")
        add(batch, datetime(2026, 4, 1, 0, 0, 2, tzinfo=UTC), toks(input=5000, output=500),
            note="utc-april")  # neither month
        add(batch, datetime(2026, 2, 28, 23, 59, 59, tzinfo=UTC), toks(input=5000, output=500),
            note="utc-february")  # neither month
        # Long context (gpt-5.4 above 272k input tokens, cached included).
        add(res, _at(9, 3, 10), toks(input=180_000, cached=120_000, output=4100), note="long")
        add(res, _at(18, 11, 5), toks(input=290_001, output=8000), note="long")
        add(res, _at(24, 16, 40), toks(input=272_000, output=2000), note="at-threshold")
        # Failed attempts.
        for day in (5, 19):
            add(sup, _at(day, 15, 1), toks(input=2400, output=0), status="failed",
                error_type="rate_limit_error", billed=False, note="booked-not-billed")
        for day in (6, 23):
            add(res, _at(day, 2, 44), toks(input=12_000, cached=8000, output=1300),
                status="failed", error_type="client_disconnected", booked_zero=True,
                note="billed-booked-zero")
        add(rt, _at(12, 9, 9), toks(input=3000, output=800), status="failed",
            error_type="gateway_timeout", note="both-charged")
        add(batch, _at(20, 4, 4), toks(input=900, output=0), status="failed", billed=False,
            booked_zero=True, note="neither")
    else:
        sup, tri, doc = ws["acme", "support-bot"], ws["acme", "triage"], \
            ws["globex", "doc-analyzer"]
        tools = ws["initech", "internal-tools"]
        add(sup, _local(la, 2026, 2, 28, 22, 0), toks(input=2100, cached=3000, w1h=2000,
                                                      output=350),
            note="la-feb28-evening")
        add(sup, _local(la, 2026, 3, 31, 21, 0), toks(input=800, cached=1000, w1h=3000,
                                                      output=600),
            note="la-mar31-evening")
        add(tri, _local(la, 2026, 3, 1, 1, 0), toks(input=1000, output=100), note="la-mar1-early")
        add(doc, _local(tokyo, 2026, 3, 1, 8, 30), toks(input=6000, w5m=2000, output=444),
            note="tokyo-mar1-morning")
        add(doc, _local(tokyo, 2026, 4, 1, 0, 10), toks(input=150_000, cached=60_000,
                                                        output=3000),
            note="tokyo-apr1-long")
        add(doc, _local(tokyo, 2026, 3, 31, 22, 0), toks(input=3000, output=250),
            note="tokyo-mar31-late")
        add(tools, _at(31, 23, 59, 59), toks(input=4321, output=1234), note="utc-last-second")
        add(tools, datetime(2026, 4, 1, 0, 0, 1, tzinfo=UTC), toks(input=4000, output=100),
            note="utc-april")
        # Long context: above 200k (input + cache reads + cache writes).
        add(doc, _at(4, 7, 30), toks(input=230_000, output=5100), note="long")
        add(doc, _at(11, 13, 0), toks(input=50_000, cached=160_000, w5m=4000, output=2222),
            note="long-through-cache")
        add(doc, _at(26, 20, 15), toks(input=150_000, cached=40_000, w1h=10_000, output=3000),
            note="at-threshold")  # exactly 200,000: standard rates
        # Failed attempts.
        for day in (3, 16, 29):
            add(doc, _at(day, 18, 12), toks(input=7000, cached=3000, output=950),
                status="failed", error_type="client_disconnected", booked_zero=True,
                note="billed-booked-zero")
        for day in (8, 25):
            add(sup, _at(day, 10, 10), toks(input=5000, output=0), status="failed",
                error_type="overloaded_error", billed=False, note="booked-not-billed")
        add(tri, _at(13, 6, 6), toks(input=2500, output=600), status="failed",
            error_type="stream_interrupted", note="both-charged")
    for r in reqs:
        price(r)
    return reqs


# --------------------------------------------------------------------------- exports


def _day_buckets() -> list[date]:
    return [date(2026, 3, d) for d in range(1, 32)]


def _pages(buckets: list[dict[str, Any]], per_page: int, token: str) -> list[dict[str, Any]]:
    out = []
    for i in range(0, len(buckets), per_page):
        more = i + per_page < len(buckets)
        out.append({"data": buckets[i:i + per_page], "has_more": more,
                    "next_page": f"{token}{i // per_page + 1:04d}" if more else None})
    return out


class _Raw:
    """A JSON number written exactly as its decimal text."""

    def __init__(self, text: str) -> None:
        self.text = text


def dump_json(value: Any) -> str:
    """JSON with exact decimal numbers (never through a float)."""
    marks: dict[str, str] = {}

    def walk(v: Any) -> Any:
        if isinstance(v, _Raw | Decimal):
            key = f"@@RAW{len(marks)}@@"
            marks[key] = v.text if isinstance(v, _Raw) else format(v, "f")
            return key
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    text = json.dumps(walk(value), indent=1)
    for key, raw in marks.items():
        text = text.replace(f'"{key}"', raw)
    return text


@dataclass
class Line:
    """One provider cost line: its exact amount and the requests on it."""

    day: date
    account: str
    key: str  # export spelling (line item / description)
    pico: int = 0
    rids: list[str] = field(default_factory=list)
    req_micros: int = 0  # sum of the per-request micro-dollar costs
    kind: str = "usage"
    unexplained_micros: int = 0


def _lines(provider: str, reqs: list[Req]) -> dict[tuple[Any, ...], Line]:
    lines: dict[tuple[Any, ...], Line] = {}
    for r in reqs:
        if not r.in_provider:
            continue
        for t in TYPES:
            if not r.tokens[t]:
                continue
            k = (r.ts.date(), r.w.account, r.w.export_model, r.w.service, r.long_context, t)
            ln = lines.setdefault(k, Line(r.ts.date(), r.w.account, ""))
            ln.pico += r.provider_pico[t]
            ln.req_micros += r.provider_micros[t]
            ln.rids.append(r.rid)
    return lines


NEVER_SEEN = {  # extra billed usage on NEVER_SEEN_DAY, whole micro-dollars
    "openai": ("proj_support", "gpt-4o-mini-2024-07-18", "default",
               {"input": 100_000, "output": 20_000}),
    "anthropic": ("wrkspc_01SupportQvzr7rXLA5AG", "claude-sonnet-4-5-20250929", "standard",
                  {"input": 40_000, "output": 2_000}),
}
WEB_SEARCH = {"openai": [(10, 3), (27, 2)], "anthropic": [(12, 4), (30, 3)]}  # (day, calls)
WEB_SEARCH_PICO = 10_000 * PICO_PER_MICRO  # $10 per 1,000 calls = 10,000 micro-USD per call


def _openai_item(model: str, service: str, long_ctx: bool, t: str) -> str:
    kind = {"input": "input", "cached": "cached input", "output": "output"}[t]
    prefix = "" if service == "default" else f"{service} | "
    tier = ", long context > 272k" if long_ctx else ""
    return f"{prefix}{model}, {kind}{tier}"


_ANTH_TYPE = {"input": "uncached_input_tokens", "cached": "cache_read_input_tokens",
              "w5m": "cache_creation.ephemeral_5m_input_tokens",
              "w1h": "cache_creation.ephemeral_1h_input_tokens", "output": "output_tokens"}
_ANTH_WORDS = {"input": "Input Tokens", "cached": "Cache Read Input Tokens",
               "w5m": "Cache Write (5m) Input Tokens", "w1h": "Cache Write (1h) Input Tokens",
               "output": "Output Tokens"}
_ANTH_NAME = {"claude-sonnet-4-5-20250929": "Claude Sonnet 4.5",
              "claude-haiku-4-5-20251001": "Claude Haiku 4.5"}


def write_month(root: Any, provider: str, seed: int = 7, mixed: bool = False
                ) -> dict[str, Any]:
    """Writes the month's files under ``root`` (a pathlib.Path); returns the answer.
    ``mixed``: one account and model also carries a second service tier, and the
    gateway's export names each request's tier."""
    root.mkdir(parents=True, exist_ok=True)
    reqs = build(provider, seed, mixed)
    lines = _lines(provider, reqs)
    days = _day_buckets()
    extra_micros = 0
    # Usage the gateway never saw: on the line, not in the telemetry.
    acct, model, service, extra = NEVER_SEEN[provider]
    c = CARDS[(model, service, False)]
    for t, tok in extra.items():
        k = (date(2026, 3, NEVER_SEEN_DAY), acct, model, service, False, t)
        ln = lines[k]
        pico = tok * c[t]
        assert pico % PICO_PER_MICRO == 0
        ln.pico += pico
        ln.unexplained_micros += pico // PICO_PER_MICRO
        extra_micros += pico // PICO_PER_MICRO
    files: list[str] = []
    if provider == "openai":
        files += _openai_files(root, reqs, lines, days)
    else:
        files += _anthropic_files(root, reqs, lines, days)
    adjust, adjust_map, adjust_lines = _adjustments(root, provider)
    files.append(adjust)

    # Expected figures.
    cats: dict[str, int] = dict.fromkeys(CATEGORIES, 0)
    ids: dict[str, set[str]] = {c_: set() for c_ in CATEGORIES}
    rounding_lines = 0
    for ln in lines.values():
        line_micros = rhe(ln.pico, PICO_PER_MICRO)
        residue = line_micros - ln.req_micros - ln.unexplained_micros
        rounding_lines += residue
    cats["rounding"] += rounding_lines
    web = sum(calls for _, calls in WEB_SEARCH[provider]) * (WEB_SEARCH_PICO // PICO_PER_MICRO)
    cats["unexplained"] += extra_micros + web
    for r in reqs:
        p, l_ = r.p_total, r.l_total
        if not r.in_provider and not r.in_ledger:
            continue
        d = p - l_
        if (r.provider_month() == PERIOD) != r.in_ledger:
            cat = "clock_skew"
        elif r.status == "failed" and (p > 0) != (l_ > 0):
            cat = "failed_request_billing"
        elif r.long_context:
            cat = "tier_breakpoint"
        else:
            zero = dict.fromkeys(TYPES, 0)
            pm = r.provider_micros if r.in_provider else zero
            per = {t: pm[t] - r.booked[t] for t in TYPES}
            cache = sum(per[t] for t in ("cached", "w5m", "w1h") if abs(per[t]) > 2)
            if cache:
                cats["cache_read_rate"] += cache
                ids["cache_read_rate"].add(r.rid)
                rest = d - cache
                assert rest == 0, (r.rid, per)
                continue
            assert all(abs(v) <= 2 for v in per.values()), (r.rid, per)
            cat = "rounding"
        if d or cat == "clock_skew":
            cats[cat] += d
            ids[cat].add(r.rid)
    cats["credits"] = sum(a for k_, a in adjust_lines if k_ == "credit")
    cats["prior_period_correction"] = sum(a for k_, a in adjust_lines if k_ == "correction")
    provider_total = sum(rhe(ln.pico, PICO_PER_MICRO) for ln in lines.values()) + web + \
        cats["credits"] + cats["prior_period_correction"]
    internal_total = sum(r.l_total for r in reqs)
    assert sum(cats.values()) == provider_total - internal_total
    internal = _internal(root, reqs, tiers=mixed)
    mapping = _mapping(root, provider, mixed)
    skew_p = sorted(r.rid for r in reqs if r.in_provider and not r.in_ledger)
    skew_l = sorted(r.rid for r in reqs if r.in_ledger and r.provider_month() != PERIOD)
    return {
        "period": PERIOD, "provider": provider, "exports": files, "internal": internal,
        "mapping": mapping, "column_map": adjust_map,
        "expected": {
            "net_micros": cats,
            "request_ids": {k: sorted(v) for k, v in ids.items()},
            "provider_month_only_ids": skew_p,
            "ledger_month_only_ids": skew_l,
            "invoice_micros": provider_total,
            "internal_micros": internal_total,
            "internal_requests": sum(1 for r in reqs if r.in_ledger),
        },
        "notes": {r.rid: r.note for r in reqs if r.note},
    }


def _openai_files(root: Any, reqs: list[Req], lines: dict[tuple[Any, ...], Line],
                  days: list[date]) -> list[str]:
    usage: dict[tuple[Any, ...], dict[str, int]] = {}
    for r in reqs:
        if not r.in_provider:
            continue
        k = (r.ts.date(), r.w.account, r.w.api_key, r.w.export_model, r.w.service)
        u = usage.setdefault(k, {"input_tokens": 0, "input_cached_tokens": 0,
                                 "output_tokens": 0, "num_model_requests": 0})
        u["input_tokens"] += r.tokens["input"] + r.tokens["cached"]
        u["input_cached_tokens"] += r.tokens["cached"]
        u["output_tokens"] += r.tokens["output"]
        u["num_model_requests"] += 1
    acct, model, service, extra = NEVER_SEEN["openai"]
    k = (date(2026, 3, NEVER_SEEN_DAY), acct, "key_support01", model, service)
    usage[k]["input_tokens"] += extra["input"]
    usage[k]["output_tokens"] += extra["output"]
    usage[k]["num_model_requests"] += 7
    buckets = []
    for d in days:
        start = int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())
        results = []
        for (day, account, key, model_, service_), u in sorted(usage.items(), key=str):
            if day != d:
                continue
            results.append({"object": "organization.usage.completions.result", **u,
                            "project_id": account, "user_id": None, "api_key_id": key,
                            "model": model_, "batch": service_ == "batch",
                            "service_tier": "default" if service_ == "batch" else service_})
        buckets.append({"object": "bucket", "start_time": start, "end_time": start + 86400,
                        "results": results})
    names = []
    for i, page in enumerate(_pages(buckets, 7, "page_AAAAAGdGxdEiJdKO")):
        name = f"openai_usage_completions_p{i + 1}.json"
        (root / name).write_text(dump_json({"object": "page", **page}))
        names.append(name)
    cost_buckets = []
    for d in days:
        start = int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp())
        results = []
        for (day, account, model_, service_, long_ctx, t), ln in sorted(lines.items(), key=str):
            if day != d:
                continue
            results.append({"object": "organization.costs.result",
                            "amount": {"value": _Raw(pico_text(ln.pico, 12)), "currency": "usd"},
                            "line_item": _openai_item(model_, service_, long_ctx, t),
                            "project_id": account})
        for wday, calls in WEB_SEARCH["openai"]:
            if wday == d.day:
                results.append({"object": "organization.costs.result",
                                "amount": {"value": _Raw(pico_text(calls * WEB_SEARCH_PICO, 12)),
                                           "currency": "usd"},
                                "line_item": "web search tool calls",
                                "project_id": "proj_research"})
        cost_buckets.append({"object": "bucket", "start_time": start,
                             "end_time": start + 86400, "results": results})
    pages = [{"object": "page", **p} for p in _pages(cost_buckets, 7, "page_AAAAAGcqsYA")]
    (root / "openai_costs.json").write_text(dump_json(pages))  # one file, a list of pages
    return [*names, "openai_costs.json"]


def _anthropic_files(root: Any, reqs: list[Req], lines: dict[tuple[Any, ...], Line],
                     days: list[date]) -> list[str]:
    usage: dict[tuple[Any, ...], dict[str, int]] = {}
    for r in reqs:
        if not r.in_provider:
            continue
        k = (r.ts.date(), r.w.account, r.w.api_key, r.w.export_model, r.w.service,
             r.long_context)
        u = usage.setdefault(k, dict.fromkeys(TYPES, 0))
        for t in TYPES:
            u[t] += r.tokens[t]
    acct, model, service, extra = NEVER_SEEN["anthropic"]
    k = (date(2026, 3, NEVER_SEEN_DAY), acct, "apikey_01SupportKey", model, service, False)
    for t, tok in extra.items():
        usage[k][t] += tok
    searches = {d: n for d, n in WEB_SEARCH["anthropic"]}
    buckets = []
    for d in days:
        start = datetime(d.year, d.month, d.day, tzinfo=UTC)
        results = []
        for (day, account, key, model_, service_, long_ctx), u in sorted(usage.items(), key=str):
            if day != d:
                continue
            ws_calls = searches.pop(d.day, 0) if account == "wrkspc_01DocsHKfFUJx3Hh9A" else 0
            results.append({
                "uncached_input_tokens": u["input"], "cache_read_input_tokens": u["cached"],
                "cache_creation": {"ephemeral_5m_input_tokens": u["w5m"],
                                   "ephemeral_1h_input_tokens": u["w1h"]},
                "output_tokens": u["output"],
                "server_tool_use": {"web_search_requests": ws_calls},
                "api_key_id": key, "workspace_id": None if account == "default" else account,
                "model": model_, "service_tier": service_,
                "context_window": "200k-1M" if long_ctx else "0-200k"})
        buckets.append({"starting_at": _rfc(start), "ending_at": _rfc(start + timedelta(days=1)),
                        "results": results})
    assert not searches
    names = []
    for i, page in enumerate(_pages(buckets, 7, "page_MjAyNS0wNS0xNFQwMDowMDowMFo")):
        name = f"anthropic_usage_report_p{i + 1}.json"
        (root / name).write_text(dump_json(page))
        names.append(name)
    cost_buckets = []
    for d in days:
        start = datetime(d.year, d.month, d.day, tzinfo=UTC)
        results = []
        for (day, account, model_, service_, long_ctx, t), ln in sorted(lines.items(), key=str):
            if day != d:
                continue
            name = _ANTH_NAME[model_]
            batch = " Batch" if service_ == "batch" else ""
            tier = " - Long Context" if long_ctx else ""
            results.append({
                "amount": pico_text(ln.pico, 10), "context_window":
                    "200k-1M" if long_ctx else "0-200k", "cost_type": "tokens",
                "currency": "USD",
                "description": f"{name}{batch} Usage - {_ANTH_WORDS[t]}{tier}",
                "model": model_, "service_tier": service_, "token_type": _ANTH_TYPE[t],
                "workspace_id": None if account == "default" else account})
        for wday, calls in WEB_SEARCH["anthropic"]:
            if wday == d.day:
                results.append({
                    "amount": pico_text(calls * WEB_SEARCH_PICO, 10), "context_window": None,
                    "cost_type": "web_search", "currency": "USD",
                    "description": "Web Search Usage", "model": None, "service_tier": None,
                    "token_type": None, "workspace_id": "wrkspc_01DocsHKfFUJx3Hh9A"})
        cost_buckets.append({"starting_at": _rfc(start),
                             "ending_at": _rfc(start + timedelta(days=1)), "results": results})
    for i, page in enumerate(_pages(cost_buckets, 7, "page_Y29zdF9yZXBvcnRfcGFnZQ")):
        name = f"anthropic_cost_report_p{i + 1}.json"
        (root / name).write_text(dump_json(page))
        names.append(name)
    return names


def _rfc(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _adjustments(root: Any, provider: str) -> tuple[str, str, list[tuple[str, int]]]:
    """Invoice lines keyed in by finance: a credit and a prior-period correction."""
    if provider == "openai":
        rows = [("2026-03-31", "", "Credit", "Promotional credit (startup program)",
                 "-5.00", ""),
                ("2026-03-31", "proj_rt", "Adjustment",
                 "Billing correction for 2026-02: priority tier over-billed", "-3.10", "2026-02")]
    else:
        rows = [("2026-03-31", "", "Credit", "Promotional credit (trial grant)", "-8.00", ""),
                ("2026-03-31", "wrkspc_01DocsHKfFUJx3Hh9A", "Adjustment",
                 "Billing correction for 2026-02: cache writes under-billed", "1.85", "2026-02")]
    head = "Date,Account,Type,Description,Amount,Currency,Service period\n"
    body = "".join(",".join([d, a, t, desc, amt, "USD", per]) + "\n"
                   for d, a, t, desc, amt, per in rows)
    name = f"{provider}_invoice_adjustments.csv"
    (root / name).write_text(head + body)
    cmap = f"{provider}_invoice_adjustments.columns.yaml"
    (root / cmap).write_text(
        "apiVersion: keel.pdp/v1\nkind: ColumnMap\n"
        f"provider: {provider}\n"
        "columns:\n  date: Date\n  account: Account\n  kind: Type\n"
        "  description: Description\n  cost: Amount\n  currency: Currency\n"
        "  belongs_to: Service period\n"
        "kinds:\n  Credit: credit\n  Adjustment: correction\n")
    out = []
    for _, _, t, _, amt, _ in rows:
        micros = int(Decimal(amt) * PICO_PER_MICRO)
        out.append(("credit" if t == "Credit" else "correction", micros))
    return name, cmap, out


def _internal(root: Any, reqs: list[Req], tiers: bool = False) -> str:
    """The gateway's export: JSON lines, every request loaded around the month.
    ``tiers``: each row names the service tier the provider billed it at, in the
    provider's own words (OpenAI ``default``, Anthropic ``standard``)."""
    rows = []
    for r in sorted(reqs, key=lambda x: (x.ts, x.rid)):
        t, b = r.tokens, r.booked
        # Three clocks in one export: UTC ISO, the tenant's wall clock with its
        # offset, epoch milliseconds.
        stamp: dict[str, Any]
        if r.w.tenant == "acme":
            local = r.ts.astimezone(ZoneInfo(ZONES["acme"]))
            stamp = {"ts": local.isoformat(timespec="milliseconds")}
        elif r.w.tenant == "globex":
            stamp = {"ts_ms": int(r.ts.timestamp()) * 1000}
        else:
            stamp = {"ts": r.ts.isoformat().replace("+00:00", "Z")}
        row: dict[str, Any] = {
            **stamp, "tenant": r.w.tenant,
            "workload": r.w.workload, "provider": r.w.provider, "model": r.w.model,
            "input_tokens": t["input"] + t["cached"] + t["w5m"] + t["w1h"],
            "cached_input_tokens": t["cached"], "cache_write_tokens": t["w5m"] + t["w1h"],
            "output_tokens": t["output"], "cost_micros": sum(b.values()),
            "input_cost_micros": b["input"], "cached_input_cost_micros": b["cached"],
            "cache_write_cost_micros": b["w5m"] + b["w1h"],
            "output_cost_micros": b["output"], "status": r.status, "permit_id": r.rid,
            "account": r.w.account, "api_key": r.w.api_key,
        }
        if r.w.provider == "anthropic":
            row["cache_write_1h_tokens"] = t["w1h"]
            row["cache_write_1h_cost_micros"] = b["w1h"]
        if r.error_type:
            row["error_type"] = r.error_type
        if tiers:
            row["service_tier"] = r.w.service
        rows.append(json.dumps(row))
    name = f"{reqs[0].w.provider}_internal.jsonl"
    (root / name).write_text("\n".join(rows) + "\n")
    return name


def _mapping(root: Any, provider: str, mixed: bool) -> str:
    ws = _workloads(provider, mixed)
    out = ["apiVersion: keel.pdp/v1", "kind: ReconcileMapping",
           "finance_owner: Priya Natarajan", "ai_program_lead: Sam Okafor", "accounts:"]
    shared: dict[str, list[Workload]] = {}
    for w in ws:
        shared.setdefault(w.account, []).append(w)
    for w in ws:
        out += [f"  - provider: {w.provider}", f"    account: {w.account}",
                f"    tenant: {w.tenant}", f"    workload: {w.workload}"]
        if w.account == "default":
            out.append("    names: [Default]")
        if len(shared[w.account]) > 1:
            out.append(f"    api_keys: [{w.api_key}]")
    out.append("workloads:")
    seen = set()
    for w in ws:
        if (w.tenant, w.workload) in seen:
            continue
        seen.add((w.tenant, w.workload))
        out += [f"  - tenant: {w.tenant}", f"    workload: {w.workload}",
                f"    engineering_owner: {w.owner}", f"    cost_center: {w.cost_center}"]
    out.append("tenants:")
    for tenant, zone in ZONES.items():
        out.append(f"  - {{tenant: {tenant}, timezone: {zone}}}")
    name = f"{provider}_mapping.yaml"
    (root / name).write_text("\n".join(out) + "\n")
    return name
