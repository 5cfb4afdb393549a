"""A bounded set of simulation seeds for CI; failing seeds found by the soak
(scripts/soak.py) are added to REGRESSION_SEEDS."""

from __future__ import annotations

import pytest

from tests.simulation.harness import run_seed

CI_SEEDS = [(1, 250), (2, 250), (3, 250), (4, 250), (5, 250), (6, 250)]
# (seed, steps) of runs that once failed. 105: the retried closeout of a
# fail-open permit found a permit record without a price and crashed.
REGRESSION_SEEDS: list[tuple[int, int]] = [(105, 800)]


@pytest.mark.parametrize(("seed", "steps"), CI_SEEDS + REGRESSION_SEEDS)
async def test_seeded_fault_simulation_keeps_every_invariant(seed: int, steps: int) -> None:
    report = await run_seed(seed, steps=steps)
    print(report.line())
    assert report.lost == 0
    assert report.doubled == 0
    assert report.events == report.ledger_events > 0
    assert sum(report.faults.values()) > 0
