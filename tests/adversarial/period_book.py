"""An independent month of ledger traffic and the books it must produce.

The generator writes decision-stream entries (the wire format the sidecars
append) for permits across tenants, and keeps its own accounts of them with
plain integers: what each permit finally costs, exactly (pico-USD) and as booked
(micro-USD rounded up), and in which period each entry must be booked given the
periods closed when it arrives. Nothing here calls the ledger's arithmetic.
"""

from __future__ import annotations

import calendar
import json
import random
import time
from dataclasses import dataclass, field

PICO = 1_000_000


def month_start_ms(year: int, month: int) -> int:
    return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000


def period_name(ms: int) -> str:
    """The UTC month of epoch milliseconds (floor to whole seconds first: a month
    starts on a whole second)."""
    t = time.gmtime(ms // 1000)
    return f"{t.tm_year:04d}-{t.tm_mon:02d}"


def following(period: str) -> str:
    y, m = int(period[:4]), int(period[5:])
    return f"{y + 1:04d}-01" if m == 12 else f"{y:04d}-{m + 1:02d}"


def pid(ms: int, n: int) -> str:
    return f"pmt_{ms:012x}{n:016x}"


def fields(etype: str, permit: str, ts: int, data: dict[str, object],
           res: dict[str, object]) -> dict[bytes, bytes]:
    f = {"type": etype, "pid": permit, "ts": str(ts),
         "data": json.dumps(data), "res": json.dumps(res)}
    return {k.encode(): v.encode() for k, v in f.items()}


@dataclass
class Permit:
    pid: str
    tenant: str
    workload: str
    issued_ms: int
    held: int                   # micro-USD held at issue (0 for a degraded permit)
    estimate: int
    # settled | overrun | voided | expired | expired_late | degraded | open | denied
    fate: str
    exact_pico: int = 0         # exact actual cost when it ran
    model: str = "m1"
    provider: str = "p1"

    @property
    def act(self) -> int:       # booked actual: exact rounded up to the micro-dollar
        return -(-self.exact_pico // PICO)

    @property
    def period(self) -> str:
        return period_name(self.issued_ms)

    def final_booked(self) -> int:
        """What the permit's entries add up to, in micro-USD."""
        if self.fate in ("voided", "expired", "denied"):
            return 0
        if self.fate == "open":
            return self.held
        return self.act

    def final_exact_pico(self) -> int:
        if self.fate in ("voided", "expired", "denied"):
            return 0
        if self.fate == "open":
            return self.held * PICO
        return self.exact_pico


@dataclass
class Entry:
    """One amount the ledger must book: which permit, which period it belongs to,
    how much (micro-USD booked, pico-USD exact) and the stream entry behind it."""

    permit: Permit | None
    belongs_to: str
    micros: int
    exact_pico: int
    kind: str
    event_id: str
    fields: dict[bytes, bytes]
    arrives_ms: int


@dataclass
class Month:
    permits: list[Permit] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    _n: int = 0

    def _eid(self, ts: int) -> str:
        self._n += 1
        return f"{ts}-{self._n}"

    def decision(self, p: Permit, arrives_ms: int | None = None) -> None:
        at = p.issued_ms if arrives_ms is None else arrives_ms
        data = {"tenant": p.tenant, "workload": p.workload, "model": p.model,
                "provider": p.provider, "est": p.estimate, "rid": p.pid}
        if p.fate == "denied":
            res: dict[str, object] = {"d": "DENY", "amt": p.estimate}
            self.entries.append(Entry(p, p.period, 0, 0, "denial", self._eid(at),
                                      fields("decision", p.pid, p.issued_ms, data, res), at))
            return
        res = {"d": "ALLOW", "amt": p.held}
        if p.fate == "degraded":
            res["degraded"] = True
        self.entries.append(Entry(p, p.period, p.held, p.held * PICO, "permit", self._eid(at),
                                  fields("decision", p.pid, p.issued_ms, data, res), at))

    def settle(self, p: Permit, at: int, prior: str) -> None:
        released = p.held if prior == "held" else 0
        data: dict[str, object] = {"usage": {"in": 1000, "out": 200},
                                   "exact_pico": p.exact_pico}
        res: dict[str, object] = {"st": "SETTLED" if prior == "held" else "SETTLED_AFTER_EXPIRY",
               "prior": prior, "act": p.act, "amt": p.held, "est": p.estimate}
        if prior == "unheld":
            res["st"] = "SETTLED"
        self.entries.append(Entry(p, p.period, p.act - released,
                                  p.exact_pico - released * PICO, "correction",
                                  self._eid(at), fields("settlement", p.pid, at, data, res), at))

    def release(self, p: Permit, at: int, kind: str) -> None:
        res = {"st": "RELEASED", "amt": p.held, "state": "voided" if kind == "void" else "expired"}
        self.entries.append(Entry(p, p.period, -p.held, -p.held * PICO, kind, self._eid(at),
                                  fields(kind, p.pid, at, {"v": 1}, res), at))

    def add(self, p: Permit, settle_at: int | None = None) -> Permit:
        """Book ``p``'s whole life; ``settle_at`` moves its last event (a late actual)."""
        self.permits.append(p)
        self.decision(p)
        end = p.issued_ms + 60_000 if settle_at is None else settle_at
        if p.fate in ("settled", "overrun"):
            self.settle(p, end, "held")
        elif p.fate == "degraded":
            self.settle(p, end, "unheld")
        elif p.fate == "voided":
            self.release(p, end, "void")
        elif p.fate == "expired":
            self.release(p, end, "expiry")
        elif p.fate == "expired_late":
            self.release(p, p.issued_ms + 600_000, "expiry")
            self.settle(p, end, "expired")
        return p


TENANTS = ("acme", "globex", "initech", "umbrella")
WORKLOADS = ("chat", "search", "batch")
FATES = ("settled", "settled", "settled", "overrun", "voided", "expired", "expired_late",
         "degraded", "open", "denied")


def random_month(rng: random.Random, year: int, month: int, n: int) -> Month:
    """``n`` permits issued over one UTC month, with every fate, and sub-micro exact costs."""
    start = month_start_ms(year, month)
    end = month_start_ms(year + 1, 1) if month == 12 else month_start_ms(year, month + 1)
    out = Month()
    for i in range(n):
        issued = rng.randrange(start, end - 3_600_000)
        fate = rng.choice(FATES)
        est = rng.randrange(1, 5_000_000)
        held = 0 if fate == "degraded" else est
        if fate == "overrun":
            exact = held * PICO + rng.randrange(1, 3_000_000 * PICO)
        else:
            exact = rng.randrange(0, est * PICO + 1)
        out.add(Permit(pid(issued, i), rng.choice(TENANTS), rng.choice(WORKLOADS), issued,
                       held, est, fate, exact))
    return out
