"""LoaderPipeline and the limits TunedLoader keeps in every mode (issue 14): /dev/shm, iterable
datasets that do not shard, loader options carried to every loader built, epochs that never end
short in silence, and the controller kept consistent with what runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from loadertune import shm
from loadertune.config import LoaderConfig
from loadertune.controller import Decision
from loadertune.pipeline import LoaderPipeline
from loadertune.planning import Recommendation
from loadertune.shm import SHM_HELD_BATCHES, SHM_MARGIN
from tests._factories import Indexed, NoShard, flat, quiet, rest

MIB = 2**20


@pytest.fixture(scope="module", autouse=True)
def _resource_tracker():
    # "spawn" starts multiprocessing's resource tracker, which lives as long as this process:
    # started before the leak check looks, it is not taken for a worker a test left behind.
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- /dev/shm: the arithmetic ----------------------------------------------------------------------
_AT_ZERO = LoaderConfig(num_workers=0, batch_size=8)


def _pipeline_on(path, batch_bytes, config=_AT_ZERO):
    pipeline = LoaderPipeline(DataLoader(Indexed(10), batch_size=8), dataset=Indexed(10), config=config)
    pipeline.shm_path = str(path)
    pipeline.batch_bytes = batch_bytes
    return pipeline


def test_shm_room_counts_free_space_and_our_own_batches(tmp_path, monkeypatch):
    # 64 MiB, empty, 19 MB batches: 3 fit with the margin, one of them the loop's.
    st = SimpleNamespace(f_bavail=64 * MIB // 4096, f_blocks=64 * MIB // 4096, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", lambda p: st)
    batch = 32 * 3 * 224 * 224 * 4
    pipeline = _pipeline_on(tmp_path, batch)
    room, total = pipeline.shm_room()
    assert total == 64 * MIB
    assert room == int(SHM_MARGIN * 64 * MIB // batch) - SHM_HELD_BATCHES == 2
    # 6 workers x prefetch 2 (what apply mode once jumped to) is cut to 2 x 1.
    assert shm.fit(LoaderConfig(num_workers=6, prefetch_factor=2, batch_size=32), room).describe() == (
        LoaderConfig(num_workers=2, prefetch_factor=1, batch_size=32).describe()
    )
    # Unknown batch bytes: no bound yet (the first batch measures them).
    pipeline.batch_bytes = None
    assert pipeline.shm_room() is None


def test_session_gives_the_controller_the_batch_bytes_in_apply_mode():
    ds = [torch.zeros(3, 4) for _ in range(16)]
    with quiet(DataLoader(ds, batch_size=4), mode="apply") as t:
        next(iter(t))
        assert t._session.controller.bounds.batch_bytes == 4 * 3 * 4 * 4
        assert t._pipeline.batch_bytes == 4 * 3 * 4 * 4


def test_apply_decision_beyond_shm_is_cut_and_the_controller_told(tmp_path, monkeypatch, caplog):
    st = SimpleNamespace(f_bavail=64 * MIB // 4096, f_blocks=64 * MIB // 4096, f_frsize=4096)
    monkeypatch.setattr(os, "statvfs", lambda p: st)
    with quiet(DataLoader(Indexed(64), batch_size=4), mode="apply") as t, caplog.at_level("WARNING", "loadertune"):
        it = iter(t)
        next(it)
        t._pipeline.batch_bytes = 32 * 3 * 224 * 224 * 4
        wanted = t.config.replace(num_workers=6, prefetch_factor=2)
        t._actuator.act(Decision("change", wanted, "starved"))
        assert (t.config.num_workers, t.config.prefetch_factor) == (2, 1)
        # The controller believes what runs, and will not try past it.
        assert t._session.controller.config == t.config
        assert t._session.controller.ceiling_workers == 3
        assert rest(it) == list(range(4, 64))  # the rebuild lost and repeated nothing
    assert "/dev/shm (64 MiB) limits the DataLoader" in caplog.text
    assert "--shm-size" in caplog.text and "prefetch_factor" in caplog.text


# -- /dev/shm: a real 64 MiB tmpfs -----------------------------------------------------------------
_SHM_JOB = textwrap.dedent(
    """
    import json, logging, os, sys, time
    import torch
    from torch.utils.data import DataLoader, Dataset
    import loadertune

    N, FILL, MODE, WORKERS, PREFETCH = int(sys.argv[1]), sys.argv[2] == "fill", sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

    class Images(Dataset):  # 32 x 3x224x224 float32: 19 MB batches, a latency-bound load
        def __len__(self):
            return N
        def __getitem__(self, i):
            time.sleep(0.001)
            x = torch.zeros(3, 224, 224)
            x[0, 0, 0] = i
            return x

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    batch = 32 * 3 * 224 * 224 * 4
    if FILL:  # another process took all but 2.5 batches of /dev/shm
        st = os.statvfs("/dev/shm")
        with open("/dev/shm/filler", "wb") as f:
            f.write(b"\\0" * (st.f_blocks * st.f_frsize - int(2.5 * batch)))
    kw = {"num_workers": WORKERS}
    if WORKERS:
        kw["prefetch_factor"] = PREFETCH
    t = loadertune.tune(DataLoader(Images(), batch_size=32, **kw), mode=MODE, gpu=None, host=None,
                        window_s=0.3, min_window_batches=3)
    seen, peak = [], 0
    for x in t:
        seen.extend(int(v) for v in x[:, 0, 0, 0])
        peak = max(peak, t.config.num_workers * (t.config.prefetch_factor or 0))
        time.sleep(0.01)
    t.close()
    print(json.dumps({"ok": sorted(seen) == list(range(N)), "n": len(seen), "peak": peak,
                      "final": t.config.to_dict(), "faults": [e.data for e in t.events if e.kind == "fault"],
                      "changes": [e.data["after"] for e in t.events if e.kind in ("change", "fault")]}))
    """
)


def _run_in_64mib_shm(tmp_path, *args):
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("a private 64 MiB /dev/shm needs root and unshare (mount namespace)")
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64m tmpfs /dev/shm"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs on /dev/shm here: {probe.stderr.strip()}")
    script = tmp_path / "shm_job.py"
    script.write_text(_SHM_JOB)
    cmd = f"mount -t tmpfs -o size=64m tmpfs /dev/shm && exec {sys.executable} {script} " + " ".join(map(str, args))
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=90, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.mark.timeout(120)
def test_apply_mode_in_a_64_mib_shm_stays_within_it(tmp_path):
    # Untuned num_workers=0 runs; apply mode once went to 6 workers x 2 here and died.
    out, stderr = _run_in_64mib_shm(tmp_path, 960, "nofill", "apply", 0, 2)
    assert out["ok"] and out["n"] == 960
    assert not out["faults"]
    assert 1 <= out["peak"] <= 2  # room for 2 in flight plus the loop's batch
    assert out["final"]["num_workers"] >= 1
    assert "/dev/shm (64 MiB) limits the DataLoader" in stderr and "--shm-size" in stderr
    assert "No space left on device" not in stderr


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["recommend", "apply"])
def test_shm_filled_by_another_process_is_a_fault_recovered_from(tmp_path, mode):
    out, stderr = _run_in_64mib_shm(tmp_path, 640, "fill", mode, 2, 1)
    assert out["ok"] and out["n"] == 640  # nothing lost, nothing twice
    assert out["faults"] and {f["cause"] for f in out["faults"]} == {"shm"}
    final = out["final"]
    assert final["num_workers"] * (final["prefetch_factor"] or 0) <= 1
    assert "unable to allocate shared memory" in stderr and "/dev/shm is full" in stderr


# -- IterableDataset that does not shard -----------------------------------------------------------
def test_apply_never_gives_a_non_sharding_iterable_more_workers(caplog):
    with quiet(DataLoader(NoShard(40), batch_size=4), mode="apply") as t, caplog.at_level("WARNING", "loadertune"):
        assert flat(t) == list(range(40))
        t._actuator.act(Decision("change", t.config.replace(num_workers=12), "starved"))
        assert t.pending_config is None or t.pending_config.num_workers <= 1
        # Every item once, the next epoch too: no 12 copies read as a 12x speed-up.
        assert flat(t) == list(range(40))
        assert t.config.num_workers <= 1
        assert t._session.controller.config == (t.pending_config or t.config)
    assert "not known to shard" in caplog.text and "iterable_shards=True" in caplog.text


def test_recommend_mode_says_more_workers_assume_sharding(caplog):
    with quiet(DataLoader(NoShard(8), batch_size=4)) as t, caplog.at_level("WARNING", "loadertune"):
        t._session.recommendation = Recommendation(config=t.config.replace(num_workers=6), reason="starved")
        t._actuator.check_limits()
    assert "assumes this IterableDataset splits its items" in caplog.text


@pytest.mark.parametrize(("workers", "shards"), [(0, True), (2, False)])
def test_a_sharding_iterable_may_get_workers(workers, shards):
    class Shards(IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            start, step = (0, 1) if info is None else (info.id, info.num_workers)
            return iter(range(start, 24, step))

    with quiet(DataLoader(Shards(), batch_size=4, num_workers=workers), mode="apply", iterable_shards=shards) as t:
        flat(t)
        t._actuator.act(Decision("change", t.config.replace(num_workers=3), "starved"))
        assert t.pending_config.num_workers == 3
        assert sorted(flat(t)) == list(range(24)) and t.config.num_workers == 3


def test_the_user_reconfiguring_an_iterable_says_it_shards():
    with quiet(DataLoader(NoShard(8), batch_size=4)) as t:
        t.reconfigure(num_workers=2)
        assert t.pending_config.num_workers == 2


def test_pending_change_is_not_judged_and_its_revert_cancels_it():
    class Shards(IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            start, step = (0, 1) if info is None else (info.id, info.num_workers)
            return iter(range(start, 32, step))

    with quiet(DataLoader(Shards(), batch_size=4, num_workers=2), mode="apply") as t:
        seen = []
        real = t._session.close_window
        t._session.close_window = lambda **kw: seen.append(kw["decide"]) or real(**kw)
        it = iter(t)
        next(it)
        t._actuator.act(Decision("change", t.config.replace(num_workers=4), "starved"))
        assert t.pending_config.num_workers == 4 and t.config.num_workers == 2
        t._on_window(1e12, None)  # a window still running the old configuration decides nothing
        assert seen == [False]
        t._actuator.act(Decision("revert", t.config, "no gain"))
        assert t.pending_config is None
        rest(it)
        assert sorted(flat(t)) == list(range(32)) and t.config.num_workers == 2
        t._on_window(1e12, None)
        assert seen[-1] is True


# -- loader options and epochs that never end short in silence -------------------------------------
@pytest.mark.timeout(120)
def test_spawn_context_survives_going_to_zero_workers():
    loader = DataLoader(Indexed(3000), batch_size=64, num_workers=1, multiprocessing_context="spawn")
    with quiet(loader, mode="apply") as t:
        it = iter(t)
        got = flat([next(it) for _ in range(4)])
        t.reconfigure(num_workers=0)
        got += rest(it)
        assert got == list(range(3000))
        assert flat(t) == list(range(3000))  # and every later epoch


def test_a_loader_torch_refuses_raises_and_the_old_one_goes_on(monkeypatch):
    with quiet(DataLoader(Indexed(40), batch_size=4), mode="apply") as t:
        it = iter(t)
        got = flat([next(it)])
        import loadertune.pipeline as pipeline_module

        def refuse(*args, **kwargs):
            raise ValueError("multiprocessing_context can only be used with multi-process loading")

        monkeypatch.setattr(pipeline_module, "build_loader", refuse)
        with pytest.raises(Exception, match="multiprocessing_context"):
            t.reconfigure(num_workers=1)
        monkeypatch.undo()
        assert got + rest(it) == list(range(40))


def test_a_loader_that_cannot_start_fails_every_next_instead_of_ending_the_epoch(monkeypatch):
    import loadertune.pipeline as pipeline_module

    with quiet(DataLoader(Indexed(40), batch_size=4)) as t:
        it = iter(t)
        next(it)
        real = pipeline_module.start_iterator

        def broken(loader, *args):
            raise OSError("cannot start workers")

        monkeypatch.setattr(pipeline_module, "start_iterator", broken)
        with pytest.raises(OSError):
            t.reconfigure(num_workers=1)
        monkeypatch.setattr(pipeline_module, "start_iterator", real)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="could not be started"):
                next(it)
        # A new epoch starts cleanly.
        assert flat(t) == list(range(40))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_sampler_cut_short_does_not_end_the_epoch_early(workers):
    with quiet(DataLoader(Indexed(60), batch_size=4, num_workers=workers)) as t:
        it = iter(t)
        got = flat([next(it) for _ in range(3)])
        # An exception raised into the sampler generator (an async signal handler's) ends it.
        t._pipeline.src_it._sampler_iter.close()
        got += rest(it)
        assert got == list(range(60))


# -- the RAM budget wins over throughput -----------------------------------------------------------
def test_a_memory_step_down_is_a_limit_not_an_experiment():
    from loadertune.diagnosis import diagnose
    from loadertune.session import model_environment
    from tests._factories import metrics

    with quiet(DataLoader(Indexed(64), batch_size=4, num_workers=2), mode="apply") as t:
        it = iter(t)
        next(it)
        down = t.config.replace(num_workers=1)
        rec = Recommendation(config=down, reason="2 workers of ~280 MiB each exceed the RAM budget; 1 fit", forced=True)
        t._actuator.act(Decision("change", down, rec.reason, recommendation=rec))
        assert t.config.num_workers == 1
        controller = t._session.controller
        assert controller.ceiling_workers == 2
        # A starved window with young (small) workers right after: no second try over the budget.
        m = metrics(wait_share=0.6, wait_s_per_batch=0.03, compute_s_per_batch=0.02, batches_per_s=20.0,
                    worker_mem_bytes=50 * MIB, gpu_util_mean_pct=None, gpu_util_std_pct=None)
        for k in range(6):
            d = controller.decide(m, diagnose(m, t.config, model_environment(None)), now_s=1e6 + 100 * k)
            assert d.config.num_workers <= 1
        assert rest(it) == list(range(4, 64))


# -- pickling ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_tuned_loader_pickles_and_copies_like_a_dataloader(how):
    import copy
    import pickle

    with quiet(DataLoader(Indexed(20), batch_size=4)) as t:
        t.reconfigure(batch_size=5)
        clone = pickle.loads(pickle.dumps(t)) if how == "pickle" else copy.deepcopy(t)
        with clone:
            assert clone is not t and clone.config == t.config
            assert flat(clone) == flat(t) == list(range(20))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_workers": True}, "max_workers must be an int"),
        ({"ram_budget_share": True}, "ram_budget_share must be a number"),
        ({"sinks": print}, "sinks must be a sequence of callables"),
        ({"iterable_shards": "yes"}, "iterable_shards must be True or False"),
    ],
)
def test_options_that_are_not_what_they_look_like_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quiet(DataLoader(Indexed(4)), **kwargs)


def test_reconfigure_refuses_a_truthy_string_for_a_flag():
    from loadertune.errors import ReconfigureError

    with quiet(DataLoader(Indexed(4))) as t, pytest.raises(ReconfigureError, match="pin_memory must be True or False"):
        t.reconfigure(pin_memory="yes")


def test_torch_warnings_come_once_per_run_not_at_every_rebuild() -> None:
    import warnings as _w

    import loadertune.building as building_module
    from loadertune.config import LoaderConfig as _Config
    from loadertune.pipeline import LoaderPipeline as _Pipeline

    building_module._WARNED.clear()
    dl = DataLoader(TensorDataset(torch.arange(32)), batch_size=4, pin_memory=True)
    cfg = _Config.from_loader(dl)
    p = _Pipeline(dl, dataset=dl.dataset, config=cfg)
    with _w.catch_warnings(record=True) as got:
        _w.simplefilter("default")
        for epoch in range(3):
            p.start_epoch()
            next(p.src_it)
            p.delivered()
            p.rebuild(cfg.replace(num_workers=1 + epoch % 2, prefetch_factor=2))
            while True:
                try:
                    next(p.src_it)
                    p.delivered()
                except StopIteration:
                    if p.finish_drain():
                        continue
                    p.end_epoch()
                    break
    p.shutdown()
    pinned = [w for w in got if "pin_memory" in str(w.message)]
    assert len(pinned) == (0 if torch.accelerator.is_available() else 1)
    assert not [w for w in got if "This DataLoader will create" in str(w.message)]


def test_turning_on_persistent_workers_keeps_the_running_workers() -> None:
    from loadertune.config import LoaderConfig as _Config
    from loadertune.pipeline import LoaderPipeline as _Pipeline

    dl = DataLoader(TensorDataset(torch.arange(40)), batch_size=4, num_workers=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    cfg = _Config.from_loader(dl)
    p = _Pipeline(dl, dataset=dl.dataset, config=cfg)
    seen: list[int] = []
    pids: list[list[int]] = []
    for epoch in range(3):
        p.start_epoch()
        n = 0
        while True:
            try:
                (b,) = next(p.src_it)
            except StopIteration:
                if p.finish_drain() or p.resume_unfinished():
                    continue
                p.end_epoch()
                break
            p.delivered()
            seen += b.tolist()
            n += 1
            if epoch == 0 and n == 3:
                before = p.worker_pids()
                assert p.rebuild(cfg.replace(persistent_workers=True)) == 0
                assert p.worker_pids() == before and p.config.persistent_workers
        pids.append(p.worker_pids())
        assert sorted(seen[-40:]) == list(range(40))  # every sample once per epoch
    p.shutdown()
    assert pids[0] == pids[1] == pids[2]
