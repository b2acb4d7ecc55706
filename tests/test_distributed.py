"""loadertune under torch.distributed: two gloo ranks on CPU, started per test.

Each scenario runs in fresh processes (forked by multiprocessing's fork server), writes what it saw to a JSON file per rank, and
the assertions run here in the parent. Every launch has a deadline, so a hang fails the test
instead of stalling the suite.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from loadertune.config import LoaderConfig
from loadertune.controller import Decision
from loadertune.distributed import combine_metrics, pack_metrics, unpack_metrics
from loadertune.errors import DistributedTimeoutError
from loadertune.metrics import WindowMetrics
from loadertune.planning import Recommendation

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)

WORLD = 2


@pytest.fixture(scope="module", autouse=True)
def _helpers() -> None:
    # The ranks are forked from multiprocessing's fork server, which imports torch and
    # loadertune once for all of them (spawning each would import them again: ~2 s a rank).
    # The server and the resource tracker live as long as this process: started before any
    # test, so that no test counts them as processes it leaked.
    from multiprocessing import forkserver, resource_tracker

    forkserver.set_forkserver_preload(["torch", "loadertune", "loadertune.distributed", __name__])
    forkserver.ensure_running()
    resource_tracker.ensure_running()


# -- helpers run in the ranks ----------------------------------------------------------------------
class _Samples(Dataset):
    """Index-tagged samples whose loading sleeps ``sleep_s`` each (I/O-like, not CPU work)."""

    def __init__(self, n: int, sleep_s: float) -> None:
        self.n = n
        self.sleep_s = sleep_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        x = torch.full((4,), float(i % 7) / 7.0)
        return i, x, x.sum(0, keepdim=True)


def _sim_gpu() -> Any:
    from loadertune.sim import SimulatedGpu

    # Cheap per sample, a fixed 10 ms per step, 1 MiB per sample of a 1 GiB device: a larger
    # batch pays, and there is room to grow.
    return SimulatedGpu(
        step_time_s=lambda b: 0.0002 * b,
        host_overhead_s=0.01,
        memory_bytes=lambda b: b * 2**20,
        total_memory_bytes=2**30,
    )


def _entry(fn: Callable[..., dict], rank: int, store: str, out: str, args: tuple) -> None:
    os.environ.pop("LOCAL_WORLD_SIZE", None)
    # A child of the fork server would start DataLoader workers through it too; ranks started
    # by torchrun fork them, as here.
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(1)
    result: dict[str, Any]
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=30),
        )
        result = {"ok": True, **fn(rank, Path(out), *args)}
    except BaseException as exc:
        result = {
            "ok": False,
            "error_type": type(exc).__name__,
            "is_runtime_error": isinstance(exc, RuntimeError),
            "message": str(exc),
            "time": time.time(),
            "traceback": traceback.format_exc(),
        }
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def _launch(
    fn: Callable[..., dict], tmp_path: Path, *args: Any, deadline_s: float = 45.0
) -> list[dict]:
    """Runs ``fn(rank, tmp_path, *args)`` on two gloo ranks; returns each rank's result."""
    ctx = mp.get_context("forkserver")
    store = tmp_path / "store"
    procs = [
        ctx.Process(target=_entry, args=(fn, rank, str(store), str(tmp_path), args))
        for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    end = time.monotonic() + deadline_s
    for p in procs:
        p.join(max(0.1, end - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    results = []
    for rank in range(WORLD):
        path = tmp_path / f"rank{rank}.json"
        results.append(
            json.loads(path.read_text()) if path.exists() else {"ok": False, "missing": True}
        )
    if hung:
        pytest.fail(f"rank(s) {hung} still running after {deadline_s} s: {results}")
    return results


def _events(tuned: Any, kinds: tuple[str, ...]) -> list[list[Any]]:
    return [[e.kind, e.step, e.data.get("after")] for e in tuned.events if e.kind in kinds]


# -- scenarios -------------------------------------------------------------------------------------
def _primitives(rank: int, tmp: Path) -> dict:
    import loadertune
    from loadertune.distributed import Collective

    c = Collective(timeout_s=10)
    out: dict[str, Any] = {"rank": c.rank, "world_size": c.world_size, "local": c.local_world_size}
    os.environ["LOCAL_WORLD_SIZE"] = "1"
    out["local_env"] = Collective(timeout_s=10).local_world_size
    os.environ.pop("LOCAL_WORLD_SIZE")
    out["max"] = c.max_int(rank * 5 + 1)
    config = LoaderConfig(num_workers=3, batch_size=16)
    mine = Decision("change", config, "rank 0's", lr_factor=2.0) if rank == 0 else "not rank 0's"
    got = c.broadcast(mine)
    out["decision"] = [got.action, got.config.to_dict(), got.reason, got.lr_factor]
    out["none"] = c.broadcast(None if rank == 0 else "x")
    big = bytes(range(256)) * 1000 if rank == 0 else b""
    out["big_ok"] = c.broadcast(big) == bytes(range(256)) * 1000
    row = _metrics(
        wait_share=0.1 + 0.3 * rank, samples_per_s=1000.0 - 100 * rank, stderr=0.01 * (rank + 1)
    )
    out["combined"] = c.reduce_metrics(row).to_dict()

    # A short recommend-mode run: both ranks close windows at the same steps and log the same
    # recommendation, decided on rank 0.
    ds = _Samples(1600, 0.0002 if rank == 0 else 0.001)
    loader = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, shuffle=False))
    tuned = loadertune.tune(
        loader, mode="recommend", gpu=None, host=None, window_s=0.2, min_window_batches=4
    )
    for _ in tuned:
        time.sleep(0.002)
    out["windows"] = [e.step for e in tuned.events if e.kind == "window"]
    rec = tuned.recommendation
    out["recommendation"] = None if rec is None else rec.to_dict()
    tuned.close()

    # A rank that never calls tune(): the others give up at set-up, within the bound.
    if rank == 0:
        began = time.monotonic()
        try:
            Collective(timeout_s=2)
        except DistributedTimeoutError as exc:
            out["setup_error"] = [str(exc), time.monotonic() - began]
        (tmp / "setup_done").write_text("")
    else:
        until = time.monotonic() + 20
        while not (tmp / "setup_done").exists() and time.monotonic() < until:
            time.sleep(0.05)
    return out


def _scripted_window(loop: Any, ticks: Any, config: Any) -> Any:
    """A window measured as a function of the configuration alone: the decisions then depend on
    what the tuner is told, never on how fast a loaded machine ran the ranks.

    Loading takes 0.2 ms a sample in a worker, a step 2 ms plus 0.1 ms a sample on the GPU:
    starved without workers, then steadily under-using the GPU at batch size 8.
    """
    from tests._factories import metrics

    w, bs = config.num_workers, config.batch_size
    load, gpu_s = 0.0002 * bs, 0.0001 * bs
    compute = 0.002 + gpu_s
    bps = min(1 / compute, w / load) if w else 1 / (load + compute)
    wait = max(0.0, 1 / bps - compute)
    return metrics(
        batches=loop.batches,
        samples=loop.batches * bs,
        batches_per_s=bps,
        samples_per_s=bps * bs,
        wait_share=wait * bps,
        wait_s_per_batch=wait,
        compute_s_per_batch=compute,
        rate_rel_stderr=0.01,
        loader_cpu_s_per_batch=0.1 * load,
        gpu_util_mean_pct=100 * gpu_s * bps,
        gpu_util_std_pct=2.0 if wait == 0 else 30.0,
        gpu_idle_share=0.0 if wait == 0 else 0.4,
        gpu_mem_used_bytes=bs * 2**20,
        gpu_mem_total_bytes=16 * 2**30,
        cpu_pct=20.0,
        usable_cpus=2,
    )


def _train_apply(rank: int, tmp: Path, n: int, epochs: int) -> dict:
    import loadertune
    import loadertune.session

    loadertune.session.compute_metrics = _scripted_window
    # The costs measured on the real clock (rebuild stalls, worker start-up per epoch) would let
    # this machine's speed choose between the changes; the test is about ranks moving together.
    loadertune.session.TuningSession._costs = lambda self, *args, **kwargs: {}
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # Rank 1's data is slower: its loader sets the pace of both.
    ds = _Samples(n, 0.0001 if rank == 0 else 0.0002)
    sampler = DistributedSampler(ds, shuffle=True, seed=1)
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    gpu = _sim_gpu()
    tuned = loadertune.tune(
        loader,
        mode="apply",
        gpu=gpu,
        host=None,
        window_s=0.05,
        min_window_batches=4,
        interval_s=0.05,
        allow_batch_size=True,
        optimizer=opt,
        lr_rule="linear",
        max_workers=3,
        dist_timeout_s=20,
    )
    steps: list[list[Any]] = []
    seen: list[list[int]] = []
    for epoch in range(epochs):
        tuned.set_epoch(epoch)
        seen.append([])
        for idx, x, y in tuned:
            gpu.step(len(idx))
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= WORLD
            opt.step()
            steps.append([epoch, len(idx), opt.param_groups[0]["lr"], tuned.num_workers])
            seen[-1].extend(idx.tolist())
    out = {
        "steps": steps,
        "seen": seen,
        "changes": _events(tuned, ("change", "keep", "revert", "retune")),
        "final": tuned.config.to_dict(),
        "weight": model.weight.detach().flatten().tolist(),
    }
    tuned.close()
    return out


def _rebuild_loop(rank: int, tmp: Path, rebuilds: int) -> dict:
    """Issue 19's shape, rebuild after rebuild: loadertune's collectives at every decision, an
    all_reduce at every step, and DataLoader workers forked and shut down each time."""
    from loadertune.distributed import Collective, fork_guard
    from loadertune.shutdown import shutdown_loader

    # A worker's "terminate called ..." goes to the fd 2 it inherits: keep it for the parent.
    err = os.open(tmp / f"stderr{rank}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(err, 2)
    collective = Collective(timeout_s=20)
    ds = _Samples(256, 0.0)
    grad = torch.ones(4)
    exits: list[int | None] = []
    quiet: list[bool] = []
    for k in range(rebuilds):
        row = _metrics(wait_share=0.1 * rank, samples_per_s=100.0, stderr=0.01)
        collective.reduce_metrics(row, step=k)
        config = collective.broadcast(LoaderConfig(1 + k % 2, 8 * (1 + k % 3)), step=k)
        collective.max_int(k, step=k)
        loader = DataLoader(
            ds,
            batch_size=config.batch_size,
            num_workers=config.num_workers + 1,
            sampler=DistributedSampler(ds, shuffle=True, seed=k),
            persistent_workers=k % 2 == 0,
        )
        with fork_guard(collective) as ok:
            it = iter(loader)
        quiet.append(ok)
        workers = list(it._workers)
        for _ in range(3):
            next(it)
            dist.all_reduce(grad)
        shutdown_loader(loader, it)
        exits.extend(w.exitcode for w in workers)
    collective.close()
    return {"exits": exits, "quiet": quiet}


def _rank_lost(rank: int, tmp: Path, how: str, at_step: int, timeout_s: float) -> dict:
    import loadertune

    ds = _Samples(4000, 0.0001)
    loader = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, shuffle=False))
    tuned = loadertune.tune(
        loader,
        mode="recommend" if how == "kill" else "apply",
        gpu=None,
        host=None,
        window_s=0.2,
        min_window_batches=4,
        dist_timeout_s=timeout_s,
    )
    step = 0
    for _ in tuned:
        step += 1
        time.sleep(0.005)
        if rank == 1 and step == at_step:
            (tmp / "lost_at").write_text(str(time.time()))
            if how == "kill":
                os._exit(3)
            # Stalled, not dead: busy elsewhere until rank 0 has given up, then carry on into
            # the next collective.
            until = time.monotonic() + 4 * timeout_s
            while not (tmp / "rank0_failed").exists() and time.monotonic() < until:
                time.sleep(0.05)
    return {"finished": True, "step": step}


def _rank_lost_entry(rank: int, tmp: Path, how: str, at_step: int, timeout_s: float) -> dict:
    try:
        return _rank_lost(rank, tmp, how, at_step, timeout_s)
    except BaseException:
        if rank == 0:
            (tmp / "rank0_failed").write_text("")
        raise


def _accelerate(rank: int, tmp: Path) -> dict:
    import loadertune

    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD)
    )
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    out: dict[str, Any] = {"processes": acc.num_processes}
    ds = _Samples(320, 0.0)
    options = {"mode": "apply", "gpu": None, "host": None, "window_s": 0.1, "min_window_batches": 4}

    # Before prepare: the DistributedSampler shards, and prepare() leaves the TunedLoader as is.
    loader = DataLoader(ds, batch_size=8, sampler=DistributedSampler(ds, seed=3))
    tuned = loadertune.tune(loader, **options)
    out["before_prepared_type"] = type(acc.prepare(tuned)).__name__
    out["before"] = _epochs(tuned, 2)
    tuned.close()

    # After prepare: accelerate shards by striding one permutation that DataLoaderShard.__iter__
    # synchronizes across ranks, an iteration TunedLoader would replace: refused, with the fix.
    prepared = acc.prepare(DataLoader(ds, batch_size=8, shuffle=True))
    try:
        loadertune.tune(prepared, **options)
        out["after_error"] = None
    except ValueError as exc:
        out["after_error"] = str(exc)
    return out


def _epochs(loader: Any, epochs: int) -> list[list[int]]:
    seen = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        seen.append([i for idx, _, _ in loader for i in idx.tolist()])
    return seen


def _metrics(wait_share: float, samples_per_s: float, stderr: float, **extra: Any) -> WindowMetrics:
    return WindowMetrics(
        duration_s=1.0,
        batches=50,
        samples=400,
        samples_per_s=samples_per_s,
        batches_per_s=samples_per_s / 8,
        wait_share=wait_share,
        wait_s_per_batch=wait_share / 50,
        compute_s_per_batch=(1 - wait_share) / 50,
        rate_rel_stderr=stderr,
        **extra,
    )


# -- pure tests (no processes) --------------------------------------------------------------------
def test_pack_roundtrip_keeps_none_and_ints() -> None:
    m = _metrics(0.2, 900.0, 0.03, gpu_util_mean_pct=41.5, gpu_mem_used_bytes=2**33, worker_count=3)
    back = unpack_metrics(pack_metrics(m))
    assert back == m
    assert isinstance(back.gpu_mem_used_bytes, int) and back.cpu_pct is None


def test_combine_takes_the_pace_setting_row() -> None:
    rows = [
        _metrics(0.02, 1000.0, 0.01, gpu_util_mean_pct=80.0, ticks=5),
        _metrics(0.30, 990.0, 0.05, gpu_util_mean_pct=30.0, ticks=7),
        _metrics(0.10, 950.0, 0.02, gpu_util_mean_pct=60.0, ticks=6),
    ]
    c = combine_metrics(rows)
    assert c.wait_share == 0.30 and c.gpu_util_mean_pct == 30.0 and c.ticks == 7
    assert c.samples_per_s == 950.0 and c.batches_per_s == 950.0 / 8
    assert c.rate_rel_stderr == 0.05
    assert combine_metrics(rows) == combine_metrics(list(rows))


def test_combine_tie_and_single_row() -> None:
    a, b = _metrics(0.1, 100.0, 0.0, ticks=1), _metrics(0.1, 100.0, 0.0, ticks=2)
    assert combine_metrics([a, b]).ticks == 1
    assert combine_metrics([a]) == a
    with pytest.raises(ValueError, match="at least one"):
        combine_metrics([])


def test_combine_room_is_the_tightest_rank() -> None:
    rows = [
        _metrics(
            0.3, 100.0, 0.0, gpu_mem_used_bytes=10, gpu_mem_total_bytes=100, worker_mem_bytes=5
        ),
        _metrics(
            0.0,
            100.0,
            0.0,
            gpu_mem_used_bytes=60,
            gpu_mem_total_bytes=80,
            worker_mem_bytes=9,
            shm_free_bytes=1,
            shm_total_bytes=64,
        ),
    ]
    c = combine_metrics(rows)
    assert (c.gpu_mem_used_bytes, c.gpu_mem_total_bytes) == (60, 80)
    assert (c.shm_free_bytes, c.shm_total_bytes) == (1, 64)
    assert c.worker_mem_bytes == 9


# -- tests on two ranks ----------------------------------------------------------------------------
def test_collective_primitives_agree_on_every_rank(tmp_path: Path) -> None:
    r0, r1 = _launch(_primitives, tmp_path)
    assert r0["ok"] and r1["ok"], (r0, r1)
    assert [r0["rank"], r1["rank"]] == [0, 1] and r0["world_size"] == r1["world_size"] == 2
    assert r0["local"] == r1["local"] == 2
    assert r0["local_env"] == r1["local_env"] == 1
    assert r0["max"] == r1["max"] == 6
    assert (
        r0["decision"]
        == r1["decision"]
        == ["change", LoaderConfig(3, 16).to_dict(), "rank 0's", 2.0]
    )
    assert r0["none"] is None and r1["none"] is None
    assert r0["big_ok"] and r1["big_ok"]
    assert r0["combined"] == r1["combined"]
    assert r0["combined"]["wait_share"] == pytest.approx(0.4)
    assert r0["combined"]["samples_per_s"] == pytest.approx(900.0)
    assert r0["combined"]["rate_rel_stderr"] == pytest.approx(0.02)
    assert r0["windows"] == r1["windows"] and len(r0["windows"]) >= 2
    assert r0["recommendation"] == r1["recommendation"]
    message, waited = r0["setup_error"]
    assert (
        "rank 0 of 2" in message
        and "set-up" in message
        and "calls tune() in the same order" in message
    )
    # The wait cannot end before its timeout; a hang past it is pytest-timeout's to catch.
    assert waited >= 1.5


_APPLY_N, _APPLY_EPOCHS = 2400, 3


@pytest.fixture(scope="module")
def apply_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """One apply-mode training run on two ranks, shared by the tests that read it."""
    r0, r1 = _launch(_train_apply, tmp_path_factory.mktemp("apply"), _APPLY_N, _APPLY_EPOCHS)
    assert r0["ok"] and r1["ok"], (r0.get("traceback"), r1.get("traceback"))
    return r0, r1


def test_apply_with_batch_growth_keeps_ranks_in_lockstep(apply_run: tuple[dict, dict]) -> None:
    r0, r1 = apply_run
    s0, s1 = r0["steps"], r1["steps"]
    # Same number of steps; the same batch size, learning rate and workers at every step.
    assert len(s0) == len(s1)
    assert s0 == s1
    assert r0["changes"] == r1["changes"] and r0["final"] == r1["final"]
    assert r0["weight"] == r1["weight"]
    kinds = {c[0] for c in r0["changes"]}
    assert "change" in kinds, r0["changes"]
    assert max(s[1] for s in s0) > 8, f"the batch never grew: {r0['changes']}"
    assert max(s[3] for s in s0) > 0, f"no worker was ever added: {r0['changes']}"
    # Linear rule, away from the steps at which a change is made: lr = 0.1 x batch / 8.
    changed = {i for i in range(1, len(s0)) if s0[i][2] != s0[i - 1][2]}
    for i in _full_batches(s0):
        if i not in changed:
            assert s0[i][2] == pytest.approx(0.1 * s0[i][1] / 8), (i, s0[i - 1 : i + 2])
    # Exactly once: per epoch the two shards are disjoint and together are the dataset.
    for e in range(_APPLY_EPOCHS):
        a, b = r0["seen"][e], r1["seen"][e]
        assert len(a) == len(set(a)) and len(b) == len(set(b))
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(_APPLY_N))
    # set_epoch reshuffles.
    assert r0["seen"][0] != r0["seen"][1]


def test_apply_lr_matches_the_batch_it_trains(apply_run: tuple[dict, dict]) -> None:
    steps = apply_run[0]["steps"]
    for i in _full_batches(steps):
        assert steps[i][2] == pytest.approx(0.1 * steps[i][1] / 8), (i, steps[i - 1 : i + 2])


def _full_batches(steps: list[list[Any]]) -> list[int]:
    """Indices of the steps that are not an epoch's last (a partial batch: no LR relation)."""
    return [i for i in range(len(steps) - 1) if steps[i + 1][0] == steps[i][0]]


def test_killed_rank_ends_the_other_with_a_clear_error(tmp_path: Path) -> None:
    timeout_s = 10.0
    r0, r1 = _launch(_rank_lost_entry, tmp_path, "kill", 50, timeout_s)
    assert r1.get("missing"), r1  # it died without a word
    assert not r0["ok"] and r0["error_type"] == "DistributedTimeoutError" and r0["is_runtime_error"]
    died = float((tmp_path / "lost_at").read_text())
    assert r0["time"] - died < timeout_s + 2.0
    msg = r0["message"]
    assert "rank 0 of 2" in msg and "Connection closed by peer" in msg
    assert "check the other ranks' logs" in msg.lower() or "other ranks' logs" in msg


def test_stalled_rank_times_out_within_the_bound(tmp_path: Path) -> None:
    timeout_s = 3.0
    r0, r1 = _launch(_rank_lost_entry, tmp_path, "stall", 50, timeout_s)
    assert not r0["ok"] and r0["error_type"] == "DistributedTimeoutError", r0
    stalled = float((tmp_path / "lost_at").read_text())
    elapsed = r0["time"] - stalled
    assert 0.8 * timeout_s <= elapsed <= timeout_s + 3.0, elapsed
    assert (
        f"dist_timeout_s={timeout_s:g}" in r0["message"] and "rank 0 of 2 waited" in r0["message"]
    )
    # The stalled rank, once back, fails at its next collective instead of hanging there.
    assert not r1["ok"] and r1["error_type"] == "DistributedTimeoutError", r1
    assert "rank 1 of 2" in r1["message"]


_REBUILDS = 24


def test_rebuilds_under_a_process_group_never_abort_a_worker(tmp_path: Path) -> None:
    # Issue 19: workers forked from a rank that uses loadertune's gloo group aborted at exit
    # ("terminate called without an active exception", SIGABRT), and one abort inside a
    # rebuild's shutdown killed the rank. Every worker here must exit with code 0, silently.
    r0, r1 = _launch(_rebuild_loop, tmp_path, _REBUILDS, deadline_s=90.0)
    assert r0["ok"] and r1["ok"], (r0.get("traceback"), r1.get("traceback"))
    for rank, r in enumerate((r0, r1)):
        assert r["quiet"] == [True] * _REBUILDS
        assert len(r["exits"]) >= 2 * _REBUILDS
        assert set(r["exits"]) == {0}, r["exits"]
        err = (tmp_path / f"stderr{rank}.txt").read_text()
        assert "terminate called" not in err and "Aborted" not in err, err[-2000:]


def test_quiesce_drops_a_failed_collectives_frames() -> None:
    from loadertune.distributed import Collective

    c = Collective.__new__(Collective)  # no process group needed for this bookkeeping
    c._pending = None
    try:
        try:
            raise ConnectionError("Connection closed by peer")
        except ConnectionError as exc:
            raise DistributedTimeoutError("rank 0 lost the connection") from exc
    except DistributedTimeoutError as error:
        c._broken = error
    assert c._broken.__traceback__ is not None and c._broken.__cause__.__traceback__ is not None
    assert c.quiesce() is True
    assert c._broken.__traceback__ is None and c._broken.__cause__.__traceback__ is None
    c._pending = object()  # a Work still in flight
    assert c.quiesce() is False


def test_fork_guard_restores_the_collector() -> None:
    import gc

    from loadertune.distributed import fork_guard

    before = gc.get_freeze_count()
    assert before == 0  # nothing in the suite freezes objects for good
    with fork_guard() as quiet:
        assert quiet is True and gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0


def test_distributed_timeout_error_is_a_runtime_error() -> None:
    assert issubclass(DistributedTimeoutError, RuntimeError)


def test_recommendation_pickles() -> None:
    import pickle

    rec = Recommendation(LoaderConfig(2, 8), "why", changes={"num_workers": (0, 2)})
    assert pickle.loads(pickle.dumps(rec)) == rec


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """Both ways of combining tune() with accelerate, on two ranks (MULTI_CPU)."""
    pytest.importorskip("accelerate")
    r0, r1 = _launch(_accelerate, tmp_path_factory.mktemp("accelerate"))
    assert r0["ok"] and r1["ok"], (r0.get("traceback"), r1.get("traceback"))
    assert r0["processes"] == r1["processes"] == 2
    return r0, r1


def _exactly_once(a: list[list[int]], b: list[list[int]], n: int) -> None:
    for e, (x, y) in enumerate(zip(a, b, strict=True)):
        assert sorted(x + y) == list(range(n)), f"epoch {e}: {len(set(x) & set(y))} samples twice"


def test_accelerate_wrapped_before_prepare_is_exactly_once(
    accelerate_run: tuple[dict, dict],
) -> None:
    r0, r1 = accelerate_run
    assert r0["before_prepared_type"] == "TunedLoader"
    _exactly_once(r0["before"], r1["before"], 320)


def test_accelerate_prepared_loader_is_refused_with_a_clear_fix(
    accelerate_run: tuple[dict, dict],
) -> None:
    for r in accelerate_run:
        assert r["after_error"] and "before accelerator.prepare()" in r["after_error"]
