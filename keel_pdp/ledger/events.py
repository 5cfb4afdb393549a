"""Decision-stream entries -> typed events -> ledger entry rows.

The wire format itself (fields, JSON, strict number reading) lives in
``keel_pdp.events``; this module says what each kind of event books. Parsing is
strict: an entry that does not match the contract raises ``ParseError`` with a
reason, and the writer moves it to the dead-letter stream instead of guessing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from keel_pdp.errors import ParseError
from keel_pdp.events import (
    EVENT_TYPES,
    EXCEPTION_STEPS,
    LEASE_STEPS,
    MAX_MICROS,
    MAX_TOKENS,
    as_int,
    get_int,
    get_str,
    loads_object,
    read_fields,
)
from keel_pdp.ledger.periods import bounds_ms, period_of_ms, permit_issued_ms

__all__ = ["EVENT_TYPES", "EXCEPTION_STEPS", "MAX_MICROS", "MAX_TOKENS", "ParseError", "as_int"]

EntryKind = Literal["permit", "denial", "settlement", "correction", "void", "expiry",
                    "exception_grant", "manual_adjustment"]
ENTRY_KINDS: tuple[EntryKind, ...] = ("permit", "denial", "settlement", "correction", "void",
                                      "expiry", "exception_grant", "manual_adjustment")
# Kinds a permit can have at most once; the store enforces it with a unique index,
# so a producer that appends the same fact twice (an outbox retry whose first
# attempt did land) still books it once.
ONCE_PER_PERMIT: tuple[EntryKind, ...] = ("permit", "denial", "settlement", "correction", "void",
                                          "expiry")
PICO = 1_000_000  # pico-USD per micro-USD
# Above any cost the engine books (provider costs up to 10^12 micro-USD), and
# within a BIGINT column.
MAX_EXACT_PICO = 10**18
_NON_BLOCKING = ("FALLBACK_PRICE_USED", "SHADOW_BUDGET_EXCEEDED")
# The first millisecond no period (YYYY-MM) can name: an entry dated there has no
# period to book into.
_NO_PERIOD_MS = bounds_ms("9999-11")[1] + 31 * 86_400_000  # the end of 9999-12


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One decision-stream entry as the ledger writer read it: the stream id, the
    event type and permit, the decoded ``data``/``res`` and their raw JSON (stored
    verbatim, so the ledger keeps exactly what the sidecar wrote)."""

    event_id: str
    etype: str
    permit_id: str
    ts_ms: int
    data: dict[str, Any]
    res: dict[str, Any]
    raw_data: str
    raw_res: str
    # What the event books, derived once when it is parsed.
    rows: tuple[EntryRow, ...] = ()
    budgets: tuple[BudgetRow, ...] = ()

    @property
    def belongs_to(self) -> str:
        """The period this event's money belongs to: the permit's issue month."""
        issued = permit_issued_ms(self.permit_id)
        return period_of_ms(self.ts_ms if issued is None else issued)


@dataclass(frozen=True, slots=True)
class Dims:
    """Who and what an entry is charged to: the dimensions reports group by."""

    tenant: str = ""
    workload: str = ""
    model: str = ""
    provider: str = ""


@dataclass(frozen=True, slots=True)
class EntryRow:
    """One ledger entry before the store assigns its id and booked period."""

    event_id: str
    seq: int
    kind: EntryKind
    permit_id: str
    ts_ms: int
    belongs_to: str
    dims: Dims = Dims()
    decision: str = ""
    status: str = ""
    request_id: str = ""
    policy_revision: str = ""
    price_revision: str = ""
    estimate_micros: int = 0
    held_micros: int = 0
    actual_micros: int = 0
    priced_micros: int = 0
    provider_cost_micros: int | None = None
    amount_micros: int = 0
    # The exact cost behind actual_micros (settlement and correction), in pico-USD;
    # None: actual_micros is exact (entries written before exact amounts).
    actual_pico: int | None = None
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    max_output_tokens: int = 0
    price_pico: tuple[int, int, int, int] | None = None
    reason: str = ""
    degraded: bool = False
    # The authenticated identity that authorized (permit, denial), closed out
    # (settlement, correction) or voided; '' when identities were not checked.
    caller: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    def with_dims(self, dims: Dims) -> EntryRow:
        return replace(self, dims=dims)


@dataclass(frozen=True, slots=True)
class BudgetRow:
    """The state of one budget window at decision time (after the hold, or as read)."""

    permit_id: str
    ordinal: int
    event_id: str
    budget_id: str
    scope: str
    window_kind: str
    window_start_ms: int
    window_end_ms: int
    limit_micros: int
    mode: str
    split: str
    settled_micros: int | None
    held_micros: int | None
    failed: bool
    applied: bool = True  # the permit was checked (and, unless denied, held) in this budget
    granted_micros: int = 0  # active exception grants raising the limit at decision time


# --------------------------------------------------------------------- parsing
def parse_entry(event_id: str, fields: dict[Any, Any] | None) -> StreamEvent:
    """Validate one stream entry against the contract of its type."""
    etype, pid, ts, raw_data, raw_res = read_fields(fields)
    issued = permit_issued_ms(pid)
    if max(ts, issued or 0) >= _NO_PERIOD_MS:
        raise ParseError("ts or the permit id's issue time is past the year 9999 "
                         "(no accounting period)")
    data, res = loads_object(raw_data, "data"), loads_object(raw_res, "res")
    ev = StreamEvent(event_id, etype, pid, ts, data, res, raw_data, raw_res)
    # Deriving the rows runs every check of the type-specific contract.
    rows, budgets = derive(ev)
    return replace(ev, rows=tuple(rows), budgets=tuple(budgets))


# ------------------------------------------------------------------ derivation
def _primary_reason(reasons: Any) -> str:
    if not isinstance(reasons, list):
        return ""
    codes = [r.get("code", "") for r in reasons if isinstance(r, dict)]
    blocking = [c for c in codes if isinstance(c, str) and c and c not in _NON_BLOCKING]
    if blocking:
        return blocking[0]
    return next((c for c in codes if isinstance(c, str) and c), "")


def _caller(data: dict[str, Any]) -> str:
    return get_str(data, "caller", "data")[:512]


def _dims(data: dict[str, Any]) -> Dims:
    return Dims(get_str(data, "tenant", "data"), get_str(data, "workload", "data"),
                get_str(data, "model", "data"), get_str(data, "provider", "data"))


def _decision(ev: StreamEvent) -> tuple[list[EntryRow], list[BudgetRow]]:
    data, res = ev.data, ev.res
    d = get_str(res, "d", "res", required=True)
    if d not in ("ALLOW", "CONSTRAIN", "DENY"):
        raise ParseError(f"res.d {d!r} is not ALLOW, CONSTRAIN or DENY")
    dims = _dims(data)
    if not dims.tenant and "shape" in data:
        raise ParseError("data refers to a stored shape copy (data.shape) that was not read "
                         "in: the entry must be read with keel_pdp.events.entry_with_shape "
                         "(a ledger writer of this version does)")
    if not dims.tenant:
        raise ParseError("data.tenant is missing")
    est = get_int(data, "est", "data", default=0, lo=0)
    amt = get_int(res, "amt", "res", lo=0)
    k = get_int(res, "k", "res", default=0, lo=0, hi=MAX_TOKENS)
    price = data.get("price")
    detail: dict[str, Any] = {}
    # With a routing rule the hold may be for a cheaper candidate than the model
    # asked for; the permit is booked for the model that was allowed to run.
    cands = data.get("cands") or []
    if not isinstance(cands, list):
        raise ParseError("data.cands is not a list")
    chosen = as_int(res.get("c", 1), "res.c", lo=1, hi=max(len(cands), 1))
    cand_budgets: list[int] | None = None
    if cands:
        cand = cands[chosen - 1]
        if not isinstance(cand, dict):
            raise ParseError(f"data.cands[{chosen - 1}] is not an object")
        where = f"data.cands[{chosen - 1}]"
        model, provider = get_str(cand, "m", where), get_str(cand, "p", where)
        if (model, provider) != (dims.model, dims.provider):
            detail["requested"] = {"model": dims.model, "provider": dims.provider}
            dims = Dims(dims.tenant, dims.workload, model or dims.model,
                        provider or dims.provider)
        est = get_int(cand, "est", where, default=est, lo=0)
        price = cand.get("price", price)
        raw_idx = cand.get("budgets") or []
        if not isinstance(raw_idx, list):
            raise ParseError(f"{where}.budgets is not a list")
        cand_budgets = [as_int(x, f"{where}.budgets", lo=0, hi=10_000) for x in raw_idx]
    for key in ("rule", "mode"):
        if isinstance(data.get(key), str):
            detail[key] = data[key]
    price_pico: tuple[int, int, int, int] | None = None
    if price is not None:
        if not isinstance(price, list) or len(price) != 4:
            raise ParseError("data.price is not a list of 4 prices")
        p = [as_int(x, f"data.price[{i}]", lo=0) for i, x in enumerate(price)]
        price_pico = (p[0], p[1], p[2], p[3])
    degraded = res.get("degraded") is True
    reasons = data.get("reasons") or res.get("reasons") or []
    if data.get("labels"):
        detail["labels"] = data["labels"]
    if reasons:
        detail["reasons"] = reasons
    shadow = res.get("shadow")
    if shadow:
        detail["shadow"] = shadow
    budgets = data.get("budgets") or []
    if not isinstance(budgets, list):
        raise ParseError("data.budgets is not a list")
    figures = res.get("b") or []
    if figures == {}:
        figures = []
    if not isinstance(figures, list):
        raise ParseError("res.b is not a list")
    fail = res.get("fail")
    fail_idx = as_int(fail, "res.fail", lo=1, hi=len(budgets)) if fail is not None else 0
    held_idx = res.get("held") or []
    if not isinstance(held_idx, list):
        raise ParseError("res.held is not a list")
    held_set = {as_int(x, "res.held", lo=1, hi=len(budgets)) for x in held_idx}
    granted = res.get("gr") or []
    if not isinstance(granted, list):
        raise ParseError("res.gr is not a list")
    if res.get("alerts"):
        detail["alerts"] = res["alerts"]
    reason = ""
    if d == "DENY":
        reason = _primary_reason(reasons) if reasons else ("BUDGET_EXHAUSTED" if fail_idx else "")
    common = {
        "event_id": ev.event_id, "seq": 0, "permit_id": ev.permit_id, "ts_ms": ev.ts_ms,
        "belongs_to": ev.belongs_to, "dims": dims, "decision": d,
        "request_id": get_str(data, "rid", "data"),
        "policy_revision": get_str(data, "rev", "data"),
        "price_revision": get_str(data, "prev", "data"),
        "estimate_micros": est, "max_output_tokens": k, "price_pico": price_pico,
        "degraded": degraded, "detail": detail, "reason": reason, "caller": _caller(data),
        "input_tokens": get_int(data, "in_tok", "data", default=0, lo=0, hi=MAX_TOKENS),
        "output_tokens": get_int(data, "out_tok", "data", default=0, lo=0, hi=MAX_TOKENS),
    }
    if d == "DENY":
        # The amount a denial asked for is informational; it moves no money.
        row = EntryRow(kind="denial", held_micros=0, amount_micros=0,
                       status="DENIED", **common)  # type: ignore[arg-type]
        row = _with_requested(row, amt)
    else:
        row = EntryRow(kind="permit", held_micros=amt, amount_micros=amt,
                       status="DEGRADED" if degraded else "HELD", **common)  # type: ignore[arg-type]
    brows: list[BudgetRow] = []
    for i, b in enumerate(budgets):
        if not isinstance(b, dict):
            raise ParseError(f"data.budgets[{i}] is not an object")
        where = f"data.budgets[{i}]"
        fig = figures[i] if i < len(figures) else None
        settled = held = None
        if fig is not None:
            if not isinstance(fig, list) or len(fig) != 2:
                raise ParseError(f"res.b[{i}] is not [settled, held]")
            settled = as_int(fig[0], f"res.b[{i}][0]")
            held = as_int(fig[1], f"res.b[{i}][1]")
        split = b.get("split") or []
        if not isinstance(split, list) or not all(isinstance(s, str) for s in split):
            raise ParseError(f"{where}.split is not a list of strings")
        brows.append(BudgetRow(
            permit_id=ev.permit_id, ordinal=i + 1, event_id=ev.event_id,
            budget_id=get_str(b, "id", where, required=True), scope=get_str(b, "scope", where),
            window_kind=get_str(b, "window", where),
            window_start_ms=get_int(b, "ws", where, lo=0),
            window_end_ms=get_int(b, "we", where, lo=0),
            limit_micros=get_int(b, "limit", where, lo=0), mode=get_str(b, "mode", where),
            split=json.dumps(split, ensure_ascii=True, separators=(",", ":")),
            settled_micros=settled, held_micros=held, failed=fail_idx == i + 1,
            applied=(i + 1 in held_set) if held_set else
            (cand_budgets is None or i in cand_budgets),
            granted_micros=as_int(granted[i], f"res.gr[{i}]", lo=0) if i < len(granted)
            else 0))
    return [row], brows


def _with_requested(row: EntryRow, requested: int) -> EntryRow:
    detail = dict(row.detail)
    detail["requested_micros"] = requested
    return replace(row, detail=detail)


def _settlement(ev: StreamEvent) -> list[EntryRow]:
    data, res = ev.data, ev.res
    st = get_str(res, "st", "res", required=True)
    if st not in ("SETTLED", "SETTLED_AFTER_EXPIRY", "SETTLED_AFTER_VOID"):
        raise ParseError(f"res.st {st!r} is not a settlement status")
    prior = get_str(res, "prior", "res", required=True)
    if prior not in ("held", "expired", "voided", "unheld"):
        raise ParseError(f"res.prior {prior!r} is not held, expired, voided or unheld")
    act = get_int(res, "act", "res", lo=0)
    amt = get_int(res, "amt", "res", lo=0)
    est = get_int(res, "est", "res", default=0, lo=0)
    usage = data.get("usage")
    if not isinstance(usage, dict):
        raise ParseError("data.usage is missing")
    tok = {k: get_int(usage, k, "data.usage", default=0, lo=0, hi=MAX_TOKENS)
           for k in ("in", "cached", "cw", "out", "rsn")}
    provider_cost = data.get("provider_cost")
    pc = None if provider_cost is None else as_int(provider_cost, "data.provider_cost", lo=0)
    priced = get_int(data, "priced", "data", default=act, lo=0)
    exact = _exact_pico(data, act)
    outcome = get_str(data, "outcome", "data")
    flags = res.get("flags") or []
    if not isinstance(flags, list):
        raise ParseError("res.flags is not a list")
    # A service tier: the rates the usage was priced at, which may not be the permit's
    # (a hold at the highest rate, settled at the tier the provider reported).
    tier = {k: get_str(data, k, "data") for k in ("service_tier", "priced_tier")}
    tier = {k: v for k, v in tier.items() if v}
    if data.get("tier_unpriced") is True:
        flags = [*flags, "SERVICE_TIER_UNPRICED"]
    # Web searches, billed per call: how many, and the fee each was booked at.
    searches: dict[str, int] = {}
    ws = get_int(usage, "ws", "data.usage", default=0, lo=0, hi=MAX_TOKENS)
    if ws:
        searches["web_search_calls"] = ws
        if "ws_fee" in data:
            searches["web_search_fee_pico"] = get_int(data, "ws_fee", "data", lo=0)
    if data.get("ws_unpriced") is True:
        flags = [*flags, "WEB_SEARCH_UNPRICED"]
    price_pico: tuple[int, int, int, int] | None = None
    price = data.get("price")
    if price is not None:
        if not isinstance(price, list) or len(price) != 4:
            raise ParseError("data.price is not a list of 4 prices")
        q = [as_int(x, f"data.price[{i}]", lo=0) for i, x in enumerate(price)]
        price_pico = (q[0], q[1], q[2], q[3])
    # The hold was released by this settlement only when it was still held;
    # otherwise a void or expiry already released it and the whole actual is new.
    released = amt if prior == "held" else 0
    common = {
        "event_id": ev.event_id, "permit_id": ev.permit_id, "ts_ms": ev.ts_ms,
        "belongs_to": ev.belongs_to, "status": st, "estimate_micros": est,
        "actual_micros": act, "priced_micros": priced, "provider_cost_micros": pc,
        "actual_pico": exact,
        "input_tokens": tok["in"], "cached_input_tokens": tok["cached"],
        "cache_write_tokens": tok["cw"], "output_tokens": tok["out"],
        "reasoning_tokens": tok["rsn"], "reason": outcome, "caller": _caller(data),
        "price_pico": price_pico,
        "detail": {"prior": prior, **({"flags": [str(f) for f in flags]} if flags else {}),
                   **tier, **searches},
    }
    return [
        EntryRow(seq=0, kind="settlement", held_micros=amt, amount_micros=0,
                 **common),  # type: ignore[arg-type]
        EntryRow(seq=1, kind="correction", held_micros=released, amount_micros=act - released,
                 **common),  # type: ignore[arg-type]
    ]


def _exact_pico(data: dict[str, Any], act: int) -> int | None:
    """The exact cost the settlement carries (``data.exact_pico``), checked against
    the booked ``act``: the booking is the exact cost rounded up to the micro-dollar,
    so the two differ by less than one micro-dollar and never downwards. Absent in
    events written before exact amounts: None (the booked amount is exact)."""
    if data.get("exact_pico") is None:
        return None
    exact = as_int(data["exact_pico"], "data.exact_pico", lo=0, hi=MAX_EXACT_PICO)
    if not act * PICO - PICO < exact <= act * PICO:
        raise ParseError(f"data.exact_pico = {exact} is not the booked res.act = {act} "
                         "micro-USD before rounding up")
    return exact


def _release(ev: StreamEvent) -> list[EntryRow]:
    res = ev.res
    amt = get_int(res, "amt", "res", lo=0)
    state = get_str(res, "state", "res")
    expected = "voided" if ev.etype == "void" else "expired"
    if state and state != expected:
        raise ParseError(f"res.state {state!r} does not match event type {ev.etype!r}")
    kind: EntryKind = "void" if ev.etype == "void" else "expiry"
    return [EntryRow(event_id=ev.event_id, seq=0, kind=kind, permit_id=ev.permit_id,
                     ts_ms=ev.ts_ms, belongs_to=ev.belongs_to, status="RELEASED",
                     held_micros=amt, amount_micros=-amt,
                     reason=get_str(ev.data, "reason", "data")[:512], caller=_caller(ev.data))]


def _grant(ev: StreamEvent) -> list[EntryRow]:
    data, res = ev.data, ev.res
    amount = get_int(res, "amt", "res", lo=0)
    detail = {
        "budget": get_str(data, "budget", "data", required=True),
        "split": data.get("split") or [],
        "path": get_str(data, "path", "data"),
        "approver": get_str(data, "approver", "data"),
        "role": get_str(data, "role", "data"),
        "expires_at_ms": get_int(res, "exp", "res", lo=0),
        "amount_micros": amount,
    }
    # Granted through the exception workflow: linked to the request and its denial.
    for key, name in (("exc", "exception_id"), ("denial", "denial_permit_id")):
        value = get_str(data, key, "data")
        if value:
            detail[name] = value
    # A grant raises a cap; it moves no money, so its amount stays out of the books.
    return [EntryRow(event_id=ev.event_id, seq=0, kind="exception_grant", permit_id=ev.permit_id,
                     ts_ms=ev.ts_ms, belongs_to=ev.belongs_to, status="GRANTED",
                     policy_revision=get_str(data, "rev", "data"),
                     reason=get_str(data, "why", "data")[:2000], detail=detail)]


def check_exception(ev: StreamEvent) -> str:
    """Validate one step of an exception request; returns the step.

    The steps are kept in the event mirror only, keyed by the denial's permit
    id (the request record): they move no money, and an approval's grant is
    booked by its own ``grant`` event.
    """
    data, res = ev.data, ev.res
    step = get_str(res, "st", "res", required=True)
    if step not in EXCEPTION_STEPS:
        raise ParseError(f"res.st {step!r} is not one of {', '.join(EXCEPTION_STEPS)}")
    exc = get_str(data, "exc", "data", required=True)
    if get_str(res, "exc", "res", required=True) != exc:
        raise ParseError("res.exc does not match data.exc")
    if not ev.permit_id.startswith("pmt_"):
        raise ParseError("an exception step's pid is not the denial's permit id")
    get_str(data, "budget", "data", required=True)
    if step == "PENDING":
        get_int(data, "amt", "data", lo=1)
        get_int(data, "dur", "data", lo=1, hi=10**9)
    if step == "APPROVED":
        get_str(res, "grant", "res", required=True)
        get_int(res, "amt", "res", lo=1)
        get_int(res, "exp", "res", lo=0)
    return step


def derive(ev: StreamEvent) -> tuple[list[EntryRow], list[BudgetRow]]:
    """The ledger entries (and budget-state rows) one stream event books.

    An alert (a soft threshold crossed by a decision) is kept in the event
    mirror only: the decision it follows already carries the money.
    """
    if ev.etype == "decision":
        return _decision(ev)
    if ev.etype == "settlement":
        return _settlement(ev), []
    if ev.etype == "grant":
        return _grant(ev), []
    if ev.etype == "alert":
        get_int(ev.res, "budget", "res", lo=1, hi=10_000)
        return [], []
    if ev.etype == "exception":
        check_exception(ev)
        return [], []
    if ev.etype == "lease":
        check_lease(ev)
        return [], []
    return _release(ev), []


def check_lease(ev: StreamEvent) -> str:
    """Validate one side of an escrow transfer; returns its step. Kept in the event
    mirror only: a lease moves headroom between a shared budget and a shard, not
    money (the decisions held against the lease carry the money)."""
    step = get_str(ev.res, "dir", "res", required=True)
    if step not in LEASE_STEPS:
        raise ParseError(f"res.dir {step!r} is not one of {', '.join(LEASE_STEPS)}")
    get_int(ev.res, "amt", "res", lo=1)
    if not ev.permit_id.startswith("lse_"):
        raise ParseError("a lease event's pid is not a transfer id (lse_...)")
    return step
