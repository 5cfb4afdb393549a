"""``make demo`` (scripts/demo.sh) runs its stack and narrates every call."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_demo_runs_and_every_permit_is_booked() -> None:
    env = {**os.environ, "PY": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    for expected in ("Keel decision CONSTRAIN", "HTTP 429, Keel decision DENY",
                     "HTTP 403, Keel decision DENY", "(PARTIAL)", "Keel voided",
                     "HTTP 400", "provider saw: nothing (refused before the call)"):
        assert expected in text, text
    assert "still open" not in text
    assert "held $0.000000" in text
