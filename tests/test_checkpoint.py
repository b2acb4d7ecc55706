"""Checkpoint and resume (issue 16): exactly-once across processes, any loader settings.

The reference is always an uninterrupted, untuned plain DataLoader: the samples received before
the checkpoint and after the resume, together and in order, must be its samples over three
epochs, each once.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    RandomSampler,
)

from loadertune.checkpoint import FORMAT, VERSION
from tests._factories import Indexed, quiet
from tests._factories import NoShard as Stream

SCRIPT = Path(__file__).parent / "fixtures" / "checkpoint" / "resume.py"


class Noisy(Indexed):
    """A random augmentation: its draws come from the global RNGs (reseeded by seed=)."""

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i)]) + torch.rand(1)


def shuffled(n=61, bs=5, workers=0, seed=3, **kw):
    return DataLoader(
        Indexed(n), batch_size=bs, shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(seed), **kw
    )


def reference(n=61, seed=3, epochs=3, generator=True, persistent=False):
    """The plain loader's sample order per epoch, from its RNG use: a base seed drawn per
    iterator (once with persistent workers), then the sampler's permutation."""
    g = torch.Generator().manual_seed(seed) if generator else None
    if not generator:
        torch.manual_seed(seed)
    sampler = RandomSampler(range(n), generator=g)
    out = []
    for e in range(epochs):
        if not persistent or e == 0:
            torch.empty((), dtype=torch.int64).random_(generator=g)
        out.append(list(sampler))
    return out


def run_until(t, epoch, step, change=None):
    """Iterates ``t`` from the start; returns the samples per epoch up to (and with) ``step`` of
    ``epoch``, where it leaves the loop as a job stopped for a checkpoint would."""
    got = []
    for e in range(epoch + 1):
        got.append([])
        for k, b in enumerate(t):
            got[-1].extend(b.tolist())
            if change and e == epoch and k == change[0]:
                t.reconfigure(**change[1])
            if e == epoch and k == step:
                break
    return got


def finish(t, epochs=3):
    out = []
    for e in range(t.epoch, epochs):
        t.set_epoch(e)
        out.append([i for b in t for i in (b.tolist() if isinstance(b, torch.Tensor) else [b])])
    return out


def joined(before, after):
    before = [list(x) for x in before]
    before[-1].extend(after[0])
    return before + after[1:]


# -- the plain reference is what a DataLoader does ---------------------------------------------------
def test_reference_is_the_plain_loader_order():
    plain = shuffled()
    assert [[int(i) for b in plain for i in b] for _ in range(3)] == reference()
    torch.manual_seed(3)
    plain = DataLoader(Indexed(61), batch_size=5, shuffle=True)
    assert [[int(i) for b in plain for i in b] for _ in range(3)] == reference(generator=False)


# -- one process ------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize(("workers", "bs"), [(0, 5), (1, 7), (3, 4)])
def test_round_trip_after_a_live_change_at_other_settings(workers, bs):
    t = quiet(shuffled(workers=2), mode="apply", allow_batch_size=True, lr_rule="none")
    before = run_until(t, 1, 6, change=(2, {"num_workers": 1, "batch_size": 3, "prefetch_factor": 3}))
    state = t.state_dict()
    t.close()
    assert state["epoch"] == 1 and state["mid_epoch"]
    assert state["epoch_start"]["position"] == 3 * 5 + 4 * 3
    t2 = quiet(shuffled(workers=workers, bs=bs, pin_memory=True), mode="apply", allow_batch_size=True, lr_rule="none")
    t2.load_state_dict(state, warm_start=False)
    assert t2.epoch == 1 and t2.config.num_workers == workers and t2.config.batch_size == bs
    after = finish(t2)
    t2.close()
    assert joined(before, after) == reference()


def test_warm_start_resumes_at_the_tuned_configuration_with_what_was_learned():
    t = quiet(shuffled(), mode="apply", allow_batch_size=True, lr_rule="none")
    run_until(t, 0, 3, change=(1, {"num_workers": 2, "batch_size": 6}))
    t._session.controller.ceiling_workers = 5
    t._session.controller.known_load_s = 0.25
    state = t.state_dict()
    t.close()
    t2 = quiet(shuffled(workers=0, bs=5), mode="apply", allow_batch_size=True, lr_rule="none")
    t2.load_state_dict(state)
    c = t2._session.controller
    assert t2.config.num_workers == 2 and t2.config.batch_size == 6
    assert (c.ceiling_workers, c.known_load_s, c.config) == (5, 0.25, t2.config)
    assert [e.kind for e in t2.events][-1] == "resume"
    t2.close()
    # Recommend mode never changes the loader: only the learned values come back.
    t3 = quiet(shuffled(workers=1, bs=5))
    t3.load_state_dict(state)
    assert t3.config.num_workers == 1 and t3.config.batch_size == 5
    assert t3._session.controller.ceiling_workers == 5
    t3.close()


def test_a_trial_under_way_resumes_at_the_configuration_it_started_from():
    t = quiet(shuffled(workers=0), mode="apply")
    ctl = t._session.controller
    from loadertune.trial import Trial

    ctl._trial = Trial(previous=t.config, before=[], lr_factor=None, cheaper=False)
    ctl.config = t.config.replace(num_workers=4)
    state = t.state_dict()
    t.close()
    assert state["controller"]["config"]["num_workers"] == 0 and not state["controller"]["converged"]


def test_checkpoint_at_an_epoch_boundary_resumes_the_next_epoch():
    t = quiet(shuffled(workers=1))
    before = [[i for b in t for i in b.tolist()]]
    state = t.state_dict()
    t.close()
    assert state["epoch"] == 1 and not state["mid_epoch"] and state["epoch_start"]["global_rng"] is None
    t2 = quiet(shuffled(workers=0, bs=8))
    t2.load_state_dict(state)
    after = finish(t2)
    t2.close()
    assert before + after == reference()


def test_loader_without_a_generator_with_the_global_rng_restored():
    torch.manual_seed(3)
    t = quiet(DataLoader(Indexed(61), batch_size=5, shuffle=True))
    before = run_until(t, 1, 4)
    state, rng = t.state_dict(), torch.get_rng_state()
    t.close()
    torch.manual_seed(12345)  # another process, its own seed
    t2 = quiet(DataLoader(Indexed(61), batch_size=9, shuffle=True, num_workers=1))
    t2.load_state_dict(state)
    torch.set_rng_state(rng)  # the script restores its RNG as it restores the model
    after = finish(t2)
    t2.close()
    assert joined(before, after) == reference(generator=False)


@pytest.mark.timeout(60)
def test_persistent_workers_draw_one_base_seed_before_and_after_resume():
    ref = reference(persistent=True)
    plain = shuffled(workers=1, persistent_workers=True)
    assert [[int(i) for b in plain for i in b] for _ in range(3)] == ref
    plain._iterator._shutdown_workers()
    t = quiet(shuffled(workers=1, persistent_workers=True))
    before = run_until(t, 1, 3)
    state = t.state_dict()
    t.close()
    t2 = quiet(shuffled(workers=0, bs=3))  # not persistent: still one base seed, as saved
    t2.load_state_dict(state)
    after = finish(t2)
    t2.close()
    assert joined(before, after) == ref


def test_set_epoch_keeps_the_position_for_the_saved_epoch_only(caplog):
    t = quiet(shuffled())
    before = run_until(t, 0, 2)
    state = t.state_dict()
    t.close()
    t2 = quiet(shuffled())
    t2.load_state_dict(state)
    t2.set_epoch(0)
    rest = [i for b in t2 for i in b.tolist()]
    assert before[0] + rest == reference()[0]
    t2.close()
    t3 = quiet(shuffled())
    t3.load_state_dict(state)
    with caplog.at_level(logging.WARNING, "loadertune"):
        t3.set_epoch(1)
    assert "starts afresh" in caplog.text
    assert len([i for b in t3 for i in b.tolist()]) == 61
    t3.close()


class Chunks(BatchSampler):
    """A user's own batch sampler: loadertune keeps its batches whole."""


def test_batch_sampler_of_the_user_resumes_by_whole_batches():
    def loader(workers):
        sampler = RandomSampler(Indexed(40), generator=torch.Generator().manual_seed(2))
        return DataLoader(Indexed(40), batch_sampler=Chunks(sampler, 6, False), num_workers=workers)

    plain = loader(0)
    ref = [[b.tolist() for b in plain] for _ in range(2)]
    t = quiet(loader(2))
    got = []
    for k, b in enumerate(t):
        got.append(b.tolist())
        if k == 3:
            break
    state = t.state_dict()
    t.close()
    assert state["epoch_start"]["position"] == 4
    t2 = quiet(loader(0))
    t2.load_state_dict(state)
    got += [b.tolist() for b in t2]
    got2 = [b.tolist() for b in t2]
    t2.close()
    assert [got, got2] == ref


def test_a_failed_batch_handed_out_again_is_not_counted_consumed():
    t = quiet(shuffled(), mode="apply", allow_batch_size=True, lr_rule="none")
    it = iter(t)
    next(it)
    t.reconfigure(batch_size=10)
    next(it)
    with t.oom_guard():
        raise torch.OutOfMemoryError("scripted")
    assert t._pipeline.position() == 5
    t.close()


# -- across processes ---------------------------------------------------------------------------------
def _run(tmp_path, phase, *args):
    out = tmp_path / f"{phase}.json"
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), phase, str(tmp_path / "state.pt"), str(out), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        proc.wait(timeout=60)
    finally:
        # The save phase exits as a preempted job does, without stopping its workers; a
        # preemption takes the whole job, so do the same. Left alone they would hold the stderr
        # pipe open until their watchdog notices the parent is gone (5 s).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    data = json.loads(out.read_text())
    return [data["epochs"][k] for k in sorted(data["epochs"], key=int)], data["config"]


@pytest.fixture(scope="module")
def saved_mid_epoch(tmp_path_factory):
    """One process that ran until mid-epoch (a live change included), saved and exited: every
    resume below starts from a copy of its state."""
    where = tmp_path_factory.mktemp("saved")
    before, saved_config = _run(where, "save", "--generator", "--workers", 1, "--batch-size", 5)
    return where / "state.pt", before, saved_config


RESUMED_AT = [(0, 5), (1, 4), (3, 9)]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, saved_mid_epoch):
    """Each resume of RESUMED_AT from a copy of the saved state, run side by side."""
    state, _, _ = saved_mid_epoch

    def resume(workers, bs):
        where = tmp_path_factory.mktemp(f"resume-w{workers}-bs{bs}")
        shutil.copy(state, where / "state.pt")
        return _run(where, "resume", "--generator", "--workers", workers, "--batch-size", bs, "--warm-start", 0)

    with ThreadPoolExecutor(max_workers=len(RESUMED_AT)) as pool:
        futures = {at: pool.submit(resume, *at) for at in RESUMED_AT}
        return {at: f.result() for at, f in futures.items()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("workers", "bs"), RESUMED_AT)
def test_two_processes_together_serve_each_sample_once_in_order(saved_mid_epoch, resumed, workers, bs):
    _, before, saved_config = saved_mid_epoch
    assert saved_config["num_workers"] == 2 and saved_config["batch_size"] == 7  # the live change
    after, config = resumed[(workers, bs)]
    assert (config["num_workers"], config["batch_size"]) == (workers, bs)
    assert joined(before, after) == reference()


@pytest.mark.timeout(40)
def test_two_processes_warm_start_and_global_rng(tmp_path):
    before, saved_config = _run(tmp_path, "save", "--workers", 0, "--epoch", 0, "--stop-at", 4)
    after, config = _run(tmp_path, "resume", "--workers", 3, "--batch-size", 2)
    assert config == saved_config  # resumed at the tuned configuration
    assert joined(before, after) == reference(generator=False)


# -- hypothesis over checkpoint positions ---------------------------------------------------------
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    epoch=st.integers(0, 2),
    step=st.integers(0, 14),
    change=st.one_of(st.none(), st.tuples(st.integers(0, 14), st.sampled_from([2, 3, 8]))),
    resume_bs=st.sampled_from([1, 4, 5, 13]),
    shuffle=st.booleans(),
    generator=st.booleans(),
)
def test_any_checkpoint_position_resumes_exactly_once(epoch, step, change, resume_bs, shuffle, generator):
    n = 37

    def loader(bs):
        g = torch.Generator().manual_seed(9) if generator else None
        return DataLoader(Indexed(n), batch_size=bs, shuffle=shuffle, generator=g)

    torch.manual_seed(1)
    plain = loader(5)
    ref = [[int(i) for b in plain for i in b] for _ in range(3)]
    torch.manual_seed(1)
    t = quiet(loader(5), mode="apply", allow_batch_size=True, lr_rule="none")
    before = run_until(t, epoch, step, change=(change[0], {"batch_size": change[1]}) if change else None)
    state = pickle.loads(pickle.dumps(t.state_dict()))
    rng = torch.get_rng_state()
    t.close()
    torch.manual_seed(77)
    t2 = quiet(loader(resume_bs), mode="apply", allow_batch_size=True, lr_rule="none")
    t2.load_state_dict(state, warm_start=False)
    torch.set_rng_state(rng)
    after = finish(t2) if state["mid_epoch"] else [[], *finish(t2)]
    t2.close()
    assert joined(before, after) == ref


# -- size -----------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_state_of_a_ten_million_sample_shuffled_loader_is_under_64_kib():
    n = 10_000_000
    loader = DataLoader(Indexed(n), batch_size=256, shuffle=True, generator=torch.Generator().manual_seed(0))
    t = quiet(loader)
    it = iter(t)
    first = [next(it).tolist() for _ in range(3)]
    state = t.state_dict()
    t.close()
    buf = io.BytesIO()
    torch.save(state, buf)
    assert len(pickle.dumps(state)) < 64 * 1024 and len(buf.getvalue()) < 64 * 1024
    assert state["epoch_start"]["position"] == 3 * 256
    t2 = quiet(DataLoader(Indexed(n), batch_size=512, shuffle=True, generator=torch.Generator().manual_seed(0)))
    t2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), warm_start=False)
    resumed = next(iter(t2)).tolist()
    t2.close()
    perm = torch.randperm(n, generator=_after_base_seed(0))[: 5 * 256].tolist()
    assert [i for b in first for i in b] + resumed == perm


def _after_base_seed(seed):
    g = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=g)
    return g


# -- mismatches -----------------------------------------------------------------------------------------
def _saved(**kw):
    t = quiet(shuffled(**kw))
    run_until(t, 0, 2)
    state = t.state_dict()
    t.close()
    return state


@pytest.mark.parametrize(
    ("make", "edit", "message"),
    [
        (lambda: shuffled(n=60), None, r"dataset len was 61 .* now 60; resume on the same dataset"),
        (lambda: DataLoader(Indexed(61), batch_size=5), None, r"sampler was 'RandomSampler' .* now 'SequentialSampler'"),
        (lambda: DataLoader(Stream(61), batch_size=5), None, r"kind was 'sampler' .* now 'iterable'"),
        (lambda: shuffled(), lambda s: s.update(version=99), r"format version was 99 .* now 1"),
        (lambda: shuffled(), lambda s: s.update(format="x"), r"not a TunedLoader state"),
        (lambda: DataLoader(Indexed(61), batch_size=5, shuffle=True), None, r"generators .* generator="),
    ],
)
def test_mismatches_name_the_field_and_change_nothing(make, edit, message):
    state = _saved()
    if edit is not None:
        edit(state)
    t = quiet(make())
    config, epoch = t.config, t.epoch
    with pytest.raises(ValueError, match=message):
        t.load_state_dict(state)
    assert (t.config, t.epoch, t.step, t._pipeline.order.resume_at) == (config, epoch, 0, None)
    t.close()


def test_seed_mismatch_and_loading_after_iterating_are_refused():
    t = quiet(shuffled(), seed=1)
    run_until(t, 0, 1)
    state = t.state_dict()
    with pytest.raises(ValueError, match="before iterating"):
        t.load_state_dict(state)
    t.close()
    t2 = quiet(shuffled(), seed=2)
    with pytest.raises(ValueError, match=r"seed was 1 .* now 2; pass the same tune\(seed=...\)"):
        t2.load_state_dict(state)
    t2.close()


def _distributed(world, rank, n=40):
    ds = Indexed(n)
    return DataLoader(ds, batch_size=4, sampler=DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=5))


def test_distributed_ranks_resume_their_own_shards_and_refuse_another_world_size_mid_epoch():
    states, before = [], []
    for rank in (0, 1):
        t = quiet(_distributed(2, rank))
        t.set_epoch(0)
        [e0] = run_until(t, 0, 1)
        before.append(e0)
        states.append(t.state_dict())
        t.close()
    for rank in (0, 1):
        ref = _distributed(2, rank)
        ref.sampler.set_epoch(0)
        t = quiet(_distributed(2, rank, n=40))
        t.load_state_dict(states[rank])
        t.set_epoch(0)
        assert before[rank] + [i for b in t for i in b.tolist()] == [int(i) for b in ref for i in b]
        t.close()
    t = quiet(_distributed(4, 0))
    with pytest.raises(ValueError, match=r"world size was 2 .* now 4; .* epoch boundary"):
        t.load_state_dict(states[0])
    t.close()
    t = quiet(_distributed(2, 1))
    with pytest.raises(ValueError, match=r"rank was 0 .* now 1; load each rank's own state"):
        t.load_state_dict(states[0])
    t.close()


def test_another_world_size_resumes_from_an_epoch_boundary():
    t = quiet(_distributed(2, 0))
    t.set_epoch(0)
    list(t)
    state = t.state_dict()
    t.close()
    t2 = quiet(_distributed(4, 3))
    t2.load_state_dict(state)
    assert t2.epoch == 1
    t2.set_epoch(1)
    ref = _distributed(4, 3)
    ref.sampler.set_epoch(1)
    assert [i for b in t2 for i in b.tolist()] == [int(i) for b in ref for i in b]
    t2.close()


# -- seed= ---------------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_with_seed_resumed_batches_are_bit_identical():
    def loader(workers, bs):
        return DataLoader(Noisy(30), batch_size=bs, shuffle=True, num_workers=workers, generator=torch.Generator().manual_seed(4))

    with quiet(loader(0, 4), seed=11) as t:
        ref = [torch.cat(list(t)) for _ in range(2)]
    t = quiet(loader(2, 4), seed=11)
    it = iter(t)
    head = [next(it) for _ in range(3)]
    state = t.state_dict()
    t.close()
    t2 = quiet(loader(1, 7), seed=11)
    t2.load_state_dict(state)
    rest = [torch.cat(list(t2)), torch.cat(list(t2))]
    t2.close()
    assert torch.equal(torch.cat([*head, rest[0]]), ref[0]) and torch.equal(rest[1], ref[1])


# -- learning rate -----------------------------------------------------------------------------------
def test_learning_rate_follows_a_batch_size_other_than_the_saved_one():
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    t = quiet(shuffled(bs=8), mode="apply", allow_batch_size=True, optimizer=opt, lr_rule="linear")
    it = iter(t)
    next(it)
    t.reconfigure(batch_size=16)
    next(it)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    state, opt_state = t.state_dict(), opt.state_dict()
    t.close()
    assert state["follower"]["lr_batch_size"] == 16
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1)
    opt2.load_state_dict(opt_state)
    t2 = quiet(shuffled(bs=8), mode="apply", allow_batch_size=True, optimizer=opt2, lr_rule="linear")
    t2.load_state_dict(state, warm_start=False)
    next(iter(t2))
    assert t2.config.batch_size == 8 and opt2.param_groups[0]["lr"] == pytest.approx(0.1)
    t2.close()


# -- IterableDataset -------------------------------------------------------------------------------
def test_iterable_dataset_resumes_at_epoch_boundaries_and_restarts_a_cut_epoch(caplog):
    t = quiet(DataLoader(Stream(20), batch_size=4))
    list(t)
    boundary = t.state_dict()
    it = iter(t)
    next(it)
    cut = t.state_dict()
    t.close()
    assert boundary["epoch"] == 1 and not boundary["mid_epoch"] and cut["mid_epoch"]
    t2 = quiet(DataLoader(Stream(20), batch_size=5, num_workers=1))
    t2.load_state_dict(boundary)
    assert t2.epoch == 1 and sorted(i for b in t2 for i in b.tolist()) == list(range(20))
    t2.close()
    t3 = quiet(DataLoader(Stream(20), batch_size=4))
    with caplog.at_level(logging.WARNING, "loadertune"):
        t3.load_state_dict(cut)
    assert "starts again from its beginning" in caplog.text
    assert [i for b in t3 for i in b.tolist()] == list(range(20))
    t3.close()


def test_state_is_plain_data_with_named_keys():
    state = _saved()
    assert state["format"] == FORMAT and state["version"] == VERSION
    assert set(state) >= {"epoch", "step", "mid_epoch", "epoch_start", "config", "controller", "follower", "seed"}
    buf = io.BytesIO()
    torch.save(state, buf)
    assert torch.load(io.BytesIO(buf.getvalue()), weights_only=True) == pickle.loads(pickle.dumps(state)) == state


# -- Lightning ---------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_lightning_checkpoints_carry_the_callback_state(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    from loadertune.integrations.lightning import LoadertuneCallback

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(1, 1)
            self.workers = {}

        def training_step(self, batch, batch_idx):
            self.workers[self.current_epoch] = self.trainer.train_dataloader.num_workers
            return self.net(batch.float().unsqueeze(1)).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def train_dataloader(self):
            return DataLoader(Indexed(16), batch_size=4)

    def trainer(epochs, cb):
        return pl.Trainer(
            max_epochs=epochs, callbacks=[cb], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
        )

    cb = LoadertuneCallback(mode="apply", host=None, gpu=None, window_s=3600.0)
    t = trainer(1, cb)
    t.fit(Model())
    cb.config = cb.config.replace(num_workers=1)  # as if tuned
    cb._session.controller.ceiling_workers = 3
    cb._session.controller.config = cb.config
    t.save_checkpoint(tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", weights_only=False)["callbacks"]
    [state] = [v for k, v in saved.items() if "LoadertuneCallback" in k]
    assert state["config"]["num_workers"] == 1 and state["controller"]["ceiling_workers"] == 3

    cb2 = LoadertuneCallback(mode="apply", host=None, gpu=None, window_s=3600.0)
    model = Model()
    trainer(3, cb2).fit(model, ckpt_path=tmp_path / "a.ckpt")
    assert cb2._session.controller.ceiling_workers == 3
    assert model.workers == {1: 1, 2: 1}
    with pytest.raises(ValueError, match="format version was 0"):
        cb2.load_state_dict({**state, "version": 0})
