"""The run's ledger: rates from the loop's own timings, and what changes cost."""

from __future__ import annotations

import pytest

from loadertune.config import LoaderConfig
from loadertune.controller import Controller
from loadertune.ledger import CostMeter, RunRates, Warmup
from loadertune.planning import Bounds
from loadertune.timer import LoopTimer
from tests._factories import metrics


def _loop(batches: int, samples: int, step_s: float, start: float = 0.0):
    timer = LoopTimer()
    for i in range(batches):
        timer.record(start + i * step_s + step_s / 2, start + (i + 1) * step_s, samples)
    return timer.take()


def test_rates_before_and_after_a_change() -> None:
    rates = RunRates()
    assert rates.first_rate() is None and rates.last_rate() is None
    rates.add(_loop(10, 8, 0.1))  # 80 samples/s
    assert rates.first_rate() == pytest.approx(80.0) and rates.last_rate() == pytest.approx(80.0)
    rates.changed()
    rates.add(_loop(10, 8, 0.025, start=5.0))  # 320 samples/s
    assert rates.changes == 1
    assert rates.first_rate() == pytest.approx(80.0)
    assert rates.last_rate() == pytest.approx(320.0)


def test_a_rebuilds_stall_and_the_workers_startup_reach_the_controller() -> None:
    config = LoaderConfig(num_workers=4, batch_size=8)
    controller = Controller(config, Bounds(usable_cpus=2, max_workers=8))
    meter = CostMeter(controller)
    meter.epoch_started(0.0, 0)
    meter.epoch_started(10.0, 100)  # an epoch is 100 batches
    m = metrics(batches_per_s=50.0)
    # Decided at t=10, 6 warm-up batches (0.14 s at 50/s with the deciding step), the window's
    # first batch requested at t=11.01: the rebuild stalled the loop 1.01 - 0.14 = 0.87 s.
    loop = _loop(20, 8, 0.02, start=11.0)
    out = meter.measure(Warmup(10.0, 6, 100), loop, m, config, now_s=12.0)
    assert out["stall_s"] == pytest.approx(0.87, abs=1e-6)
    assert meter.last_stall_s == pytest.approx(0.87, abs=1e-6)
    assert controller.costs.stall_s == pytest.approx(0.87, abs=1e-6)
    # Not persistent: every epoch starts those workers again (2 s of 100 batches at 50/s).
    assert out["epoch_s"] == pytest.approx(2.0)
    assert controller.costs.startup_share() == pytest.approx(0.87 / 2.87)
    job = meter.job_metrics(m, config)
    assert job.samples_per_s == pytest.approx(m.samples_per_s * (1 - controller.costs.startup_share()))
    # Persistent workers start once: the steady rate is the job's.
    assert meter.job_metrics(m, config.replace(persistent_workers=True)) is m


def test_the_runs_start_up_is_measured_as_every_epochs_cost_not_as_a_rebuild_stall() -> None:
    config = LoaderConfig(num_workers=4, batch_size=8)
    controller = Controller(config, Bounds(usable_cpus=2, max_workers=8))
    meter = CostMeter(controller)
    meter.epoch_started(0.0, 0)
    meter.epoch_started(10.0, 100)
    # The run started at t=10 with 4 workers: 8 warm-up batches, the first counted at t=11.
    loop = _loop(20, 8, 0.02, start=11.0)
    out = meter.measure(Warmup(10.0, 8, 100, priced=False), loop, metrics(batches_per_s=50.0), config, now_s=12.0)
    assert "stall_s" not in out and meter.last_stall_s is None and controller.costs.stall_s is None
    # First counted batch requested at t=11.01, less 9 batches at 50/s: 0.83 s each epoch pays.
    assert out["startup_s"] == pytest.approx(1.01 - 9 / 50.0, abs=1e-6)
