"""Three sign-offs bound to the memo by hash; the chargeback posts on the third."""

from __future__ import annotations

import json
import pathlib
from datetime import UTC, datetime

import pytest

from keel_pdp.reconcile.errors import SignoffError
from keel_pdp.reconcile.signoff import sign, status
from tests.unit.test_reconcile_bad_exports import FIXTURES, args
from tests.unit.test_reconcile_e2e import main

EXPORTS = [FIXTURES / "openai" / "usage_completions.json", FIXTURES / "openai" / "costs.json",
           FIXTURES / "generic" / "invoice_adjustments.csv"]
SIGNERS = (("engineering-owner", "Lee Park"), ("finance-owner", "Priya Natarajan"),
           ("ai-program-lead", "Sam Okafor"))


@pytest.fixture
def period(tmp_path: pathlib.Path) -> pathlib.Path:
    out = tmp_path / "out"
    argv = [*args(out, *EXPORTS), "--column-map",
            str(FIXTURES / "generic" / "invoice_adjustments.columns.yaml")]
    assert main(argv) == 0
    return out / "2026-01" / "openai"


def at(minute: int) -> datetime:
    return datetime(2026, 2, 9, 10, minute, tzinfo=UTC)


def test_three_signatures_post_the_chargeback(period: pathlib.Path) -> None:
    for i, (role, name) in enumerate(SIGNERS[:2]):
        st = sign(period, role, name, at(i))
        assert st.posted is None
        assert not (period / "posted.json").exists()
    st = sign(period, *SIGNERS[2], now=at(2))
    assert st.posted is not None
    posted = json.loads((period / "posted.json").read_text())
    memo = json.loads((period / "memo.json").read_text())
    assert posted["status"] == "posted"
    assert posted["memo_sha256"] == st.memo_sha256
    assert posted["total_micros"] == memo["totals"]["invoice_micros"]
    assert [s["role"] for s in posted["signatures"]] == [r for r, _ in SIGNERS]
    assert posted["signatures"][0] == {
        "role": "engineering-owner", "name": "Lee Park", "signed_at": "2026-02-09T10:00:00Z",
        "memo_sha256": st.memo_sha256,
        "memo_json_sha256": posted["memo_json_sha256"]}


def test_a_change_to_the_memo_voids_the_signatures(period: pathlib.Path) -> None:
    sign(period, *SIGNERS[0], now=at(0))
    sign(period, *SIGNERS[1], now=at(1))
    memo = period / "memo.md"
    # A response to an escalation, added by hand between signatures.
    memo.write_text(memo.read_text() + "\nResponse: telemetry timezone to be aligned.\n")
    st = status(period)
    assert st.edited
    assert st.valid == {} and {s.role for s in st.void} == {r for r, _ in SIGNERS[:2]}
    st = sign(period, *SIGNERS[2], now=at(2))
    assert st.posted is None and not (period / "posted.json").exists()
    assert set(st.valid) == {"ai-program-lead"}
    for i, signer in enumerate(SIGNERS[:2]):
        st = sign(period, *signer, now=at(3 + i))
    assert st.posted is not None
    posted = json.loads((period / "posted.json").read_text())
    assert posted["memo_sha256"] == status(period).memo_sha256


def test_signatures_over_an_earlier_memo_are_void_after_a_rerun_with_new_inputs(
        tmp_path: pathlib.Path, period: pathlib.Path) -> None:
    sign(period, *SIGNERS[0], now=at(0))
    sign(period, *SIGNERS[1], now=at(1))
    # The provider's cost export is re-pulled with one more line item: new memo.
    costs = json.loads((FIXTURES / "openai" / "costs.json").read_text())
    costs["data"][0]["results"].append({
        "object": "organization.costs.result", "amount": {"value": 0.01, "currency": "usd"},
        "line_item": "web search tool calls", "project_id": "proj_support"})
    repulled = tmp_path / "costs.json"
    repulled.write_text(json.dumps(costs))
    argv = [*args(period.parent.parent, EXPORTS[0], repulled, EXPORTS[2]), "--column-map",
            str(FIXTURES / "generic" / "invoice_adjustments.columns.yaml")]
    before = (period / "memo.md").read_bytes()
    assert main(argv) == 2  # a draft is never replaced silently
    assert (period / "memo.md").read_bytes() == before
    assert len(status(period).valid) == 2
    assert main([*argv, "--replace"]) == 0
    st = status(period)
    assert st.valid == {} and len(st.void) == 2
    sign(period, *SIGNERS[2], now=at(3))
    assert not (period / "posted.json").exists()
    history = json.loads((period / "signoffs.json").read_text())["signatures"]
    assert len(history) == 3  # the void ones are kept as history
    for i, signer in enumerate(SIGNERS[:2]):
        sign(period, *signer, now=at(4 + i))
    assert (period / "posted.json").exists()


def test_an_unchanged_rerun_keeps_signatures_valid(period: pathlib.Path) -> None:
    sign(period, *SIGNERS[0], now=at(0))
    argv = [*args(period.parent.parent, *EXPORTS), "--column-map",
            str(FIXTURES / "generic" / "invoice_adjustments.columns.yaml")]
    assert main(argv) == 0
    assert set(status(period).valid) == {"engineering-owner"}


def test_a_changed_document_blocks_signing(period: pathlib.Path) -> None:
    chargeback = period / "chargeback.csv"
    chargeback.write_text(chargeback.read_text().replace("Lee Park", "Nobody"))
    with pytest.raises(SignoffError, match=r"chargeback\.csv changed"):
        sign(period, *SIGNERS[0], now=at(0))


def test_a_posted_period_is_frozen(period: pathlib.Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    for i, signer in enumerate(SIGNERS):
        sign(period, *signer, now=at(i))
    before = (period / "memo.md").read_bytes()
    assert main(["signoff", "--dir", str(period), "--role", "finance-owner",
                 "--name", "Someone Else"]) == 2
    assert "already posted" in capsys.readouterr().err
    argv = [*args(period.parent.parent, *EXPORTS), "--column-map",
            str(FIXTURES / "generic" / "invoice_adjustments.columns.yaml")]
    assert main(argv) == 2
    assert "Corrections go to the next period" in capsys.readouterr().err
    assert (period / "memo.md").read_bytes() == before


def test_signoff_cli_status_and_errors(period: pathlib.Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["signoff", "--dir", str(period), "--role", "finance-owner",
                 "--name", "Priya Natarajan"]) == 0
    assert main(["signoff", "--dir", str(period), "--status"]) == 0
    out = capsys.readouterr().out
    assert "finance-owner: signed by Priya Natarajan" in out
    assert "waiting for: engineering-owner, ai-program-lead" in out
    assert main(["signoff", "--dir", str(period), "--role", "finance-owner"]) == 2
    assert main(["signoff", "--dir", str(period.parent), "--status"]) == 2
    assert "not a reconciled period folder" in capsys.readouterr().err


def test_only_the_owners_on_file_sign_their_role(period: pathlib.Path) -> None:
    with pytest.raises(SignoffError, match="not the finance-owner on file"):
        sign(period, "finance-owner", "Lee Park", now=at(0))
    with pytest.raises(SignoffError, match="not the engineering-owner on file"):
        sign(period, "engineering-owner", "Priya Natarajan", now=at(0))
    with pytest.raises(SignoffError, match="not the ai-program-lead on file"):
        sign(period, "ai-program-lead", "Dana Ruiz", now=at(0))
    assert not (period / "signoffs.json").exists()


def test_every_escalated_engineering_owner_signs(tmp_path: pathlib.Path) -> None:
    from tests.reconcile_month.generate import generate
    from tests.unit.test_reconcile_e2e import reconcile_args

    answer = generate(tmp_path / "in", seed=5, requests=2_000)
    out = tmp_path / "out"
    main(reconcile_args(tmp_path / "in", answer, "anthropic", out))
    # A second provider's run into the same --out leaves the first one's folder alone.
    folder = out / "2026-01" / "anthropic"
    memo = json.loads((folder / "memo.json").read_text())
    owners = memo["signers"]["engineering"]
    assert memo["signers"]["engineering_all_required"] and len(owners) >= 2
    sign(folder, "engineering-owner", owners[0], now=at(0))
    sign(folder, "finance-owner", "Priya Natarajan", now=at(1))
    st = sign(folder, "ai-program-lead", "Sam Okafor", now=at(2))
    assert f"engineering-owner ({owners[1]})" in st.missing
    main(reconcile_args(tmp_path / "in", answer, "openai", out))
    assert status(folder).valid.keys() == {"engineering-owner", "finance-owner",
                                           "ai-program-lead"}
    assert (out / "2026-01" / "openai" / "memo.json").is_file()
