"""Every fixture under tests/fixtures/invalid_bundles/ is a bundle broken in one
way, named after the failure; its EXPECTED file holds the message (file, field
path and reason) the loader and `keel-pdp policy check` must give."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from keel_pdp.policy.loader import PolicyError, load_bundle

FIXTURES = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "invalid_bundles"
CASES = sorted(p for p in FIXTURES.iterdir() if p.is_dir())


@pytest.mark.parametrize("bundle", CASES, ids=[p.name for p in CASES])
def test_invalid_bundle_is_rejected_with_a_precise_message(bundle: pathlib.Path) -> None:
    expected = (bundle / "EXPECTED").read_text().strip()
    with pytest.raises(PolicyError) as info:
        load_bundle(bundle)
    messages = [str(p) for p in info.value.problems]
    assert any(expected in m for m in messages), messages


def test_policy_check_prints_the_same_message_and_exits_1() -> None:
    bundle = FIXTURES / "float-cap"
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "policy", "check", str(bundle)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert (bundle / "EXPECTED").read_text().strip() in res.stderr


def test_there_is_a_fixture_for_every_kind_of_mistake() -> None:
    assert len(CASES) >= 20
