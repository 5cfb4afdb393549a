"""What-if replay: re-decide a period's recorded requests under a candidate bundle.

Each recorded decision of the period is rebuilt as the request the caller made
(request id, tenant, workload, model, provider, token estimates, labels) and
planned again with ``keel_pdp.decision.plan`` under the candidate bundle, in the
order the requests arrived. Budgets are simulated in memory with the same
rules as the hold script: the first candidate model whose full estimate fits
every enforce budget is allowed (a later one is a reroute), else one that may
be constrained gets the largest max_output_tokens that fits, else the request
is denied.

What an allowed request then costs under the candidate: the recorded usage
(output capped at the new max_output_tokens) priced at the candidate model's
rate when the original call ran and was settled; nothing when it did not run
(voided, expired); its estimate when it is still open or was originally denied.
Budget windows start empty at the beginning of the period, and exception grants
are not replayed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from keel_pdp.csv_cells import csv_rows
from keel_pdp.decision import AuthorizeInput, InvalidRequest, Plan, plan
from keel_pdp.events import loads_object
from keel_pdp.ledger.cli_support import add_store, open_for_cli, period_arg, run_cli
from keel_pdp.ledger.money import usd
from keel_pdp.ledger.periods import bounds_ms
from keel_pdp.ledger.report import pid_bound, text_table
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.policy.loader import PolicyError, load_bundle
from keel_pdp.policy.snapshot import PolicySnapshot
from keel_pdp.pricing import (
    CACHE_TTLS,
    MAX_WEB_SEARCH_CALLS,
    WEB_SEARCH_UNBOUNDED,
    TokenUsage,
    max_output_tokens_within,
    tier_problem,
    usage_cost_micros,
)

GROUP_BY = ("tenant", "workload")


@dataclass(frozen=True)
class Recorded:
    permit_id: str
    ts_ms: int
    request: AuthorizeInput
    decision: str  # ALLOW | CONSTRAIN | DENY
    model: str  # the model the original decision allowed (after any reroute)
    spend_micros: int  # what the original decision cost: actual, open estimate or 0
    settled: bool
    ran: bool  # False when voided or expired without a settlement
    usage: TokenUsage | None


@dataclass(frozen=True)
class Replayed:
    decision: str
    model: str
    provider: str
    max_output_tokens: int
    spend_micros: int
    reason: str = ""


@dataclass
class Tally:
    requests: int = 0
    baseline: dict[str, int] = field(default_factory=lambda: {
        "ALLOW": 0, "CONSTRAIN": 0, "DENY": 0})
    candidate: dict[str, int] = field(default_factory=lambda: {
        "ALLOW": 0, "CONSTRAIN": 0, "DENY": 0})
    rerouted: int = 0
    capped: int = 0
    newly_denied: int = 0
    newly_allowed: int = 0
    baseline_spend: int = 0
    candidate_spend: int = 0

    @property
    def difference(self) -> int:
        return self.candidate_spend - self.baseline_spend


_DECISIONS_SQL = """
SELECT v.permit_id, v.ts_ms, v.data, v.res FROM ledger_events v
WHERE v.etype = 'decision' AND v.permit_id >= ? AND v.permit_id < ?
ORDER BY v.ts_ms, v.event_id
"""

_OUTCOMES_SQL = """
SELECT e.permit_id, e.kind, e.actual_micros, e.held_micros, e.input_tokens,
       e.cached_input_tokens, e.cache_write_tokens, e.output_tokens, e.reasoning_tokens,
       e.model
FROM ledger_entries e
WHERE e.permit_id >= ? AND e.permit_id < ?
  AND e.kind IN ('permit', 'settlement', 'void', 'expiry')
"""


def recorded(store: LedgerStore, period: str) -> list[Recorded]:
    start, end = bounds_ms(period)
    lo, hi = pid_bound(start), pid_bound(end)
    facts: dict[str, dict[str, Any]] = {}
    for pid, kind, act, held, tin, cached, cw, out, rsn, model in store.query(
            _OUTCOMES_SQL, (lo, hi)):
        f = facts.setdefault(str(pid), {})
        if kind == "permit":
            f["held"], f["model"] = int(held), str(model)
        elif kind == "settlement":
            f["actual"] = int(act)
            f["usage"] = TokenUsage(int(tin), int(cached), int(cw), int(out), int(rsn))
        else:
            f["released"] = True
    out_list: list[Recorded] = []
    seen: set[str] = set()
    for pid, ts, data_text, res_text in store.query(_DECISIONS_SQL, (lo, hi)):
        pid = str(pid)
        if pid in seen:
            continue
        seen.add(pid)
        data, res = loads_object(data_text, "data"), loads_object(res_text, "res")
        labels = tuple(sorted((str(k), str(v)) for k, v in (data.get("labels") or {}).items()))
        tier = data.get("service_tier")
        search = data.get("web_search")
        bound = search.get("max") if isinstance(search, dict) else 0
        ttl = data.get("cache_ttl")
        req = AuthorizeInput(str(data.get("rid", pid)), str(data["tenant"]),
                             str(data.get("workload", "")), str(data.get("model", "")),
                             str(data.get("provider", "")), int(data.get("in_tok", 0)),
                             int(data.get("out_tok", 0)), labels,
                             tier if isinstance(tier, str) and tier_problem(tier) is None
                             else "",
                             bound if type(bound) is int and
                             WEB_SEARCH_UNBOUNDED <= bound <= MAX_WEB_SEARCH_CALLS else 0,
                             ttl if ttl in CACHE_TTLS else "")
        f = facts.get(pid, {})
        settled = "actual" in f
        ran = settled or not f.get("released", False)
        if str(res.get("d")) == "DENY":
            spend, ran = 0, False
        elif settled:
            spend = int(f["actual"])
        else:
            spend = int(f.get("held", 0)) if ran else 0
        out_list.append(Recorded(pid, int(ts), req, str(res.get("d", "DENY")),
                                 str(f.get("model", req.model)), spend, settled, ran,
                                 f.get("usage")))
    return out_list


class BudgetSimulation:
    """Committed spend per budget window, in memory."""

    def __init__(self) -> None:
        self.committed: dict[tuple[str, tuple[str, ...], int], int] = {}

    def _key(self, p: Plan, i: int) -> tuple[str, tuple[str, ...], int]:
        t = p.targets[i]
        return (t.budget.id, t.split, t.window_start_ms)

    def room(self, p: Plan, idx: Sequence[int]) -> int | None:
        rooms = [p.targets[i].budget.limit_micros - self.committed.get(self._key(p, i), 0)
                 for i in idx if p.targets[i].budget.enforce and not p.observe]
        return min(rooms) if rooms else None

    def commit(self, p: Plan, idx: Sequence[int], micros: int) -> None:
        for i in idx:
            key = self._key(p, i)
            self.committed[key] = self.committed.get(key, 0) + micros


def decide(p: Plan, sim: BudgetSimulation, rec: Recorded, min_out: int) -> Replayed:
    req = p.request
    if p.denial or not p.candidates:
        code = str(p.denial[0].code) if p.denial else "NO_CANDIDATE"
        return Replayed("DENY", req.model, req.provider, 0, 0, code)
    chosen, k = -1, 0
    for n, c in enumerate(p.candidates):
        room = sim.room(p, c.target_idx)
        if room is None or c.estimate_micros <= room:
            chosen, k = n, c.output_tokens
            break
    if chosen < 0:
        for n, c in enumerate(p.candidates):
            room = sim.room(p, c.target_idx)
            if not c.may_constrain or room is None or room < 0:
                continue
            kmax = min(max_output_tokens_within(c.rate, req.estimated_input_tokens, room,
                                                fixed_pico=c.fixed_pico),
                       c.output_tokens)
            if kmax >= min_out:
                chosen, k = n, kmax
                break
    if chosen < 0:
        return Replayed("DENY", req.model, req.provider, 0, 0, "BUDGET_EXHAUSTED")
    c = p.candidates[chosen]
    if rec.usage is not None and rec.ran:
        u = rec.usage
        out = min(u.output_tokens, k)
        usage = TokenUsage(u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, out,
                           min(u.reasoning_tokens, out), u.cache_write_1h_tokens,
                           u.web_search_calls)
        spend = usage_cost_micros(c.rate, usage)
    elif rec.decision == "DENY" or rec.ran:
        spend = -(-(c.fixed_pico + k * c.rate.output) // 1_000_000)
    else:
        spend = 0
    sim.commit(p, c.target_idx, spend)
    capped = k < c.output_tokens
    rerouted = (c.provider, c.model) != (p.candidates[0].provider, req.model)
    decision = "ALLOW" if chosen == 0 and not capped and not rerouted else "CONSTRAIN"
    return Replayed(decision, c.model, c.provider, k, spend,
                    "REROUTED" if rerouted else ("OUTPUT_TOKENS_CAPPED" if capped else ""))


@dataclass
class ReplayResult:
    period: str
    candidate_revision: str
    by: tuple[str, ...]
    groups: dict[tuple[str, ...], Tally]
    skipped: int = 0
    changes: list[tuple[Recorded, Replayed]] = field(default_factory=list)

    @property
    def total(self) -> Tally:
        t = Tally()
        for g in self.groups.values():
            t.requests += g.requests
            for d in t.baseline:
                t.baseline[d] += g.baseline[d]
                t.candidate[d] += g.candidate[d]
            t.rerouted += g.rerouted
            t.capped += g.capped
            t.newly_denied += g.newly_denied
            t.newly_allowed += g.newly_allowed
            t.baseline_spend += g.baseline_spend
            t.candidate_spend += g.candidate_spend
        return t


def replay(store: LedgerStore, period: str, candidate: PolicySnapshot,
           by: Sequence[str] = GROUP_BY) -> ReplayResult:
    sim = BudgetSimulation()
    groups: dict[tuple[str, ...], Tally] = {}
    result = ReplayResult(period, candidate.policy_revision, tuple(by), groups)
    min_out = candidate.settings.min_output_tokens
    for rec in recorded(store, period):
        try:
            p = plan(candidate, rec.request, rec.ts_ms, permit_id=rec.permit_id)
        except InvalidRequest:
            result.skipped += 1
            continue
        new = decide(p, sim, rec, min_out)
        dims = {"tenant": rec.request.tenant, "workload": rec.request.workload,
                "model": rec.request.model, "provider": rec.request.provider}
        t = groups.setdefault(tuple(dims[d] for d in by), Tally())
        t.requests += 1
        t.baseline[rec.decision] = t.baseline.get(rec.decision, 0) + 1
        t.candidate[new.decision] += 1
        t.rerouted += new.reason == "REROUTED"
        t.capped += new.reason == "OUTPUT_TOKENS_CAPPED"
        t.newly_denied += new.decision == "DENY" and rec.decision != "DENY"
        t.newly_allowed += new.decision != "DENY" and rec.decision == "DENY"
        t.baseline_spend += rec.spend_micros
        t.candidate_spend += new.spend_micros
        if new.decision != rec.decision or new.model != rec.model:
            result.changes.append((rec, new))
    result.groups = dict(sorted(groups.items()))
    return result


COLUMNS = ("requests", "allow", "constrain", "deny", "would_allow", "would_constrain",
           "would_deny", "rerouted", "capped", "newly_denied", "newly_allowed",
           "baseline_usd", "candidate_usd", "difference_usd")


def cells(t: Tally) -> list[str]:
    return [str(t.requests), str(t.baseline["ALLOW"]), str(t.baseline["CONSTRAIN"]),
            str(t.baseline["DENY"]), str(t.candidate["ALLOW"]), str(t.candidate["CONSTRAIN"]),
            str(t.candidate["DENY"]), str(t.rerouted), str(t.capped), str(t.newly_denied),
            str(t.newly_allowed), usd(t.baseline_spend), usd(t.candidate_spend),
            usd(t.difference)]


def render(r: ReplayResult, fmt: str) -> str:
    header = [*r.by, *COLUMNS]
    rows = [[*k, *cells(t)] for k, t in r.groups.items()]
    total = ["TOTAL", *[""] * (len(r.by) - 1), *cells(r.total)]
    if fmt == "json":
        return json.dumps({"period": r.period, "candidate": r.candidate_revision,
                           "currency": "USD", "skipped": r.skipped,
                           "groups": [dict(zip(header, x, strict=True)) for x in rows],
                           "total": dict(zip(header, total, strict=True))}, indent=2)
    buf = io.StringIO()
    if fmt == "csv":
        w = csv.writer(buf, lineterminator="\n")
        w.writerows(csv_rows([header, *rows, total]))
        return buf.getvalue()
    buf.write(f"Replay of {r.period} under candidate policy {r.candidate_revision} "
              f"(amounts in USD; {r.skipped} requests skipped)\n\n")
    buf.write(text_table(header, [*rows, total]) + "\n")
    if r.changes:
        buf.write(f"\n{len(r.changes)} decisions change, first ones:\n")
        for rec, new in r.changes[:20]:
            buf.write(f"  {rec.permit_id} {rec.request.tenant}/{rec.request.workload} "
                      f"{rec.decision} {rec.model} -> {new.decision} {new.model}"
                      f"{' (' + new.reason + ')' if new.reason else ''}\n")
    return buf.getvalue()


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_store(p)
    p.add_argument("--period", type=period_arg, required=True)
    p.add_argument("--candidate", required=True, help="candidate policy bundle directory")
    p.add_argument("--by", default=",".join(GROUP_BY),
                   help="comma-separated: tenant, workload, model, provider")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=cmd_replay)


def register(sub: Any) -> None:
    """``replay`` under ``sub`` (``keel-pdp ledger``; keel_pdp.ledger.commands adds the
    old spellings as aliases)."""
    _add_arguments(sub.add_parser(
        "replay", help="re-decide a period's recorded requests under a candidate bundle"))


def cmd_replay(ns: argparse.Namespace) -> int:
    def go(ns: argparse.Namespace) -> int:
        by = [d.strip() for d in ns.by.split(",") if d.strip()]
        if not by or any(d not in ("tenant", "workload", "model", "provider") for d in by):
            raise ValueError("--by takes tenant, workload, model and provider")
        try:
            snapshot = load_bundle(ns.candidate)
        except PolicyError as exc:
            for problem in exc.problems:
                print(f"error: {problem}", file=sys.stderr)
            return 1
        store = open_for_cli(ns.store)
        try:
            result = replay(store, ns.period, snapshot, by)
        finally:
            store.close()
        sys.stdout.write(render(result, ns.format))
        return 0

    return run_cli(go, ns)
