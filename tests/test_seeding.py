"""Tests for loadertune.seeding: seeding, speed flags, and num_workers-independent samples."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

import loadertune.seeding as seeding
from loadertune.seeding import (
    KeyedSampler,
    SampleKey,
    SeededDataset,
    keyed_indices,
    sample_seed,
    seed_everything,
    torch_speed_flags,
)

SEED = 1234
N_SAMPLES = 12
# A fixed shuffled order, so batches do not line up with index ranges and workers.
ORDER = [5, 0, 11, 3, 8, 1, 10, 7, 2, 9, 4, 6]
BAD_U64 = [-1, 2**64, True, np.bool_(False), 1.5, "3", None, np.float64(2.0)]


class Draws(Dataset):
    """Draws from all three global RNGs, as augmentations do, and tags the row with its index."""

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(
            [random.random(), np.random.rand(), torch.rand(()).item(), float(index)],
            dtype=torch.float64,
        )


class DrawsWithBatchFetch(Draws):
    """Has a batch fetch that DataLoader would prefer; SeededDataset must not use it."""

    def __getitems__(self, indices):
        raise AssertionError("the wrapped dataset's __getitems__ must be bypassed")


class Failing(Dataset):
    """Draws, then fails, as a dataset with a corrupt file does."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> None:
        random.random(), np.random.rand(), torch.rand(())
        raise KeyError(f"corrupt sample {index}")


class Stream(IterableDataset):
    def __iter__(self):
        return iter(range(3))


def as_is(sample):
    """A user collate_fn; module-level so workers started by spawn can unpickle it."""
    return sample


def load_epochs(num_workers: int, epochs: int = 2, persistent: bool = False, **kwargs):
    """One tensor per epoch: all rows of the epoch, in loading order."""
    sampler = KeyedSampler(ORDER)
    loader = DataLoader(
        SeededDataset(Draws(), SEED),
        sampler=sampler,
        batch_size=kwargs.pop("batch_size", 4),
        num_workers=num_workers,
        persistent_workers=persistent,
        **kwargs,
    )
    result = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        result.append(torch.cat(list(loader)))
    return result


@pytest.fixture(scope="module")
def reference() -> list[torch.Tensor]:
    return load_epochs(num_workers=0)


def reset_global_rngs() -> None:
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    # Leaves a cached Gaussian in numpy's legacy state, which a careless restore would lose.
    np.random.standard_normal()


def global_draws() -> tuple[float, ...]:
    return (random.random(), np.random.rand(), np.random.standard_normal(), torch.rand(()).item())


@pytest.fixture
def restored_torch_state(monkeypatch):
    """Puts back everything seed_everything touches, so other tests see torch as they left it."""
    flags = (
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    rngs = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    # monkeypatch records the current values (or their absence) and restores them afterwards.
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    yield
    benchmark, cudnn_deterministic, algorithms, warn_only = flags
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.deterministic = cudnn_deterministic
    # Only when changed: the first call imports torch._inductor, about a second.
    if (algorithms, warn_only) != (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    ):
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
    random.setstate(rngs[0])
    np.random.set_state(rngs[1])
    torch.set_rng_state(rngs[2])


# --- sample_seed -------------------------------------------------------------------------------


def test_sample_seed_is_pinned():
    # Hard-coded: a change here changes every augmentation of every user's run.
    assert sample_seed(0, 0, 0) == 13537303313503879940
    assert sample_seed(42, 3, 7) == 2401115527341933190
    assert sample_seed(2**64 - 1, 2**64 - 1, 2**64 - 1) == 10887997780889222910


def test_sample_seed_separates_its_inputs():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 3 * 3 * 50
    assert all(0 <= value < 2**64 for value in seeds)
    # Permuting the arguments must not collide (a sum or xor of the three would).
    assert sample_seed(1, 2, 3) != sample_seed(3, 2, 1) != sample_seed(2, 1, 3)
    assert sample_seed(np.int64(42), np.uint8(3), 7) == sample_seed(42, 3, 7)


@pytest.mark.parametrize("bad", BAD_U64)
@pytest.mark.parametrize("position", ["seed", "epoch", "index"])
def test_sample_seed_rejects_bad_values(position, bad):
    args = {"seed": 1, "epoch": 1, "index": 1, position: bad}
    with pytest.raises(ValueError, match=rf"^{position} must be an int in \[0, 2\*\*64\)"):
        sample_seed(**args)


# --- SeededDataset through DataLoader ----------------------------------------------------------


def test_reference_rows_differ_between_indices_epochs_and_rngs(reference):
    epoch0, epoch1 = reference
    assert epoch0.shape == (N_SAMPLES, 4)
    assert epoch0[:, 3].tolist() == ORDER
    assert torch.equal(epoch0[:, 3], epoch1[:, 3])
    for column in range(3):
        assert len(set(epoch0[:, column].tolist())) == N_SAMPLES, "indices share draws"
        assert not torch.isin(epoch0[:, column], epoch1[:, column]).any(), "epochs share draws"
    # random and numpy both run MT19937; seeded with the same words they return the same numbers.
    for rng_a, rng_b in [(0, 1), (0, 2), (1, 2)]:
        assert not torch.isin(epoch0[:, rng_a], epoch0[:, rng_b]).any(), "RNG streams coincide"


# More workers than this 2-core machine has cores is the point here, not a mistake.
@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize(
    ("num_workers", "persistent"), [(1, False), (3, False), (3, True)], ids=str
)
def test_batches_are_bit_identical_for_any_num_workers(reference, num_workers, persistent):
    got = load_epochs(num_workers, persistent=persistent)
    for epoch, (expected, actual) in enumerate(zip(reference, got, strict=True)):
        assert torch.equal(expected, actual), f"epoch {epoch} differs at num_workers={num_workers}"


def test_batch_size_none_and_custom_collate_give_the_same_samples(reference):
    unbatched = load_epochs(num_workers=2, batch_size=None, collate_fn=as_is)
    as_lists = load_epochs(num_workers=0, collate_fn=torch.stack)
    for expected, rows, stacked in zip(reference, unbatched, as_lists, strict=True):
        assert torch.equal(expected, rows.reshape(-1, 4))
        assert torch.equal(expected, stacked)


def test_same_across_separate_loaders_whatever_the_global_seed(reference):
    torch.manual_seed(1)
    random.seed(1)
    first = load_epochs(num_workers=0)
    torch.manual_seed(2)
    np.random.seed(2)
    second = load_epochs(num_workers=0)
    for expected, a, b in zip(reference, first, second, strict=True):
        assert torch.equal(expected, a)
        assert torch.equal(expected, b)


def test_same_in_a_separate_interpreter(reference):
    script = (
        "import json, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "import test_seeding as t\n"
        "from loadertune.seeding import sample_seed\n"
        "rows = [epoch.tolist() for epoch in t.load_epochs(num_workers=0)]\n"
        "print(json.dumps({'rows': rows, 'seed': sample_seed(7, 8, 9)}))\n"
    )
    package_root = str(Path(seeding.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
        "PYTHONHASHSEED": "random",
    }
    out = subprocess.run(
        [sys.executable, "-c", script, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(out.stdout)
    assert result["seed"] == sample_seed(7, 8, 9)
    assert result["rows"] == [epoch.tolist() for epoch in reference]


@pytest.mark.parametrize("batch_size", [4, None], ids=["getitems", "getitem"])
def test_loading_in_main_process_leaves_global_rngs_untouched(batch_size):
    def loaded() -> None:
        # DataLoader draws its base seed from the global torch RNG unless given a generator.
        loader = DataLoader(
            SeededDataset(Draws(), SEED),
            sampler=KeyedSampler(ORDER, epoch=1),
            batch_size=batch_size,
            generator=torch.Generator().manual_seed(0),
        )
        assert len(list(loader)) > 0

    reset_global_rngs()
    expected = global_draws()
    reset_global_rngs()
    loaded()
    assert global_draws() == expected


def test_global_rngs_restored_when_the_dataset_raises():
    reset_global_rngs()
    expected = global_draws()
    reset_global_rngs()
    wrapped = SeededDataset(Failing(), SEED)
    with pytest.raises(KeyError, match="corrupt sample 2"):
        wrapped[SampleKey(0, 2)]
    with pytest.raises(KeyError, match="corrupt sample 0"):
        wrapped.__getitems__([SampleKey(0, 0), SampleKey(0, 1)])
    assert global_draws() == expected


def test_inner_getitems_is_bypassed_for_per_sample_seeds(reference):
    loader = DataLoader(
        SeededDataset(DrawsWithBatchFetch(), SEED), sampler=KeyedSampler(ORDER), batch_size=4
    )
    assert torch.equal(torch.cat(list(loader)), reference[0])


# --- SeededDataset keys and plumbing -----------------------------------------------------------


def test_key_forms():
    wrapped = SeededDataset(Draws(), SEED)
    assert torch.equal(wrapped[5], wrapped[SampleKey(0, 5)])
    assert torch.equal(wrapped[(2, 5)], wrapped[SampleKey(2, 5)])
    assert torch.equal(wrapped[np.int64(5)], wrapped[SampleKey(0, 5)])
    assert not torch.equal(wrapped[SampleKey(1, 5)], wrapped[SampleKey(0, 5)])
    batch = wrapped.__getitems__([SampleKey(2, 5), 3])
    assert torch.equal(batch[0], wrapped[SampleKey(2, 5)])
    assert torch.equal(batch[1], wrapped[3])


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ((1, 2, 3), r"SampleKey\(epoch, index\) or an int index, got the 3-tuple"),
        (SampleKey(-1, 0), r"epoch must be an int"),
        (-1, r"index must be an int"),
        (1.0, r"index must be an int"),
        (True, r"index must be an int"),
    ],
)
def test_bad_keys_are_refused(key, message):
    with pytest.raises(ValueError, match=message):
        SeededDataset(Draws(), SEED)[key]


def test_wrapper_exposes_dataset_len_and_pickles():
    inner = Draws()
    wrapped = SeededDataset(inner, SEED)
    assert wrapped.dataset is inner
    assert len(wrapped) == N_SAMPLES
    assert "seed=1234" in repr(wrapped)
    copy = pickle.loads(pickle.dumps(wrapped))
    assert copy.seed == SEED
    assert torch.equal(copy[SampleKey(1, 3)], wrapped[SampleKey(1, 3)])
    key = SampleKey(epoch=3, index=7)
    assert pickle.loads(pickle.dumps(key)) == key
    assert len(pickle.dumps(key)) < 64


def test_iterable_dataset_is_refused():
    with pytest.raises(ValueError, match=r"IterableDataset.*worker_init_fn"):
        SeededDataset(Stream(), SEED)


def test_dataset_without_getitem_is_refused():
    with pytest.raises(ValueError, match="needs a map-style dataset with __getitem__"):
        SeededDataset(object(), SEED)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", BAD_U64)
def test_seeded_dataset_rejects_bad_seeds(bad):
    with pytest.raises(ValueError, match=r"^seed must be an int"):
        SeededDataset(Draws(), bad)


def test_keyed_indices_and_keyed_sampler():
    assert list(keyed_indices([4, 2], epoch=3)) == [SampleKey(3, 4), SampleKey(3, 2)]
    with pytest.raises(ValueError, match="epoch must be an int"):
        keyed_indices([1], epoch=-1)  # refused at the call, not on first use

    class EpochAware(list):
        def set_epoch(self, epoch: int) -> None:
            self.epochs = [*getattr(self, "epochs", []), epoch]

    inner = EpochAware([1, 0])
    sampler = KeyedSampler(inner)
    assert len(sampler) == 2
    assert list(sampler) == [SampleKey(0, 1), SampleKey(0, 0)]
    sampler.set_epoch(4)
    assert inner.epochs == [4]
    assert list(sampler) == [SampleKey(4, 1), SampleKey(4, 0)]
    with pytest.raises(ValueError, match="epoch must be an int"):
        sampler.set_epoch(True)


# --- seed_everything and torch_speed_flags -----------------------------------------------------


def test_seed_everything_matches_the_usual_way(restored_torch_state):
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    expected = global_draws()
    report = seed_everything(7)
    assert global_draws() == expected
    assert report.seed == 7
    assert report.numpy_seed == 7
    assert report.pythonhashseed == os.environ["PYTHONHASHSEED"] == "7"


def test_seed_everything_accepts_the_full_64_bit_range(restored_torch_state):
    big = 2**64 - 1
    report = seed_everything(big)
    first = global_draws()
    seed_everything(np.uint64(big))
    assert global_draws() == first
    assert report.numpy_seed == (2**32 - 1, 2**32 - 1, seeding._NUMPY_KEY_TAG)
    # Python refuses to start with a PYTHONHASHSEED above 2**32 - 1.
    assert report.pythonhashseed == os.environ["PYTHONHASHSEED"] == str(2**32 - 1)
    seed_everything(2**32)
    assert random.random() != np.random.rand(), "random and numpy streams coincide"


@pytest.mark.parametrize(("benchmark", "cudnn_deterministic"), [(True, False), (False, True)])
def test_seed_everything_leaves_speed_flags_alone_by_default(
    restored_torch_state, caplog, benchmark, cudnn_deterministic
):
    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.deterministic = cudnn_deterministic
    torch.use_deterministic_algorithms(cudnn_deterministic)
    with caplog.at_level(logging.INFO, logger="loadertune"):
        report = seed_everything(3)
    assert torch.backends.cudnn.benchmark is benchmark
    assert torch.backends.cudnn.deterministic is cudnn_deterministic
    assert torch.are_deterministic_algorithms_enabled() is cudnn_deterministic
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert report.changed == ()
    assert report.cublas_workspace_config is None
    assert not caplog.records


def test_seed_everything_deterministic_sets_exactly_its_flags(restored_torch_state, caplog):
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    torch.use_deterministic_algorithms(False)
    with caplog.at_level(logging.INFO, logger="loadertune"):
        report = seed_everything(3, deterministic=True)
    assert torch.backends.cudnn.benchmark is False
    assert torch.backends.cudnn.deterministic is True
    assert torch.are_deterministic_algorithms_enabled() is True
    assert torch.is_deterministic_algorithms_warn_only_enabled() is False
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert report.cublas_workspace_config == ":4096:8"
    assert report.changed == ("cudnn_benchmark", "cudnn_deterministic", "deterministic_algorithms")
    assert report.flags == torch_speed_flags()
    [record] = caplog.records
    assert record.name == "loadertune"
    assert record.levelno == logging.WARNING
    assert "3x slower" in record.getMessage()
    assert "bit-exact" in record.getMessage()


def test_seed_everything_keeps_an_existing_cublas_config(restored_torch_state, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    report = seed_everything(3, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert report.cublas_workspace_config == ":16:8"


def test_seed_everything_says_when_cublas_config_comes_too_late(
    restored_torch_state, monkeypatch, caplog
):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with caplog.at_level(logging.WARNING, logger="loadertune"):
        seed_everything(3, deterministic=True)
    assert "CUDA is already initialised" in caplog.text


@pytest.mark.parametrize("bad", BAD_U64)
def test_seed_everything_rejects_bad_seeds(restored_torch_state, bad):
    with pytest.raises(ValueError, match=r"^seed must be an int in \[0, 2\*\*64\)"):
        seed_everything(bad)


def test_seed_everything_rejects_a_non_bool_deterministic(restored_torch_state):
    with pytest.raises(ValueError, match=r"deterministic must be True or False.*warn_only=True"):
        seed_everything(1, deterministic="warn")  # type: ignore[arg-type]


def test_torch_speed_flags_explains_each_slow_flag(restored_torch_state):
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False
    torch.use_deterministic_algorithms(False)
    fast = torch_speed_flags()
    assert fast.costs == ()
    assert fast.to_dict()["cudnn_benchmark"] is True

    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    slow = torch_speed_flags()
    assert (slow.cudnn_benchmark, slow.cudnn_deterministic) == (False, True)
    assert (slow.deterministic_algorithms, slow.deterministic_algorithms_warn_only) == (True, True)
    assert len(slow.costs) == 3
    assert all("\n" not in line for line in slow.costs)
    assert slow.costs[0].startswith("cudnn.deterministic=True")
    assert slow.costs[1].startswith("cudnn.benchmark=False")
    assert slow.costs[2].startswith("torch.use_deterministic_algorithms(True)")


def test_all_is_sorted_and_complete():
    assert seeding.__all__ == sorted(seeding.__all__)
    assert all(hasattr(seeding, name) for name in seeding.__all__)
