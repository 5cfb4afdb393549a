"""Three sign-offs per period, bound to the memo by hash; posting on the third.

The engineering owner signs the telemetry side, the finance owner the provider
side, the AI program lead both. A signature records the name, the time and the
SHA-256 of the memo (Markdown and JSON). The Markdown may be edited between
signatures (responses to escalations, follow-up notes); each edit voids the
signatures given before it. The data files the memo lists must not change.
Signatures are kept as an append-only history; the latest one per role counts,
and only while the memo still hashes to what was signed. The chargeback posts
(``posted.json``) when all three roles hold valid signatures, every document
still matches the hash the memo lists and the memo is not blocked by an
unexplained variance outside tolerance.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from keel_pdp.reconcile.errors import SignoffError
from keel_pdp.reconcile.output import (
    CHARGEBACK,
    MEMO_JSON,
    MEMO_MD,
    POSTED,
    SIGNOFFS,
    sha256_file,
    write_json_atomic,
)
from keel_pdp.reconcile.report import BLOCKED

ROLES = ("engineering-owner", "finance-owner", "ai-program-lead")


@dataclass(frozen=True, slots=True)
class Signature:
    role: str
    name: str
    signed_at: str
    memo_sha256: str
    memo_json_sha256: str


@dataclass(frozen=True)
class Status:
    period: str
    memo_sha256: str
    valid: dict[str, Signature]
    void: list[Signature]
    missing: list[str]
    blocked: bool
    tampered: list[str]
    posted: dict[str, Any] | None
    edited: bool = False
    engineering: dict[str, Signature] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.missing

    def lines(self) -> list[str]:
        out = [f"period {self.period}: memo sha256 {self.memo_sha256}"
               + (" (memo.md edited since the reconciliation wrote it)" if self.edited else "")]
        for name, eng in sorted(self.engineering.items()):
            out.append(f"  {ROLES[0]}: signed by {name} at {eng.signed_at}")
        if not self.engineering:
            out.append(f"  {ROLES[0]}: not signed")
        for role in ROLES[1:]:
            sig = self.valid.get(role)
            if sig is not None:
                out.append(f"  {role}: signed by {sig.name} at {sig.signed_at}")
            else:
                out.append(f"  {role}: not signed")
        for sig in self.void:
            out.append(f"  void: {sig.role} by {sig.name} at {sig.signed_at} (the memo "
                       "changed since it was signed)")
        for name in self.tampered:
            out.append(f"  {name} no longer matches the hash the memo lists")
        if self.posted is not None:
            out.append(f"  posted at {self.posted.get('posted_at')}")
            if self.posted.get("memo_sha256") != self.memo_sha256:
                out.append("  the memo changed after posting: the posted chargeback stands; "
                           "corrections go to the next period")
        elif self.blocked:
            out.append("  not posted: an unexplained variance is outside tolerance (see the "
                       "memo); re-run the reconciliation once it is explained")
        elif self.complete:
            out.append("  all three signatures are valid")
        else:
            out.append(f"  waiting for: {', '.join(self.missing)}")
        return out


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SignoffError(f"{path}: cannot read ({exc})") from None


def _history(directory: pathlib.Path) -> list[Signature]:
    path = directory / SIGNOFFS
    if not path.exists():
        return []
    data = _read_json(path)
    out: list[Signature] = []
    for item in data.get("signatures", []):
        out.append(Signature(role=item["role"], name=item["name"],
                             signed_at=item["signed_at"], memo_sha256=item["memo_sha256"],
                             memo_json_sha256=item.get("memo_json_sha256", "")))
    return out


def _check_dir(directory: pathlib.Path) -> dict[str, Any]:
    if not (directory / MEMO_MD).is_file() or not (directory / MEMO_JSON).is_file():
        raise SignoffError(f"{directory}: not a reconciled period folder (no {MEMO_MD} / "
                           f"{MEMO_JSON})")
    data = _read_json(directory / MEMO_JSON)
    if not isinstance(data, dict) or "period" not in data:
        raise SignoffError(f"{directory / MEMO_JSON}: not a variance memo")
    return data


def status(directory: pathlib.Path) -> Status:
    memo = _check_dir(directory)
    md_hash = sha256_file(directory / MEMO_MD)
    json_hash = sha256_file(directory / MEMO_JSON)
    tampered = []
    for name, digest in sorted(memo.get("documents", {}).items()):
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            tampered.append(name)
    latest: dict[tuple[str, str], Signature] = {}
    for sig in _history(directory):
        # Engineering owners sign one each; the other roles have one signer.
        key = (sig.role, sig.name.casefold() if sig.role == ROLES[0] else "")
        latest[key] = sig
    good = {k: s for k, s in latest.items()
            if s.memo_sha256 == md_hash and s.memo_json_sha256 == json_hash and not tampered}
    void = [s for k, s in latest.items() if k not in good]
    valid = {k[0]: s for k, s in good.items()}
    engineering = {s.name: s for k, s in good.items() if k[0] == ROLES[0]}
    missing = [r for r in ROLES[1:] if r not in valid]
    required = memo.get("signers") or {}
    if required.get("engineering_all_required"):
        signed = {n.casefold() for n in engineering}
        missing = [f"{ROLES[0]} ({n})" for n in required.get("engineering", [])
                   if n.casefold() not in signed] + missing
    elif not engineering:
        missing = [ROLES[0], *missing]
    posted_path = directory / POSTED
    posted = _read_json(posted_path) if posted_path.exists() else None
    return Status(period=str(memo["period"]), memo_sha256=md_hash, valid=valid, void=void,
                  missing=missing, engineering=engineering,
                  blocked=memo.get("status") == BLOCKED, tampered=tampered, posted=posted,
                  edited=memo.get("memo_markdown_sha256") not in (None, md_hash))


def sign(directory: pathlib.Path, role: str, name: str, now: datetime | None = None) -> Status:
    if role not in ROLES:
        raise SignoffError(f"role must be one of {', '.join(ROLES)}")
    if not name.strip():
        raise SignoffError("a signature needs a name")
    current = status(directory)
    if current.posted is not None:
        raise SignoffError(f"{directory}: period {current.period} is already posted; "
                           "corrections go to the next period")
    _check_signer(_check_dir(directory), role, name.strip())
    if current.tampered:
        raise SignoffError(f"{directory}: {', '.join(current.tampered)} changed after the "
                           "reconciliation; re-run it before signing")
    at = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="seconds")
    history = _history(directory)
    history.append(Signature(role=role, name=name.strip(), signed_at=at.replace("+00:00", "Z"),
                             memo_sha256=current.memo_sha256,
                             memo_json_sha256=sha256_file(directory / MEMO_JSON)))
    write_json_atomic(directory / SIGNOFFS, {
        "period": current.period,
        "signatures": [_sig_dict(sig) for sig in history],
    })
    after = status(directory)
    if after.complete and not after.blocked and not after.tampered:
        _post(directory, after, at)
        after = status(directory)
    return after


def _check_signer(memo: dict[str, Any], role: str, name: str) -> None:
    """Only the owners the mapping names for a role may sign for it."""
    signers = memo.get("signers")
    if not isinstance(signers, dict):
        return  # a memo written before signers were recorded
    if role == ROLES[0]:
        allowed = [str(n) for n in signers.get("engineering", [])]
    else:
        allowed = [str(signers.get("finance" if role == ROLES[1] else "ai_program_lead") or "")]
    allowed = [a for a in allowed if a]
    if not allowed:
        raise SignoffError(f"no {role} is named in the mapping file for this memo; add it "
                           "and re-run the reconciliation")
    if name.casefold() not in {a.casefold() for a in allowed}:
        raise SignoffError(f"{name!r} is not the {role} on file for this memo (expected "
                           f"{' or '.join(allowed)})")


def _sig_dict(sig: Signature) -> dict[str, str]:
    return {"role": sig.role, "name": sig.name, "signed_at": sig.signed_at,
            "memo_sha256": sig.memo_sha256, "memo_json_sha256": sig.memo_json_sha256}


def _post(directory: pathlib.Path, st: Status, at: str) -> None:
    memo = _read_json(directory / MEMO_JSON)
    rows = memo.get("chargeback", [])
    write_json_atomic(directory / POSTED, {
        "period": st.period,
        "status": "posted",
        "posted_at": at.replace("+00:00", "Z"),
        "memo_sha256": st.memo_sha256,
        "memo_json_sha256": sha256_file(directory / MEMO_JSON),
        "chargeback_sha256": sha256_file(directory / CHARGEBACK),
        "total_micros": sum(int(r["amount_micros"]) for r in rows),
        "rows": len(rows),
        "signatures": [_sig_dict(sig) for sig in sorted(st.engineering.values(),
                                                         key=lambda x: x.name)]
        + [_sig_dict(st.valid[r]) for r in ROLES[1:]],
    })
