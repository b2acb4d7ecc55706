"""``loadertune run -- COMMAND``: through the real entry point, on unmodified scripts.

Process tests run ``python -m loadertune run`` on the scripts in tests/fixtures/run, which know
nothing of loadertune, and check what passes through (output, exit status, signals), what the
report says (diagnosis, recommendation, creation site, rank) and that recommend mode changes
nothing. Timings are never asserted (bench/run_speedup.py measures apply mode's speed-up).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from loadertune.cli.run import boot_dir, child_environment, exit_status
from loadertune.runreport import ProcessReport, classify, code_change, format_report, report_json

FIXTURES = Path(__file__).parent / "fixtures" / "run"
# Short windows: the scripts run for seconds, not minutes.
FAST = ["--window-s", "0.5", "--min-window-batches", "4"]


def _site(script: str, needle: str) -> str:
    """``script:line`` of the first line of the fixture containing ``needle``."""
    for number, line in enumerate((FIXTURES / script).read_text().splitlines(), 1):
        if needle in line:
            return f"{script}:{number}"
    raise AssertionError(f"{needle!r} not in {script}")


def _run(*args: str, timeout: float = 100, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadertune", "run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _script(name: str, *args: str) -> list[str]:
    return ["--", sys.executable, str(FIXTURES / name), *args]


def _loaders(document: dict, name: str) -> list[dict]:
    return [item for item in document["loaders"] if item["name"] == name]


# -- through the entry point --------------------------------------------------------------------
_TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
_RECOMMEND_ARGS = ("--seconds", "1", "--exit", "3")


def _job_commands(d: Path) -> dict[str, Callable[[], subprocess.CompletedProcess[str]]]:
    """The jobs the tests below read, each writing into its own directory ``d / name``."""
    jobs = {
        "recommend": lambda: _run(
            "--json", str(d / "recommend" / "report.json"), "--log-dir", str(d / "recommend" / "logs"),
            *FAST, *_script("latency_train.py", *_RECOMMEND_ARGS),
        ),
        "plain": lambda: subprocess.run(
            [sys.executable, str(FIXTURES / "latency_train.py"), *_RECOMMEND_ARGS],
            capture_output=True, text=True, timeout=60,
        ),
        "apply": lambda: _run(
            "--mode", "apply", "--json", str(d / "apply" / "report.json"), *FAST,
            *_script("latency_train.py", "--seconds", "2"),
        ),
        "killed": lambda: _run(
            "--quiet", "--json", str(d / "killed" / "report.json"), *FAST,
            *_script("wait_for_signal.py", "--kill-self", "120"),
        ),
    }
    if importlib.util.find_spec("accelerate") is not None:
        jobs["accelerate"] = lambda: _run(
            "--mode", "apply", "--json", str(d / "accelerate" / "report.json"), *FAST, *_script("accelerate_train.py")
        )
    if _TORCHRUN is not None:
        jobs["torchrun"] = lambda: _run(
            "--json", str(d / "torchrun" / "report.json"), "--log-dir", str(d / "torchrun" / "logs"), *FAST, "--",
            _TORCHRUN,
            "--standalone",  # a free port: other jobs on the machine may hold torchrun's default
            "--nproc-per-node", "2", str(FIXTURES / "ddp_train.py"), "--steps", "30",
        )
    if importlib.util.find_spec("pytorch_lightning") is not None:
        jobs["lightning"] = lambda: _run(
            "--json", str(d / "lightning" / "report.json"), *FAST, *_script("lightning_train.py", "--steps", "24")
        )
    return jobs


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Future, Path]]:
    """Runs every job of ``_job_commands`` to its end before the first test reads one, two at a
    time: each mostly imports torch, then waits on its simulated I/O or steps, so two share the
    machine's cores without changing what either reports (no timing is asserted). Maps a job's
    name to its future (whose result raises what running it raised) and its directory."""
    d = tmp_path_factory.mktemp("jobs")
    commands = _job_commands(d)
    for name in commands:
        (d / name).mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(command) for name, command in commands.items()}
    return {name: (future, d / name) for name, future in futures.items()}


def _job(jobs: dict[str, tuple[Future, Path]], name: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    future, where = jobs[name]
    return future.result(), where


@pytest.mark.timeout(120)
def test_recommend_passes_the_job_through_and_reports_each_loader(jobs) -> None:
    result, tmp_path = _job(jobs, "recommend")
    report = tmp_path / "report.json"
    plain, _ = _job(jobs, "plain")  # the same job without loadertune

    # The job's own output and status, unchanged; the same RNG draws as without loadertune.
    assert result.returncode == 3 == plain.returncode
    assert result.stdout.splitlines()[0] == "stdout: training starts"
    ids = [line for line in result.stdout.splitlines() if line.startswith("first batch ids")]
    assert ids == [line for line in plain.stdout.splitlines() if line.startswith("first batch ids")]
    assert "stderr: a line of the job's own" in result.stderr
    ours = [line for line in result.stderr.splitlines() if line.startswith("[loadertune]")]
    assert ours and all(
        line.startswith("[loadertune]") or "a line of the job's own" in line or not line.strip()
        for line in result.stderr.splitlines()
    )

    document = json.loads(report.read_text())
    assert document["exit_status"] == 3 and document["mode"] == "recommend"
    train_site = _site("latency_train.py", "train = DataLoader(")
    (train,) = _loaders(document, train_site)
    assert train["role"] == "training"
    assert train["rank"] is None
    assert train["kind"] == "data_starved"
    assert train["loader"]["site"]["code"].startswith("train = DataLoader(SlowDataset(")
    assert train["loader"]["config"]["num_workers"] == 0
    assert train["loader"]["final_config"]["num_workers"] == 0  # recommend changes nothing
    target = train["loader"]["recommendation"]["config"]["num_workers"]
    assert target >= 2
    assert train["change"] == f"DataLoader(..., num_workers={target})"
    (val,) = _loaders(document, _site("latency_train.py", "val = DataLoader("))
    assert val["role"] == "evaluation" and val["role_reason"] == "iterated with autograd off"

    text = "\n".join(ours)
    assert f"{train_site}: train = DataLoader(" in text
    assert "limited by: Data-starved" in text
    assert f"change the code: DataLoader(..., num_workers={target})" in text
    assert "Evaluation loaders (reported apart):" in text
    # Per-process event logs and reports, kept in --log-dir.
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert any(name.endswith(".report.json") for name in logs)
    assert any(name.endswith(f"-{train_site.replace('.py:', '-')}.jsonl") for name in logs)


@pytest.mark.timeout(120)
def test_apply_tunes_the_training_loader_in_the_same_order(jobs) -> None:
    result, where = _job(jobs, "apply")
    report = where / "report.json"
    assert result.returncode == 0, result.stderr
    # tune() keeps the sample order: the same first batch as the untouched loader draws.
    plain_ids = "first batch ids: [11226.0, 91366.0, 80555.0, 44095.0]"
    assert plain_ids in result.stdout
    document = json.loads(report.read_text())
    (train,) = _loaders(document, _site("latency_train.py", "train = DataLoader("))
    assert train["loader"]["mode"] == "apply" and train["loader"]["not_tuned"] is None
    workers = train["loader"]["final_config"]["num_workers"]
    assert workers > 0
    assert train["change"] == f"DataLoader(..., num_workers={workers})"
    assert f"to keep it without loadertune: DataLoader(..., num_workers={workers})" in result.stderr
    # The validation loader runs under no_grad: observed, not replaced.
    (val,) = _loaders(document, _site("latency_train.py", "val = DataLoader("))
    assert val["loader"]["mode"] == "recommend"
    assert "autograd off" in val["loader"]["not_tuned"]


@pytest.mark.timeout(120)
def test_apply_observes_accelerate_prepared_loaders_and_says_why(jobs) -> None:
    pytest.importorskip("accelerate")
    result, where = _job(jobs, "accelerate")
    report = where / "report.json"
    assert result.returncode == 0, result.stderr
    assert "seen 400 samples" in result.stdout
    (item,) = json.loads(report.read_text())["loaders"]
    assert item["name"] == _site("accelerate_train.py", "accelerator.prepare(")
    assert item["loader"]["mode"] == "recommend"
    assert "prepared by accelerate" in item["loader"]["not_tuned"]
    assert "observed, not tuned: it was prepared by accelerate" in result.stderr


@pytest.mark.timeout(120)
def test_torchrun_two_gloo_ranks_report_per_rank_without_hanging(jobs) -> None:
    if _TORCHRUN is None:
        pytest.skip("torchrun not installed beside this python")
    result, tmp_path = _job(jobs, "torchrun")
    report = tmp_path / "report.json"
    assert result.returncode == 0, result.stderr
    # The ranks share the output pipe (through torchrun's agent), so their lines may interleave:
    # find each rank's line in the whole output rather than line by line.
    assert sorted(re.findall(r"rank (\d): done 30 steps", result.stdout)) == ["0", "1"]
    document = json.loads(report.read_text())
    train = _loaders(document, _site("ddp_train.py", "train = DataLoader("))
    assert sorted(item["rank"] for item in train) == [0, 1]
    assert all(item["role"] == "training" and item["loader"]["batches"] == 30 for item in train)
    # Only rank 0 validates; its loader is reported apart and nobody waited for rank 1's.
    val = _loaders(document, _site("ddp_train.py", "val = DataLoader("))
    assert [(item["rank"], item["role"]) for item in val] == [(0, "evaluation")]
    # torchrun's own process imports torch but iterates nothing: it writes no report.
    assert sorted(p["rank"] for p in document["processes"]) == [0, 1]
    names = sorted(p.name for p in (tmp_path / "logs").iterdir() if p.name.endswith(".report.json"))
    assert [name.split("-")[0] for name in names] == ["rank0", "rank1"]
    assert "(rank 0)" not in result.stderr  # ranks are blocks under one site
    assert "  rank 0 [" in result.stderr and "  rank 1 [" in result.stderr


@pytest.mark.timeout(120)
def test_under_a_lightning_trainer(jobs) -> None:
    pytest.importorskip("pytorch_lightning")
    result, where = _job(jobs, "lightning")
    report = where / "report.json"
    assert result.returncode == 0, result.stderr
    assert "trained 24 steps" in result.stdout
    document = json.loads(report.read_text())
    # Sites name the user's code, not Lightning's frames.
    (train,) = _loaders(document, _site("lightning_train.py", "SlowDataset(2_000"))
    assert train["role"] == "training" and train["loader"]["batches"] == 24
    assert train["kind"] is not None
    (val,) = _loaders(document, _site("lightning_train.py", "SlowDataset(64"))
    assert val["role"] == "evaluation"  # the sanity check and validation run under no_grad


@pytest.mark.timeout(120)
def test_under_the_hugging_face_trainer(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    report = tmp_path / "report.json"
    result = _run("--json", str(report), *FAST, *_script("hf_trainer_train.py", "--steps", "24"))
    assert result.returncode == 0, result.stderr
    assert "trained 24 steps" in result.stdout
    site = _site("hf_trainer_train.py", "trainer.train()")
    items = _loaders(json.loads(report.read_text()), site)
    # The Trainer builds the loaders; the site is the user's line that made it, and the change
    # is written in the Trainer's own settings.
    roles = sorted(item["role"] for item in items)
    assert roles == ["evaluation", "evaluation", "training"]
    (train,) = [item for item in items if item["role"] == "training"]
    assert train["loader"]["site"]["via"].startswith("transformers.")
    if train["change"] is not None:
        assert train["change"].startswith("TrainingArguments(..., dataloader_num_workers=")


@pytest.mark.timeout(120)
def test_signals_reach_the_job_and_its_status_comes_back() -> None:
    cmd = [sys.executable, "-m", "loadertune", "run", "--quiet", *_script("wait_for_signal.py", "--catch-term")]
    for sent, status, said in ((signal.SIGTERM, 7, "job: got SIGTERM"), (signal.SIGINT, 130, "KeyboardInterrupt")):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline().strip() == "ready"
            proc.send_signal(sent)
            out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
        assert proc.returncode == status, err
        assert said in out + err
        # The report still comes, from what the job wrote at exit.
        assert "[loadertune] report (recommend mode): 1 DataLoader(s)" in err


@pytest.mark.timeout(120)
def test_a_killed_job_leaves_its_last_window(jobs) -> None:
    result, where = _job(jobs, "killed")
    report = where / "report.json"
    assert result.returncode == 128 + signal.SIGKILL
    document = json.loads(report.read_text())
    assert document["exit_status"] == 137
    assert [p["complete"] for p in document["processes"]] == [False]
    (item,) = document["loaders"]
    assert item["loader"]["metrics"] is not None  # the windows that closed before the kill
    assert "1 process(es) ended without a normal exit" in result.stderr


@pytest.mark.timeout(60)
def test_processes_without_torch_pay_nothing_and_other_sitecustomize_still_runs(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "sitecustomize.py").write_text("import sys\nsys.stdout.write('their sitecustomize ran\\n')\n")
    env = dict(os.environ, PYTHONPATH=str(theirs))
    code = (
        "import sys, threading, sitecustomize; "
        "print(sorted(m for m in sys.modules if m.startswith('loadertune')), threading.active_count(), "
        "sitecustomize.__file__)"
    )
    result = _run("--", sys.executable, "-c", code, env=env)
    assert result.returncode == 0, result.stderr
    # Once in loadertune's own process (it has the same PYTHONPATH), once in the job.
    *theirs_ran, last = result.stdout.splitlines()
    assert theirs_ran == ["their sitecustomize ran"] * 2
    assert last == f"[] 1 {theirs / 'sitecustomize.py'}"
    assert "no DataLoader was iterated" in result.stderr


@pytest.mark.timeout(60)
def test_command_errors_exit_like_a_shell() -> None:
    assert _run("--", "no-such-command-loadertune").returncode == 127
    missing = _run()
    assert missing.returncode == 2 and "give the command to run after --" in missing.stderr
    bad = _run("--ram-budget-share", "2", "--", sys.executable, "-c", "pass")
    assert bad.returncode == 2 and "ram_budget_share" in bad.stderr
    nowhere = _run("--json", "/no/such/dir/r.json", "--", sys.executable, "-c", "print('ran')")
    assert nowhere.returncode == 2 and "ran" not in nowhere.stdout and "--json" in nowhere.stderr


# -- the pieces -----------------------------------------------------------------------------------
def test_child_environment_puts_the_boot_directory_first() -> None:
    env = child_environment(
        {"PYTHONPATH": "/theirs", "HOME": "/h"}, run_dir="/tmp/r", run_id="7", options={"mode": "apply"}, quiet=True
    )
    assert env["PYTHONPATH"] == os.pathsep.join([boot_dir(), "/theirs"])
    assert Path(boot_dir(), "sitecustomize.py").is_file()
    assert env["HOME"] == "/h" and env["LOADERTUNE_RUN_DIR"] == "/tmp/r" and env["LOADERTUNE_RUN_ID"] == "7"
    assert json.loads(env["LOADERTUNE_RUN_OPTIONS"]) == {"mode": "apply"}
    assert env["LOADERTUNE_RUN_QUIET"] == "1"
    assert child_environment({}, run_dir="d", run_id="i", options={}, quiet=False)["PYTHONPATH"] == boot_dir()


def test_exit_status_follows_the_shell_convention() -> None:
    assert [exit_status(code) for code in (0, 3, -2, -15, -9)] == [0, 3, 130, 143, 137]


def test_code_change_writes_only_what_differs_from_torch_defaults() -> None:
    before = {"num_workers": 0, "batch_size": 32, "prefetch_factor": None, "pin_memory": False, "persistent_workers": False}
    after = {**before, "num_workers": 8, "prefetch_factor": 2, "persistent_workers": True}
    assert code_change(before, after) == "DataLoader(..., num_workers=8, persistent_workers=True)"
    assert code_change(before, {**after, "prefetch_factor": 4}) == (
        "DataLoader(..., num_workers=8, prefetch_factor=4, persistent_workers=True)"
    )
    assert code_change(before, {**before, "batch_size": 64}, "MyLoader") == "MyLoader(..., batch_size=64)"
    assert code_change(before, before) is None


def _entry(**changes: object) -> dict:
    config = {"num_workers": 0, "batch_size": 32, "prefetch_factor": None, "pin_memory": False, "persistent_workers": False}
    entry = {
        "site": {"path": "/x/train.py", "line": 9, "function": "main", "code": "dl = DataLoader(ds)", "name": "train.py:9"},
        "index": 0,
        "class": "DataLoader",
        "mode": "recommend",
        "not_tuned": None,
        "error": None,
        "batches": 100,
        "samples": 3200,
        "epochs": 1,
        "wait_s": 0.1,
        "busy_s": 2.0,
        "grad_off_batches": 0,
        "shuffled": True,
        "config": config,
        "final_config": config,
        "metrics": {"samples_per_s": 1600.0, "wait_share": 0.02},
        "diagnosis": {"kind": "balanced", "summary": "Balanced: the loop waited 2% of the time.", "advice": []},
        "recommendation": None,
        "summary": None,
    }
    entry.update(changes)
    return entry


def test_a_balanced_loader_is_not_the_bottleneck() -> None:
    process = ProcessReport(run_id="r", pid=11, rank=None, mode="recommend", final=True, loaders=[_entry()])
    document = report_json([process], command=["python", "train.py"], mode="recommend", exit_status=0, log_dir=None)
    lines = format_report(document)
    assert lines[0] == "report (recommend mode): 1 DataLoader(s) in 1 process(es)"
    assert lines[1] == "train.py:9: dl = DataLoader(ds)"
    assert lines[2].startswith("  pid 11 [num_workers=0, batch_size=32]: 100 batches in 1 epoch(s), 1600 samples/s")
    assert "    not the bottleneck: leave it as it is" in lines


def test_roles_training_evaluation_brief() -> None:
    assert classify(_entry()) == ("training", "")
    assert classify(_entry(grad_off_batches=60)) == ("evaluation", "iterated with autograd off")
    assert classify(_entry(shuffled=False), shuffled_elsewhere=True)[0] == "evaluation"
    assert classify(_entry(shuffled=False))[0] == "training"
    assert classify(_entry(metrics=None, batches=3, busy_s=0.2)) == (
        "brief",
        "3 batches in 0.2 s: shorter than one measurement window",
    )


def test_an_interrupted_process_is_flagged() -> None:
    process = ProcessReport(run_id="r", pid=11, rank=1, mode="recommend", final=False, loaders=[_entry()])
    document = report_json([process], command=["x"], mode="recommend", exit_status=143, log_dir=None)
    assert "1 process(es) ended without a normal exit" in format_report(document)[0]
    assert document["processes"] == [{"pid": 11, "rank": 1, "argv": [], "complete": False, "loaders": 1}]


def test_workers_for_an_iterable_dataset_come_with_their_condition() -> None:
    target = {"num_workers": 4, "batch_size": 32, "prefetch_factor": 2, "pin_memory": False, "persistent_workers": False}
    rec = {"config": target, "reason": "r", "expected_speedup": 3.0, "lr_factor": None, "changes": {}}
    diagnosis = {"kind": "data_starved", "summary": "Data-starved.", "advice": []}
    entry = _entry(iterable=True, recommendation=rec, diagnosis=diagnosis, shuffled=None)
    process = ProcessReport(run_id="r", pid=11, rank=0, mode="recommend", final=True, loaders=[entry])
    document = report_json([process], command=["x"], mode="recommend", exit_status=0, log_dir=None)
    (item,) = document["loaders"]
    assert item["change"] == "DataLoader(..., num_workers=4)"
    assert "get_worker_info()" in item["caveat"]
    lines = format_report(document)
    assert lines[2].startswith("  rank 0 [")
    assert any(line.startswith("    but only if the IterableDataset splits its items") for line in lines)
