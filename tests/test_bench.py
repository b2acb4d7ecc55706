"""The benchmark harness: its figures, its workload plan, and one tiny run end to end.

Behaviour only: nothing here asserts a speed (timings flake on a shared 2-core machine).
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from bench import micro, run, workloads
from loadertune.diagnosis import DIAGNOSIS_KINDS

ROOT = Path(__file__).resolve().parent.parent


def _trace(done: list[float], samples: list[int], duration: float) -> run.Trace:
    return run.Trace(
        done_s=np.asarray(done),
        samples=np.asarray(samples, dtype=np.int64),
        wait_s=np.zeros(len(done)),
        duration_s=duration,
    )


def test_figures_from_a_trace() -> None:
    # 10 samples every 0.1 s for 4 s, then 20 every 0.1 s: the rate doubles at t = 4.
    done = [round(0.1 * i, 1) for i in range(1, 81)]
    samples = [10 if t <= 4.0 else 20 for t in done]
    trace = _trace(done, samples, 8.0)
    assert run.steady_rate(trace) == pytest.approx(200.0)
    assert run.rate_between(trace, 0.0, 4.0) == pytest.approx(100.0)
    assert run.per_second(trace) == [100, 100, 100, 100, 200, 200, 200, 200]
    assert run.time_to_reach(trace, 150.0) == pytest.approx(5.0)
    # A window straddling the change is not credited to the time after it.
    assert run.time_to_reach(trace, 190.0, start_s=4.0) == pytest.approx(2.0)
    assert run.time_to_reach(trace, 500.0) is None
    assert trace.total_samples == sum(samples)


def test_static_points_hold_the_baselines_once() -> None:
    cpus = run.usable_cpus()
    points = run.static_points(workloads.get("latency"), quick=True, sweep=[0, 3])
    workers = [p.num_workers for p in points]
    assert workers == sorted(set(workers))
    roles = {role for p in points for role in p.roles}
    assert {"default (0)", f"torch max ({cpus})", "cpus-1", "sweep"} <= roles
    assert {0, cpus, max(1, cpus - 1), 3} == set(workers)


def test_every_workload_is_well_formed() -> None:
    assert len(set(workloads.names())) == len(workloads.WORKLOADS)
    assert set(workloads.QUICK_DEFAULT) <= set(workloads.names())
    for w in workloads.WORKLOADS:
        assert w.expected_first_diagnosis in DIAGNOSIS_KINDS
        assert w.sweep_quick and w.sweep_full
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.get("nope")


def test_diagnosis_scenarios_are_labelled_and_cover_every_kind() -> None:
    cases = micro.diagnosis_scenarios()
    assert len(cases) >= 20
    assert {label for label, *_ in cases} == set(DIAGNOSIS_KINDS)
    # Seeded: the same scenarios every time, so the accuracy figure is comparable between runs.
    again = micro.diagnosis_scenarios()
    assert [(c[0], c[1], c[2], c[3]) for c in again] == [(c[0], c[1], c[2], c[3]) for c in cases]


def _key(metrics: Any, config: Any, env: Any) -> str:
    # The scenarios are rebuilt (seeded) inside diagnosis_accuracy: match them by value.
    return repr((metrics, config, env))


def test_diagnosis_accuracy_counts_right_and_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    import loadertune.diagnosis as diagnose_module

    cases = micro.diagnosis_scenarios()
    # A scripted diagnose: right on every window except the first two, which it calls "balanced"
    # when they are not (so the counting, not the real diagnose's quality, is what is tested).
    script = {_key(*c[3:]): c[0] for c in cases}
    assert len(script) == len(cases)  # every window tells itself apart
    for c in [c for c in cases if c[0] != "balanced"][:2]:
        script[_key(*c[3:])] = "balanced"

    def scripted(metrics, config, env):
        return types.SimpleNamespace(kind=script[_key(metrics, config, env)])

    monkeypatch.setattr(diagnose_module, "diagnose", scripted)
    real = [("latency", "data_starved", "data_starved"), ("cpu", "balanced", "cpu_bound")]
    item = micro.diagnosis_accuracy(real, recorded=None)
    data = item["data"]
    assert data["synthetic_total"] == len(cases)
    assert data["synthetic_right"] == len(cases) - 2
    assert len(data["wrong"]) == 2 and all("→ balanced" in w for w in data["wrong"])
    assert sum(right for right, _ in data["per_kind"].values()) == len(cases) - 2
    assert sum(total for _, total in data["per_kind"].values()) == len(cases)
    assert item["result"] == (
        f"no recorded windows; self-consistency check {len(cases) - 2}/{len(cases)} synthetic windows"
    )
    assert "bench workloads' first windows 1/2" in item["detail"]
    assert "| cpu | balanced | cpu_bound |" in item["table"]
    assert any(line.startswith("Misdiagnosed synthetic windows: ") for line in item["table"])


def test_diagnosis_accuracy_all_right_lists_no_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    import loadertune.diagnosis as diagnose_module

    labels = {_key(*c[3:]): c[0] for c in micro.diagnosis_scenarios()}
    monkeypatch.setattr(
        diagnose_module,
        "diagnose",
        lambda m, c, e: types.SimpleNamespace(kind=labels[_key(m, c, e)]),
    )
    item = micro.diagnosis_accuracy(recorded=None)
    assert item["data"]["synthetic_right"] == item["data"]["synthetic_total"]
    total = item["data"]["synthetic_total"]
    assert item["data"]["wrong"] == [] and f"self-consistency check {total}/{total}" in item["result"]
    assert "bench workloads" not in item["detail"]
    assert not any("Misdiagnosed" in line for line in item["table"])


# -- targets, oracle and summary (the PASS/MISS logic itself) -----------------------------------


def _workload(**changes: Any) -> workloads.Workload:
    return dataclasses.replace(workloads.get("latency"), **changes)


def _tuned(**figures: Any) -> dict[str, Any]:
    base = {
        "steady_vs_oracle": 1.0,
        "whole_vs_oracle": 1.0,
        "reach_90_s": 3.0,
        "recover_80_s": 4.0,
        "num_workers": 2,
        "max_workers_used": 2,
        "peak_worker_pss_bytes": 0,
        "segments": [{"start_s": 0.0, "end_s": 20.0, "num_workers": 2, "batch_size": 32}],
    }
    base.update(figures)
    return base


@pytest.mark.parametrize(
    ("kind", "figures", "passed", "measured"),
    [
        ("steady_90", {"steady_vs_oracle": 0.90}, True, "90%"),
        ("steady_90", {"steady_vs_oracle": 0.8949}, False, "89%"),
        ("steady_95", {"steady_vs_oracle": 0.95}, True, "95%"),
        ("steady_95", {"steady_vs_oracle": 0.94}, False, "94%"),
        ("whole_job_90", {"whole_vs_oracle": 0.91}, True, "91%"),
        ("whole_job_90", {"whole_vs_oracle": 0.6}, False, "60%"),
        ("reach_90_10s", {"reach_90_s": 10.0}, True, "10.0 s"),
        ("reach_90_10s", {"reach_90_s": 10.25}, False, "10.2 s"),
        ("reach_90_10s", {"reach_90_s": None}, False, "not within 20 s"),
        ("phase_recover_80_15s", {"recover_80_s": 15.0}, True, "15.0 s"),
        ("phase_recover_80_15s", {"recover_80_s": 15.5}, False, "15.5 s"),
        ("phase_recover_80_15s", {"recover_80_s": None}, False, "not within the 8 s after"),
        ("within_budget", {"peak_worker_pss_bytes": 100 << 20}, True, "peak 100 MiB"),
        ("within_budget", {"peak_worker_pss_bytes": (100 << 20) + 1}, False, "peak 100 MiB"),
        ("within_budget", {"peak_worker_pss_bytes": None}, True, "peak 0 MiB"),
    ],
)
def test_each_target_passes_and_misses_at_its_threshold(
    kind: str, figures: dict[str, Any], passed: bool, measured: str
) -> None:
    w = _workload(memory_budget_bytes=100 << 20)
    summary = {"phase": {"at_s": 12.0}}
    row = run._target(kind, w, _tuned(**figures), summary, 2, 20.0, True)
    assert row["id"] == kind
    assert row["passed"] is passed
    assert row["measured"].startswith(measured)


def _segment(start: float, end: float, workers: int) -> dict[str, Any]:
    return {"start_s": start, "end_s": end, "num_workers": workers, "batch_size": 32}


@pytest.mark.parametrize(
    ("segments", "passed", "says"),
    [
        # Above the 2 CPUs only briefly (a trial shorter than SETTLE_S), then back: fine.
        ([_segment(0, 3, 0), _segment(3, 4, 4), _segment(4, 20, 2)], True, "ended at 2"),
        # Held 4 workers for SETTLE_S: settled above the CPUs.
        (
            [_segment(0, 3, 0), _segment(3, 3 + run.SETTLE_S, 4), _segment(8, 20, 2)],
            False,
            "held 4 > 2",
        ),
        # The configuration in use at the end counts as settled, however short.
        ([_segment(0, 19.5, 2), _segment(19.5, 20, 3)], False, "held 3 > 2"),
    ],
)
def test_no_oversubscription_target(
    segments: list[dict[str, Any]], passed: bool, says: str
) -> None:
    tuned = _tuned(segments=segments, num_workers=segments[-1]["num_workers"], max_workers_used=4)
    row = run._target("no_oversubscription", _workload(), tuned, {}, 2, 20.0, True)
    assert row["passed"] is passed
    assert says in row["measured"]


def test_an_unknown_target_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown target 'fastest'"):
        run._target("fastest", _workload(), _tuned(), {}, 2, 20.0, True)


def _static(label: str, sps: float, pss: int | None = None) -> dict[str, Any]:
    return {"label": label, "steady_sps": sps, "peak_worker_pss_bytes": pss}


def test_the_oracle_is_the_fastest_static_inside_the_memory_budget() -> None:
    statics = [_static("w=0", 100.0, 0), _static("w=8", 900.0, 300), _static("w=4", 700.0, 200)]
    assert run._pick_oracle(_workload(memory_budget_bytes=None), statics)["label"] == "w=8"
    assert run._pick_oracle(_workload(memory_budget_bytes=250), statics)["label"] == "w=4"
    # Nothing fits: the fastest of all rather than no oracle.
    assert run._pick_oracle(_workload(memory_budget_bytes=-1), statics)["label"] == "w=8"
    assert run._pick_oracle(_workload(), []) is None


def _run_record(kind: str, label: str, rate: float, duration: float = 10.0) -> dict[str, Any]:
    done = [round(0.1 * i, 1) for i in range(1, int(duration * 10) + 1)]
    trace = _trace(done, [int(rate / 10)] * len(done), duration)
    return {
        "kind": kind,
        "label": label,
        "steady_sps": run.steady_rate(trace),
        "whole_samples": trace.total_samples,
        "rate_cv": run.rate_cv(trace),
        "_trace": trace,
        "num_workers": 2,
        "batch_size": 10,
        "rebuilds": 1,
        "rebuild_stall_s": 0.0,
        "max_workers_used": 2,
        "first_diagnosis": "data_starved",
        "peak_worker_pss_bytes": None,
        "segments": [_segment(0, duration, 2)],
    }


def test_summary_averages_the_oracle_with_its_repeat_and_scores_the_tuner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run, "usable_cpus", lambda: 2)
    oracle = _run_record("static", "w=8", 1000.0)
    repeat = _run_record("repeat", "w=8 again", 800.0)
    tuned = _run_record("tuned", "loadertune", 810.0)
    w = _workload(targets=("steady_90", "whole_job_90", "reach_90_10s"))
    out = run._summarise(w, [oracle, repeat, tuned], oracle, 10.0, True)
    assert out["oracle"]["steady_sps"] == pytest.approx(900.0)
    assert out["oracle"]["repeat_noise"] == pytest.approx(200.0 / 900.0)
    assert out["tuner"]["steady_vs_oracle"] == pytest.approx(0.9)
    assert out["tuner"]["whole_vs_oracle"] == pytest.approx(0.9)
    # 810/s from the start: the trailing 2 s window first holds 90% of 900/s at t = 2 s.
    assert out["tuner"]["reach_90_s"] == pytest.approx(2.0)
    assert [(t["id"], t["passed"]) for t in out["targets"]] == [
        ("steady_90", True),
        ("whole_job_90", True),
        ("reach_90_10s", True),
    ]
    slow = _run_record("tuned", "loadertune", 500.0)
    out = run._summarise(w, [oracle, repeat, slow], oracle, 10.0, True)
    assert [t["passed"] for t in out["targets"]] == [False, False, False]
    assert out["tuner"]["reach_90_s"] is None


def test_summary_without_an_oracle_has_no_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "usable_cpus", lambda: 2)
    out = run._summarise(_workload(), [_run_record("tuned", "loadertune", 100.0)], None, 10.0, True)
    assert out["targets"] == [] and "oracle" not in out and "tuner" not in out


def test_one_tiny_workload_end_to_end(tmp_path: Path) -> None:
    code = run.main(
        [
            "--quick",
            "--only",
            "latency",
            "--duration",
            "0.5",
            "--sweep",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    (w,) = results["workloads"]
    assert w["name"] == "latency"
    kinds = [r["kind"] for r in w["runs"]]
    assert kinds.count("tuned") == 1 and "static" in kinds
    tuned = next(r for r in w["runs"] if r["kind"] == "tuned")
    # What the tuner did is whatever 0.5 s allowed; the record must agree with itself.
    changes = [d for d in tuned["decisions"] if d["action"] in ("change", "revert", "fault")]
    assert len(tuned["segments"]) == len(changes) + 1
    assert tuned["whole_samples"] > 0
    assert sum(tuned["per_second"]) <= tuned["whole_samples"]
    targets = {t["id"]: t for t in w["targets"]}
    assert set(targets) == {"steady_90", "whole_job_90", "reach_90_10s"}
    # Each PASS/MISS follows from the figures recorded beside it.
    assert targets["steady_90"]["passed"] is (tuned["steady_vs_oracle"] >= 0.90)
    assert targets["whole_job_90"]["passed"] is (tuned["whole_vs_oracle"] >= 0.90)
    reach = tuned["reach_90_s"]
    assert targets["reach_90_10s"]["passed"] is (reach is not None and reach <= 10)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Command: `python -m bench --quick --only latency" in text
    assert "| latency |" in text
    # Every worker of every run was shut down.
    left = [c for c in psutil.Process().children(recursive=True) if run._is_worker(c)]
    assert left == []


def test_unknown_names_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(["--only", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown workload 'nope'" in capsys.readouterr().err


def test_runs_as_a_script() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout


# -- confidence intervals and verdicts ------------------------------------------------------------


def test_median_ci_uses_order_statistics_with_their_coverage() -> None:
    lo, hi, cover = micro.median_ci(list(range(40)))
    # n = 40: the 14th smallest to the 14th largest covers the median with 96.2% probability.
    assert (lo, hi) == (13.0, 26.0) and cover == pytest.approx(0.9615, abs=1e-4)
    lo, hi, cover = micro.median_ci([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0])
    assert (lo, hi) == (1.0, 9.0) and cover == pytest.approx(1 - 2 / 256)
    # Too few values for 95%: the whole range, with the coverage it really has.
    assert micro.median_ci([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)
    with pytest.raises(ValueError):
        micro.median_ci([])


@pytest.mark.parametrize(
    ("low", "high", "passed", "verdict"),
    [
        (2.0, 10.0, True, "PASS"),
        (10.01, 30.0, False, "MISS"),
        (9.0, 11.0, None, "UNDECIDED (CI straddles target)"),
        (-66.0, 74.0, None, "UNDECIDED (CI straddles target)"),
    ],
)
def test_decide_on_the_interval(low: float, high: float, passed: bool | None, verdict: str) -> None:
    assert micro.decide(low, high, 10.0) == (passed, verdict)


def _wrapper_result(diffs: list[float], batch_size: int = 32) -> dict[str, Any]:
    lo, hi, cover = micro.median_ci(diffs)
    return {
        "batch_size": batch_size,
        "diff_us": float(np.median(diffs)),
        "iqr_us": [0.0, 0.0],
        "ci95_us": [lo, hi],
        "ci_coverage": cover,
        "wall_diff_us": 0.0,
        "bare_us": 150.0,
        "cpu_diffs_us": diffs,
    }


@pytest.mark.parametrize(
    ("diffs", "passed", "verdict"),
    [
        ([4.0 + 0.1 * i for i in range(40)], True, "PASS"),  # CI 5.3 to 6.6
        ([20.0 + 0.1 * i for i in range(40)], False, "MISS"),
        # Median ~10 with pairs from -66 to +74: the interval straddles the target.
        ([-66.0 + 3.5 * i for i in range(41)], None, "UNDECIDED (CI straddles target)"),
    ],
)
def test_wrapper_verdict_is_decided_on_the_ci(
    diffs: list[float], passed: bool | None, verdict: str
) -> None:
    item = micro.wrapper_item(_wrapper_result(diffs), _wrapper_result(diffs, 8), len(diffs))
    row = item["target"]
    assert row["passed"] is passed and row["verdict"] == verdict
    lo, hi = item["data"]["bs32"]["ci95_us"]
    assert f"95% CI {lo:+.1f} to {hi:+.1f}" in row["measured"]
    assert run.verdict(row) == verdict


@pytest.mark.parametrize(
    ("diffs", "thread", "passed", "verdict"),
    [
        ([0.1, 0.2, 0.05, 0.3, 0.15, 0.2], [0.5, 0.6, 0.55, 0.5, 0.6, 0.58], True, "PASS"),
        # The thread's own CPU lies wholly above 1%: a miss, whatever the process difference.
        ([0.1, 0.2, 0.05, 0.3, 0.15, 0.2], [1.2, 1.3, 1.25, 1.4, 1.22, 1.3], False, "MISS"),
        # Process differences from -0.5 to +2.3: undecided.
        ([-0.5, 0.01, 0.11, 2.28, 0.4, 1.5], [0.5, 0.6, 0.55, 0.5, 0.6, 0.58], None, "UNDECIDED (CI straddles target)"),
    ],
)
def test_sampler_verdict_is_decided_on_both_cis(
    diffs: list[float], thread: list[float], passed: bool | None, verdict: str
) -> None:
    item = micro.sampler_item(diffs, thread, 100)
    assert item["target"]["passed"] is passed and item["target"]["verdict"] == verdict
    assert item["data"]["ci95"] == [min(diffs), max(diffs)]  # 6 pairs: the whole range


def test_results_md_shows_undecided_and_old_rows_still_read() -> None:
    assert run.verdict({"passed": True}) == "PASS"
    assert run.verdict({"passed": False}) == "MISS"
    results = {
        "meta": {
            "command": "python -m bench",
            "date": "d",
            "elapsed_s": 60.0,
            "mode": "full",
            "machine": run.machine(),
            "load_average_end": [0.0, 0.0, 0.0],
        },
        "workloads": [],
        "micro": {
            "items": [],
            "targets": [
                {"id": "wrapper_10us", "target": "t", "measured": "m", "passed": None,
                 "verdict": micro.UNDECIDED},
                {"id": "x", "target": "t2", "measured": "m2", "passed": False},
            ],
        },
    }
    text = run.render_markdown(results)
    assert "| micro | t | m | **UNDECIDED (CI straddles target)** |" in text
    assert "| micro | t2 | m2 | **MISS** |" in text


# -- the memory workload's oracle comparison ------------------------------------------------------


def test_an_over_budget_tuner_is_flagged_against_the_in_budget_oracle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run, "usable_cpus", lambda: 2)
    w = _workload(memory_budget_bytes=300 << 20, targets=("within_budget",))
    oracle = _run_record("static", "w=3", 600.0)
    oracle["peak_worker_pss_bytes"] = 290 << 20
    tuned = _run_record("tuned", "loadertune", 800.0)
    tuned["peak_worker_pss_bytes"] = 313 << 20
    tuned["windows"], tuned["decisions"] = [], []
    out = run._summarise(w, [oracle, tuned], oracle, 10.0, True)
    assert out["tuner"]["over_budget"] is True
    assert out["targets"][0]["passed"] is False
    assert "ended at w=2" in out["targets"][0]["measured"]
    out["runs"] = [oracle, tuned]
    for r in out["runs"]:
        r.setdefault("roles", [r["label"]])
    meta = {"command": "c", "date": "d", "elapsed_s": 1.0, "mode": "quick", "machine": run.machine(),
            "load_average_end": [0, 0, 0]}
    text = run.render_markdown({"meta": meta, "workloads": [out]})
    assert "133% (over budget ‡)" in text
    assert "over the 300 MiB budget" in text and "not a speed-up" in text
    assert "313 MiB (over budget)" in text
    # Within the budget: no flag.
    tuned["peak_worker_pss_bytes"] = 200 << 20
    out = run._summarise(w, [oracle, tuned], oracle, 10.0, True)
    assert out["tuner"]["over_budget"] is False
    assert run.over_budget(_workload(memory_budget_bytes=None), tuned) is False


# -- recorded windows -----------------------------------------------------------------------------


def _recorded_line(job: str, label: str, metrics: Any, config: Any, batch_bytes: int | None = None) -> str:
    return json.dumps(
        {
            "job": job,
            "label": label,
            "why": "fixture",
            "index": 0,
            "config": config.to_dict(),
            "metrics": {**metrics.to_dict(), "a_field_from_another_version": 1},
            "environment": dataclasses.asdict(micro.Environment()),
            "batch_bytes": batch_bytes,
            "diagnosed_at_record": "whatever",
        }
    )


def test_accuracy_on_recorded_windows_counts_per_kind_with_confusion(tmp_path: Path) -> None:
    from loadertune.config import LoaderConfig

    starved = micro._window(wait_share=0.6, workers=0, cpu_pct=20.0, util=(40.0, 35.0, 0.5))
    busy = micro._window(wait_share=0.005, workers=2, cpu_pct=30.0, util=(92.0, 3.0, 0.0),
                         gpu_mem_used_share=0.5)
    # /dev/shm 80% taken by 8 x 2 x 1 GiB batches in flight: full only if the batch bytes count.
    shm = micro._window(wait_share=0.005, workers=8, cpu_pct=30.0, util=(92.0, 3.0, 0.0),
                        gpu_mem_used_share=0.5, shm_free_share=0.2)
    w0, w2, w8 = (LoaderConfig(num_workers=w, batch_size=32) for w in (0, 2, 8))
    path = tmp_path / "windows.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps({"header": {"date": "2026-01-01", "git_commit": "abc"}}),
                _recorded_line("a", "data_starved", starved, w0),
                _recorded_line("b", "balanced", busy, w2),
                _recorded_line("c", "cpu_bound", starved, w0),  # labelled otherwise: a miss
                _recorded_line("d", "memory_bound", shm, w8, batch_bytes=2**30),
            ]
        )
        + "\n"
    )
    header, windows = micro.load_recorded(path)
    assert header["git_commit"] == "abc" and len(windows) == 4
    rec = micro.recorded_accuracy(windows)
    assert (rec["right"], rec["total"]) == (2, 4)
    assert rec["per_kind"]["data_starved"] == [1, 1]
    assert rec["per_kind"]["balanced"] == [1, 1]
    assert rec["per_kind"]["cpu_bound"] == [0, 1]
    assert rec["per_kind"]["memory_bound"] == [0, 1]
    assert rec["per_kind"]["batch_headroom"] == [0, 0]  # every kind listed, even unrecorded
    assert rec["confusion"] == {"cpu_bound": {"data_starved": 1}, "memory_bound": {"balanced": 1}}
    assert rec["per_job"]["c"]["label"] == "cpu_bound"
    assert rec["per_job"]["c"]["diagnosed"] == {"data_starved": 1}
    # The batch bytes the session measured would have caught the /dev/shm case.
    assert rec["with_batch_bytes"]["right"] == 3

    item = micro.diagnosis_accuracy(recorded=path)
    assert item["result"].startswith("2/4 recorded real windows right (balanced 1/1, ")
    assert "cpu_bound 0/1" in item["result"] and "batch_headroom 0/0 (none recorded)" in item["result"]
    assert "self-consistency check" in item["result"]
    assert "| cpu_bound | 0/1 **MISS** | data_starved 1 |" in "\n".join(item["table"])
    assert any(line.startswith("| c | cpu_bound | data_starved 1 | ") for line in item["table"])
    assert any("3/4 recorded windows right" in line for line in item["table"])
    assert micro.load_recorded(tmp_path / "missing.jsonl") == (None, [])


def test_the_committed_recorded_windows_cover_every_kind_and_stay_small() -> None:
    header, windows = micro.load_recorded(micro.RECORDED_WINDOWS)
    assert header is not None and set(header["label_rules"]) == set(DIAGNOSIS_KINDS)
    assert {w["label"] for w in windows} == set(DIAGNOSIS_KINDS)
    assert micro.RECORDED_WINDOWS.stat().st_size < 1_000_000
    for w in windows:
        micro._recorded_case(w)  # every line replays


def test_record_jobs_are_well_formed() -> None:
    from bench import record

    names = [j.name for j in record.JOBS]
    assert len(names) == len(set(names))
    assert {j.label for j in record.JOBS} == set(DIAGNOSIS_KINDS) == set(record.LABEL_RULES)
    for j in record.JOBS:
        if j.label == "cpu_bound":
            assert j.num_workers >= 2  # at least the usable CPUs of the machine it was built for
        gpu = record.make_gpu(j)
        assert gpu.total_memory_bytes == 16 * 2**30
    with pytest.raises(ValueError, match="unknown job"):
        record.get("nope")
