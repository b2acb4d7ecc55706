"""Worker memory growth (issue 15): the forecast, the probe step, and a real copy-on-read dataset."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time

import psutil
import pytest
from torch.utils.data import DataLoader, Dataset

import loadertune
from loadertune.config import LoaderConfig
from loadertune.diagnosis import Diagnosis
from loadertune.memory import MemoryTrend, fit_slope, probe_limit, workers_within
from loadertune.metrics import WindowMetrics
from loadertune.planning import Bounds, plan
from loadertune.sources.host import HostSource

MiB = 2**20


def test_fit_slope():
    assert fit_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert fit_slope([1, 1], [0, 5]) == 0.0
    assert fit_slope([1], [1]) == 0.0


def test_linear_growth_predicted_to_the_epoch_end():
    trend = MemoryTrend()
    for walk, pos in enumerate(range(0, 5000, 1000)):
        # Two workers: 100 MiB each, growing 4 KiB per sample consumed.
        trend.observe(walk, 0, pos, 10_000, {11: 100 * MiB + 4096 * pos, 12: 100 * MiB + 4096 * pos})
    f = trend.forecast()
    assert f.workers == 2 and f.growing == 2
    assert f.end_bytes == pytest.approx(2 * (100 * MiB + 4096 * 10_000), rel=1e-6)
    assert f.per_worker_end_bytes == pytest.approx(100 * MiB + 4096 * 10_000, rel=1e-6)
    assert f.crosses(250 * MiB) and not f.crosses(300 * MiB)


def test_growth_that_stopped_is_not_extrapolated_and_settles():
    trend = MemoryTrend()
    # A bounded cache: it fills, then stays.
    for walk, (pos, pss) in enumerate([(0, 20), (500, 60), (1000, 63), (1500, 63)]):
        trend.observe(walk, 0, pos, 1_000_000, {7: pss * MiB})
    f = trend.forecast()
    assert f.growing == 0 and f.end_bytes == 63 * MiB and not f.crosses(10 * MiB)
    assert trend.settled_bytes() == 63 * MiB


def test_not_settled_while_growing_or_new():
    trend = MemoryTrend()
    trend.observe(0, 0, 0, 100, {1: 10 * MiB})
    assert trend.settled_bytes() is None
    trend.observe(1, 0, 10, 100, {1: 20 * MiB})
    assert trend.settled_bytes() is None
    trend.observe(1, 0, 20, 100, {1: 99 * MiB})  # the same walk again: ignored
    trend.observe(2, 0, 30, 100, {1: 20 * MiB, 2: 5 * MiB})
    assert trend.settled_bytes() is None, "worker 2 is new"


def test_epochs_continue_the_series_and_gone_workers_are_forgotten():
    trend = MemoryTrend()
    trend.observe(0, 0, 800, 1000, {1: 10 * MiB})
    trend.observe(1, 1, 100, 1000, {1: 11 * MiB})
    trend.observe(2, 1, 200, 1000, {1: 12 * MiB})
    f = trend.forecast()
    assert f.position == 1200 and f.end_position == 2000
    trend.observe(3, 1, 300, 1000, {2: 12 * MiB})
    assert trend.forecast().workers == 1 and trend.forecast().growing == 0


def test_no_forecast_without_an_epoch_length():
    trend = MemoryTrend()
    trend.observe(0, 0, 5, None, {1: MiB})
    assert trend.forecast() is None


def test_workers_within_and_probe_limit():
    assert workers_within(300 * MiB, 63 * MiB, 5) == 4
    assert workers_within(300 * MiB, 400 * MiB, 2) == 0
    assert workers_within(300 * MiB, 10 * MiB, 3) == 2, "always a step down"
    assert probe_limit(0, 5, 300 * MiB, 400 * MiB) == 2
    assert probe_limit(2, 5, 300 * MiB, 400 * MiB) == 2
    assert probe_limit(0, 5, 10_000 * MiB, 400 * MiB) is None, "even the worst case fits"
    assert probe_limit(0, 5, None, 400 * MiB) is None
    assert probe_limit(0, 5, 300 * MiB, None) is None


def _starved(**kw) -> WindowMetrics:
    base = dict(
        duration_s=2.0, batches=20, samples=320, batches_per_s=10.0, samples_per_s=160.0,
        wait_share=0.85, wait_s_per_batch=0.085, compute_s_per_batch=0.015, rate_rel_stderr=0.02,
    )
    base.update(kw)
    return WindowMetrics(**base)


def test_first_step_from_zero_measures_a_few_workers_first():
    m = _starved()
    d = Diagnosis("data_starved", "waits", {})
    config = LoaderConfig(num_workers=0, batch_size=16)
    bounds = Bounds(usable_cpus=2, max_workers=16, ram_budget_bytes=300 * MiB)
    free = plan(m, d, config, bounds)
    assert free.config.num_workers > 2
    probed = plan(m, d, config, bounds, unmeasured_worker_bytes=400 * MiB)
    assert probed.config.num_workers == 2
    roomy = dataclasses.replace(bounds, ram_budget_bytes=100_000 * MiB)
    assert plan(m, d, config, roomy, unmeasured_worker_bytes=400 * MiB).config.num_workers == free.config.num_workers
    # At the probe count, nothing more until the memory is measured.
    assert plan(m, d, config.replace(num_workers=2), bounds, unmeasured_worker_bytes=400 * MiB) is None


class CopyOnRead(Dataset):
    """A list of Python objects (4 KB records): every worker copies the page of each it reads."""

    def __init__(self, n: int) -> None:
        self.items = [bytes([i % 251]) * 4000 for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> int:
        record = self.items[i]  # touching it writes its reference count: its page is copied
        return i if record else -1


def _workers_pss(tuned) -> int:
    total = 0
    for pid in tuned._pipeline.worker_pids():
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_full_info().pss
    return total


def _run(mode: str, budget_above_start_mib: float, caplog):
    n = 16000
    loader = DataLoader(CopyOnRead(n), batch_size=32, num_workers=2, shuffle=True)
    available = psutil.virtual_memory().available
    tuned = loadertune.tune(
        loader, mode=mode, gpu=None, host=HostSource(pss_interval_s=0.3), window_s=0.5, ram_budget_share=0.5
    )
    seen, budget, peak, end = [], None, 0, None
    caplog.set_level(logging.WARNING, logger="loadertune")
    with tuned:
        for k, batch in enumerate(tuned):
            seen.extend(int(x) for x in batch)
            time.sleep(0.005)
            if k == 5:
                # The budget: what the workers hold now plus a share of what the epoch adds
                # (16000 records x ~4 KiB = ~62 MiB), so it is crossed in the epoch's middle.
                budget = _workers_pss(tuned) + int(budget_above_start_mib * MiB)
                session = tuned._session
                session.bounds = dataclasses.replace(session.bounds, ram_budget_bytes=budget)
                session.controller.bounds = dataclasses.replace(session.controller.bounds, ram_budget_bytes=budget)
            if k % 25 == 0 or k >= len(tuned) - 2:
                pss = _workers_pss(tuned)
                peak = max(peak, pss)
                if k >= len(tuned) - 2 and pss:
                    end = pss
        events = tuned.events
    assert sorted(seen) == list(range(n)), "exactly once"
    del available
    return [e for e in events if e.kind == "memory"], budget, peak, end, events


def _story(events, budget) -> str:
    """What the run did, for a failure message."""
    lines = [f"budget {budget / MiB:.0f} MiB"]
    for e in events:
        data = {k: v for k, v in e.data.items() if k in ("action", "reason", "diagnosis", "after", "forecast")}
        lines.append(f"{e.kind} step {e.step}: {data}")
    return "\n".join(lines)


@pytest.mark.timeout(60)
def test_copy_on_read_forecast_within_25_percent(caplog):
    memory, budget, _peak, end, _events = _run("recommend", 30, caplog)
    assert memory, "the crossing is predicted"
    f = memory[0].data["forecast"]
    assert memory[0].data["action"] == "warn"
    assert f["now_bytes"] < budget < f["end_bytes"], "warned before the budget is crossed"
    assert end is not None and abs(f["end_bytes"] - end) / end <= 0.25
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "copy-on-read" in text and "numpy arrays or tensors" in text


@pytest.mark.timeout(60)
def test_apply_steps_down_for_memory_and_ends_within_the_budget(caplog):
    memory, budget, _peak, end, events = _run("apply", 30, caplog)
    # Two defences: the forecast steps down before the budget is crossed (a `memory` event);
    # growth too fast for it (it needs three rising walks: a large parent process whose own
    # writes un-share pages raises the workers' PSS at once) meets the RAM cap one window later.
    forecast = [e for e in memory if e.data["action"] == "step_down"]
    capped = [e for e in events if e.kind == "change" and "exceed the RAM budget" in e.data["reason"]]
    assert forecast or capped, _story(events, budget)
    if forecast:
        assert forecast[0].data["forecast"]["now_bytes"] < budget, "stepped down before the crossing"
    steps = [e for e in events if e.kind == "change" and ("memory is predicted" in e.data["reason"] or e in capped)]
    assert steps and steps[0].data["after"]["num_workers"] < 2, _story(events, budget)
    # The workers' PSS at the epoch's end (None: no workers left, nothing held).
    assert end is None or end <= budget, (end, _story(events, budget))
