"""The benchmark harness: its figures, its workload plan, and one tiny run end to end.

Behaviour only: nothing here asserts a speed (timings flake on a shared 2-core machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from bench import micro, run, workloads
from loadertune.diagnose import DIAGNOSIS_KINDS

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
    item = micro.diagnosis_accuracy([("latency", "data_starved", "data_starved")])
    assert item["data"]["synthetic_total"] == len(cases)
    assert 0 <= item["data"]["synthetic_right"] <= len(cases)


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
    assert isinstance(tuned["rebuilds"], int)
    assert tuned["whole_samples"] > 0
    assert {t["id"] for t in w["targets"]} == {"steady_90", "whole_job_90", "reach_90_10s"}
    assert all(isinstance(t["passed"], bool) for t in w["targets"])
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
