"""Workers that start slowly (spawn, forkserver) start in the background while the running
loader serves (loadertune.prestart): nothing lost, repeated or reordered, nothing left behind.

Each test's new workers are held in their ``worker_init_fn`` by a file the test removes, so
"still starting" and "started" are states the test sets, not moments it waits for.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import threading
import time
import warnings

import pytest
import torch
from torch.utils.data import DataLoader

from loadertune import building
from loadertune.config import LoaderConfig
from loadertune.group import GroupIterator
from loadertune.pipeline import LoaderPipeline
from loadertune.prestart import Gate, Started, slow_start_method
from loadertune.session import PRESTART_POLL_S
from tests._factories import Indexed, exit_if_exists, flat, hold_while_exists, quiet


@pytest.fixture(scope="module", autouse=True)
def _helpers():
    # "spawn" starts multiprocessing's resource tracker, and "forkserver" its fork server, which
    # live as long as this process: started before the leak check looks, they are not taken for
    # workers a test left behind. The server imports torch and loadertune once, so that its
    # workers start in a fraction of a second (still a slow start method to loadertune).
    from multiprocessing import forkserver, resource_tracker

    forkserver.set_forkserver_preload(["torch", "loadertune"])
    forkserver.ensure_running()
    resource_tracker.ensure_running()


def _slow_loader(
    n: int,
    init,
    *,
    workers: int = 1,
    batch_size: int = 4,
    persistent: bool = False,
    pin_memory: bool = False,
    context: str = "spawn",
) -> DataLoader:
    return DataLoader(
        Indexed(n),
        batch_size=batch_size,
        num_workers=workers,
        multiprocessing_context=context,
        worker_init_fn=init,
        persistent_workers=persistent,
        pin_memory=pin_memory,
    )


def _decide(t, **changes) -> None:
    """A change the tuner decided (reconfigure and faults rebuild at once; decisions may not)."""
    t._actuator.change(t.config.replace(**changes), "change", "test decision", background=True)


def _next_after_start(it, t, want) -> list[int]:
    """Waits until the background start has come to ``want`` ("ready", or a failure when
    None), then reads one batch once the front end's check is due: it acts on the outcome."""
    starting = t._pipeline.starting
    deadline = time.monotonic() + 90
    while True:
        state = starting.poll()
        if (state == "ready") if want == "ready" else (state not in (None, "ready")):
            break
        assert time.monotonic() < deadline, f"the new workers never came to {want!r} (last: {state!r})"
        time.sleep(0.01)
    time.sleep(PRESTART_POLL_S)  # the check is due on the next batch
    return [int(i) for i in next(it)]


def _prestart_threads() -> list[threading.Thread]:
    return [th for th in threading.enumerate() if th.name == "loadertune-prestart" and th.is_alive()]


def test_slow_start_methods():
    def loader(ctx):
        return DataLoader(Indexed(4), num_workers=1, multiprocessing_context=ctx)

    assert slow_start_method(loader("spawn")) == "spawn"
    assert slow_start_method(loader("forkserver")) == "forkserver"
    assert slow_start_method(loader("fork")) is None
    default = multiprocessing.get_start_method()
    assert slow_start_method(DataLoader(Indexed(4))) == (default if default != "fork" else None)


def test_started_reports_even_when_the_init_fn_raises():
    sem = threading.Semaphore(0)

    def broken(worker_id):
        raise OSError("no such file")

    with pytest.raises(OSError):
        Started(broken, sem)(0)
    assert sem.acquire(blocking=False)  # torch raises the error with the first batch instead
    Started(None, sem)(1)
    assert sem.acquire(blocking=False)


def test_an_abandoned_gate_lets_the_sampler_return_without_drawing():
    gate = Gate()
    gate.abort()
    assert gate.wait() is False
    gate = Gate()
    gate.open()
    assert gate.wait() is True


@pytest.mark.timeout(120)
def test_close_while_new_workers_start_leaves_nothing_behind(tmp_path):
    hold = tmp_path / "hold"
    hold.touch()  # held for good: close() must not wait for them
    loader = _slow_loader(400, functools.partial(hold_while_exists, str(hold)))
    t = quiet(loader, mode="apply")
    t.reconfigure(num_workers=0)  # the running loader needs no worker of its own
    it = iter(t)
    next(it)
    _decide(t, num_workers=1)
    assert t._pipeline.starting is not None
    next(it)
    t.close()
    assert t._pipeline.starting is None
    assert not _prestart_threads()
    # conftest's leak check: no worker outlives the test


@pytest.mark.timeout(120)
def test_a_new_worker_that_dies_while_starting_leaves_the_job_on_the_old_loader(tmp_path, caplog):
    die = tmp_path / "die"
    n = 400
    loader = _slow_loader(n, functools.partial(exit_if_exists, str(die)))
    with quiet(loader, mode="apply") as t, caplog.at_level(logging.INFO, "loadertune"):
        t.reconfigure(num_workers=0)
        it = iter(t)
        got = flat([next(it) for _ in range(3)])
        die.touch()
        _decide(t, num_workers=1)
        assert t._pipeline.starting is not None
        got += _next_after_start(it, t, None)
        assert t._pipeline.starting is None
        got += flat(it)
        assert got == list(range(n))
        assert t.config.num_workers == 0
        faults = [e for e in t.events if e.kind == "fault"]
        assert len(faults) == 1 and "exited with code 3 while starting" in faults[0].data["error"]
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and "keeping" in r.getMessage()]
        assert len(warned) == 1 and "num_workers=0" in warned[0].getMessage()
        # No more workers than the ones that died are tried again.
        assert t._session.controller.ceiling_workers == 1
    assert not _prestart_threads()


@pytest.mark.timeout(120)
def test_the_old_loader_serves_while_new_workers_start_then_hands_over(tmp_path, caplog, monkeypatch):
    # Persistent workers: the old loader serves the rest of the epoch and the next epoch's
    # start while the new worker cannot finish starting, then hands over mid-epoch.
    hold = tmp_path / "hold"
    n = 400
    # pin_memory without an accelerator: torch warns at every iterator it builds, the one built
    # on the background thread too; the run shows it once.
    monkeypatch.setattr(building, "_WARNED", set())
    pin = torch.accelerator.is_available()
    loader = _slow_loader(n, functools.partial(hold_while_exists, str(hold)), persistent=True, pin_memory=not pin)
    with (
        warnings.catch_warnings(record=True) as shown,
        quiet(loader, mode="apply") as t,
        caplog.at_level(logging.INFO, "loadertune"),
    ):
        warnings.simplefilter("always")
        it = iter(t)
        first = flat([next(it) for _ in range(5)])
        hold.touch()
        _decide(t, prefetch_factor=4)
        assert t._pipeline.starting is not None
        assert t.config.prefetch_factor == 2  # the old loader still runs
        first += flat(it)
        assert t._pipeline.starting is not None
        it = iter(t)
        second = flat([next(it) for _ in range(5)])
        assert t._pipeline.starting is not None and t.config.prefetch_factor == 2
        hold.unlink()
        second += _next_after_start(it, t, "ready")
        assert t._pipeline.starting is None
        second += flat(it)
        # Every sample once, in the sampler's order: the old loader's in-flight batches came
        # first, then the new loader took over from where the old one stopped drawing.
        assert first == list(range(n)) and second == list(range(n))
        assert t.config == LoaderConfig(
            num_workers=1, batch_size=4, prefetch_factor=4, persistent_workers=True, pin_memory=not pin
        )
        change = [e for e in t.events if e.kind == "change"][-1]
        assert change.step == 5
        assert any("start in the background (spawn)" in r.getMessage() for r in caplog.records)
        switched = [r.getMessage() for r in caplog.records if "switched to" in r.getMessage()]
        assert len(switched) == 1 and "prefetch_factor=4" in switched[0]
        assert flat(t) == list(range(n))  # and the next epoch, on the new workers
    assert not _prestart_threads()
    if not pin:
        pinned = [w for w in shown if "pin_memory" in str(w.message)]
        assert len(pinned) == 1, [str(w.message) for w in pinned]


@pytest.mark.timeout(120)
def test_without_persistent_workers_the_next_epoch_starts_with_the_new_ones(tmp_path):
    hold = tmp_path / "hold"
    hold.touch()  # held for good: the epoch's end must not wait for them
    n = 400
    loader = _slow_loader(n, functools.partial(hold_while_exists, str(hold)))
    with quiet(loader, mode="apply") as t:
        t.reconfigure(num_workers=0)
        it = iter(t)
        got = flat([next(it) for _ in range(2)])
        _decide(t, num_workers=1)
        got += flat(it)  # the old loader ends the epoch
        assert got == list(range(n))
        assert t._pipeline.starting is None and t.config.num_workers == 1
    assert not _prestart_threads()


def test_fork_started_workers_rebuild_at_once():
    with quiet(DataLoader(Indexed(400), batch_size=4, num_workers=1, multiprocessing_context="fork"), mode="apply") as t:
        it = iter(t)
        got = flat([next(it) for _ in range(3)])
        _decide(t, num_workers=2)
        assert t._pipeline.starting is None and t.config.num_workers == 2
        got += flat(it)
        assert got == list(range(400))


def _held_start(tmp_path, n=400, **loader_kw):
    """A tuned spawn loader running at 0 workers, a decided change to 1 worker held starting."""
    hold = tmp_path / "hold"
    hold.touch()
    t = quiet(_slow_loader(n, functools.partial(hold_while_exists, str(hold)), **loader_kw), mode="apply")
    t.reconfigure(num_workers=0)
    it = iter(t)
    got = flat([next(it) for _ in range(3)])
    _decide(t, num_workers=1)
    assert t._pipeline.starting is not None and t._session.windows_held
    return t, it, got


@pytest.mark.timeout(60)
def test_leaving_the_epoch_gives_the_start_up_and_windows_go_on(tmp_path, caplog):
    t, it, _ = _held_start(tmp_path)
    with t, caplog.at_level(logging.INFO, "loadertune"):
        del it
        it = iter(t)  # the loop left the epoch: the half-started workers go with it
        assert t._pipeline.starting is None
        next(it)
        time.sleep(PRESTART_POLL_S)
        next(it)  # the front end's check reports it and opens the next window
        assert not t._session.windows_held
        abandon = [e for e in t.events if e.kind == "abandon"]
        assert len(abandon) == 1 and abandon[0].data["why"] == "the epoch was left before they had started"
        assert t._session.controller.config == t.config and t.config.num_workers == 0
        assert any("gave up starting the workers of num_workers=1" in r.getMessage() for r in caplog.records)
    assert not _prestart_threads()


@pytest.mark.timeout(60)
def test_a_later_change_supersedes_a_start_under_way(tmp_path):
    t, it, got = _held_start(tmp_path)
    with t:
        t.reconfigure(prefetch_factor=None, num_workers=0, batch_size=8)
        assert t._pipeline.starting is None and not t._session.windows_held
        got += flat(it)
        assert sorted(got) == list(range(400)) and got == sorted(got)
        assert [e.data["why"] for e in t.events if e.kind == "abandon"] == ["a later change came first"]
    assert not _prestart_threads()


@pytest.mark.timeout(60)
def test_workers_too_slow_to_start_are_given_up(tmp_path, monkeypatch, caplog):
    import loadertune.prestart as prestart

    monkeypatch.setattr(prestart, "PRESTART_TIMEOUT_S", 0.0)
    t, it, got = _held_start(tmp_path)
    with t, caplog.at_level(logging.WARNING, "loadertune"):
        time.sleep(PRESTART_POLL_S)
        got += flat([next(it)])
        assert t._pipeline.starting is None and not t._session.windows_held
        fault = [e for e in t.events if e.kind == "fault"]
        assert len(fault) == 1 and fault[0].data["cause"] == "start" and "had not all started" in fault[0].data["error"]
        assert t._session.controller.ceiling_workers == 1
        got += flat(it)
        assert got == list(range(400))
    assert not _prestart_threads()


@pytest.mark.timeout(60)
def test_the_position_a_checkpoint_takes_ignores_the_loader_still_starting(tmp_path):
    t, _, got = _held_start(tmp_path)
    with t:
        assert t._pipeline.position() == len(got) == 12
        state = t.state_dict()
    assert state["epoch_start"]["position"] == 12


def test_a_batch_size_change_is_not_started_in_the_background():
    loader = DataLoader(Indexed(40), batch_size=4, num_workers=1, multiprocessing_context="spawn")
    pipeline = LoaderPipeline(loader, dataset=loader.dataset, config=LoaderConfig(num_workers=0, batch_size=4))
    pipeline.start_epoch()
    try:
        assert not pipeline.prestart(LoaderConfig(num_workers=1, batch_size=8))
        assert pipeline.starting is None
    finally:
        pipeline.shutdown()


@pytest.mark.timeout(60)
def test_a_start_still_under_way_at_close_is_reported_and_never_counted(tmp_path):
    t, _, _ = _held_start(tmp_path)
    t.close()
    abandon = [e for e in t.events if e.kind == "abandon"]
    assert len(abandon) == 1 and abandon[0].data["why"] == "the loader was closed first"
    summary = [e for e in t.events if e.kind == "summary"][-1].data
    # The reconfigure to 0 workers ran; the decision for 1 worker never did.
    assert summary["changes"] == 1 and summary["final_config"]["num_workers"] == 0
    assert not _prestart_threads()


@pytest.mark.timeout(120)
def test_a_change_that_also_persists_turns_the_running_workers_persistent_first(tmp_path):
    # The tuner's one change for a slow start (issue 13): persistent_workers on, and more of them.
    # The running workers turn persistent in place, so when the epoch ends before the new ones
    # have started they serve the next epoch too, and the start goes on. Only the added worker
    # starts: it joins the running one (loadertune.group), which keeps serving beside it.
    hold = tmp_path / "hold"
    n = 200
    loader = _slow_loader(n, functools.partial(hold_while_exists, str(hold)), context="forkserver")
    with quiet(loader, mode="apply") as t:
        it = iter(t)
        got = flat([next(it) for _ in range(2)])  # the running worker has started
        running = set(t._pipeline.worker_pids())
        hold.touch()
        _decide(t, num_workers=2, persistent_workers=True)
        assert t._pipeline.starting is not None and t._pipeline.starting.loader.num_workers == 1
        assert t.config == LoaderConfig.from_loader(loader).replace(persistent_workers=True)
        got += flat(it)  # the running worker ends the epoch
        assert got == list(range(n))
        it = iter(t)
        assert t._pipeline.starting is not None, "the start goes on into the next epoch"
        second = flat([next(it)])
        hold.unlink()
        second += _next_after_start(it, t, "ready")
        assert isinstance(t._pipeline._it, GroupIterator)
        pids = set(t._pipeline.worker_pids())
        assert running < pids and len(pids) == 2
        second += flat(it)
        assert second == list(range(n))
        assert t.config.num_workers == 2 and t.config.persistent_workers
        assert flat(t) == list(range(n))  # both loaders reset for the next epoch, none restarted
        assert set(t._pipeline.worker_pids()) == pids
    assert not _prestart_threads()


# -- workers added beside the running ones (loadertune.group) ---------------------------------------
@pytest.fixture()
def _fork_starts_slowly(monkeypatch):
    # The group's bookkeeping does not depend on how workers start: fork-started workers taken
    # for slow ones keep these tests fast.
    from loadertune import actuator, pipeline, tuned

    for module in (actuator, pipeline, tuned):
        monkeypatch.setattr(module, "slow_start_method", lambda loader: "forkserver")


def _fork_group(n: int, *, shuffle: bool = False):
    """A tuned fork loader of 1 persistent worker with 2 more joined after 4 batches."""
    loader = DataLoader(
        Indexed(n), batch_size=4, num_workers=1, persistent_workers=True, shuffle=shuffle,
        multiprocessing_context="fork", generator=torch.Generator().manual_seed(3),
    )
    t = quiet(loader, mode="apply")
    it = iter(t)
    got = [next(it) for _ in range(4)]
    _decide(t, num_workers=3)
    got.append(_next_after_start(it, t, "ready"))
    assert isinstance(t._pipeline._it, GroupIterator)
    return t, it, flat(got)


@pytest.mark.timeout(60)
def test_a_group_hands_over_to_a_replacement_without_losing_a_sample(_fork_starts_slowly):
    t, it, got = _fork_group(400)
    with t:
        got += flat([next(it) for _ in range(5)])
        t.reconfigure(num_workers=1, prefetch_factor=3)  # the group drains as one
        assert t._pipeline._added == []
        got += flat(it)
        assert got == list(range(400))
        assert len(t._pipeline.worker_pids()) == 1
        assert flat(t) == list(range(400))


@pytest.mark.timeout(60)
def test_a_group_adds_more_workers_again(_fork_starts_slowly):
    t, it, got = _fork_group(400)
    with t:
        _decide(t, num_workers=5)
        assert t._pipeline.starting.loader.num_workers == 2
        got += _next_after_start(it, t, "ready")
        assert len(t._pipeline._it.parts) == 3 and len(t._pipeline.worker_pids()) == 5
        got += flat(it)
        assert got == list(range(400))


@pytest.mark.timeout(60)
def test_a_checkpoint_taken_in_a_group_resumes_exactly_where_it_was(_fork_starts_slowly):
    t, it, got = _fork_group(400, shuffle=True)
    with t:
        got += flat([next(it) for _ in range(7)])
        state = t.state_dict()
        rest_of_epoch = flat(it)
    order = got + rest_of_epoch
    assert sorted(order) == list(range(400))
    loader = DataLoader(Indexed(400), batch_size=4, num_workers=1, persistent_workers=True, shuffle=True,
                        multiprocessing_context="fork", generator=torch.Generator().manual_seed(3))
    with quiet(loader, mode="apply") as resumed:
        resumed.load_state_dict(state)
        assert flat(resumed) == rest_of_epoch


@pytest.mark.timeout(60)
def test_a_worker_death_in_a_group_is_recovered_without_losing_a_sample(_fork_starts_slowly):
    import os
    import signal

    t, it, got = _fork_group(400)
    with t:
        added = [w.pid for w in t._pipeline._it.parts[1][1]._workers]
        os.kill(added[0], signal.SIGKILL)
        got += flat(it)
        assert sorted(got) == list(range(400)) and len(got) == 400
        assert [e for e in t.events if e.kind == "fault"]


@pytest.mark.timeout(60)
def test_a_worker_death_in_a_group_suspects_only_the_batches_of_its_own_loader(_fork_starts_slowly):
    import os
    import signal

    from loadertune.shutdown import unregister

    t, _, _ = _fork_group(400)
    with t:
        pipeline = t._pipeline
        group = pipeline.src_it
        shares = [flat(share) for _, share in group.split(pipeline.src_issued)]
        assert shares[0] and shares[1]
        added = group.parts[1][1]
        unregister(added)  # the death is the test's to report, not torch's SIGCHLD handler's
        victim = added._workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        pipeline.note_death(
            group, RuntimeError(f"DataLoader worker (pid(s) {victim.pid}) exited unexpectedly")
        )
        assert pipeline.crashes.suspects and pipeline.crashes.suspects <= set(shares[1])


@pytest.mark.timeout(60)
def test_workers_that_fail_to_join_at_the_switch_leave_no_sample_behind(
    _fork_starts_slowly, monkeypatch, caplog
):
    from loadertune.prestart import Prestart
    from loadertune.shutdown import abort_iterator

    real_finish = Prestart.finish

    def finish_then_fail(self):
        it = real_finish(self)  # the gate opened: its first batches are drawn into the shared lists
        abort_iterator(it)
        raise RuntimeError("lost at the last moment")

    monkeypatch.setattr(Prestart, "finish", finish_then_fail)
    loader = DataLoader(
        Indexed(400),
        batch_size=4,
        num_workers=1,
        persistent_workers=True,
        multiprocessing_context="fork",
    )
    t = quiet(loader, mode="apply")
    with t, caplog.at_level(logging.WARNING, logger="loadertune"):
        it = iter(t)
        got = flat([next(it) for _ in range(4)])
        _decide(t, num_workers=3)
        got += _next_after_start(it, t, "ready")
        assert "could not join the running ones" in caplog.text
        assert (
            not isinstance(t._pipeline._it, GroupIterator) and len(t._pipeline.worker_pids()) == 3
        )
        got += flat(it)
        assert sorted(got) == list(range(400)) and len(got) == 400


@pytest.mark.parametrize("in_order", [True, False])
def test_only_an_in_order_loader_has_workers_join_it(_fork_starts_slowly, in_order):
    # Out of order, a batch whose loading raised cannot be told from one still to come.
    loader = DataLoader(
        Indexed(200),
        batch_size=4,
        num_workers=1,
        persistent_workers=True,
        multiprocessing_context="fork",
        in_order=in_order,
    )
    with quiet(loader, mode="apply") as t:
        it = iter(t)
        next(it)
        assert t._pipeline.joins(t.config.replace(num_workers=3)) is in_order


@pytest.mark.timeout(60)
def test_stopping_a_group_never_reports_the_death_of_one_of_its_own_workers(
    _fork_starts_slowly, monkeypatch
):
    import os
    import signal

    from loadertune import pipeline as pipeline_module

    t, _, _ = _fork_group(400)
    victim = t._pipeline._it.parts[1][1]._workers[0]
    # The death's SIGCHLD is delivered below, while the first loader stops (a stuck worker
    # killed then): torch's handler checks then every worker still registered.
    previous = signal.signal(signal.SIGCHLD, lambda *_: None)
    try:
        os.kill(victim.pid, signal.SIGKILL)
        os.waitid(os.P_PID, victim.pid, os.WEXITED | os.WNOWAIT)
        real = pipeline_module.shutdown_loader

        def stop(loader, iterator):
            torch._C._error_if_any_worker_fails()
            real(loader, iterator)

        monkeypatch.setattr(pipeline_module, "shutdown_loader", stop)
        t.close()
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert not [e for e in t.events if e.kind == "fault"]
