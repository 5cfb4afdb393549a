"""The variance memo: one paragraph per category, past tense, with numbers.

Each paragraph says what each side said, which side was authoritative, the
size of the gap and the decision. The Markdown is for people; the JSON carries
the same figures (integer micro-USD) for machines. Neither contains the time it
was generated, so re-running an unchanged reconciliation reproduces the memo
byte for byte and existing signatures stay valid.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from keel_pdp.reconcile.mapping import Workload
from keel_pdp.reconcile.model import CREDIT, STANDARD_TIER
from keel_pdp.reconcile.money import usd
from keel_pdp.reconcile.report import (
    ACCEPTED,
    BLOCKED,
    ESCALATED,
    RECORDED,
    CategoryReport,
    Report,
)
from keel_pdp.reconcile.variance import (
    CACHE_RATE,
    CLOCK_SKEW,
    CREDITS,
    FAILED,
    PRIOR_PERIOD,
    ROUNDING,
    TIER,
    UNEXPLAINED,
    Cell,
    per_million,
    workloads_of,
)

SCHEMA = "keel.pdp/variance-memo/v1"
MAX_MD_LINE_ITEMS = 50


def _variance(micros: int) -> str:
    if micros > 0:
        return f"{usd(micros, signed=True)} (provider higher)"
    if micros < 0:
        return f"{usd(micros)} (internal higher)"
    return usd(0)


def _accounts(report: Report, accounts: list[str], limit: int = 3) -> str:
    labels = []
    for account in accounts:
        workloads = report.mapping.workloads_for(report.rec.provider, account)
        names = ", ".join(f"{t}/{w}" for t, w in workloads)
        labels.append(f"{account} ({names})" if names else f"{account} (not in the mapping)")
    if not labels:
        return "the organization"
    if len(labels) > limit:
        return ", ".join(labels[:limit]) + f" and {len(labels) - limit} more"
    if len(labels) == 1:
        return labels[0]
    return ", ".join(labels[:-1]) + " and " + labels[-1]


def _decision(report: Report, c: CategoryReport) -> str:
    pct = f"{report.tolerance_pct.normalize():f}"
    bound = f"the {pct}% tolerance ({usd(report.tolerance_micros)})"
    if c.decision == ACCEPTED:
        return f"Accepted: within {bound}."
    if c.decision == RECORDED:
        return "Recorded."
    if c.decision == ESCALATED:
        text = f"Escalated to {', '.join(c.escalate_to)}: outside {bound}."
        if c.blocks_posting:
            text += " The chargeback is not posted until this gap is explained."
        return text
    return ""


def _days(days: list[Any]) -> str:
    shown = sorted({d.isoformat() for d in days})
    if len(shown) > 4:
        return ", ".join(shown[:4]) + f" and {len(shown) - 4} more"
    return ", ".join(shown)


def _types(rec: Any, category: str) -> str:
    """Both sides' figures per token type: "output: provider $1.00 vs internal $0.00"."""
    parts = []
    for t, f in sorted(rec.evidence.figures.get(category, {}).items()):
        if f.provider_micros or f.internal_micros:
            parts.append(f"{t} ({f.tokens:,} tokens): provider {usd(f.provider_micros)} vs "
                         f"internal {usd(f.internal_micros)}")
    return "; ".join(parts) if parts else "no token figures"


def _tiered(model: str, service_tier: str) -> str:
    """A model as the memo names it: with its service tier when not the standard one."""
    return model if service_tier == STANDARD_TIER else f"{model} ({service_tier})"


def paragraph(report: Report, c: CategoryReport) -> str:
    rec = report.rec
    ev = rec.evidence
    if c.decision == "none":
        return (f"No variance of this kind was found across the {len(rec.cells):,} line "
                "items.")
    accounts = _accounts(report, c.accounts)
    v = _variance(c.net_micros)
    decision = _decision(report, c)
    n = c.line_count
    items = f"{n} line item{'s' if n != 1 else ''}"
    if c.category == CLOCK_SKEW:
        clock = ("each tenant's own time zone (from the mapping file; UTC where none is "
                 "given)" if rec.ledger_clock == "tenant" else "UTC (forced)")
        return (f"Provider billed {usd(ev.skew_provider_micros)} for "
                f"{len(ev.skew_provider_only)} request(s) in its {rec.period} window (UTC) that "
                f"the ledger books in another month, and the ledger booked "
                f"{usd(ev.skew_ledger_micros)} for {len(ev.skew_ledger_only)} request(s) in "
                f"{rec.period} that the provider billed in an adjacent month, because the "
                f"ledger month runs on {clock}; {_types(rec, CLOCK_SKEW)}. Each request was "
                f"counted whole, on {accounts}. Provider window (UTC) applied for what is "
                f"paid. Variance: {v}. {decision}")
    if c.category == CACHE_RATE:
        rates = []
        for (account, model, t, st), seen in sorted(ev.cache_internal_rates.items()):
            card = [r for s_, days in ev.rates.items()
                    if s_[:3] == (account, model, t) and s_[4] == st for _, r in days]
            if card:
                rates.append(f"{_tiered(model, st)} {t} on {account}: provider "
                             f"{per_million(card[0])} vs "
                             f"internal {', '.join(per_million(x) for x in sorted(seen)[:2])}"
                             " per 1M tokens")
        listed = "; ".join(rates[:4]) or "a different cache rate"
        return (f"Provider billed cache-read and cache-write tokens at its cache rates on "
                f"{accounts}; internal telemetry priced them at other rates ({listed}); "
                f"{_types(rec, CACHE_RATE)}, over {len(ev.requests[CACHE_RATE]):,} "
                f"request(s), each sized as its cached tokens times the rate difference. "
                f"Provider rate applied. Variance: {v}. {decision}")
    if c.category == TIER:
        tiers = []
        for s_, days in sorted(ev.rates.items()):
            if s_[3] and days:
                tiers.append(f"{_tiered(s_[1], s_[4])} {s_[2]} on {s_[0]} at "
                             f"{per_million(days[0][1])}")
        listed = "; ".join(tiers[:4]) or "tier lines"
        return (f"Provider billed {len(ev.requests[TIER]):,} request(s) whose input was above "
                f"the long-context threshold on its tier-marked lines ({listed} per 1M "
                f"tokens) on {accounts}; internal telemetry priced them at the normal rates; "
                f"{_types(rec, TIER)}. Provider rate applied. Variance: {v}. {decision}")
    if c.category == FAILED:
        billed, unbilled = ev.failed_billed, ev.failed_unbilled
        return (f"Provider billed {usd(billed[1])} for {billed[0]:,} failed attempt(s) of the "
                f"error classes it bills (generated tokens of client-disconnected streams) "
                f"that the gateway booked at {usd(billed[2])}, and nothing for {unbilled[0]:,} "
                f"attempt(s) it does not bill (overloaded, rate-limited) that the gateway "
                f"booked at {usd(unbilled[2])}, on {accounts}; {_types(rec, FAILED)}. "
                f"Provider count of billable units applied. Variance: {v}. {decision}")
    if c.category == CREDITS:
        lines = [a.line for a in rec.adjustments if a.category == CREDITS]
        what = "; ".join(f"{ln.description or CREDIT} {usd(ln.cost_micros or 0)}"
                         for ln in lines[:4])
        return (f"Provider applied {c.line_count} credit line(s) totalling "
                f"{usd(c.net_micros)} ({what}); internal telemetry records no credits. "
                "Provider invoice applied; the credit was spread over the chargeback in "
                f"proportion to each workload's usage. Variance: {v}. {decision}")
    if c.category == PRIOR_PERIOD:
        lines = [a.line for a in rec.adjustments if a.category == PRIOR_PERIOD]
        periods = sorted({ln.belongs_to for ln in lines})
        what = "; ".join(f"{ln.description or 'correction'} {usd(ln.cost_micros or 0)}"
                         for ln in lines[:4])
        return (f"Provider posted {c.line_count} correction(s) totalling {usd(c.net_micros)} "
                f"on the {rec.period} invoice that belong to {', '.join(periods)} ({what}); "
                f"internal telemetry for {rec.period} has no counterpart. Provider invoice "
                f"applied; the amount was booked to the chargeback as adjustment rows naming "
                f"{', '.join(periods)}, not as {rec.period} usage. Variance: {v}. {decision}")
    if c.category == ROUNDING:
        cells = rec.cells_in(ROUNDING)
        largest = max((abs(cell.alloc.get(ROUNDING, 0)) for cell in cells), default=0)
        only = [cell for cell in cells if len(cell.alloc) == 1]
        sides = ""
        if only:
            sides = (f"; on the {len(only)} of them with no other difference, provider billed "
                     f"{usd(sum(x.provider_micros for x in only))} and internal telemetry "
                     f"recorded {usd(sum(x.internal_micros for x in only))}")
        return (f"After the categories above, {items} kept differences within rounding "
                f"(largest {usd(largest)}){sides}: the provider rounds each line item, the "
                "gateway rounds each request up to the micro-dollar. Provider figures "
                f"applied. Variance: {v}. {decision}")
    gross = f" (gross {usd(c.gross_micros)})" if c.gross_micros != abs(c.net_micros) else ""
    return (f"Provider billed {usd(c.provider_micros)} on {items} on {accounts} where internal "
            f"telemetry recorded {usd(c.internal_micros)}, and no known cause explained the "
            f"difference; the line items are listed below. Provider invoice carried into the "
            f"chargeback. Variance: {v}{gross}. {decision}")


def _line_item(report: Report, cell: Cell, category: str) -> dict[str, Any]:
    workloads: list[Workload] = workloads_of(report.rec, report.mapping, cell)
    return {
        "day": cell.key.day.isoformat(),
        "account": cell.key.account,
        "model": cell.key.model,
        "token_type": cell.key.token_type,
        "tier": cell.key.tier,
        "service_tier": cell.key.service_tier,
        "workloads": [f"{t}/{w}" for t, w in workloads],
        "provider_tokens": cell.provider_tokens,
        "provider_micros": cell.provider_micros,
        "internal_tokens": cell.internal_tokens,
        "internal_micros": cell.internal_micros,
        "amount_micros": cell.alloc.get(category, 0),
        "note": cell.notes.get(category, ""),
        "provider_source": cell.provider_refs[:3],
    }


def memo_json(report: Report, documents: dict[str, str]) -> dict[str, Any]:
    rec = report.rec
    categories = []
    for c in report.categories:
        entry: dict[str, Any] = {
            "category": c.category,
            "title": c.title,
            "net_micros": c.net_micros,
            "gross_micros": c.gross_micros,
            "provider_micros": c.provider_micros,
            "internal_micros": c.internal_micros,
            "line_count": c.line_count,
            "authoritative": "provider",
            "decision": c.decision,
            "escalate_to": c.escalate_to,
            "blocks_posting": c.blocks_posting,
            "accounts": c.accounts,
            "workloads": [f"{t}/{w}" for t, w in c.workloads],
            "paragraph": paragraph(report, c),
        }
        if c.category in (CREDITS, PRIOR_PERIOD):
            entry["line_items"] = [
                {"day": a.line.day.isoformat(), "account": a.line.account,
                 "description": a.line.description, "belongs_to": a.line.belongs_to,
                 "amount_micros": a.line.cost_micros or 0,
                 "provider_source": f"{pathlib.PurePath(a.line.source).name}: "
                                    f"{a.line.where}"}
                for a in rec.adjustments if a.category == c.category]
        elif c.category in (UNEXPLAINED, CLOCK_SKEW, CACHE_RATE, TIER, FAILED):
            entry["line_items"] = [_line_item(report, cell, c.category)
                                   for cell in rec.cells_in(c.category)]
        entry["request_ids"] = list(rec.evidence.requests.get(c.category, []))
        if c.category == CLOCK_SKEW:
            # + billed in this month, booked in another; - the reverse
            entry["provider_month_only_ids"] = list(rec.evidence.skew_provider_only)
            entry["ledger_month_only_ids"] = list(rec.evidence.skew_ledger_only)
        entry["line_ids"] = list(rec.evidence.lines.get(c.category, []))
        entry["by_token_type"] = {
            t: {"tokens": f.tokens, "provider_micros": f.provider_micros,
                "internal_micros": f.internal_micros}
            for t, f in sorted(rec.evidence.figures.get(c.category, {}).items())}
        categories.append(entry)
    usage = rec.provider_usage_micros
    return {
        "schema": SCHEMA,
        "period": str(rec.period),
        "provider": rec.provider,
        "window": {"start": rec.period.start.isoformat().replace("+00:00", "Z"),
                   "end": rec.period.end.isoformat().replace("+00:00", "Z")},
        "currency": "USD",
        "status": report.status,
        "totals": {
            "invoice_micros": rec.invoice_micros,
            "provider_usage_micros": usage,
            "credits_micros": rec.category_net(CREDITS),
            "prior_period_micros": rec.category_net(PRIOR_PERIOD),
            "internal_micros": rec.internal_micros,
            "internal_requests": len(rec.window_lines),
            "gap_micros": rec.invoice_micros - rec.internal_micros,
            "line_items": len(rec.cells),
        },
        "tolerance": {"pct": f"{report.tolerance_pct.normalize():f}",
                      "micros": report.tolerance_micros},
        "categories": categories,
        "escalations": report.escalations,
        "ledger_clock": rec.ledger_clock,
        "by_account": rec.by_account(),
        "unmapped_accounts": rec.unmapped_accounts,
        "chargeback": [
            {"kind": r.kind, "belongs_to": r.belongs_to, "tenant": r.tenant,
             "workload": r.workload, "cost_center": r.cost_center,
             "engineering_owner": r.engineering_owner, "amount_micros": r.amount_micros}
            for r in report.chargeback],
        "owners": {
            "engineering": sorted({r.engineering_owner for r in report.chargeback
                                   if r.engineering_owner}),
            "finance": report.mapping.doc.finance_owner,
            "ai_program_lead": report.mapping.doc.ai_program_lead,
        },
        "signers": signers(report),
        "documents": documents,
    }


def signers(report: Report) -> dict[str, Any]:
    """Who must sign: every engineering owner a category was escalated to (or,
    with no escalation, one of the engineering owners behind the chargeback),
    the finance owner and the AI program lead named in the mapping."""
    escalated: list[str] = []
    for c in report.categories:
        for w in c.workloads if c.decision == ESCALATED else []:
            owner = report.mapping.owner(w)
            if owner and owner not in escalated:
                escalated.append(owner)
    owners = sorted({r.engineering_owner for r in report.chargeback if r.engineering_owner}
                    | set(escalated))
    return {"engineering": sorted(escalated) if escalated else owners,
            "engineering_all_required": bool(escalated),
            "finance": report.mapping.doc.finance_owner,
            "ai_program_lead": report.mapping.doc.ai_program_lead}


def memo_markdown(report: Report, documents: dict[str, str]) -> str:
    rec = report.rec
    period = rec.period
    out: list[str] = []
    w = out.append
    w(f"# Variance memo: {rec.provider}, {period}")
    w("")
    w(f"- Billing window: {period.start.date().isoformat()} 00:00 UTC to "
      f"{period.end.date().isoformat()} 00:00 UTC (the provider's billing month).")
    w(f"- Invoice total (provider, authoritative for what is paid): {usd(rec.invoice_micros)} "
      f"(usage {usd(rec.provider_usage_micros)}, credits {usd(rec.category_net(CREDITS))}, "
      f"prior-period corrections {usd(rec.category_net(PRIOR_PERIOD))}).")
    w(f"- Internal telemetry: {usd(rec.internal_micros)} over {len(rec.window_lines):,} "
      f"recorded requests, {len(rec.cells):,} line items at the grain UTC day x account x "
      "model x token type.")
    zones = ", ".join(f"{t.tenant} {t.timezone}" for t in report.mapping.doc.tenants)
    if rec.ledger_clock == "tenant" and zones:
        w(f"- Ledger month: each tenant's own calendar month ({zones}; UTC for the others); "
          "requests on the other side of a month boundary are clock skew.")
    else:
        w("- Ledger month: the UTC calendar month.")
    w(f"- Gap (provider minus internal): {_variance(rec.invoice_micros - rec.internal_micros)}.")
    w(f"- Tolerance: {report.tolerance_pct.normalize():f}% of the invoice, "
      f"{usd(report.tolerance_micros)}.")
    if report.status == BLOCKED:
        w("- Status: **blocked**: an unexplained variance is outside tolerance; the "
          "chargeback is not posted until it is explained and the memo re-issued.")
    else:
        w("- Status: ready for sign-off.")
    if rec.unmapped_accounts:
        w(f"- Not in the mapping file: {', '.join(rec.unmapped_accounts)}.")
    w("")
    w("## Variance by category")
    w("")
    for c in report.categories:
        w(f"### {c.title}")
        w("")
        w(paragraph(report, c))
        w("")
        if c.category == UNEXPLAINED and c.line_count:
            w("| Day | Account | Model | Token type | Provider | Internal | Gap | Note |")
            w("|---|---|---|---|---|---|---|---|")
            cells = rec.cells_in(UNEXPLAINED)
            for cell in cells[:MAX_MD_LINE_ITEMS]:
                model = _tiered(cell.key.model or "-", cell.key.service_tier)
                w(f"| {cell.key.day.isoformat()} | {cell.key.account} | {model} "
                  f"| {cell.key.token_type} | {usd(cell.provider_micros)} | "
                  f"{usd(cell.internal_micros)} | {usd(cell.alloc[UNEXPLAINED], signed=True)} "
                  f"| {cell.notes.get(UNEXPLAINED, '')} |")
            if len(cells) > MAX_MD_LINE_ITEMS:
                w(f"| ... | {len(cells) - MAX_MD_LINE_ITEMS} more in memo.json and "
                  "line_items.csv | | | | | | |")
            w("")
    w("## Bridge")
    w("")
    w("| | Amount |")
    w("|---|---:|")
    w(f"| Internal telemetry | {usd(rec.internal_micros)} |")
    for c in report.categories:
        w(f"| {c.title} | {usd(c.net_micros, signed=True)} |")
    w(f"| **Invoice total** | **{usd(rec.invoice_micros)}** |")
    w("")
    w("## Chargeback")
    w("")
    w("Posted from the reconciled total (the invoice total) once all three sign-offs are "
      "recorded; see chargeback.csv.")
    w("")
    w("| Kind | Belongs to | Tenant | Workload | Cost center | Engineering owner | Amount |")
    w("|---|---|---|---|---|---|---:|")
    for r in report.chargeback:
        w(f"| {r.kind} | {r.belongs_to or period} | {r.tenant} | {r.workload} | "
          f"{r.cost_center or '-'} | {r.engineering_owner or '-'} | {usd(r.amount_micros)} |")
    w(f"| | | | | | **Total** | **{usd(sum(r.amount_micros for r in report.chargeback))}** |")
    w("")
    if report.escalations:
        w("## Escalations")
        w("")
        for e in report.escalations:
            w(f"- {e}")
        w("")
    w("## Documents")
    w("")
    w("| Document | SHA-256 |")
    w("|---|---|")
    for name, digest in sorted(documents.items()):
        w(f"| {name} | `{digest}` |")
    w("")
    w("## Sign-off")
    w("")
    doc = report.mapping.doc
    owners = sorted({r.engineering_owner for r in report.chargeback if r.engineering_owner})
    w("Three signatures are required: the engineering owner (telemetry side), the finance "
      "owner (provider side) and the AI program lead (both). Each records a name, a time and "
      "the SHA-256 of this memo in signoffs.json; any change to the memo voids them. "
      "Corrections found after sign-off go to the next period with their own paragraph.")
    w("")
    w(f"- Engineering owners on file: {', '.join(owners) or '-'}")
    w(f"- Finance owner on file: {doc.finance_owner or '-'}")
    w(f"- AI program lead on file: {doc.ai_program_lead or '-'}")
    w("")
    return "\n".join(out)


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
