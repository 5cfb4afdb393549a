"""End to end through the CLI on a generated month (``tests.reconcile_month``):
the document set, its hashes, a byte-identical re-run, the chargeback, and an
unexplained amount above tolerance that blocks posting even when everyone signs.

Category sizes on the full 20,000-request months are in test_reconcile_month.py.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import pathlib
from typing import Any

import pytest

from keel_pdp.reconcile import commands
from tests.reconcile_month.generate import generate

PERIOD = "2026-01"


def main(argv: list[str]) -> int:
    """The reconcile and signoff sub-commands, parsed as ``keel-pdp`` parses them."""
    parser = argparse.ArgumentParser(prog="keel-pdp")
    commands.register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return int(ns.func(ns))


def reconcile_args(month: pathlib.Path, answer: dict[str, Any], provider: str,
                   out: pathlib.Path) -> list[str]:
    ex = answer["providers"][provider]
    args = ["reconcile", "--internal", str(month / answer["internal"]), "--period", PERIOD,
            "--provider", provider, "--mapping", str(month / answer["mapping"]),
            "--out", str(out), "--column-map", str(month / ex["column_map"])]
    for name in ex["exports"]:
        args += ["--export", str(month / name)]
    return args


@pytest.fixture
def small(tmp_path: pathlib.Path) -> tuple[pathlib.Path, dict[str, Any]]:
    month = tmp_path / "in"
    return month, generate(month, seed=7, requests=3_000)


def test_the_document_set_is_written_with_hashes_and_reproduced(
        small: tuple[pathlib.Path, dict[str, Any]], tmp_path: pathlib.Path) -> None:
    month, answer = small
    out = tmp_path / "out"
    args = reconcile_args(month, answer, "openai", out)
    assert main(args) == 1  # the planted unexplained line blocks posting
    folder = out / PERIOD / "openai"
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"provider_export.csv", "internal_usage.csv", "internal_boundary.csv",
            "chargeback.csv", "memo.md", "memo.json", "line_items.csv",
            "provider_original/openai_costs.json",
            "provider_original/openai_usage_completions.json",
            "provider_original/openai_invoice_adjustments.csv"} <= names
    data = json.loads((folder / "memo.json").read_text())
    for name, digest in data["documents"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    # The internal export is the ledger month: tenant-local January, so UTC stamps
    # from the last hours of December (Tokyo) and of February 1 (Los Angeles).
    with (folder / "internal_usage.csv").open() as fh:
        stamps = sorted(row["ts"] for row in csv.DictReader(fh))
    assert stamps[0].startswith("2025-12-31T") and stamps[-1].startswith("2026-02-01T")
    assert [p.name for p in out.iterdir()] == [PERIOD]
    # Every line item: its categories add up to its gap; tier lines stand apart.
    with (folder / "line_items.csv").open() as fh:
        items = list(csv.DictReader(fh))
    cats = [k for k in items[0] if k.endswith("_micros") and k not in (
        "provider_micros", "internal_micros", "gap_micros")]
    assert len(cats) == 8
    for row in items:
        assert sum(int(row[c]) for c in cats) == int(row["gap_micros"]), row
    assert {row["tier"] for row in items} == {"", "long_context"}
    before = (folder / "memo.md").read_bytes()
    assert main([*args, "--replace"]) == 1
    assert (folder / "memo.md").read_bytes() == before
    # Chargeback: the invoice total; the correction names its period.
    rows = data["chargeback"]
    assert sum(r["amount_micros"] for r in rows) == data["totals"]["invoice_micros"]
    adjust = [r for r in rows if r["kind"] == "prior_period_adjustment"]
    assert {r["belongs_to"] for r in adjust} == {"2025-12"}
    text = (folder / "memo.md").read_text()
    for title in ("Clock skew at window boundaries", "Cache-read tokens at a different rate",
                  "Tier breakpoints", "Failed-request billing",
                  "Credits and promotional balances",
                  "Provider corrections that belong to a prior period", "Rounding",
                  "Unexplained"):
        assert f"### {title}" in text
    assert "Provider rate applied." in text


def test_an_unexplained_gap_above_tolerance_blocks_posting(
        small: tuple[pathlib.Path, dict[str, Any]], tmp_path: pathlib.Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    month, answer = small
    out = tmp_path / "out"
    assert main(reconcile_args(month, answer, "anthropic", out)) == 1
    assert "posting is blocked" in capsys.readouterr().err
    folder = out / PERIOD / "anthropic"
    data = json.loads((folder / "memo.json").read_text())
    cats = {c["category"]: c for c in data["categories"]}
    assert data["status"] == "blocked"
    assert cats["unexplained"]["blocks_posting"] is True
    assert any("Ana Silva" in e for e in cats["unexplained"]["escalate_to"])
    for role, name in [("engineering-owner", n) for n in data["signers"]["engineering"]] + [
            ("finance-owner", "Priya Natarajan"), ("ai-program-lead", "Sam Okafor")]:
        assert main(["signoff", "--dir", str(folder), "--role", role, "--name", name]) == 0
    assert not (folder / "posted.json").exists()
    assert "not posted" in capsys.readouterr().out


@pytest.mark.parametrize(("provider", "factor", "likely"), [
    ("anthropic", 100, "cents read as dollars"),
    ("openai", 100, "cents read as dollars"),
    ("openai", "0.01", "dollars read as cents"),
])
def test_amounts_in_the_wrong_unit_stop_with_exit_2(
        small: tuple[pathlib.Path, dict[str, Any]], tmp_path: pathlib.Path,
        capsys: pytest.CaptureFixture[str], provider: str, factor: Any, likely: str) -> None:
    from decimal import Decimal

    month, answer = small
    name = answer["providers"][provider]["exports"][0]
    doc = json.loads((month / name).read_text(), parse_float=Decimal)
    for page in doc:
        for bucket in page["data"]:
            for r in bucket["results"]:
                if provider == "anthropic":
                    r["amount"] = f"{Decimal(r['amount']) * Decimal(factor)}"
                else:
                    r["amount"]["value"] = f"@@{r['amount']['value'] * Decimal(factor)}@@"
    (month / name).write_text(json.dumps(doc).replace('"@@', "").replace('@@"', ""))
    out = tmp_path / "out"
    assert main(reconcile_args(month, answer, provider, out)) == 2
    err = capsys.readouterr().err
    assert name in err and likely in err and "nothing was written" in err
    assert not out.exists() or not any(out.rglob("memo.json"))
