"""Keep/revert accuracy (issue 13) on a small, seeded version of ``bench.accuracy``.

Loop timings of known true gain go through the real LoopTimer, compute_metrics, diagnose and
Controller. The loop is a regular one (5% step jitter, 1% background drift, rare stalls, 20 ms
per batch); ``python -m bench.accuracy`` prints the full table, noisier loops included.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.accuracy import Noise, Regime, run_trial

REGULAR = Noise(step_sigma=0.05, drift_sigma=0.01, stall_p=0.002)
LOOP = Regime("fast", 0.02)
TRIALS = 40


def _keep_rate(gain: float, cheaper: bool, seed: int) -> float:
    rng = np.random.default_rng([13, int(cheaper), seed])
    results = [run_trial(gain, cheaper, regime=LOOP, noise=REGULAR, rng=rng) for _ in range(TRIALS)]
    assert all(r.decided for r in results)
    return sum(r.kept for r in results) / TRIALS


@pytest.mark.parametrize("cheaper", [False, True], ids=["more-workers", "fewer-workers"])
def test_true_gains_are_kept_and_true_losses_reverted(cheaper):
    assert _keep_rate(0.05, cheaper, 1) >= 0.95
    assert _keep_rate(0.10, cheaper, 2) >= 0.95
    assert _keep_rate(-0.05, cheaper, 3) <= 0.05
    assert _keep_rate(-0.10, cheaper, 4) <= 0.05


def test_within_the_band_the_cheaper_configuration_wins():
    # No true difference: more workers are reverted, fewer workers kept.
    assert _keep_rate(0.0, False, 5) <= 0.1
    assert _keep_rate(0.0, True, 6) >= 0.9
    assert _keep_rate(0.02, False, 7) <= 0.25
    assert _keep_rate(-0.02, True, 8) >= 0.75


def test_the_issue_regular_loop_keeps_its_nine_percent_gain():
    # pytorch/examples imagenet on 2 CPUs: 0 -> 1 worker is +9% (81.5 -> 89 samples/s); a
    # regular 0.3 s loop with 10-batch windows was reverted in 3 of 3 runs before the fix.
    regular = Noise(step_sigma=0.02, drift_sigma=0.01, stall_p=0.0)
    rng = np.random.default_rng(89)
    kept = [run_trial(0.09, False, regime=Regime("imagenet", 0.3), noise=regular, rng=rng).kept for _ in range(20)]
    assert sum(kept) >= 19
