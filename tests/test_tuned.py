from __future__ import annotations

import json
import logging
import os
import signal

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

import loadertune
from loadertune.errors import ReconfigureError
from loadertune.sim import SimulatedGpu
from tests._factories import Indexed, flat, quiet


class Boom(Exception):
    pass


class Failing(Indexed):
    def __getitem__(self, i: int) -> int:
        if i == 7:
            raise Boom(f"sample {i} is corrupt")
        return i


class KillOnce(Indexed):
    """The worker that loads sample ``at`` SIGKILLs itself, once (a flag file remembers)."""

    def __init__(self, n: int, at: int, flag: str) -> None:
        super().__init__(n)
        self.at, self.flag = at, flag

    def __getitem__(self, i: int) -> int:
        if i == self.at and torch.utils.data.get_worker_info() is not None and not os.path.exists(self.flag):
            open(self.flag, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return i


class Stream(IterableDataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        start, step = (0, 1) if info is None else (info.id, info.num_workers)
        return iter(range(start, self.n, step))


# -- drop-in ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_same_batches_and_rng_use_as_the_plain_loader_over_epochs(workers):
    def run(wrap):
        torch.manual_seed(123)
        loader = DataLoader(Indexed(50), batch_size=8, shuffle=True, num_workers=workers)
        it = quiet(loader) if wrap else loader
        epochs = [[b.tolist() for b in it] for _ in range(3)]
        if wrap:
            it.close()
        # The global RNG advanced exactly as the plain loader advances it.
        return epochs, torch.rand(3).tolist()

    assert run(True) == run(False)


def test_generator_of_the_loader_is_honoured():
    def order(wrap):
        loader = DataLoader(Indexed(30), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5))
        it = quiet(loader) if wrap else loader
        out = [flat(it) for _ in range(2)]
        if wrap:
            it.close()
        return out

    assert order(True) == order(False)


def test_len_dataset_attributes_and_context_manager():
    loader = DataLoader(Indexed(50), batch_size=8, drop_last=False)
    with quiet(loader) as t:
        assert len(t) == 7 and t.dataset is loader.dataset
        assert t.batch_size == 8 and t.num_workers == 0
        assert t.drop_last is False and t.sampler is loader.sampler
        t.reconfigure(batch_size=16)
        assert len(t) == 4
    with pytest.raises(RuntimeError, match="closed"):
        iter(t)


def test_set_epoch_reaches_a_distributed_sampler():
    ds = Indexed(20)
    sampler = DistributedSampler(ds, num_replicas=2, rank=0, shuffle=True, seed=1)
    with quiet(DataLoader(ds, batch_size=5, sampler=sampler)) as t:
        t.set_epoch(0)
        a = flat(t)
        t.set_epoch(1)
        b = flat(t)
    assert sorted(a) != sorted(b) or a != b
    assert len(a) == len(b) == 10 and sampler.epoch == 1
    with pytest.raises(ValueError, match="epoch"):
        t.set_epoch(-1)


def test_iterable_dataset_with_workers():
    with quiet(DataLoader(Stream(40), batch_size=4, num_workers=2)) as t:
        assert sorted(flat(t)) == list(range(40))


def test_batch_size_none_loader():
    with quiet(DataLoader(Indexed(10), batch_size=None)) as t:
        assert [int(x) for x in t] == list(range(10))
        t.reconfigure(num_workers=1)
        assert [int(x) for x in t] == list(range(10))
        with pytest.raises(ReconfigureError, match="automatic batching off"):
            t.reconfigure(batch_size=4)


# -- rebuilding mid-epoch -----------------------------------------------------------------------------
def test_rebuild_mid_epoch_keeps_order_and_exactly_once():
    loader = DataLoader(Indexed(100), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0))
    reference = [b.tolist() for b in DataLoader(Indexed(100), batch_size=10, shuffle=True, generator=torch.Generator().manual_seed(0))]
    with quiet(loader) as t:
        got = []
        for step, b in enumerate(t):
            got.append(b.tolist())
            if step == 2:
                t.reconfigure(num_workers=2, prefetch_factor=3)
            if step == 5:
                t.reconfigure(num_workers=1, persistent_workers=True)
        assert got == reference
        assert t.rebuilds == 2 and t.config.num_workers == 1


def test_batch_size_change_rebatches_the_rest_in_order():
    with quiet(DataLoader(Indexed(50), batch_size=4, num_workers=2)) as t:
        sizes, seen = [], []
        for step, b in enumerate(t):
            sizes.append(len(b))
            seen.extend(b.tolist())
            if step == 1:
                t.reconfigure(batch_size=10)
    assert seen == list(range(50))
    assert sizes == [4, 4, 10, 10, 10, 10, 2]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    plan=st.lists(
        st.tuples(
            st.integers(0, 12),  # at which step of the epoch
            st.integers(0, 3),  # num_workers
            st.sampled_from([3, 5, 8]),  # batch size
            st.integers(1, 3),  # prefetch factor
            st.booleans(),  # persistent workers
        ),
        max_size=4,
    ),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
)
def test_random_reconfigurations_keep_exactly_once_and_order_across_epochs(plan, shuffle, drop_last):
    n = 37
    gen = torch.Generator().manual_seed(11)
    loader = DataLoader(Indexed(n), batch_size=5, shuffle=shuffle, drop_last=drop_last, generator=gen)
    ref_gen = torch.Generator().manual_seed(11)
    ref_sampler = RandomSampler(Indexed(n), generator=ref_gen) if shuffle else SequentialSampler(Indexed(n))
    with quiet(loader) as t:
        for epoch in range(2):
            # The plain loader draws a base seed before each epoch's order: mimic it.
            torch.empty((), dtype=torch.int64).random_(generator=ref_gen)
            expected = list(ref_sampler)
            got = []
            for step, batch in enumerate(t):
                got.extend(batch.tolist())
                for at, workers, bs, prefetch, persistent in plan:
                    if at == step and epoch == 0:
                        t.reconfigure(num_workers=workers, batch_size=bs, prefetch_factor=prefetch, persistent_workers=persistent)
            if drop_last:
                assert got == expected[: len(got)] and n - len(got) < t.config.batch_size + 8
            else:
                assert got == expected


def test_a_hundred_rebuilds_leak_nothing():
    # 50 worker starts and stops: a descriptor or child left per rebuild shows 25-fold over the
    # slack the assertions allow.
    proc = psutil.Process()
    fds = proc.num_fds()
    children = len(proc.children(recursive=True))
    with quiet(DataLoader(Indexed(2000), batch_size=4)) as t:
        seen = []
        for step, b in enumerate(t):
            seen.extend(b.tolist())
            if step < 100:
                t.reconfigure(num_workers=(step + 1) % 2, prefetch_factor=1 + step % 3)
        assert t.rebuilds == 100
    assert seen == list(range(2000))
    assert len(proc.children(recursive=True)) == children
    assert proc.num_fds() <= fds + 2


def test_close_mid_epoch_shuts_workers_down():
    proc = psutil.Process()
    before = len(proc.children(recursive=True))
    t = quiet(DataLoader(Indexed(100), batch_size=2, num_workers=3, persistent_workers=True))
    it = iter(t)
    next(it)
    assert len(proc.children(recursive=True)) >= before + 3
    t.close()
    t.close()  # idempotent
    assert len(proc.children(recursive=True)) == before


def test_leaving_an_epoch_early_starts_the_next_cleanly():
    with quiet(DataLoader(Indexed(20), batch_size=4, num_workers=2, persistent_workers=True)) as t:
        for step, _ in enumerate(t):
            if step == 1:
                break
        assert flat(t) == list(range(20))


def test_custom_batch_sampler_allows_worker_changes_and_refuses_batch_size():
    class Pairs(BatchSampler):
        pass

    loader = DataLoader(Indexed(12), batch_sampler=Pairs(SequentialSampler(range(12)), 3, False))
    with quiet(loader) as t:
        got = []
        for step, b in enumerate(t):
            got.extend(b.tolist())
            if step == 0:
                t.reconfigure(num_workers=2)
        assert got == list(range(12))
        with pytest.raises(ReconfigureError, match="own batch_sampler"):
            t.reconfigure(batch_size=6)


def test_iterable_dataset_changes_apply_at_the_next_epoch():
    with quiet(DataLoader(Stream(12), batch_size=3)) as t:
        for step, _ in enumerate(t):
            if step == 0:
                t.reconfigure(num_workers=2)
                # Still running the old loader until the epoch ends.
                assert t.config.num_workers == 0 and t.pending_config.num_workers == 2
        # Applied at the epoch boundary: the new epoch runs on two workers.
        assert sorted(flat(t)) == list(range(12))
        assert t.config.num_workers == 2 and t.pending_config is None
        assert t.rebuilds == 1


def test_reconfigure_rejects_unknown_and_bad_values():
    with quiet(DataLoader(Indexed(8), batch_size=2)) as t:
        with pytest.raises(ValueError, match="unknown loader setting"):
            t.reconfigure(workers=2)
        with pytest.raises(ValueError, match="num_workers"):
            t.reconfigure(num_workers=-1)


# -- faults ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_dataset_exception_reaches_the_caller_unchanged(workers):
    with quiet(DataLoader(Failing(20), batch_size=4, num_workers=workers)) as t:
        it = iter(t)
        assert next(it).tolist() == [0, 1, 2, 3]
        with pytest.raises(Boom, match="sample 7 is corrupt"):
            next(it)
        # Like torch, iteration can go on after a dataset error.
        assert next(it).tolist() == [8, 9, 10, 11]


def test_killed_worker_is_recovered_without_losing_a_sample(tmp_path, caplog):
    ds = KillOnce(60, at=21, flag=str(tmp_path / "killed"))
    with quiet(DataLoader(ds, batch_size=4, num_workers=2)) as t, caplog.at_level(logging.WARNING, "loadertune"):
        got = flat(t)
        assert got == list(range(60))
        assert t.config.num_workers == 1
        assert any(e.kind == "fault" for e in t.events)
    assert "exited unexpectedly" in caplog.text or "killed by signal" in caplog.text


def test_oom_guard_reverts_batch_growth_and_hands_samples_out_again():
    gpu = SimulatedGpu(step_time_s=0.0, memory_bytes=lambda b: b * 100, total_memory_bytes=1000)
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(Indexed(40), batch_size=8)
    with quiet(loader, optimizer=opt, lr_rule="linear") as t:
        trained = []
        lrs = []
        for step, b in enumerate(t):
            if step == 1:
                t.reconfigure(batch_size=16)
                # The learning rate follows the first batch of the new size, not before.
                assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
            lrs.append((len(b), opt.param_groups[0]["lr"]))
            with t.oom_guard():
                gpu.step(len(b))
                trained.extend(b.tolist())
        assert t.config.batch_size == 8
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert trained == list(range(40))
    # Every batch trained at the learning rate of its size.
    assert lrs[:3] == [(8, 0.1), (8, 0.1), (16, pytest.approx(0.2))]
    assert all(lr == pytest.approx(0.1 * size / 8) for size, lr in lrs if size in (8, 16))


def test_oom_without_a_batch_increase_is_reraised():
    with quiet(DataLoader(Indexed(8), batch_size=4)) as t:
        for _ in t:
            with pytest.raises(torch.OutOfMemoryError), t.oom_guard():
                raise torch.OutOfMemoryError("real")
            break


# -- learning rate and accumulation ---------------------------------------------------------------------
def test_accumulation_keeps_effective_batch_instead_of_scaling_lr():
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    with quiet(DataLoader(Indexed(32), batch_size=4), optimizer=opt, accumulation_steps=4) as t:
        it = iter(t)
        assert len(next(it)) == 4 and t.accumulation_steps == 4
        t.reconfigure(batch_size=8)
        assert t.accumulation_steps == 4  # still, until a batch of 8 arrives
        assert len(next(it)) == 8 and t.accumulation_steps == 2
        assert opt.param_groups[0]["lr"] == 0.1


def test_allow_batch_size_needs_an_optimizer_or_no_lr_rule():
    with pytest.raises(ValueError, match="pass optimizer="):
        quiet(DataLoader(Indexed(8), batch_size=2), mode="apply", allow_batch_size=True)
    quiet(DataLoader(Indexed(8), batch_size=2), mode="apply", allow_batch_size=True, lr_rule="none").close()


# -- seeding ---------------------------------------------------------------------------------------
class Noisy(Indexed):
    def __getitem__(self, i):
        return torch.tensor([float(i), torch.rand(()).item()])


def test_seed_makes_batches_independent_of_workers_and_rebuilds():
    def run(workers, rebuild_at=None):
        with quiet(DataLoader(Noisy(24), batch_size=4, num_workers=workers), seed=7) as t:
            out = []
            for epoch in range(2):
                t.set_epoch(epoch)
                for step, b in enumerate(t):
                    out.append(b)
                    if step == rebuild_at and epoch == 0:
                        t.reconfigure(num_workers=3 - workers)
            return torch.cat(out)

    a, b, c = run(0), run(2), run(0, rebuild_at=2)
    assert torch.equal(a, b) and torch.equal(a, c)
    # Different epochs draw differently.
    assert not torch.equal(a[:24], a[24:])


def test_seed_refuses_iterable_datasets():
    with pytest.raises(ValueError, match="IterableDataset"):
        quiet(DataLoader(Stream(4), batch_size=2), seed=1)


# -- arguments and events --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "auto"}, "mode must be one of"),
        ({"window_s": 0}, "window_s"),
        ({"min_window_batches": 1}, "min_window_batches"),
        ({"ram_budget_share": 1.5}, "ram_budget_share"),
        ({"lr_rule": "cubic"}, "lr_rule"),
        ({"gpu": "cuda:0"}, "gpu must be"),
        ({"gpu": 3}, "gpu must be"),
        ({"max_workers": 0}, "max_workers"),
        ({"accumulation_steps": 0}, "accumulation_steps"),
        ({"log_file": "/no/such/dir/run.jsonl"}, "does not exist"),
    ],
)
def test_bad_arguments_name_what_is_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quiet(DataLoader(Indexed(4), batch_size=2), **kwargs)


def test_not_a_dataloader():
    with pytest.raises(ValueError, match=r"takes a torch\.utils\.data\.DataLoader"):
        loadertune.tune([1, 2, 3])


def test_allow_batch_size_on_iterable_is_refused():
    with pytest.raises(ValueError, match="IterableDataset"):
        quiet(DataLoader(Stream(4), batch_size=2), allow_batch_size=True, lr_rule="none")


def test_event_log_and_summary(tmp_path, caplog):
    path = tmp_path / "run.jsonl"
    seen = []
    loader = DataLoader(Indexed(40), batch_size=4)
    with caplog.at_level(logging.INFO, "loadertune"), quiet(loader, log_file=str(path), sinks=(seen.append,)) as t:
        for step, _ in enumerate(t):
            if step == 3:
                t.reconfigure(num_workers=1)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [e["kind"] for e in lines]
    assert kinds[0] == "start" and kinds[-1] == "summary" and "change" in kinds
    change = lines[kinds.index("change")]
    assert change["before"]["num_workers"] == 0 and change["after"]["num_workers"] == 1
    assert change["step"] == 4 and change["forced"] is True
    assert [e.kind for e in seen] == kinds
    assert "summary" in caplog.text and "num_workers=1" in caplog.text
    assert loadertune.read_events(path)[-1]["rebuilds"] == 1


def test_lr_warmup_and_schedule_length_follow_a_batch_change():
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    with quiet(
        DataLoader(Indexed(32), batch_size=4),
        optimizer=opt,
        scheduler=sched,
        lr_rule="linear",
        lr_warmup_steps=4,
        keep_schedule_length=True,
    ) as t:
        it = iter(t)
        next(it)
        t.reconfigure(batch_size=8)
        next(it)
        # The group holds the target; the ramp applies inside optimizer.step().
        assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
        assert sched.step_size == 5
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        quiet(DataLoader(Indexed(8), batch_size=2), lr_warmup_steps=-1)
    with pytest.raises(ValueError, match="keep_schedule_length"):
        quiet(DataLoader(Indexed(8), batch_size=2), keep_schedule_length=True)


def test_worker_change_hands_over_in_flight_batches_without_requeueing():
    reference = list(range(200))
    with quiet(DataLoader(Indexed(200), batch_size=4, num_workers=2, prefetch_factor=4)) as t:
        got = []
        for step, b in enumerate(t):
            got.extend(b.tolist())
            if step == 3:
                t.reconfigure(num_workers=3)
                # The old loader drains what it had in flight; the new one already started.
                assert t._pipeline._drain is not None and len(t._pipeline._drain.issued) > 0
                assert t._pipeline.stream.requeued == 0
            if step == 4:
                # A second change during the hand-over re-queues both loaders' batches, in order.
                t.reconfigure(num_workers=1)
                assert t._pipeline._drain is None
        assert got == reference


def test_hand_over_with_persistent_workers_across_epochs():
    with quiet(DataLoader(Indexed(40), batch_size=4, num_workers=2, persistent_workers=True, shuffle=True, generator=torch.Generator().manual_seed(3))) as t:
        ref = DataLoader(Indexed(40), batch_size=4, num_workers=2, persistent_workers=True, shuffle=True, generator=torch.Generator().manual_seed(3))
        for epoch in range(3):
            got = []
            for step, b in enumerate(t):
                got.extend(b.tolist())
                if epoch == 0 and step == 2:
                    t.reconfigure(num_workers=3)
            assert got == flat(ref)


def test_an_explicit_batch_sampler_is_a_batch_size_loader():
    sampler = BatchSampler(SequentialSampler(range(21)), 4, drop_last=True)
    with quiet(DataLoader(Indexed(21), batch_sampler=sampler)) as t:
        assert t.config.batch_size == 4 and len(t) == 5
        got = []
        for step, b in enumerate(t):
            got.append(b.tolist())
            if step == 0:
                t.reconfigure(batch_size=8)
        # drop_last comes from the BatchSampler: the incomplete tail is dropped.
        assert got == [[0, 1, 2, 3], list(range(4, 12)), list(range(12, 20))]


def test_iterable_dataset_lr_follows_at_the_next_epoch():
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    with quiet(DataLoader(Stream(12), batch_size=3), optimizer=opt, lr_rule="linear") as t:
        for step, _ in enumerate(t):
            if step == 0:
                t.reconfigure(batch_size=6)
            assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
        sizes = []
        for b in t:
            sizes.append(len(b))
            assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
        assert sizes == [6, 6]


def test_accelerate_prepared_loaders_are_refused_with_the_fix():
    fake = type("DataLoaderShard", (DataLoader,), {})
    fake.__module__ = "accelerate.data_loader"
    with pytest.raises(ValueError, match=r"before accelerator\.prepare"):
        quiet(fake(Indexed(4), batch_size=2))


def test_a_second_live_iterator_is_refused_with_a_clear_error():
    with quiet(DataLoader(Indexed(20), batch_size=4)) as t:
        with pytest.raises(RuntimeError, match=r"superseded.*zip\(loader, loader\)"):
            list(zip(t, t, strict=False))
        outer = iter(t)
        next(outer)
        assert [len(b) for b in t] == [4] * 5  # the inner loop gets a whole epoch of its own
        with pytest.raises(RuntimeError, match="superseded"):
            next(outer)


def test_leaving_a_loop_and_starting_another_is_a_fresh_epoch():
    with quiet(DataLoader(Indexed(20), batch_size=4)) as t:
        for _ in t:
            break
        got = [x for b in t for x in b.tolist()]
        assert got == list(range(20))
        it = iter(t)
        assert next(t).tolist() == [0, 1, 2, 3]  # next() on the loader reads the live iterator
        assert next(it).tolist() == [4, 5, 6, 7]


class _Burns(Indexed):
    """Each sample costs 2 ms of this thread's CPU: loading that is CPU work, not waiting."""

    def __getitem__(self, i):
        import time

        until = time.thread_time() + 0.002
        while time.thread_time() < until:
            pass
        return super().__getitem__(i)


def test_a_short_first_window_without_workers_knows_the_loading_cpu():
    # A first window of a few slow batches (JPEG decode on a slow machine) must still tell CPU
    # work from waiting, or it plans workers past the CPUs. An epoch's first batch is not timed
    # (it pays the epoch's own set-up); the second is.
    with quiet(DataLoader(_Burns(40), batch_size=4), window_s=0.001, min_window_batches=3) as t:
        first = None
        for _ in t:
            if first is None and t.metrics is not None:
                first = t.metrics
        assert first is not None and first.batches <= 4
        assert first.loader_cpu_s_per_batch is not None
        # Loading is all CPU: its CPU time per batch is most of the wait for it.
        assert first.loader_cpu_s_per_batch >= 0.5 * first.wait_s_per_batch
