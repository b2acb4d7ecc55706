"""``loadertune report``: summaries of event logs built here, rendered, as JSON, and plotted."""

from __future__ import annotations

import json

import pytest

from loadertune.cli import _output, main
from loadertune.cli.report import split_runs, summarize_run, summarize_runs

T0 = 1_700_000_000.0


def ev(kind, t, step=0, **data):
    return {"time": T0 + t, "step": step, "epoch": 0, "kind": kind, **data}


def cfg(w, bs=32):
    return {
        "num_workers": w,
        "batch_size": bs,
        "prefetch_factor": 2 if w else None,
        "pin_memory": False,
        "persistent_workers": False,
    }


def window(t, w, rate, wait=0.5, kind="data_starved"):
    return ev(
        "window",
        t,
        config=cfg(w),
        metrics={"samples_per_s": rate, "wait_share": wait},
        diagnosis={"kind": kind, "summary": f"{kind} at {rate}"},
    )


def apply_run():
    return [
        ev("start", 0, mode="apply", config=cfg(0), gpu="simulated", usable_cpus=2),
        window(1, 0, 200, wait=0.87),
        ev("change", 1.1, before=cfg(0), after=cfg(8), reason="9 workers keep up", forced=False),
        window(2, 8, 1500, wait=0.06),
        ev("keep", 2.1, reason="kept"),
        window(3, 8, 1520, wait=0.05),
        ev("change", 3.5, before=cfg(8), after=cfg(12), reason="12 keep up", forced=False),
        window(4.5, 12, 1510, wait=0.05),
        ev("revert", 4.6, before=cfg(12), after=cfg(8), reason="within the noise"),
        window(5.5, 8, 1490, wait=0.05, kind="balanced"),
        ev("summary", 6, final_config=cfg(8), text="summary"),
    ]


def recommend_run():
    rec = {
        "config": cfg(6),
        "reason": "one worker makes a batch in 120 ms",
        "lr_factor": None,
        "expected_speedup": 5.5,
        "changes": {"num_workers": [0, 6], "prefetch_factor": [None, 2]},
    }
    return [
        ev("start", 100, mode="recommend", config=cfg(0)),
        window(101, 0, 210),
        ev(
            "recommendation",
            101.01,
            recommendation=rec,
            diagnosis={"kind": "data_starved", "summary": "Data-starved."},
            metrics={"samples_per_s": 210},
        ),
        window(102, 0, 205),
    ]


@pytest.fixture
def log(tmp_path):
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in apply_run() + recommend_run()))
    return path


def test_split_runs_at_each_start():
    runs = split_runs(apply_run() + recommend_run())
    assert [r[0]["kind"] for r in runs] == ["start", "start"]
    assert [len(r) for r in runs] == [11, 4]


def test_configurations_over_time():
    r = summarize_run(apply_run())
    assert r["mode"] == "apply"
    assert r["windows"] == 5
    assert [p["config"]["num_workers"] for p in r["periods"]] == [0, 8, 12, 8]
    first, second = r["periods"][:2]
    assert (first["from_s"], first["to_s"], first["samples_per_s"]) == (0.0, 1.0, 200)
    # A period starts at the change that began it.
    assert (second["from_s"], second["to_s"], second["windows"]) == (1.1, 3.0, 2)
    assert second["samples_per_s"] == pytest.approx(1510)
    assert r["periods"][-1]["diagnosis"] == "balanced"
    assert r["final_config"] == cfg(8)
    assert r["finished"]


def test_throughput_before_and_after_each_change():
    changes = summarize_run(apply_run())["changes"]
    assert [c["kind"] for c in changes] == ["change", "change", "revert"]
    first, second, back = changes
    assert first["changes"] == {"num_workers": [0, 8], "prefetch_factor": [None, 2]}
    assert (first["before_samples_per_s"], first["after_samples_per_s"]) == (
        200,
        pytest.approx(1510),
    )
    assert first["outcome"] == "kept"
    assert (second["before_samples_per_s"], second["after_samples_per_s"], second["outcome"]) == (
        1520,
        1510,
        "reverted",
    )
    assert (back["before_samples_per_s"], back["after_samples_per_s"]) == (1510, 1490)


def test_first_and_last_rates():
    r = summarize_run(apply_run())
    assert (r["first_samples_per_s"], r["last_samples_per_s"]) == (200, 1490)
    assert r["speedup"] == pytest.approx(7.45)


def test_the_runs_own_summary_gives_the_throughput_when_it_closed():
    # The log's summary line and the report must tell one story: the summary's steady rates
    # (epoch starts included) over the windows' (which leave them out).
    events = apply_run()
    events[-1] = ev("summary", 6, final_config=cfg(8), text="summary", first_samples_per_s=177.0, last_samples_per_s=437.0)
    r = summarize_run(events)
    assert (r["first_samples_per_s"], r["last_samples_per_s"], r["throughput_from"]) == (177.0, 437.0, "summary")
    assert r["speedup"] == pytest.approx(437 / 177, abs=1e-3)
    assert summarize_run(apply_run()[:-1])["throughput_from"] == "windows"  # a run that never closed


def test_recommendations_in_recommend_mode():
    r = summarize_run(recommend_run())
    assert r["mode"] == "recommend"
    assert r["changes"] == []
    (rec,) = r["recommendations"]
    assert rec["changes"]["num_workers"] == [0, 6]
    assert rec["expected_speedup"] == 5.5
    assert rec["at_s"] == pytest.approx(1.01)
    assert not r["finished"]


def test_a_log_cut_before_its_start_still_summarizes():
    (r,) = summarize_runs(apply_run()[1:])
    assert r["mode"] is None
    assert r["windows"] == 5


def test_report_prints_every_run(log, capsys):
    assert main(["report", str(log)]) == 0
    text = capsys.readouterr().out
    assert "Run 1 of 2: apply mode" in text
    assert "Configurations over time" in text
    assert (
        "change: num_workers 0 -> 8, prefetch_factor None -> 2: 200 -> 1510 samples/s (kept)"
        in text
    )
    assert "revert: num_workers 12 -> 8" in text
    assert "Run 2 of 2: recommend mode" in text
    assert "num_workers 0 -> 6, prefetch_factor None -> 2 (expected ~5.5x)" in text
    assert "the run did not close" in text


def test_report_plain_text_without_rich(log, capsys, monkeypatch):
    monkeypatch.setattr(_output, "rich_available", lambda: False)
    assert main(["report", str(log)]) == 0
    text = capsys.readouterr().out
    assert "┃" not in text
    header = next(line for line in text.splitlines() if line.startswith("from s"))
    assert header.split()[:4] == ["from", "s", "to", "s"]


def test_report_json(log, capsys):
    assert main(["report", str(log), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["file"] == str(log)
    assert len(doc["runs"]) == 2
    run = doc["runs"][0]
    for key in (
        "mode",
        "periods",
        "changes",
        "recommendations",
        "series",
        "final_config",
        "speedup",
    ):
        assert key in run
    assert run["series"][0] == {
        "t_s": 1.0,
        "step": 0,
        "samples_per_s": 200,
        "wait_share": 0.87,
        "num_workers": 0,
        "batch_size": 32,
        "diagnosis": "data_starved",
    }


def test_report_plot(log, tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "run.png"
    assert main(["report", str(log), "--plot", str(png)]) == 0
    assert f"Plot written to {png}" in capsys.readouterr().out
    with Image.open(png) as image:
        assert image.width > 400 and image.height > 300


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "no such file"),
        ("", "holds no events"),
        ("not json\n", "run.jsonl:1: not a JSON line"),
        ('{"no_kind": 1}\n', "not a loadertune event"),
    ],
)
def test_bad_logs_exit_2_with_one_line(tmp_path, capsys, content, says):
    path = tmp_path / "run.jsonl"
    if content is not None:
        path.write_text(content)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert says in err
    assert err.startswith("loadertune report: error: ")


def test_a_directory_is_not_a_log(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
