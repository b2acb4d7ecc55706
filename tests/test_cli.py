"""The command line through its real entry point: ``python -m loadertune ...`` in a subprocess.

Budgets are small (a few seconds) so the whole file runs in well under a minute on two cores;
the bad-input cases run concurrently. Assertions are about behaviour, never about speed, except
the demo's "after > before", which the latency-bound load gives by a factor of several.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

TARGET_SOURCE = """
import time
import torch
from torch.utils.data import DataLoader, Dataset

class Tiny(Dataset):
    def __len__(self):
        return 100_000
    def __getitem__(self, i):
        time.sleep(0.002)
        return torch.full((8,), float(i))

dataset = Tiny()
loader = DataLoader(dataset, batch_size=8)
"""

INTERRUPT_BATCH = 16
#: Worker 0 loads batches 0, 2, 4... (round robin over 2 workers) and interrupts on the first
#: sample of its 9th, batch 16. The loader keeps 4 batches in flight, so batch 16 is requested
#: only after batch 12 was consumed: 13-16 batches consumed, minus the 5 of the warm-up, leaves
#: 8-11 measured intervals, enough for a partial rate (2) and too few for the point to end on
#: its own (16 for a "precise" rate; the 200 s budget share is out of reach).
INTERRUPT_AT_SAMPLE = 8 * INTERRUPT_BATCH + 1

INTERRUPTING_SOURCE = f"""
import os
import signal
import time

import torch
from torch.utils.data import Dataset, get_worker_info

HERE = os.path.dirname(os.path.abspath(__file__))
CLI_PID = os.getpid()  # imported by the CLI process; forked workers inherit it


class Interrupting(Dataset):
    def __init__(self):
        self.served = 0  # per worker: each has its own copy

    def __len__(self):
        return 100_000

    def __getitem__(self, i):
        info = get_worker_info()
        if info is not None:
            if self.served == 0:
                with open(os.path.join(HERE, "pids.txt"), "a") as fh:
                    fh.write(f"{{os.getpid()}}\\n")
            self.served += 1
            if info.id == 0 and self.served == {INTERRUPT_AT_SAMPLE}:
                try:  # once per test, whatever happens after
                    os.close(os.open(os.path.join(HERE, "interrupted"), os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    pass
                else:
                    os.kill(CLI_PID, signal.SIGINT)
        time.sleep(0.002)
        return torch.full((8,), float(i))


dataset = Interrupting()
"""

# Objects of the wrong kind, without importing torch, so the error cases start fast.
NO_TORCH_SOURCE = """
number = 42

def needs_args(path):
    return path
"""

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}


def loadertune(*args, cwd=None, timeout=120, block=()):
    """Runs the CLI as a user would; returns the CompletedProcess (text mode).

    ``block`` names optional packages to hide, as if they were not installed.
    """
    if block:
        code = (
            f"import sys; sys.modules.update(dict.fromkeys({list(block)!r})); "
            f"from loadertune.cli import main; raise SystemExit(main({list(args)!r}))"
        )
        cmd = [sys.executable, "-c", code]
    else:
        cmd = [sys.executable, "-m", "loadertune", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=ENV, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "tiny.py").write_text(textwrap.dedent(TARGET_SOURCE))
    (root / "plain.py").write_text(textwrap.dedent(NO_TORCH_SOURCE))
    (root / "broken.py").write_text("def oops(:\n")
    (root / "raises.py").write_text("raise RuntimeError('cannot reach the bucket')\n")
    (root / "garbage.jsonl").write_text("this is not json\n")
    (root / "empty.jsonl").write_text("")
    return root


# -- probe -------------------------------------------------------------------------------------


def test_probe_reports_the_machine():
    # NVML hidden, so the GPU line is the same on every host: one line with the reason.
    r = loadertune("probe", block=("pynvml",))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith("System\n")
    for label in ("Python", "torch", "CPUs", "RAM", "/dev/shm", "Speed flags", "cudnn.benchmark="):
        assert label in out
    gpu_lines = [line for line in out.splitlines() if line.strip().startswith("GPU")]
    assert len(gpu_lines) == 1
    assert gpu_lines[0].split()[1:3] == ["no", "GPU:"]
    assert "NVML could not be queried (ModuleNotFoundError" in gpu_lines[0]
    assert r.stderr == ""


def test_version():
    r = loadertune("--version")
    assert r.returncode == 0, r.stderr
    from loadertune import __version__

    assert r.stdout.strip() == f"loadertune {__version__}"


def test_probe_json_without_target():
    r = loadertune("probe", "--json")
    assert r.returncode == 0, r.stderr
    system = json.loads(r.stdout)["system"]
    assert set(system) >= {
        "python",
        "torch",
        "gpus",
        "no_gpu_reason",
        "cpu",
        "memory",
        "shm",
        "warnings",
    }
    assert system["cpu"]["usable"] >= 1
    assert set(system["torch"]["flags"]) >= {
        "cudnn_benchmark",
        "cudnn_deterministic",
        "deterministic_algorithms",
        "costs",
    }
    assert system["shm"]["total_bytes"] > 0
    assert isinstance(system["gpus"], list)
    assert system["gpus"] or system["no_gpu_reason"]
    assert r.stderr == ""


def test_probe_sweeps_a_target_json_and_plot(files, tmp_path):
    png = tmp_path / "sweep.png"
    r = loadertune(
        "probe",
        "tiny.py:loader",
        "--budget",
        "3",
        "--workers",
        "0,1,2",
        "--json",
        "--plot",
        str(png),
        cwd=files,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # --json: no progress, nothing but errors
    doc = json.loads(r.stdout)
    assert set(doc) >= {"system", "sweep", "recommended", "target", "batch_size", "stopped"}
    assert doc["batch_size"] == 8  # the DataLoader's
    assert [p["num_workers"] for p in doc["sweep"]] == [0, 1, 2]
    for p in doc["sweep"]:
        assert set(p) >= {
            "num_workers",
            "samples_per_s",
            "batches",
            "seconds",
            "rel_stderr",
            "worker_mem_bytes",
        }
        assert p["samples_per_s"] > 0 and p["batches"] >= 2
    assert doc["sweep"][0]["worker_mem_bytes"] is None
    assert doc["sweep"][2]["worker_mem_bytes"] > 0
    rec = doc["recommended"]
    assert set(rec) >= {"num_workers", "batch_size", "samples_per_s", "ram_bytes", "shm_bytes"}
    best = max(p["samples_per_s"] for p in doc["sweep"])
    assert rec["samples_per_s"] >= 0.95 * best
    # Whichever count wins (0 included): workers x prefetch x batch bytes of /dev/shm, and
    # workers x one worker's memory of RAM.
    assert rec["shm_bytes"] == rec["num_workers"] * 2 * 8 * 8 * 4
    assert rec["ram_bytes"] == rec["num_workers"] * (rec["worker_mem_bytes"] or 0)
    assert png.stat().st_size > 1000


def test_probe_plain_text_table_and_progress_without_rich(files):
    r = loadertune(
        "probe", "tiny.py:dataset", "--budget", "2", "--workers", "0-1", cwd=files, block=("rich",)
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("workers"))
    assert lines[header].split()[:3] == ["workers", "samples/s", "stderr"]
    assert lines[header + 1].startswith("-------")
    assert [line.split()[0] for line in lines[header + 2 : header + 4]] == ["0", "1"]
    assert any(line.startswith("Recommended: num_workers=") for line in lines)
    assert "batch_size=32" in r.stdout  # a bare Dataset: the default batch size
    # The plain progress counter (one line redrawn with \r, which text mode reads as newlines).
    assert "/2 s  num_workers=0: " in r.stderr


def test_plot_without_matplotlib_names_the_extra(files):
    r = loadertune(
        "probe", "tiny.py:dataset", "--plot", "out.png", cwd=files, block=("matplotlib",)
    )
    assert r.returncode == 2
    assert r.stderr.strip() == (
        "loadertune probe: error: --plot needs matplotlib, which is not installed; "
        "pip install 'loadertune[plot]'"
    )
    assert r.stdout == ""


@pytest.mark.timeout(120)
def test_ctrl_c_prints_partial_results_and_leaves_no_worker(tmp_path):
    # The dataset itself presses Ctrl-C at a fixed point of the stream (no timing: see
    # INTERRUPTING_SOURCE), inside the first point, after its warm-up, before it can finish.
    (tmp_path / "interrupting.py").write_text(textwrap.dedent(INTERRUPTING_SOURCE))
    r = loadertune(
        "probe",
        "interrupting.py:dataset",
        "--batch-size",
        str(INTERRUPT_BATCH),
        "--budget",
        "600",
        "--workers",
        "2,4,8",
        cwd=tmp_path,
        timeout=100,
    )
    assert (tmp_path / "interrupted").exists()  # the SIGINT was sent, once
    assert r.returncode == 130, r.stderr
    assert "interrupted: partial results" in r.stdout
    assert f"Recommended so far (partial sweep): num_workers=2, batch_size={INTERRUPT_BATCH}" in (
        r.stdout
    )
    assert "interrupted" in r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr
    pids = [int(line) for line in (tmp_path / "pids.txt").read_text().split()]
    assert len(pids) == 2  # the first point's two workers, and no later point started
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"worker processes left behind: {alive}"


# -- demo and report -----------------------------------------------------------------------------


DEMO_STEP_MS, DEMO_SAMPLE_MS, DEMO_BATCH = 30.0, 5.0, 8


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The demo twice at once, with --json and a log file, and as text: both sleep far more than
    they compute (the costs are simulated), so they share the machine without changing each
    other's outcome."""
    log = tmp_path_factory.mktemp("demo") / "run.jsonl"
    with ThreadPoolExecutor(max_workers=2) as pool:
        text = pool.submit(loadertune, "demo", "--seconds", "5")
        as_json = pool.submit(
            loadertune,
            "demo",
            "--seconds",
            "5",
            "--step-ms",
            f"{DEMO_STEP_MS:g}",
            "--sample-ms",
            f"{DEMO_SAMPLE_MS:g}",
            "--batch-size",
            str(DEMO_BATCH),
            "--json",
            "--log-file",
            str(log),
        )
        return {"text": text.result(), "json": (as_json.result(), log)}


@pytest.fixture(scope="module")
def demo_run(demo_runs):
    return demo_runs["json"]


def test_demo_speeds_up_the_loader(demo_run):
    r, _ = demo_run
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    doc = json.loads(r.stdout)
    assert set(doc) >= {
        "before_samples_per_s",
        "after_samples_per_s",
        "speedup",
        "final_config",
        "rebuilds",
        "seconds",
    }
    assert doc["after_samples_per_s"] > doc["before_samples_per_s"]
    assert doc["speedup"] > 1
    assert doc["final_config"]["num_workers"] > 0
    assert doc["initial_config"]["num_workers"] == 0
    assert doc["rebuilds"] >= 1
    assert doc["seconds"] >= 5
    # The options reach the run: the batch size is what the loop got, and the rates stay under
    # the ceilings the simulated costs set (sleeps never end early, so no load can break these):
    # at num_workers=0 a batch costs its samples' waits plus the step; the step alone bounds
    # every rate. 10% over for a window's batches counted over one interval fewer.
    assert doc["settings"] == {
        "step_ms": DEMO_STEP_MS,
        "sample_ms": DEMO_SAMPLE_MS,
        "batch_size": DEMO_BATCH,
        "window_s": 1.0,
    }
    assert doc["final_config"]["batch_size"] == DEMO_BATCH
    assert doc["samples"] % DEMO_BATCH == 0
    at_zero = DEMO_BATCH / ((DEMO_BATCH * DEMO_SAMPLE_MS + DEMO_STEP_MS) / 1000)
    assert doc["before_samples_per_s"] <= 1.1 * at_zero
    assert doc["after_samples_per_s"] <= 1.1 * DEMO_BATCH / (DEMO_STEP_MS / 1000)


def test_a_probes_ctrl_c_is_taken_between_batches_and_a_second_one_at_once():
    import signal

    from loadertune.cli.measure import _sigint_between_batches

    before = signal.getsignal(signal.SIGINT)
    with _sigint_between_batches() as pressed:
        signal.raise_signal(signal.SIGINT)  # arrives while torch hands over a batch: only noted
        assert pressed == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # pressed again: the user is not held
    assert signal.getsignal(signal.SIGINT) is before


class _ShortEpochs:
    """A loader on a virtual clock whose epochs are shorter than what its workers hold in
    flight: each epoch's first batch waits for the pipeline to refill (10 s), the rest come
    from the backlog (1 s each)."""

    batch_sampler = object()  # automatic batching: a batch is 4 samples
    prefetch_factor = 2

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def __iter__(self):
        import torch

        for i in range(5):
            self.now += 10.0 if i == 0 else 1.0
            yield torch.zeros(4)


def test_a_probe_over_short_epochs_counts_the_wait_between_them():
    from loadertune.cli.measure import measure_point

    loader = _ShortEpochs()
    point, _ = measure_point(loader, 1, 2000.0, lambda _line: None, clock=loader.clock)
    # A training loop over this loader makes 5 batches of 4 per 14 s; leaving the epochs'
    # boundaries out read the backlog draining: 4 samples/s.
    assert point.samples_per_s == pytest.approx(20 / 14, rel=0.1)


def test_report_on_the_demo_log(demo_run):
    _, log = demo_run
    r = loadertune("report", str(log))
    assert r.returncode == 0, r.stderr
    assert "Run: apply mode" in r.stdout
    assert "Configurations over time" in r.stdout
    assert "change: num_workers 0 ->" in r.stdout
    j = loadertune("report", str(log), "--json")
    (run,) = json.loads(j.stdout)["runs"]
    assert run["mode"] == "apply"
    assert run["changes"][0]["changes"]["num_workers"][0] == 0
    assert run["changes"][0]["after_samples_per_s"] > run["changes"][0]["before_samples_per_s"]


def test_demo_text_shows_status_and_summary(demo_runs):
    r = demo_runs["text"]
    assert r.returncode == 0, r.stderr
    assert "Before and after" in r.stdout
    assert "x the samples/s after" in r.stdout
    assert "samples/s" in r.stderr and "num_workers=" in r.stderr
    assert "change: num_workers 0 ->" in r.stderr


# -- bad input -----------------------------------------------------------------------------------

BAD = {
    "no_command": ([], "required: COMMAND"),
    "unknown_command": (["frobnicate"], "invalid choice"),
    "missing_module": (["probe", "surely_no_such_module_xyz:data"], "no module named"),
    "syntax_error": (["probe", "broken.py:data"], "SyntaxError"),
    "import_raises": (["probe", "raises.py:data"], "RuntimeError: cannot reach the bucket"),
    "missing_name": (["probe", "plain.py:nothing_here"], "has no 'nothing_here'"),
    "wrong_type": (["probe", "plain.py:number"], "is an int"),
    "needs_args": (["probe", "plain.py:needs_args"], "needs argument(s) path"),
    "missing_file": (["probe", "nowhere.py:data"], "no file"),
    "no_colon": (["probe", "tiny"], "no ':name' part"),
    "workers_letters": (["probe", "tiny.py:dataset", "--workers", "a,b"], "--workers"),
    "workers_backwards": (["probe", "tiny.py:dataset", "--workers", "8-2"], "runs backwards"),
    "workers_zero_step": (["probe", "tiny.py:dataset", "--workers", "0:8:0"], "step"),
    "workers_without_target": (["probe", "--workers", "0,1"], "need(s) a TARGET"),
    "budget_text": (["probe", "tiny.py:dataset", "--budget", "soon"], "--budget"),
    "budget_negative": (["probe", "tiny.py:dataset", "--budget=-5"], "positive number of seconds"),
    "budget_nan": (["probe", "tiny.py:dataset", "--budget", "nan"], "positive number of seconds"),
    "plot_extension": (["probe", "tiny.py:dataset", "--plot", "out.txt"], ".png"),
    "demo_too_short": (["demo", "--seconds", "1"], "too short"),
    "demo_step_zero": (["demo", "--step-ms", "0"], "--step-ms"),
    "demo_sample_text": (["demo", "--sample-ms", "slow"], "--sample-ms"),
    "demo_batch_zero": (["demo", "--batch-size", "0"], "--batch-size"),
    "probe_batch_negative": (["probe", "tiny.py:dataset", "--batch-size", "-4"], "--batch-size"),
    "probe_batch_without_target": (["probe", "--batch-size", "4"], "need(s) a TARGET"),
    "demo_log_dir": (["demo", "--log-file", "no/such/dir/run.jsonl"], "does not exist"),
    "report_missing": (["report", "nowhere.jsonl"], "no such file"),
    "report_garbage": (["report", "garbage.jsonl"], "not a JSON line"),
    "report_empty": (["report", "empty.jsonl"], "holds no events"),
}
DEBUG = {
    "debug_import_raises": (["--debug", "probe", "raises.py:data"], "cannot reach the bucket"),
    "debug_after_command": (["report", "nowhere.jsonl", "--debug"], "no such file"),
}


@pytest.fixture(scope="module")
def bad_runs(files):
    cases = {**BAD, **DEBUG}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {
            name: pool.submit(loadertune, *args, cwd=files) for name, (args, _) in cases.items()
        }
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line(bad_runs, case):
    r = bad_runs[case]
    _, says = BAD[case]
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("loadertune")
    assert "error:" in lines[0]
    assert says in lines[0]
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("case", sorted(DEBUG))
def test_debug_shows_the_traceback(bad_runs, case):
    r = bad_runs[case]
    _, says = DEBUG[case]
    assert r.returncode == 2
    assert "Traceback (most recent call last)" in r.stderr
    assert says in r.stderr.strip().splitlines()[-1]


def test_a_dataset_that_fails_while_measured_exits_1(tmp_path):
    (tmp_path / "failing.py").write_text(
        textwrap.dedent(
            """
            from torch.utils.data import Dataset

            class Failing(Dataset):
                def __len__(self):
                    return 100
                def __getitem__(self, i):
                    raise KeyError(f"sample {i} is missing")

            data = Failing()
            """
        )
    )
    r = loadertune("probe", "failing.py:data", "--budget", "2", "--workers", "0", cwd=tmp_path)
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("loadertune probe: error: KeyError: ")
    assert "sample" in last and "--debug" in last
    assert "Traceback" not in r.stderr


# -- the package stays cheap ---------------------------------------------------------------------


def test_importing_the_cli_loads_no_heavy_module():
    code = (
        "import sys, loadertune, loadertune.cli; "
        "print(sorted(m for m in ('torch', 'rich', 'matplotlib', 'pynvml') if m in sys.modules))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60
    )
    assert r.stdout.strip() == "[]"


def test_help_lists_the_commands():
    r = loadertune("--help")
    assert r.returncode == 0
    for command in ("probe", "demo", "report"):
        assert command in r.stdout


# -- the machine report's warnings (pure) ----------------------------------------------------------


def _facts(shm_total=8 << 30, quota=None, affinity=8, throttled=0, limit=None):
    return {
        "shm": {"total_bytes": shm_total, "free_bytes": shm_total},
        "cpu": {
            "affinity": affinity,
            "cgroup_quota_cores": quota,
            "usable": min(affinity, int(quota + 0.999)) if quota else affinity,
            "cgroup_throttled_periods": throttled,
        },
        "memory": {"total_bytes": 64 << 30, "cgroup_limit_bytes": limit},
    }


def test_a_healthy_machine_has_no_warning():
    from loadertune.cli.system import system_warnings

    assert system_warnings(_facts()) == []


def test_dockers_default_shm_is_called_out_with_the_fix():
    from loadertune.cli.system import system_warnings

    (note,) = system_warnings(_facts(shm_total=64 << 20))
    assert "/dev/shm is only 64.0 MiB" in note
    assert "--shm-size" in note


def test_a_binding_cpu_quota_throttling_and_memory_limit_are_called_out():
    from loadertune.cli.system import system_warnings

    notes = system_warnings(_facts(quota=2.0, throttled=17, limit=8 << 30))
    assert any("quota of 2 cores binds although 8 CPUs are visible" in n for n in notes)
    assert any("throttled this container 17 times" in n for n in notes)
    assert any("memory limit of 8.0 GiB" in n for n in notes)


def test_progress_and_status_into_a_file_are_lines_not_one_redrawn_line():
    # `loadertune demo 2>log` once wrote every update onto one line of \r redraws.
    import io

    from loadertune.cli._output import Progress, StatusLine

    buf = io.StringIO()  # not a terminal
    with Progress(10, stream=buf) as progress:
        for i in range(50):
            progress.update(i * 0.1, f"step {i}")
    with StatusLine(stream=buf) as status:
        for i in range(50):
            status.update(f"status {i}")
        status.message("a message")
    out = buf.getvalue()
    assert "\r" not in out and "\x1b" not in out
    # (all within the 5 s between lines: the first of each, the message, the final status)
    assert out.splitlines() == ["[....................]    0/10 s  step 0", "status 0", "a message", "status 49"]
