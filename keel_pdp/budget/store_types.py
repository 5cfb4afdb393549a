"""What a caller hands the budget store and what it reads back from a permit:
the hold request and its candidates, ``hold_shape`` (the authorize script's
KEYS and ARGV shared by every request of one shape, encoded once), and the
permit records.

Its own module so the decision side can build requests (and ``material`` can
build shapes) without the store's Redis machinery.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from keel_pdp.budget.resp_pack import Shared

Arg = str | int


@dataclass(slots=True)
class HoldCandidate:
    """One way to serve the request: a model's cost shape and the budgets it needs."""

    input_pico: int
    output_price_pico: int
    output_tokens: int
    may_constrain: bool
    permit_meta: str
    budget_indexes: tuple[int, ...]  # 0-based indexes into the shape's budget windows
    # The full estimate in micro-USD, as the plan made it: ceil((input_pico +
    # output_tokens x output_price_pico) / 10^6).
    estimate_micros: int


@dataclass(slots=True)
class HoldRequest:
    """One authorize call: the permit to issue, its idempotency, its event and the
    candidates that may serve it."""

    permit_id: str
    idempotency_key: str
    fingerprint: str
    now_ms: int
    expires_at_ms: int
    event_data: str
    shape: HoldShape  # hold_shape(...): the same for every request of one shape
    candidates: tuple[HoldCandidate, ...]
    # A lease on a shared budget short of the estimate answers "lease" (refill and
    # ask again with False) instead of deciding.
    refill: bool = False


@dataclass(frozen=True, slots=True)
class HoldShape(Shared):
    """The shared KEYS and ARGV of one shape's authorize calls, with what the caller
    needs of them per request: the permit retention and the shape's budgets in order
    (0-based), the index list of a candidate held in all of them."""

    permit_retention_s: int = 0
    every: tuple[int, ...] = ()
    # The stored copy of the shape's decision event members (last of the shared
    # KEYS) and its text, sent when the copy is missing or due for a refresh; ""
    # when the events are written inline.
    copy_key: str = ""
    copy_text: str = ""


def hold_shape(window_keys: Sequence[str], grant_keys: Sequence[str], limits: Sequence[int],
               enforce: Sequence[bool], window_expire_at_s: Sequence[int],
               thresholds: Sequence[Sequence[int]], *, idempotency_ttl_s: int,
               permit_retention_s: int, min_output_tokens: int,
               shape_copy: tuple[str, str, str] | None = None) -> HoldShape:
    """The authorize script's KEYS and ARGV that every request of one shape shares:
    the budget windows and their grant hashes, each budget's figures, the settings;
    with ``shape_copy`` (key, mark field, text) the stored copy of the members its
    decision events refer to, marked in the window hash that expires first."""
    args: list[Arg] = [len(window_keys)]
    for limit, enf, wx, th in zip(limits, enforce, window_expire_at_s, thresholds, strict=True):
        # Ascending: the script skips a budget below its lowest threshold.
        args.extend((limit, 1 if enf else 0, wx, ",".join(str(t) for t in sorted(set(th)))))
    copy_key, mark, copy_text = shape_copy or ("", "", "")
    # The window whose hash carries the copy's mark (1-based; 0: none, or no copy)
    markj = 0
    if copy_key and window_expire_at_s:
        markj = 1 + min(range(len(window_expire_at_s)), key=lambda i: window_expire_at_s[i])
    args.extend((idempotency_ttl_s, permit_retention_s, min_output_tokens,
                 ",".join(str(wx) for wx in window_expire_at_s),
                 ",".join(str(i) for i in range(1, len(window_keys) + 1)), mark, markj))
    s = Shared.of((*window_keys, *grant_keys, *((copy_key,) if copy_key else ())), args)
    return HoldShape(s.keys, s.args, s.wire, permit_retention_s,
                     tuple(range(len(window_keys))), copy_key, copy_text)


@dataclass(frozen=True, slots=True)
class PermitRecord:
    """A permit as the store reads it back: its window keys, metadata and state."""

    keys: tuple[str, ...]
    meta: dict[str, Any]
    state: str
    idempotency_key: str = ""


@dataclass(frozen=True, slots=True)
class DegradedPermit:
    """What record.lua stores for a fail-open permit issued without a hold."""

    keys: tuple[str, ...]
    wexp: tuple[int, ...]
    meta: str
    estimate_micros: int
    max_output_tokens: int
    expires_at_ms: int
    retention_s: int
