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
    item = micro.diagnosis_accuracy(real)
    data = item["data"]
    assert data["synthetic_total"] == len(cases)
    assert data["synthetic_right"] == len(cases) - 2
    assert len(data["wrong"]) == 2 and all("→ balanced" in w for w in data["wrong"])
    assert sum(right for right, _ in data["per_kind"].values()) == len(cases) - 2
    assert sum(total for _, total in data["per_kind"].values()) == len(cases)
    assert item["result"] == f"{(len(cases) - 2) / len(cases):.0%} of {len(cases)} labelled windows"
    assert "real runs' first windows 1/2" in item["detail"]
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
    item = micro.diagnosis_accuracy()
    assert item["data"]["synthetic_right"] == item["data"]["synthetic_total"]
    assert item["data"]["wrong"] == [] and item["result"].startswith("100% of ")
    assert "real runs" not in item["detail"]
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
