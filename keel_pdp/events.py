"""The decision stream's wire format: the one place that writes and reads it.

Every entry of the stream has five fields: ``type``, ``pid`` (the permit id), ``ts``
(epoch ms), ``data`` (JSON: what the sidecar knew) and ``res`` (JSON: what the
store did). The Lua scripts append the entries (so a balance never moves without
its event) and write ``res``; this module encodes every ``data`` the sidecar sends
them and every ``res`` it writes itself (decisions taken without the store), and
holds the strict readers the ledger parses entries with.

Kinds (``EVENT_TYPES``):

* ``decision``   — data: ``decision_data``; res: authorize.lua, or ``denial_res`` /
  ``degraded_res`` for decisions that held nothing.
* ``settlement`` — data: ``settlement_data``; res: closeout.lua.
* ``void``, ``expiry`` — data: ``release_data``; res: release.lua / abort.lua.
* ``alert``      — data: the decision's; res: authorize.lua (a threshold crossed).
* ``grant``      — data: ``grant_data``; res: grant.lua.
* ``exception``  — data / res: ``dumps`` of the exception workflow's steps.
* ``lease``      — one side of an escrow transfer (escrow.lua): pid the transfer id;
  data names the budget or the two keys; res ``{"dir": step, "amt": micro-USD, ..}``.

A decision the authorize script writes refers to a stored copy of the members
every request of its shape shares (``shape_ref``): its data ends
``"shape":"<digest>"}`` and a reader puts the copy's members in its place
(``entry_with_shape``) before parsing; docs/ledger.md, "Stored shape copies".

Golden round trips of each kind are in tests/unit/test_events_golden.py. JSON
numbers are read as integers or Decimals, never floats: no money passes a float.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from keel_pdp.errors import ParseError
from keel_pdp.policy.snapshot import bounded_put

if TYPE_CHECKING:
    from keel_pdp.decision.model import Outcome, Plan, Reason
    from keel_pdp.decision.shape import Shape
    from keel_pdp.pricing import Price, TokenUsage

EVENT_TYPES = ("decision", "settlement", "void", "expiry", "alert", "grant", "exception",
               "lease")
LEASE_STEPS = ("take", "back", "credit", "give")
# The steps of an exception request ("exception" events, pid = the denial's permit id).
EXCEPTION_STEPS = ("PENDING", "APPROVED", "REJECTED", "EXPIRED")
MAX_MICROS = 10**15
MAX_TOKENS = 10**12
PICO_PER_MICRO = 1_000_000


def dumps(value: object) -> str:
    """Compact JSON, ASCII only: the form of every data and res the sidecar writes."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


# --------------------------------------------------------------------- encoding
# Text that JSON writes as it is: no quote, backslash, control or non-ASCII character.
_PLAIN = re.compile(r"[A-Za-z0-9 _.:/@+=,;!#$%&'()*?^`{|}~\[\]<>-]*")
# Callers send the same few label sets over and over: their JSON is kept (bounded).
_LABELS: dict[tuple[tuple[str, str], ...], str] = {}


def _labels_object(labels: tuple[tuple[str, str], ...]) -> str:
    found = _LABELS.get(labels)
    return found if found is not None else bounded_put(
        _LABELS, labels, dumps(dict(labels)), 4096)


def decision_tail(shape: Shape) -> str:
    """The decision event members every request of ``shape`` shares (JSON without
    the opening brace), computed once per shape and kept on it."""
    if shape.event_tail:
        return shape.event_tail
    snap = shape.snapshot
    price = shape.prices[0] if shape.prices else None
    data: dict[str, object] = {
        "tenant": shape.tenant, "workload": shape.workload, "model": shape.model,
        "provider": price.provider if price else shape.provider,
        "rev": snap.policy_revision, "prev": snap.price_revision,
    }
    if shape.rule_id:
        data["rule"] = shape.rule_id
        data["mode"] = shape.route_mode
    if shape.targets:
        data["budgets"] = [
            {"id": t.budget.id, "scope": t.budget.scope_text, "window": t.budget.window,
             "ws": t.window_start_ms, "we": t.window_end_ms, "limit": t.budget.limit_micros,
             "mode": "enforce" if t.budget.enforce else "observe",
             "split": list(t.split)}
            for t in shape.targets
        ]
    reasons = [*shape.pre_reasons, *shape.denial]
    if reasons:
        data["reasons"] = [r.to_json() for r in reasons]
    shape.event_tail = dumps(data)[1:]
    return shape.event_tail


# A decision written by authorize.lua leaves the shape's members out and ends
# instead with a reference to a stored copy of them (see ``shape_ref``).
SHAPE_DIGEST_CHARS = 32
_SHAPE_REF = re.compile(',?"shape":"([0-9a-f]{' + str(SHAPE_DIGEST_CHARS) + r'})"\}\Z')


@dataclass(frozen=True, slots=True)
class ShapeRef:
    """A shape's decision event members stored once (``copy``: a JSON object) and
    referred to by their digest: a decision's data then ends ``"shape":"<digest>"}``
    instead of the members themselves."""

    digest: str
    copy: str
    tail: str  # the members as ``decision_data`` ends with them

    @property
    def suffix(self) -> str:
        return f'"shape":"{self.digest}"}}'

    @property
    def mark(self) -> str:
        """The hash field that says, in a budget window's hash, that the copy was
        written (authorize.lua)."""
        return f"c:{self.digest}"


def _shape_digest(copy: str) -> str:
    """A copy's name: the hash of its text (128 bits of BLAKE2b, in hex)."""
    return hashlib.blake2b(copy.encode(), digest_size=SHAPE_DIGEST_CHARS // 2).hexdigest()


def _ref_at_end(data: str) -> re.Match[str] | None:
    """The shape reference that ends ``data`` (its comma included), if any."""
    return _SHAPE_REF.search(data, max(0, len(data) - SHAPE_DIGEST_CHARS - 12))


def shape_ref(shape: Shape) -> ShapeRef:
    """The stored form of ``decision_tail(shape)``: its digest is a hash of its
    text, so a copy never changes once written and equal members share one copy
    whichever revision or process wrote them."""
    tail = decision_tail(shape)
    copy = "{" + tail
    return ShapeRef(_shape_digest(copy), copy, tail)


def referenced_shape(data: str) -> str | None:
    """The digest a decision's data refers to (None: its members are inline)."""
    if not data.endswith('"}'):
        return None
    found = _ref_at_end(data)
    return found.group(1) if found else None


def with_shape(data: str, digest: str, copy: str) -> str:
    """A decision's data with its shape reference replaced by the stored members:
    the text the sidecar would have written inline. ParseError when ``copy`` is not
    the members of ``digest`` (a copy is named by the hash of its text)."""
    found = _ref_at_end(data)
    if found is None or found.group(1) != digest:
        raise ParseError(f"data does not refer to shape {digest!r}")
    if _shape_digest(copy) != digest or not copy.startswith("{") or not copy.endswith("}"):
        raise ParseError(f"the stored copy of shape {digest} is not the text it is named by")
    head = data[:found.start()]
    if head == "{":
        return copy
    return head + "," + copy[1:]


def entry_shape(fields: dict[Any, Any] | None) -> str | None:
    """The shape digest a raw stream entry's data refers to (None: none)."""
    raw = fields.get(b"data", fields.get("data")) if fields else None
    if isinstance(raw, bytes | bytearray):
        if not raw.endswith(b'"}'):
            return None
        return referenced_shape(bytes(raw[-60:]).decode("ascii", "replace"))
    return referenced_shape(raw) if isinstance(raw, str) else None


def entry_with_shape(fields: dict[Any, Any], digest: str, copy: str | bytes | None,
                     key: str) -> dict[Any, Any]:
    """A raw entry whose data refers to shape ``digest`` with the stored members in
    place (``copy``: the text read from ``key``), as the ledger parses it.
    ParseError when the copy is gone or is not the text its name says."""
    if copy is None:
        raise ParseError(f"data refers to the shape copy {key}, which is not in Redis "
                         "(expired or deleted): the decision's tenant, budgets and policy "
                         "revision are unknown")
    name = b"data" if b"data" in fields else "data"
    text = field_text(fields, "data")
    members = copy.decode("utf-8", "replace") if isinstance(copy, bytes) else copy
    full = with_shape(text, digest, members)
    return {**fields, name: full.encode() if isinstance(name, bytes) else full}


def decision_data(p: Plan, caller: str = "") -> str:
    """The request side of the decision event (the store adds the figures in res).
    ``caller``: the authenticated identity that asked, when identities are checked."""
    req = p.request
    rid = req.request_id
    rid_json = f'"{rid}"' if _PLAIN.fullmatch(rid) else dumps(rid)
    head = (f'{{"v":1,"rid":{rid_json},"in_tok":{req.estimated_input_tokens},'
            f'"out_tok":{p.output_tokens},"est":{p.estimate_micros},"now":{p.now_ms},'
            f'"exp":{p.expires_at_ms},')
    if p.candidates:
        r = p.candidates[0].rate
        head += f'"price":[{r.input},{r.cached_input},{r.cache_write},{r.output}],'
    if req.max_web_search_calls:
        # The bound asked for (-1: none), the searches held and the fee they were held at.
        fee = p.candidates[0].rate.web_search if p.candidates else None
        head += (f'"web_search":{{"max":{req.max_web_search_calls},'
                 f'"held":{p.web_search_calls},"fee":{"null" if fee is None else fee}}},')
    if req.cache_write_ttl:
        head += f'"cache_ttl":"{req.cache_write_ttl}",'
    if req.service_tier or (p.candidates and p.candidates[0].tier):
        # The tier asked for (absent: not set) and the one the hold is priced at.
        if req.service_tier:
            head += '"service_tier":' + dumps(req.service_tier) + ","
        if p.candidates and p.candidates[0].tier:
            head += f'"held_tier":"{p.candidates[0].tier}",'
    if len(p.candidates) > 1 or (p.candidates and p.candidates[0].model != req.model):
        cands = [
            {"p": c.provider, "m": c.model, "est": c.estimate_micros, "out": c.output_tokens,
             "price": [c.rate.input, c.rate.cached_input, c.rate.cache_write, c.rate.output],
             "budgets": list(c.target_idx), **({"tier": c.tier} if c.tier else {})}
            for c in p.candidates
        ]
        head += '"cands":' + dumps(cands) + ","
    if req.labels:
        head += '"labels":' + _labels_object(req.labels) + ","
    if caller:
        head += '"caller":' + dumps(caller) + ","
    assert p.shape is not None
    return head + decision_tail(p.shape)


def denial_res(permit_id: str, reasons: tuple[Reason, ...] = ()) -> str:
    """res of a decision that denied without touching budgets (policy, reused id)."""
    res: dict[str, object] = {"d": "DENY", "pid": permit_id, "amt": 0, "k": 0}
    if reasons:
        res["reasons"] = [r.to_json() for r in reasons]
    return dumps(res)


def degraded_res(out: Outcome) -> str:
    """res of a decision taken by the budgets' fail modes (nothing held)."""
    return dumps({"d": str(out.decision), "pid": out.permit_id, "amt": 0,
                  "k": out.max_output_tokens, "degraded": True,
                  "reasons": [r.to_json() for r in out.reasons]})


@dataclass(frozen=True, slots=True)
class SettledTier:
    """How a settlement's service tier was priced: the tier the provider reported
    ("" when it did not say), the tier whose rates priced the usage ("highest": the
    highest rates the permit knows; "" for a model without service tiers), whether
    the reported tier had no rate of its own (flagged), and the rates used."""

    reported: str
    priced: str
    unpriced: bool
    price: Price


def settlement_data(now_ms: int, outcome: str, priced_micros: int,
                    provider_cost_micros: int | None, actual_micros: int, usage: TokenUsage,
                    caller: str = "", exact_pico: int | None = None,
                    tier: SettledTier | None = None) -> str:
    """data of a settlement: the reported usage, Keel's price of it, what is booked.

    ``actual`` is the booked cost, rounded up to the micro-dollar (budgets move by
    it); ``exact_pico`` is the same cost exactly, in pico-USD: the price table's
    integer sum when Keel priced the usage, ``provider_cost x 10^6`` when the
    provider reported the cost. Reports and reconciliation sum the exact amount.
    Without ``exact_pico`` the booked amount is taken as exact. With ``tier`` (a
    service tier was reported or priced) the settlement also says which
    (``service_tier``, ``priced_tier``, ``tier_unpriced``) and the four rates it
    priced the usage at (``price``), which may differ from the permit's (held at
    another tier). Web searches are in the usage (``ws``) with the fee per call they
    were booked at (``ws_fee``, pico-USD), or ``ws_unpriced`` when the permit's price
    has none.
    """
    exact = actual_micros * PICO_PER_MICRO if exact_pico is None else exact_pico
    used: dict[str, int] = {"in": usage.input_tokens, "cached": usage.cached_input_tokens,
                            "cw": usage.cache_write_tokens, "out": usage.output_tokens,
                            "rsn": usage.reasoning_tokens}
    data: dict[str, object] = {
        "v": 1, "now": now_ms, "outcome": outcome, "priced": priced_micros,
        "provider_cost": provider_cost_micros, "actual": actual_micros, "exact_pico": exact,
        "usage": used,
    }
    if usage.web_search_calls:
        used["ws"] = usage.web_search_calls
        fee = tier.price.web_search if tier is not None else None
        if fee is None:
            data["ws_unpriced"] = True
        else:
            data["ws_fee"] = fee
    if tier is not None and (tier.reported or tier.priced):
        r = tier.price
        if tier.reported:
            data["service_tier"] = tier.reported
        if tier.priced:
            data["priced_tier"] = tier.priced
        if tier.unpriced:
            data["tier_unpriced"] = True
        data["price"] = [r.input, r.cached_input, r.cache_write, r.output]
    if caller:
        data["caller"] = caller
    return dumps(data)


def release_data(now_ms: int, reason: str = "", caller: str = "") -> str:
    """data of a void or an expiry (an abort is a void whose reason starts "aborted")."""
    data: dict[str, object] = {"v": 1, "now": now_ms}
    if reason:
        data["reason"] = reason
    if caller:
        data["caller"] = caller
    return dumps(data)


ABORT_REASON = ("aborted: the answer to this Authorize was not the store's "
                "(store timeout or error)")


def grant_data(now_ms: int, budget_id: str, split: tuple[str, ...], path: str, amount: int,
               expires_at_ms: int, approver: str, role: str, why: str, revision: str,
               extra: dict[str, object] | None = None) -> str:
    """data of a grant: who raised which budget, by how much, until when, and why."""
    return dumps({"v": 1, "now": now_ms, "budget": budget_id, "split": list(split),
                  "path": path, "amount": amount, "exp": expires_at_ms, "approver": approver,
                  "role": role, "why": why, "rev": revision, **(extra or {})})


# --------------------------------------------------------------------- decoding
def loads_object(text: str | bytes, name: str = "value") -> dict[str, Any]:
    """A JSON object, numbers as int or Decimal (never float); ParseError otherwise."""
    try:
        value = json.loads(text, parse_float=Decimal)
    except ValueError as exc:
        raise ParseError(f"field {name!r} is not JSON: {exc}") from exc
    except RecursionError as exc:
        raise ParseError(f"field {name!r} is nested too deeply") from exc
    if not isinstance(value, dict):
        raise ParseError(f"field {name!r} is not a JSON object")
    return value


def field_text(fields: dict[Any, Any], name: str) -> str:
    """One field of a raw stream entry, as text (bytes keys or str keys)."""
    raw = fields.get(name.encode(), fields.get(name))
    if raw is None:
        raise ParseError(f"field {name!r} is missing")
    if isinstance(raw, bytes | bytearray):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"field {name!r} is not UTF-8") from exc
    return str(raw)


def as_int(value: Any, where: str, *, lo: int = -MAX_MICROS, hi: int = MAX_MICROS) -> int:
    """A JSON integer (or an integral Decimal, as Lua's cjson writes large numbers)."""
    if type(value) is int and lo <= value <= hi:
        return value
    if isinstance(value, bool):
        raise ParseError(f"{where} is a boolean, expected an integer")
    if isinstance(value, Decimal):
        if not value.is_finite() or value != value.to_integral_value():
            raise ParseError(f"{where} is {value}, expected an integer")
        # int() writes out every digit: 1e999999999 would take minutes and gigabytes.
        if value.adjusted() >= len(str(max(abs(lo), abs(hi)))):
            raise ParseError(f"{where} = {value} is out of range")
        value = int(value)
    if not isinstance(value, int):
        raise ParseError(f"{where} is {type(value).__name__}, expected an integer")
    if not lo <= value <= hi:
        raise ParseError(f"{where} = {value} is out of range")
    return value


def get_int(obj: dict[str, Any], key: str, where: str, *, default: int | None = None,
            lo: int = -MAX_MICROS, hi: int = MAX_MICROS) -> int:
    if key not in obj or obj[key] is None:
        if default is None:
            raise ParseError(f"{where}.{key} is missing")
        return default
    return as_int(obj[key], f"{where}.{key}", lo=lo, hi=hi)


def get_str(obj: dict[str, Any], key: str, where: str, *, required: bool = False) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise ParseError(f"{where}.{key} is missing")
        return ""
    if not isinstance(value, str):
        raise ParseError(f"{where}.{key} is not a string")
    return value


def read_fields(fields: dict[Any, Any] | None) -> tuple[str, str, int, str, str]:
    """(type, pid, ts, data text, res text) of a raw entry, checked against the
    contract every kind shares."""
    if not fields:
        raise ParseError("entry has no fields (deleted from the stream)")
    etype = field_text(fields, "type")
    if etype not in EVENT_TYPES:
        raise ParseError(f"unknown event type {etype!r}")
    pid = field_text(fields, "pid")
    if not pid or len(pid) > 128:
        raise ParseError("pid is empty or longer than 128 characters")
    ts_text = field_text(fields, "ts")
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses.
    if not (ts_text.isascii() and ts_text.isdigit()) or len(ts_text) > 15:
        raise ParseError(f"ts {ts_text[:40]!r} is not epoch milliseconds")
    return etype, pid, int(ts_text), field_text(fields, "data"), field_text(fields, "res")
