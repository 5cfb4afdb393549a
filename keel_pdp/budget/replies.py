"""Typed answers of the budget scripts, decoded once, here.

Each Lua script answers one JSON object (its header documents the shape). The
store decodes it into one of these immutable values, so nothing above the store
reads a raw key such as ``"amt"`` or ``"held"``. They are named tuples: immutable,
typed, and built at the cost of a tuple (an Authorize builds one per call).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from keel_pdp.errors import ReplyError

__all__ = ["ReplyError"]


class HoldReply(NamedTuple):
    """authorize.lua. ``outcome``: "decided" (this call decided: ``decision`` and the
    figures below), "replay" (the request_id's permit is still held: the figures of
    the original decision), "reused" (same request_id, other parameters), "ended"
    (the request_id's permit has ended: ``permit_id`` and ``ended_state``),
    "aborted" (an abort overtook this call: nothing was held), or "lease" (a lease
    on a shared budget is short: ``need`` (0-based budget, micro-USD) per lease;
    nothing was written), or "shape" (the stored copy of the shape's decision event
    members is missing: send it and ask again; nothing was written)."""

    outcome: str
    decision: str = ""
    permit_id: str = ""
    expires_at_ms: int = 0
    amount_micros: int = 0
    max_output_tokens: int = 0
    candidate: int = 0  # 0-based index into the plan's candidates
    figures: tuple[tuple[int, int], ...] = ()  # (settled, held) per budget, after the hold
    held: tuple[int, ...] = ()  # 0-based budget indexes held
    fail: int = -1  # 0-based budget index that refused, -1 when none
    shadow: tuple[int, ...] = ()  # 0-based observe-mode budgets that would have refused
    alerts: tuple[tuple[int, int], ...] = ()  # (0-based budget, threshold percent)
    granted: tuple[int, ...] = ()  # exception grants per budget (micro-USD), () when none
    ended_state: str = ""
    need: tuple[tuple[int, int], ...] = ()


class SettleReply(NamedTuple):
    """closeout.lua: ``status`` is SETTLED, SETTLED_AFTER_EXPIRY, SETTLED_AFTER_VOID,
    ALREADY_SETTLED, UNKNOWN_PERMIT, KEYS_MISMATCH or IMPLAUSIBLE."""

    status: str
    actual_micros: int = 0
    estimate_micros: int = 0
    amount_micros: int = 0  # what the permit held
    prior: str = ""  # held | expired | voided | unheld | settled
    flags: tuple[str, ...] = ()
    ceiling_micros: int = 0  # IMPLAUSIBLE: the overrun ceiling
    max_output_tokens: int = 0  # IMPLAUSIBLE: the permit's cap
    # ALREADY_SETTLED: Keel's own price and flags as the settlement recorded them
    # (None: a settlement that did not record them)
    priced_micros: int | None = None
    keel_flags: tuple[str, ...] | None = None


class ReleaseReply(NamedTuple):
    """release.lua and abort.lua: ``status`` is RELEASED, NOOP, NOT_DUE, UNKNOWN_PERMIT,
    KEYS_MISMATCH or (abort) TOMBSTONE; ``state`` the permit's state."""

    status: str
    amount_micros: int = 0
    state: str = ""


def _object(raw: Any) -> dict[str, Any]:
    text = raw.decode() if isinstance(raw, bytes | bytearray) else str(raw)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ReplyError(f"script answered {text[:80]!r}: not JSON") from exc
    if not isinstance(value, dict):
        raise ReplyError(f"script answered {text[:80]!r}: not an object")
    return value


def _ints(value: Any, shift: int = 0) -> tuple[int, ...]:
    # cjson would print an empty list as {}: the scripts write lists by hand, with
    # '%d', so JSON gives ints; only the type is checked (this runs per Authorize).
    if not value:
        return ()
    if type(value) is not list or any(type(x) is not int for x in value):
        raise ReplyError(f"expected a list of integers, got {value!r:.80}")
    return tuple([x - shift for x in value]) if shift else tuple(value)


def _pairs(value: Any, shift: int = 0) -> tuple[tuple[int, int], ...]:
    if not value:
        return ()
    out = tuple([(a - shift, b) for a, b in value])
    if any(type(a) is not int or type(b) is not int for a, b in out):
        raise ReplyError(f"expected pairs of integers, got {value!r:.80}")
    return out


def _decided(res: dict[str, Any], outcome: str) -> HoldReply:
    try:
        fail = res.get("fail")
        return HoldReply(
            outcome, str(res["d"]), str(res["pid"]), int(res.get("exp", 0)), int(res["amt"]),
            int(res["k"]), int(res.get("c", 1)) - 1, _pairs(res.get("b")),
            _ints(res.get("held"), 1), -1 if fail is None else int(fail) - 1,
            _ints(res.get("shadow"), 1), _pairs(res.get("alerts"), 1), _ints(res.get("gr")))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ReplyError(f"authorize reply {res!r:.120}: {exc}") from exc


def hold_reply(raw: Any) -> HoldReply:
    res = _object(raw)
    r = res.get("r")
    if r is None:
        return _decided(res, "decided")
    if r == "replay" and isinstance(res.get("res"), dict):
        return _decided(res["res"], "replay")
    if r == "ended":
        return HoldReply("ended", permit_id=str(res.get("pid", "")),
                         ended_state=str(res.get("st", "")))
    if r == "lease":
        need = _pairs(res.get("need"), 1)
        if not need or any(b < 0 or amt <= 0 for b, amt in need):
            raise ReplyError(f"authorize reply {res!r:.120}: no lease is short")
        return HoldReply("lease", need=need)
    if r in ("reused", "aborted", "shape"):
        return HoldReply(str(r))
    raise ReplyError(f"authorize reply {res!r:.120} is not documented")


def settle_reply(raw: Any) -> SettleReply:
    res = _object(raw)
    try:
        pc: int | None = None
        kf: list[str] | None = None
        pk = res.get("pk")
        if pk is not None:
            if (type(pk) is not list or len(pk) != 2 or type(pk[0]) is not int
                    or type(pk[1]) is not list or any(type(f) is not str for f in pk[1])):
                raise ValueError("pk is not [price, [flags]]")
            pc, kf = pk
        return SettleReply(
            str(res["st"]), int(res.get("act", 0)), int(res.get("est", 0)),
            int(res.get("amt", 0)), str(res.get("prior", "")),
            tuple(str(f) for f in res.get("flags") or ()), int(res.get("ceiling", 0)),
            int(res.get("k", 0)), pc, None if kf is None else tuple(kf))
    except (KeyError, TypeError, ValueError) as exc:
        raise ReplyError(f"closeout reply {res!r:.120}: {exc}") from exc


def release_reply(raw: Any) -> ReleaseReply:
    res = _object(raw)
    try:
        return ReleaseReply(str(res["st"]), int(res.get("amt", 0)), str(res.get("state", "")))
    except (KeyError, TypeError, ValueError) as exc:
        raise ReplyError(f"release reply {res!r:.120}: {exc}") from exc
