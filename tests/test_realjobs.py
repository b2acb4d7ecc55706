"""bench/realjobs.py: the PASS/MISS logic and one tiny run of each workload's machinery (no timing
asserts: figures on a shared 2-core machine are the bench's business, not the tests')."""

from __future__ import annotations

import pytest
import torch

from bench import realjobs
from bench.realjobs import (
    JobResult,
    LatencyCpuDataset,
    SmallJpegDataset,
    at_least,
    best_static,
    run_job,
    spread,
    true_rates,
    verdict_jpeg,
    verdict_ratio,
    within,
)


def test_ratio_verdicts():
    assert verdict_ratio([95.0, 100.0, 90.0], [100.0, 100.0], 0.95) == (0.95, "PASS")
    ratio, v = verdict_ratio([89.0], [100.0], 0.90)
    assert v == "MISS" and ratio == pytest.approx(0.89)
    assert at_least(1.0, 1.0) == "PASS" and at_least(0.999, 1.0) == "MISS"


def test_within_is_relative_and_needs_a_truth():
    assert within(120.0, 100.0, 0.20) and not within(121.0, 100.0, 0.20)
    assert within(80.0, 100.0, 0.20) and not within(5.0, 0.0, 0.20)


def test_spread_and_best_static():
    s = spread([90.0, 100.0, 110.0])
    assert s["median"] == 100.0 and s["pm"] == pytest.approx(0.10)
    assert best_static({"w=0": [10.0, 12.0], "w=2": [11.0, 13.0, 30.0]}) == "w=2"


def test_jpeg_zero_worker_rule():
    # w=2 is >5% better than w=0: ending at w=0 in any run is a MISS.
    ok, why = verdict_jpeg({0: 67.0, 1: 61.0, 2: 81.0}, [2, 0])
    assert not ok and "1 of 2" in why and "[2]" in why
    assert verdict_jpeg({0: 67.0, 1: 61.0, 2: 81.0}, [2, 3])[0]
    # Nothing with workers is >5% better: w=0 is a fine place to end.
    assert verdict_jpeg({0: 100.0, 1: 104.0}, [0])[0]


def test_true_rates_cover_the_spans_the_summary_counts():
    res = JobResult("tuner")
    res.iter0_s = 0.5  # tune()'s set-up before the first iter() is not the loop's
    res.batch_done_s = [1.0, 2.0, 3.0, 4.0, 4.5, 5.0, 5.5, 6.0]
    res.batch_samples = [10] * 8
    # Decided on batch 3 (step 4, its step carries the decision); the first window after it
    # counted batches 5-7 (warm-up: batch 4).
    res.events = [{"kind": "change", "step": 4}, {"kind": "window", "step": 8, "batches": 3}]
    first, last = true_rates(res)
    assert first == pytest.approx(20 / 2.0)  # batches 1-2: the first batch's one-off wait left out
    assert last == pytest.approx(30 / 1.5)  # batches 5-7, from 4.5 s to 6.0 s
    res.events = [{"kind": "change", "step": 4}, {"kind": "keep", "step": 5}]
    assert true_rates(res)[1] == pytest.approx(40 / 2.0)  # no window after: from the change
    res.events = []
    assert true_rates(res) == (pytest.approx(70 / 5.0), pytest.approx(70 / 5.0))


def test_datasets_make_what_the_loop_expects():
    x, y = SmallJpegDataset(4, images=2, size=64, crop=48, out=32)[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert LatencyCpuDataset(5, wait_ms=0.1, cpu_ms=0.1, shape=(4,))[2].tolist() == [2.0] * 4


def test_a_static_job_and_a_tuned_job_run_to_the_end():
    ds = LatencyCpuDataset(24, shape=(4,))
    make = realjobs._loader_factory(ds, 4, 0)
    static = run_job(make, lambda b: None, epochs=2, label="w=0")
    assert static.samples == 48 and len(static.epoch_s) == 2 and static.final is None
    tuned = run_job(make, lambda b: None, epochs=2, tune={"mode": "recommend", "host": None, "gpu": None}, label="tuner")
    assert tuned.samples == 48 and tuned.final is not None and tuned.summary is not None
    assert "summary" in tuned.summary["text"]
    timed = run_job(make, lambda b: None, duration_s=0.05, label="w=0")
    assert timed.samples > 0


def test_the_spawn_workload_builds_spawn_started_non_persistent_loaders():
    # Not iterated here: spawn's resource tracker would outlive the test.
    loader = realjobs._loader_factory(LatencyCpuDataset(16, shape=(4,)), 4, 2, context="spawn")()
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    assert loader.num_workers == 2 and not loader.persistent_workers


def test_the_report_renders_every_kind_of_row():
    res = JobResult("w=0", samples=10, wall_s=1.0)
    tuned = JobResult("tuner", samples=12, wall_s=1.0, final={"num_workers": 2, "persistent_workers": True}, summary={"text": "summary: x"})
    tuned.events = [{"kind": "change", "step": 3, "after": "w=2 pf=2 pw=0"}]
    w = realjobs._result("jpeg", {"w=0": [res], "tuner": [tuned]}, [{"target": "t", "measured": "m", "verdict": "MISS"}], ["note"])
    results = {
        "command": "python -m bench.realjobs --quick",
        "date": "2026-01-01",
        "took_s": 60.0,
        "machine": {"usable_cpus": 2, "cpu_model": "x", "python": "3.11", "torch": "2", "torch_threads": 2, "load_average": [1, 1, 1]},
        "load_end": [1, 1, 1],
        "workloads": [w, {"name": "anchors", "rows": [], "targets": [{"target": "a", "measured": "skipped", "verdict": "SKIP"}], "notes": [], "best_static": None, "events": {}}],
    }
    text = realjobs.render(results)
    assert "**MISS**" in text and "w=2 pw" in text and "change@3" in text and "SKIP" in text


def test_unknown_workload_is_refused(capsys):
    with pytest.raises(SystemExit):
        realjobs.main(["--only", "nope"])
    assert "unknown workload" in capsys.readouterr().err


def test_count_target_flags_a_job_that_consumed_a_different_number_of_samples():
    from bench.realjobs import count_target

    ok = JobResult("w=0", samples=4800)
    short = JobResult("tuner", samples=3600)
    assert count_target({"w=0": [ok], "tuner": [ok]}, 4800)["verdict"] == "PASS"
    t = count_target({"w=0": [ok], "tuner": [ok, short]}, 4800)
    assert t["verdict"] == "MISS" and "tuner run 2: 3600" in t["measured"]
