"""Write the four-document set of one period, all or nothing.

Everything is written into a temporary folder next to the target and renamed
into place at the end, so a failed run leaves no partial folder behind. A
period that has been posted is never rewritten: corrections go to the next
period, where they get their own memo paragraph.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Sequence

from keel_pdp.csv_cells import csv_rows
from keel_pdp.reconcile.errors import ReconcileError
from keel_pdp.reconcile.internal import write_export
from keel_pdp.reconcile.memo import dumps, memo_json, memo_markdown
from keel_pdp.reconcile.model import ProviderLine
from keel_pdp.reconcile.money import decimal_str
from keel_pdp.reconcile.report import Report
from keel_pdp.reconcile.variance import CATEGORIES, workloads_of

MEMO_MD = "memo.md"
MEMO_JSON = "memo.json"
CHARGEBACK = "chargeback.csv"
SIGNOFFS = "signoffs.json"
POSTED = "posted.json"
PROVIDER_EXPORT = "provider_export.csv"
INTERNAL_EXPORT = "internal_usage.csv"
INTERNAL_BOUNDARY = "internal_boundary.csv"
LINE_ITEMS = "line_items.csv"
ORIGINALS = "provider_original"


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_csv(path: pathlib.Path, header: list[str], rows: Iterable[Sequence[object]]
               ) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(csv_rows(rows))


def _provider_export(path: pathlib.Path, report: Report, lines: list[ProviderLine]) -> None:
    provider = report.rec.provider

    def account(ln: ProviderLine) -> str:
        return report.mapping.canonical_account(provider, ln.account)

    rows = sorted(lines, key=lambda ln: (ln.day, account(ln), ln.model, ln.token_type, ln.kind,
                                         pathlib.PurePath(ln.source).name, ln.where))
    _write_csv(path, ["day", "provider", "account", "account_in_export", "api_key", "model",
                      "token_type", "tier", "service_tier", "kind", "belongs_to_period",
                      "tokens", "cost_micros", "cost_usd", "description", "source_file",
                      "source_location"],
               ([ln.day.isoformat(), provider, account(ln), ln.account, ln.api_key, ln.model,
                 ln.token_type, ln.tier, ln.service_tier, ln.kind, ln.belongs_to, ln.tokens,
                 ln.cost_micros,
                 decimal_str(ln.cost_micros) if ln.cost_micros is not None else "",
                 ln.description, pathlib.PurePath(ln.source).name, ln.where] for ln in rows))


def _line_items(path: pathlib.Path, report: Report) -> None:
    rec = report.rec
    names = [c for c, _ in CATEGORIES]
    rows = []
    for key in sorted(rec.cells):
        cell = rec.cells[key]
        workloads = workloads_of(rec, report.mapping, cell)
        rows.append([key.day.isoformat(), key.account, key.model, key.token_type, key.tier,
                     key.service_tier, " ".join(f"{t}/{w}" for t, w in workloads),
                     cell.provider_tokens,
                     cell.provider_micros, cell.internal_tokens, cell.internal_requests,
                     cell.internal_micros, cell.gap,
                     *[cell.alloc.get(n, 0) for n in names],
                     "; ".join(f"{k}: {v}" for k, v in sorted(cell.notes.items()))])
    _write_csv(path, ["day", "account", "model", "token_type", "tier", "service_tier",
                      "workloads",
                      "provider_tokens",
                      "provider_micros", "internal_tokens", "internal_requests",
                      "internal_micros", "gap_micros", *[f"{n}_micros" for n in names],
                      "notes"], rows)


def _chargeback(path: pathlib.Path, report: Report) -> None:
    period = str(report.rec.period)
    _write_csv(path, ["period", "provider", "kind", "belongs_to_period", "tenant", "workload",
                      "cost_center", "engineering_owner", "amount_micros", "amount_usd",
                      "memo"],
               ([period, report.rec.provider, r.kind, r.belongs_to or period, r.tenant,
                 r.workload, r.cost_center, r.engineering_owner, r.amount_micros,
                 decimal_str(r.amount_micros), f"variance memo {period}"]
                for r in report.chargeback))


def period_dir(out: pathlib.Path, period: str, provider: str) -> pathlib.Path:
    """One folder per period and provider: ``OUT/YYYY-MM/<provider>``. A run for
    one provider never touches another provider's draft or signatures."""
    return out / period / provider


def check_not_posted(target: pathlib.Path) -> None:
    if (target / POSTED).exists():
        raise ReconcileError(
            f"{target} is posted and signed; it is not rewritten. Corrections go to the next "
            "period, where they get their own memo paragraph")


def write_period(out: pathlib.Path, report: Report, exports: list[pathlib.Path],
                 provider_lines: list[ProviderLine], *, replace: bool = False
                 ) -> pathlib.Path:
    """Write the period folder; an existing draft is only replaced when it is
    byte-identical (signatures stay valid) or ``replace`` is given (signatures
    over the old memo stay in the history, void)."""
    rec = report.rec
    target = period_dir(out, str(rec.period), rec.provider)
    check_not_posted(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{rec.provider}.tmp-", dir=target.parent))
    try:
        originals = tmp / ORIGINALS
        originals.mkdir()
        used: set[str] = set()
        for index, src in enumerate(exports, start=1):
            name = src.name if src.name not in used else f"{index}-{src.name}"
            used.add(name)
            shutil.copyfile(src, originals / name)
        _provider_export(tmp / PROVIDER_EXPORT, report, provider_lines)
        write_export(rec.window_lines, tmp / INTERNAL_EXPORT)
        write_export(rec.boundary_lines, tmp / INTERNAL_BOUNDARY)
        _line_items(tmp / LINE_ITEMS, report)
        _chargeback(tmp / CHARGEBACK, report)
        documents = {
            str(p.relative_to(tmp)): sha256_file(p)
            for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        (tmp / MEMO_MD).write_text(memo_markdown(report, documents), encoding="utf-8")
        data = memo_json(report, documents)
        data["memo_markdown_sha256"] = sha256_file(tmp / MEMO_MD)
        (tmp / MEMO_JSON).write_text(dumps(data), encoding="utf-8")
        if target.exists() and not replace and not _same_memo(tmp, target):
            raise ReconcileError(
                f"{target} holds a draft with a different memo; it is not replaced silently "
                "(signatures given on it would be void). Pass --replace to replace it, or "
                "--out another folder")
        if (target / SIGNOFFS).exists():
            # Kept as history; signatures over a memo that changed are void by hash.
            shutil.copyfile(target / SIGNOFFS, tmp / SIGNOFFS)
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _same_memo(new: pathlib.Path, old: pathlib.Path) -> bool:
    return all((old / name).is_file() and sha256_file(old / name) == sha256_file(new / name)
               for name in (MEMO_MD, MEMO_JSON))


def _swap_into_place(tmp: pathlib.Path, target: pathlib.Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: pathlib.Path, obj: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
