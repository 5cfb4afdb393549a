"""Chargeback/showback CSV and a FinOps FOCUS CSV for one period.

Both read only the entries booked in the period, so a closed period exports
the same file every time, and every row names the ledger entries it sums
(``entry_ids`` / ``x_EntryIds``, as id ranges such as ``12-40;45``). Exception
grants move no money and are not exported.

- ``csv`` (chargeback/showback): the period's books per cost center, business
  unit and the chosen dimensions, including accruals for open permits and
  late adjustments for earlier periods (``charge_type`` late, naming the
  period in ``charge_period``). The rows' exact charges add up to the period's
  booked total less what rounding each settlement up to the micro-dollar added;
  each printed row is rounded once, so the column's sum is within half a
  micro-dollar per row of that exact total.
- ``focus``: billed cost only (settled actuals and manual adjustments), one row
  per day, tenant, workload, model and token type, in FOCUS column
  conventions. A late settlement for an earlier, closed period is a row with
  ``ChargeClass`` = Correction whose charge period lies in that period.

Money columns sum the entries' exact amounts (pico-USD) and round each row once,
half to even (``keel_pdp.ledger.money.micros_half_even``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from keel_pdp.csv_cells import csv_rows
from keel_pdp.ledger.cli_support import add_store, open_for_cli, period_arg, run_cli
from keel_pdp.ledger.mapping import CostMapping
from keel_pdp.ledger.money import PICOS_PER_MICRO, micros_half_even, usd, usd_from_pico
from keel_pdp.ledger.periods import bounds_ms, day_start_ms, iso_utc, permit_issued_ms
from keel_pdp.ledger.report import DIMENSIONS, dims_of
from keel_pdp.ledger.store import LedgerStore

CURRENCY = "USD"
TOKEN_TYPES = ("input", "cached_input", "cache_write", "output")
SEARCH_TYPE = "web_search"  # the FOCUS line of web search calls (x_TokenType)


def id_ranges(ids: Iterable[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> "1-3;7;9-10"."""
    out: list[str] = []
    run: list[int] = []
    for i in sorted(set(ids)):
        if run and i == run[-1] + 1:
            run.append(i)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [i]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ";".join(out)


def parse_id_ranges(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(";")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def split_micros(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` in proportion to ``weights``; the parts sum to ``total`` exactly
    (largest remainder, ties to the first)."""
    whole = sum(weights)
    if whole <= 0:
        return [total, *[0] * (len(weights) - 1)]
    shares = [total * w // whole for w in weights]
    rest = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in order[:rest]:
        shares[i] += 1
    return shares


_ENTRIES_SQL = """
SELECT e.id, e.kind, e.belongs_to, e.permit_id,
       COALESCE(p.tenant, e.tenant), COALESCE(p.workload, e.workload),
       COALESCE(p.model, e.model), COALESCE(p.provider, e.provider),
       e.held_micros, e.actual_micros, e.amount_micros,
       e.input_tokens, e.cached_input_tokens, e.cache_write_tokens, e.output_tokens,
       e.reasoning_tokens,
       COALESCE(e.price_input_pico, p.price_input_pico),
       COALESCE(e.price_cached_input_pico, p.price_cached_input_pico),
       COALESCE(e.price_cache_write_pico, p.price_cache_write_pico),
       COALESCE(e.price_output_pico, p.price_output_pico), p.price_revision, e.ts_ms, e.reason,
       e.actual_pico, e.detail
FROM ledger_entries e
LEFT JOIN ledger_entries p
  ON p.permit_id = e.permit_id AND e.permit_id <> '' AND p.kind IN ('permit', 'denial')
WHERE e.period = ? AND e.kind <> 'exception_grant'
ORDER BY e.id
"""


@dataclass(frozen=True)
class _Entry:
    id: int
    kind: str
    belongs_to: str
    permit_id: str
    key: tuple[str, str, str, str]
    held: int
    actual: int
    amount: int
    tokens: tuple[int, int, int, int, int]  # input (all), cached, cache write, output, reasoning
    price: tuple[int, int, int, int] | None
    price_revision: str
    ts_ms: int
    reason: str
    # What rounding up to the micro-dollar added to ``actual`` (settlement and
    # correction entries), in pico-USD; 0 when the booked amount is exact.
    round_pico: int = 0
    # Web searches a settlement booked (README "Server-tool fees"): how many, and the
    # fee per call in pico-USD (0, 0 when none).
    searches: tuple[int, int] = (0, 0)

    @property
    def actual_pico(self) -> int:
        """The exact cost of a settlement (or a manual adjustment), in pico-USD."""
        return self.actual * PICOS_PER_MICRO - self.round_pico

    @property
    def amount_pico(self) -> int:
        """The exact amount the entry moves, in pico-USD."""
        over = self.round_pico if self.kind == "correction" else 0
        return self.amount * PICOS_PER_MICRO - over


def _entries(store: LedgerStore, period: str) -> list[_Entry]:
    out: list[_Entry] = []
    for r in store.query(_ENTRIES_SQL, (period,)):
        price = None if r[16] is None else (int(r[16]), int(r[17]), int(r[18]), int(r[19]))
        out.append(_Entry(
            id=int(r[0]), kind=str(r[1]), belongs_to=str(r[2]), permit_id=str(r[3]),
            key=(str(r[4]), str(r[5]), str(r[6]), str(r[7])), held=int(r[8]),
            actual=int(r[9]), amount=int(r[10]),
            tokens=(int(r[11]), int(r[12]), int(r[13]), int(r[14]), int(r[15])),
            price=price, price_revision=str(r[20] or ""), ts_ms=int(r[21]), reason=str(r[22]),
            round_pico=0 if r[23] is None else int(r[9]) * PICOS_PER_MICRO - int(r[23]),
            searches=_searches(r[24]) if r[1] == "settlement" else (0, 0)))
    return out


def _searches(raw: object) -> tuple[int, int]:
    """(web search calls, fee per call in pico-USD) from a settlement's detail."""
    try:
        detail = json.loads(raw) if isinstance(raw, str) and raw else {}
    except ValueError:
        return 0, 0
    if not isinstance(detail, dict):
        return 0, 0
    calls, fee = detail.get("web_search_calls"), detail.get("web_search_fee_pico")
    if not (isinstance(calls, int) and isinstance(fee, int)) or isinstance(calls, bool) \
            or isinstance(fee, bool) or calls <= 0 or fee <= 0:
        return 0, 0
    return calls, fee


# ----------------------------------------------------------------- chargeback
CHARGEBACK_FIXED = ("billing_period", "charge_period", "charge_type")
CHARGEBACK_FIGURES = (
    "permits", "denials", "settlements", "input_tokens", "cached_input_tokens",
    "cache_write_tokens", "output_tokens", "reasoning_tokens", "estimated_usd", "actual_usd",
    "accrual_usd", "charge_usd", "currency", "entry_count", "entry_ids")
DEFAULT_BY = ("cost_center", "business_unit", "tenant", "workload", "provider", "model")


@dataclass
class _Acc:
    permits: int = 0
    denials: int = 0
    settlements: int = 0
    tokens: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])
    estimated: int = 0
    actual_pico: int = 0
    charge_pico: int = 0
    ids: list[int] = field(default_factory=list)


def chargeback_rows(store: LedgerStore, period: str, mapping: CostMapping,
                    by: Sequence[str] = DEFAULT_BY) -> tuple[list[str], list[list[str]]]:
    mapping = mapping.for_store(store)
    groups: dict[tuple[str, ...], _Acc] = {}
    for e in _entries(store, period):
        dims = dims_of(e.key, mapping)
        if e.kind == "manual_adjustment":
            ctype = "manual"
        else:
            ctype = "usage" if e.belongs_to == period else "late"
        gkey = (period, e.belongs_to, ctype, *(dims[d] for d in by))
        acc = groups.setdefault(gkey, _Acc())
        acc.ids.append(e.id)
        acc.charge_pico += e.amount_pico
        if e.kind == "permit":
            acc.permits += 1
            acc.estimated += e.held
        elif e.kind == "denial":
            acc.denials += 1
        elif e.kind == "settlement":
            acc.settlements += 1
            acc.actual_pico += e.actual_pico
            acc.tokens = [a + b for a, b in zip(acc.tokens, e.tokens, strict=True)]
        elif e.kind == "manual_adjustment":
            acc.actual_pico += e.actual_pico
    header = [*CHARGEBACK_FIXED, *by, *CHARGEBACK_FIGURES]
    order = sorted(groups, key=lambda k: (k[3:], k[1], k[2]))
    rows = []
    for k in order:
        a = groups[k]
        rows.append([*k, str(a.permits), str(a.denials), str(a.settlements),
                     *(str(t) for t in a.tokens), usd(a.estimated),
                     usd(micros_half_even(a.actual_pico)),
                     usd(micros_half_even(a.charge_pico - a.actual_pico)),
                     usd(micros_half_even(a.charge_pico)), CURRENCY, str(len(a.ids)),
                     id_ranges(a.ids)])
    return header, rows


# ---------------------------------------------------------------------- FOCUS
def _id_part(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F")


def resource_id(tenant: str, workload: str) -> str:
    """``tenant/workload`` (``tenant`` without a workload), with ``/`` and ``%`` inside
    a name percent-encoded: tenant ``a/b`` workload ``c`` is ``a%2Fb/c``, tenant ``a``
    workload ``b/c`` is ``a/b%2Fc``, so one id never names two resources."""
    return f"{_id_part(tenant)}/{_id_part(workload)}" if workload else _id_part(tenant)


FOCUS_COLUMNS = (
    "AvailabilityZone", "BilledCost", "BillingAccountId", "BillingAccountName",
    "BillingCurrency", "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory",
    "ChargeClass", "ChargeDescription", "ChargeFrequency", "ChargePeriodEnd",
    "ChargePeriodStart", "CommitmentDiscountCategory", "CommitmentDiscountId",
    "CommitmentDiscountName", "CommitmentDiscountStatus", "CommitmentDiscountType",
    "ConsumedQuantity", "ConsumedUnit", "ContractedCost", "ContractedUnitPrice",
    "EffectiveCost", "InvoiceIssuerName", "ListCost", "ListUnitPrice", "PricingCategory",
    "PricingQuantity", "PricingUnit", "ProviderName", "PublisherName", "RegionId",
    "RegionName", "ResourceId", "ResourceName", "ResourceType", "ServiceCategory",
    "ServiceName", "ServiceSubcategory", "SkuId", "SkuPriceId", "SubAccountId",
    "SubAccountName", "Tags",
    # Extension columns (FOCUS reserves the x_ prefix for them).
    "x_Tenant", "x_Workload", "x_Model", "x_TokenType", "x_CostCenter", "x_BusinessUnit",
    "x_LedgerPeriod", "x_PermitCount", "x_EntryIds",
)


@dataclass
class _FocusAcc:
    quantity: int = 0
    list_pico: int = 0
    billed_pico: int = 0
    permits: set[str] = field(default_factory=set)
    ids: list[int] = field(default_factory=list)
    reasons: set[str] = field(default_factory=set)


def focus_rows(store: LedgerStore, period: str, mapping: CostMapping,
               billing_account: str = "keel") -> tuple[list[str], list[list[str]]]:
    p_start, p_end = bounds_ms(period)
    mapping = mapping.for_store(store)
    groups: dict[tuple[Any, ...], _FocusAcc] = {}
    for e in _entries(store, period):
        if e.kind not in ("settlement", "manual_adjustment"):
            continue
        if e.kind == "manual_adjustment":
            gkey: tuple[Any, ...] = ("adj", e.belongs_to, day_start_ms(e.ts_ms), e.key, "",
                                     None, "")
            acc = groups.setdefault(gkey, _FocusAcc())
            acc.billed_pico += e.amount_pico
            acc.list_pico += e.amount_pico
            acc.ids.append(e.id)
            acc.reasons.add(e.reason)
            continue
        issued = permit_issued_ms(e.permit_id) or e.ts_ms
        day = day_start_ms(issued)
        tin, cached, cw, out, _rsn = e.tokens
        quantities = (max(tin - cached - cw, 0), cached, cw, out)
        if e.price is None:
            # The permit is not in the ledger (yet): book the cost unsplit.
            gkey = ("use", e.belongs_to, day, e.key, "unpriced", None, "")
            acc = groups.setdefault(gkey, _FocusAcc())
            acc.quantity += sum(quantities)
            acc.list_pico += e.actual_pico
            acc.billed_pico += e.actual_pico
            acc.permits.add(e.permit_id)
            acc.ids.append(e.id)
            continue
        exact = e.actual_pico
        calls, fee = e.searches
        if calls:
            # The web search fee is a line of its own (calls at the fee), as the
            # provider bills it: the token lines keep their token prices.
            fee_pico = min(calls * fee, exact)
            exact -= fee_pico
            gkey = ("use", e.belongs_to, day, e.key, SEARCH_TYPE, fee, e.price_revision)
            acc = groups.setdefault(gkey, _FocusAcc())
            acc.quantity += calls
            acc.list_pico += calls * fee
            acc.billed_pico += fee_pico
            acc.permits.add(e.permit_id)
            acc.ids.append(e.id)
        costs = [q * p for q, p in zip(quantities, e.price, strict=True)]
        weights = costs if sum(costs) else list(quantities)
        billed = split_micros(exact, weights)
        for i, ttype in enumerate(TOKEN_TYPES):
            if quantities[i] == 0 and billed[i] == 0:
                continue
            gkey = ("use", e.belongs_to, day, e.key, ttype, e.price[i], e.price_revision)
            acc = groups.setdefault(gkey, _FocusAcc())
            acc.quantity += quantities[i]
            acc.list_pico += costs[i]
            acc.billed_pico += billed[i]
            acc.permits.add(e.permit_id)
            acc.ids.append(e.id)
    rows: list[list[str]] = []
    for gkey in sorted(groups, key=lambda k: (k[2], k[3], k[4] or "", k[0], k[1])):
        kind, belongs, day, (tenant, workload, model, provider), ttype, unit_pico, prev = gkey
        acc = groups[gkey]
        alloc = mapping.allocate(tenant, workload)
        correction = "Correction" if belongs != period else ""
        tags = json.dumps({"tenant": tenant, "workload": workload,
                           "cost_center": alloc.cost_center,
                           "business_unit": alloc.business_unit},
                          sort_keys=True, separators=(",", ":"))
        sku = f"{provider}/{model}/{ttype}" if ttype else ""
        if kind == "adj":
            charge_start, charge_end = bounds_ms(belongs)
            description = "Manual adjustment: " + "; ".join(sorted(r for r in acc.reasons if r))
        else:
            charge_start, charge_end = day, day + 86_400_000
            what = "web search calls" if ttype == SEARCH_TYPE else \
                f"{ttype.replace('_', ' ')} tokens"
            description = f"{provider}/{model} {what} for {tenant}/{workload}"
        unit = usd_from_pico(unit_pico) if unit_pico is not None else ""
        billed_micros = micros_half_even(acc.billed_pico)  # the exact sum, rounded once
        usage = kind == "use"
        values = {
            "AvailabilityZone": "", "BilledCost": usd(billed_micros),
            "BillingAccountId": billing_account, "BillingAccountName": billing_account,
            "BillingCurrency": CURRENCY, "BillingPeriodEnd": iso_utc(p_end),
            "BillingPeriodStart": iso_utc(p_start),
            "ChargeCategory": "Usage" if usage else "Adjustment", "ChargeClass": correction,
            "ChargeDescription": description,
            "ChargeFrequency": "Usage-Based" if usage else "One-Time",
            "ChargePeriodEnd": iso_utc(charge_end), "ChargePeriodStart": iso_utc(charge_start),
            "CommitmentDiscountCategory": "", "CommitmentDiscountId": "",
            "CommitmentDiscountName": "", "CommitmentDiscountStatus": "",
            "CommitmentDiscountType": "",
            "ConsumedQuantity": str(acc.quantity) if usage else "",
            "ConsumedUnit": (("Requests" if ttype == SEARCH_TYPE else "Tokens") if usage
                             else ""),
            "ContractedCost": usd_from_pico(acc.list_pico), "ContractedUnitPrice": unit,
            "EffectiveCost": usd(billed_micros), "InvoiceIssuerName": provider or billing_account,
            "ListCost": usd_from_pico(acc.list_pico), "ListUnitPrice": unit,
            "PricingCategory": "Standard" if usage else "",
            "PricingQuantity": str(acc.quantity) if usage else "",
            "PricingUnit": (("Requests" if ttype == SEARCH_TYPE else "Tokens") if usage
                            else ""),
            "ProviderName": provider or billing_account,
            "PublisherName": provider or billing_account, "RegionId": "", "RegionName": "",
            "ResourceId": resource_id(tenant, workload),
            "ResourceName": workload or tenant, "ResourceType": "LLM workload",
            "ServiceCategory": "AI and Machine Learning",
            "ServiceName": f"{provider} {model}".strip() or "manual adjustment",
            "ServiceSubcategory": "Generative AI", "SkuId": sku,
            "SkuPriceId": f"{prev}:{sku}" if sku and prev else sku,
            "SubAccountId": tenant, "SubAccountName": tenant, "Tags": tags,
            "x_Tenant": tenant, "x_Workload": workload, "x_Model": model, "x_TokenType": ttype,
            "x_CostCenter": alloc.cost_center, "x_BusinessUnit": alloc.business_unit,
            "x_LedgerPeriod": belongs, "x_PermitCount": str(len(acc.permits)),
            "x_EntryIds": id_ranges(acc.ids),
        }
        rows.append([values[c] for c in FOCUS_COLUMNS])
    return list(FOCUS_COLUMNS), rows


# ---------------------------------------------------------------------- files
def write_csv(out: TextIO, header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    w.writerows(csv_rows(rows))


def export(store: LedgerStore, period: str, fmt: str, out_path: str,
           mapping: CostMapping | None = None, by: Sequence[str] = DEFAULT_BY,
           billing_account: str = "keel") -> int:
    """Write the export atomically (temp file + rename); returns the row count."""
    mapping = mapping or CostMapping()
    if fmt == "focus":
        header, rows = focus_rows(store, period, mapping, billing_account)
    elif fmt == "csv":
        header, rows = chargeback_rows(store, period, mapping, by)
    else:
        raise ValueError(f"unknown export format {fmt!r}")
    if out_path == "-":
        import sys

        write_csv(sys.stdout, header, rows)
        return len(rows)
    target = pathlib.Path(out_path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
            write_csv(fh, header, rows)
        os.replace(tmp, target)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return len(rows)


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="chargeback/showback CSV or FOCUS CSV for a period")
    add_store(p)
    p.add_argument("--period", type=period_arg, required=True)
    p.add_argument("--format", choices=("csv", "focus"), default="csv")
    p.add_argument("--out", required=True, help="output file ('-' for stdout)")
    p.add_argument("--mapping", help="YAML file: tenant -> cost center / business unit")
    p.add_argument("--by", default=",".join(DEFAULT_BY),
                   help=f"chargeback grouping, comma-separated: {', '.join(DIMENSIONS)}")
    p.add_argument("--billing-account", default="keel",
                   help="FOCUS BillingAccountId/Name (default: keel)")
    p.set_defaults(func=cmd_export)


def cmd_export(ns: argparse.Namespace) -> int:
    def go(ns: argparse.Namespace) -> int:
        mapping = CostMapping.load(ns.mapping)
        by = [d.strip() for d in ns.by.split(",") if d.strip()]
        bad = [d for d in by if d not in DIMENSIONS]
        if bad:
            raise ValueError(f"--by: unknown dimension(s) {', '.join(bad)}")
        store = open_for_cli(ns.store)
        try:
            n = export(store, ns.period, ns.format, ns.out, mapping, by, ns.billing_account)
        finally:
            store.close()
        if ns.out != "-":
            print(f"{ns.out}: {n} rows ({ns.format}, {ns.period})")
        return 0

    return run_cli(go, ns)
