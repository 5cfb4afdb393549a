"""A bounded set of simulation seeds for CI; failing seeds found by the soak
(scripts/soak.py) are added to REGRESSION_SEEDS."""

from __future__ import annotations

import pytest

from tests.simulation.harness import run_seed

CI_SEEDS = [1, 2, 3, 4, 5, 6]
REGRESSION_SEEDS: list[int] = []


@pytest.mark.parametrize("seed", CI_SEEDS + REGRESSION_SEEDS)
async def test_seeded_fault_simulation_keeps_every_invariant(seed: int) -> None:
    report = await run_seed(seed, steps=250)
    print(report.line())
    assert report.lost == 0
    assert report.doubled == 0
    assert report.events == report.ledger_events > 0
    assert sum(report.faults.values()) > 0
