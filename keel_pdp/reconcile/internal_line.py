"""One request of the internal side, as reconciliation reads it.

``InternalUsageLine`` is what reconciliation needs from the ledger's settlement
entries (or from any telemetry export): when, for whom, which model, tokens by
type and the cost the gateway booked. ``InternalSource`` is what every source of
such lines offers (``keel_pdp.reconcile.internal_file``,
``keel_pdp.reconcile.internal_ledger``); ``write_export`` writes lines in the
export format the file source reads back.
"""

from __future__ import annotations

import csv
import pathlib
from dataclasses import dataclass
from typing import Protocol

from keel_pdp.csv_cells import csv_dict
from keel_pdp.reconcile.errors import ReconcileError
from keel_pdp.reconcile.model import CACHE_WRITE, CACHE_WRITE_1H, CACHED_INPUT, INPUT, OUTPUT
from keel_pdp.reconcile.money import split_exact
from keel_pdp.reconcile.period import Period, iso_ms
from keel_pdp.reconcile.prices import PriceBook, split_cost

COST_COLUMNS = {
    INPUT: "input_cost_micros",
    CACHED_INPUT: "cached_input_cost_micros",
    CACHE_WRITE: "cache_write_cost_micros",
    OUTPUT: "output_cost_micros",
}
EXPORT_COLUMNS = (
    "ts", "ts_ms", "tenant", "workload", "provider", "account", "api_key", "model",
    "input_tokens", "cached_input_tokens", "cache_write_tokens", "cache_write_1h_tokens",
    "output_tokens", "reasoning_tokens", "cost_micros", *COST_COLUMNS.values(),
    "cache_write_1h_cost_micros", "status", "error_type",
    "permit_id", "service_tier",
)


@dataclass(frozen=True, slots=True)
class InternalUsageLine:
    """One settled request as the gateway recorded it.

    Tokens follow Keel's convention: ``input_tokens`` includes cached and
    cache-write tokens, ``output_tokens`` includes reasoning tokens. Cost is the
    booked total in micro-USD; the per-type costs are given when the source
    has them (all four or none).
    """

    ts_ms: int
    tenant: str
    workload: str
    provider: str
    model: str
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_micros: int = 0
    input_cost_micros: int | None = None
    cached_input_cost_micros: int | None = None
    cache_write_cost_micros: int | None = None
    output_cost_micros: int | None = None
    permit_id: str = ""
    status: str = "ok"
    account: str = ""  # provider project / workspace when the telemetry knows it
    api_key: str = ""
    error_type: str = ""  # free text: client_disconnected, overloaded_error, ...
    # Of cache_write_tokens (and their cost), the 1-hour cache writes.
    cache_write_1h_tokens: int = 0
    cache_write_1h_cost_micros: int | None = None
    # The service tier the provider billed the request at, as
    # ``keel_pdp.reconcile.model.service_tier_name`` spells it; "" when not recorded.
    service_tier: str = ""

    @property
    def failed(self) -> bool:
        """An attempt that did not complete (failed, cancelled, partial), or one the
        telemetry gave an error class."""
        return bool(self.error_type.strip()) or self.status.strip().lower() not in (
            "", "ok", "success", "succeeded", "settled", "outcome_unspecified")

    @property
    def request_id(self) -> str:
        return self.permit_id or f"{self.tenant}/{self.workload}@{iso_ms(self.ts_ms)}"

    def tokens_by_type(self) -> dict[str, int]:
        return {
            INPUT: self.input_tokens - self.cached_input_tokens - self.cache_write_tokens,
            CACHED_INPUT: self.cached_input_tokens,
            CACHE_WRITE: self.cache_write_tokens - self.cache_write_1h_tokens,
            CACHE_WRITE_1H: self.cache_write_1h_tokens,
            OUTPUT: self.output_tokens,
        }

    def has_type_costs(self) -> bool:
        return self.input_cost_micros is not None

    def costs_by_type(self, prices: PriceBook | None, model_key: str) -> dict[str, int]:
        if self.input_cost_micros is not None:
            write = self.cache_write_cost_micros or 0
            if self.cache_write_1h_cost_micros is not None:
                write_1h = self.cache_write_1h_cost_micros
            else:  # without its own figure, the 1-hour part by token count
                write_1h = split_exact(write, [
                    self.cache_write_tokens - self.cache_write_1h_tokens,
                    self.cache_write_1h_tokens])[1] if self.cache_write_tokens else 0
            return {
                INPUT: self.input_cost_micros,
                CACHED_INPUT: self.cached_input_cost_micros or 0,
                CACHE_WRITE: write - write_1h,
                CACHE_WRITE_1H: write_1h,
                OUTPUT: self.output_cost_micros or 0,
            }
        price = (prices.price_for(self.provider, model_key, self.ts_ms, self.input_tokens,
                                  self.service_tier)
                 if prices is not None else None)
        if price is None:
            raise ReconcileError(
                f"internal line {self.permit_id or iso_ms(self.ts_ms)} ({self.provider}/"
                f"{self.model}) carries only a total cost; pass --prices with a price table "
                "that lists this model (or export the per-token-type costs)")
        return split_cost(self.cost_micros, price, self.tokens_by_type())

    def problems(self) -> list[str]:
        out: list[str] = []
        if self.cached_input_tokens + self.cache_write_tokens > self.input_tokens:
            out.append("cached_input_tokens + cache_write_tokens exceed input_tokens "
                       "(input_tokens includes them)")
        if self.cache_write_1h_tokens > self.cache_write_tokens:
            out.append("cache_write_1h_tokens exceed cache_write_tokens (cache_write_tokens "
                       "includes them)")
        if (self.cache_write_1h_cost_micros is not None
                and not 0 <= self.cache_write_1h_cost_micros
                <= (self.cache_write_cost_micros or 0)):
            out.append("cache_write_1h_cost_micros must be part of cache_write_cost_micros")
        if self.reasoning_tokens > self.output_tokens:
            out.append("reasoning_tokens exceed output_tokens (output_tokens includes them)")
        parts = [self.input_cost_micros, self.cached_input_cost_micros,
                 self.cache_write_cost_micros, self.output_cost_micros]
        given = [p for p in parts if p is not None]
        if given and len(given) != 4:
            out.append("give all four per-type cost columns or none")
        elif given and sum(given) != self.cost_micros:
            out.append(f"per-type costs add up to {sum(given)}, not cost_micros "
                       f"{self.cost_micros}")
        return out

    def as_row(self) -> dict[str, str]:
        def opt(v: int | None) -> str:
            return "" if v is None else str(v)

        return {
            "ts": iso_ms(self.ts_ms), "ts_ms": str(self.ts_ms), "tenant": self.tenant,
            "workload": self.workload, "provider": self.provider, "account": self.account,
            "api_key": self.api_key, "model": self.model,
            "input_tokens": str(self.input_tokens),
            "cached_input_tokens": str(self.cached_input_tokens),
            "cache_write_tokens": str(self.cache_write_tokens),
            "cache_write_1h_tokens": str(self.cache_write_1h_tokens),
            "cache_write_1h_cost_micros": opt(self.cache_write_1h_cost_micros),
            "output_tokens": str(self.output_tokens),
            "reasoning_tokens": str(self.reasoning_tokens),
            "cost_micros": str(self.cost_micros),
            "input_cost_micros": opt(self.input_cost_micros),
            "cached_input_cost_micros": opt(self.cached_input_cost_micros),
            "cache_write_cost_micros": opt(self.cache_write_cost_micros),
            "output_cost_micros": opt(self.output_cost_micros),
            "status": self.status, "error_type": self.error_type,
            "permit_id": self.permit_id, "service_tier": self.service_tier,
        }


class InternalSource(Protocol):
    """Where the internal usage of a period comes from."""

    @property
    def description(self) -> str: ...

    def lines_for_month(self, period: Period, pad_ms: int = 0) -> list[InternalUsageLine]:
        """Lines with ``period.start - pad <= ts < period.end + pad`` (UTC)."""
        ...


def in_window(line: InternalUsageLine, period: Period, pad_ms: int) -> bool:
    """Whether ``line`` falls in ``period`` widened by ``pad_ms`` either side (UTC)."""
    return period.start_ms - pad_ms <= line.ts_ms < period.end_ms + pad_ms


def write_export(lines: list[InternalUsageLine], path: pathlib.Path) -> None:
    """Write ``lines`` as an internal usage export (CSV) the file source reads back."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(EXPORT_COLUMNS), lineterminator="\n")
        writer.writeheader()
        for line in sorted(lines, key=lambda ln: (ln.ts_ms, ln.permit_id)):
            writer.writerow(csv_dict(line.as_row()))
