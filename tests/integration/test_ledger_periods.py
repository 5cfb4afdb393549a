"""Periods: accruals while open, close, and late actuals booked into the next open
period as adjustments naming the period they belong to. Events are produced by
the real engine with its clock set into the previous month."""

from __future__ import annotations

import pathlib
import time
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel_pdp.cli import main
from keel_pdp.decision import AuthorizeInput, DecisionKind
from keel_pdp.ledger.periods import PeriodError, bounds_ms, period_of_ms, previous_period
from keel_pdp.ledger.report import build_report
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.permits import PermitIds
from keel_pdp.pricing import TokenUsage
from tests.helpers import make_engine
from tests.integration.conftest import drain, ledger_bundle, make_writer

NOW = time.time_ns() // 1_000_000
CURRENT = period_of_ms(NOW)
PREVIOUS = previous_period(CURRENT)
IN_PREVIOUS = bounds_ms(PREVIOUS)[0] + 9 * 86_400_000 + 12 * 3_600_000


class Clock:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, at_ms: int) -> None:
        self.at = at_ms
        # The engine's clock is its permit-id source's (keel_pdp.permits.PermitIds).
        monkeypatch.setattr(PermitIds, "now_ms", lambda _ids: self.at)


def ask(rid: str, tenant: str = "acme", workload: str = "chat",
        model: str = "gpt-4o-mini", provider: str = "openai") -> AuthorizeInput:
    return AuthorizeInput(rid, tenant, workload, model, provider, 1000, 400)


USAGE = TokenUsage(input_tokens=1000, cached_input_tokens=200, output_tokens=300)


@dataclass
class Scenario:
    a_held: int
    a_act: int
    b_held: int
    b_act: int
    c_held: int
    d_held: int
    d_act: int
    f_held: int
    close_booked: int


@pytest.fixture
async def scenario(redis_url: str, store_url: str, tmp_path: pathlib.Path,
                   monkeypatch: pytest.MonkeyPatch) -> Any:
    client = aioredis.Redis.from_url(redis_url)
    engine = make_engine(client, ledger_bundle(tmp_path / "bundle"))
    store = LedgerStore(store_url)
    store.migrate()
    writer = make_writer(redis_url, store)
    clock = Clock(monkeypatch, IN_PREVIOUS)
    # In the previous month: A settled on time, B and D left open (B settles
    # late; D expires, then settles late), C voided, E denied by routing policy.
    a = await engine.authorize(ask("a"))
    a_set = await engine.closeout(a.permit_id, USAGE, "SUCCEEDED", None)
    b = await engine.authorize(ask("b", workload="search", model="gpt-4.1"))
    c = await engine.authorize(ask("c", tenant="globex"))
    await engine.void(c.permit_id, "user cancelled")
    d = await engine.authorize(ask("d", tenant="globex", model="claude-sonnet-4-5",
                                   provider="anthropic"))
    e = await engine.authorize(ask("e", workload="restricted", model="gpt-4.1"))
    assert e.decision is DecisionKind.DENY
    drain(writer)
    yield locals() | {"client": client}
    store.close()
    await client.aclose()


async def test_open_period_accrues_open_permits_at_their_estimate(scenario: Any) -> None:
    s = scenario
    store: LedgerStore = s["store"]
    report = build_report(store, PREVIOUS, ["tenant"], as_of_ms=NOW)
    acme, globex = report.groups[("acme",)], report.groups[("globex",)]
    a, b, c, d = (s[k] for k in "abcd")
    assert acme.permits == 2 and acme.denials == 1 and acme.settlements == 1
    assert acme.forecast_micros == a.estimated_cost_micros + b.estimated_cost_micros
    assert acme.actual_micros == s["a_set"].actual_cost_micros
    assert acme.accrued_micros == b.estimated_cost_micros  # B is open: accrued at estimate
    assert acme.open_permits == 1
    assert acme.variance_micros == s["a_set"].actual_cost_micros - a.estimated_cost_micros
    assert globex.forecast_micros == c.estimated_cost_micros + d.estimated_cost_micros
    assert globex.accrued_micros == d.estimated_cost_micros  # C was voided: no accrual
    assert globex.actual_micros == 0
    assert report.state == "open"


async def test_close_with_late_actuals_books_adjustments_in_the_next_open_period(
        scenario: Any, capsys: pytest.CaptureFixture[str]) -> None:
    s = scenario
    store: LedgerStore = s["store"]
    url = store.url
    assert main(["period", "close", "--store", url, "--period", CURRENT]) == 1
    assert "has not ended" in capsys.readouterr().err
    assert main(["period", "close", "--store", url, "--period", PREVIOUS, "--to",
                 "closing"]) == 0
    assert store.period_state(PREVIOUS) == "closing"
    assert main(["period", "close", "--store", url, "--period", PREVIOUS]) == 0
    assert main(["period", "close", "--store", url, "--period", PREVIOUS]) == 1
    assert "is closed" in capsys.readouterr().err
    frozen = store.period_totals(PREVIOUS)
    b, d = s["b"], s["d"]
    assert frozen["open_permits"] == 2
    assert frozen["open_accrual_micros"] == b.estimated_cost_micros + d.estimated_cost_micros

    # Back to the present: B settles late, D expires and then settles late, and F
    # is an ordinary permit of the current period.
    s["clock"].at = NOW
    engine = s["engine"]
    b_set = await engine.closeout(b.permit_id, USAGE, "SUCCEEDED", 777)
    assert await engine.sweep_once(NOW) == 1
    d_set = await engine.closeout(d.permit_id, USAGE, "SUCCEEDED", None)
    assert d_set.status == "SETTLED_AFTER_EXPIRY"
    f = await engine.authorize(ask("f"))
    drain(s["writer"])

    # The closed period's books did not move.
    after = store.period_totals(PREVIOUS)
    assert after["booked_micros"] == frozen["booked_micros"]
    assert after["entries"] == frozen["entries"]
    late = (777 - b.estimated_cost_micros) + (-d.estimated_cost_micros) + d_set.actual_cost_micros
    assert after["late_out_micros"] == late
    rows = store.query(
        "SELECT kind, period, belongs_to, amount_micros FROM ledger_entries "
        "WHERE permit_id IN (?, ?) AND kind IN ('correction', 'expiry') ORDER BY id",
        (b.permit_id, d.permit_id))
    assert rows == [("correction", CURRENT, PREVIOUS, 777 - b.estimated_cost_micros),
                    ("expiry", CURRENT, PREVIOUS, -d.estimated_cost_micros),
                    ("correction", CURRENT, PREVIOUS, d_set.actual_cost_micros)]

    prev = build_report(store, PREVIOUS, ["tenant"], as_of_ms=NOW)
    cur = build_report(store, CURRENT, ["tenant"], as_of_ms=NOW)
    assert prev.state == "closed"
    # The previous period's cost now includes its late actuals ...
    a_act = s["a_set"].actual_cost_micros
    assert prev.total.cost_micros == a_act + 777 + d_set.actual_cost_micros
    assert prev.total.accrued_micros == 0
    assert prev.total.late_out_micros == late
    assert prev.total.booked_micros == frozen["booked_micros"]
    # ... and the current period's books carry them as adjustments for it.
    assert cur.total.adjustments_in_micros == late
    assert cur.total.booked_micros == late + f.estimated_cost_micros
    assert cur.total.forecast_micros == f.estimated_cost_micros
    assert b_set.status == "SETTLED"

    # A manual adjustment for the closed period lands in the current one too.
    assert main(["period", "adjust", "--store", url, "--period", PREVIOUS,
                 "--amount-usd", "-0.25", "--tenant", "acme", "--reason", "provider credit",
                 "--key", "credit-1"]) == 0
    assert f"booked in {CURRENT}" in capsys.readouterr().out
    main(["period", "adjust", "--store", url, "--period", PREVIOUS, "--amount-usd", "-0.25",
          "--tenant", "acme", "--reason", "provider credit", "--key", "credit-1"])
    again = build_report(store, CURRENT, ["tenant"], as_of_ms=NOW)
    assert again.total.adjustments_in_micros == late - 250_000  # booked once, not twice

    # History is append-only: the store refuses to rewrite an entry.
    with pytest.raises(Exception, match="append-only"), store.tx() as tx:
        tx.run("UPDATE ledger_entries SET amount_micros = 0")
    assert main(["period", "status", "--store", url, "--period", PREVIOUS]) == 0
    out = capsys.readouterr().out
    assert "closed" in out and "open -> closing" in out and "closing -> closed" in out


async def test_burn_rate_forecast_per_budget(scenario: Any) -> None:
    store: LedgerStore = scenario["store"]
    start, end = bounds_ms(PREVIOUS)
    half = start + (end - start) // 2
    report = build_report(store, PREVIOUS, ["tenant"], as_of_ms=half)
    by_id = {(b.budget_id, b.split): b for b in report.budgets}
    org = by_id[("org-monthly", ())]
    spend = sum(f.cost_micros for f in report.groups.values())
    assert org.spend_micros == spend
    # Half the month gone: the projection doubles what was spent (rounded up).
    assert org.projected_micros == -(-spend * (end - start) // (half - start))
    assert org.period_cap_micros == 1000 * 1_000_000 and org.status == "ok"
    daily = by_id[("tenant-daily", ("acme",))]
    days = (end - start) // 86_400_000
    assert daily.windows_in_period == days
    assert daily.period_cap_micros == 50 * 1_000_000 * days
    assert daily.mode == "observe"
    with pytest.raises(PeriodError):
        store.transition(CURRENT, "closed")


async def test_report_cli_renders_the_same_figures(
        scenario: Any, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from keel_pdp.ledger.money import parse_usd

    store: LedgerStore = scenario["store"]
    mapping = tmp_path / "m.yaml"
    mapping.write_text("tenants:\n  acme: {cost_center: CC-100, business_unit: Retail}\n")
    assert main(["report", "--store", store.url, "--period", PREVIOUS, "--by",
                 "cost_center,model", "--mapping", str(mapping), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    groups = {(g["cost_center"], g["model"]): g for g in doc["groups"]}
    a, a_set = scenario["a"], scenario["a_set"]
    mini = groups[("CC-100", "gpt-4o-mini")]
    assert (mini["permits"], mini["settled"], mini["open"]) == ("1", "1", "0")
    assert parse_usd(mini["forecast_usd"]) == a.estimated_cost_micros
    assert parse_usd(mini["actual_usd"]) == a_set.actual_cost_micros
    assert ("unallocated", "claude-sonnet-4-5") in groups
    assert doc["total"]["cost_center"] == "TOTAL" and doc["state"] == "open"
    assert {b["budget_id"] for b in doc["budgets"]} == {"org-monthly", "tenant-daily"}
    assert main(["report", "--store", store.url, "--period", PREVIOUS]) == 0
    text = capsys.readouterr().out
    assert "Burn-rate forecast" in text and "acme" in text and "TOTAL" in text
    assert main(["report", "--store", store.url, "--period", PREVIOUS, "--by", "colour"]) == 1
    assert "--by" in capsys.readouterr().err
