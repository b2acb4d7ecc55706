"""Repeatable runs without the cuDNN slowdown, and data that does not depend on ``num_workers``.

Two tools live here:

* :func:`seed_everything` seeds ``random``, numpy's legacy global RNG and torch, and only on request
  turns on the deterministic-kernel flags, which can make convolution-heavy training several times
  slower. :func:`torch_speed_flags` reports which of those flags are on and what they cost.
* :class:`SeededDataset` reseeds the global RNGs from ``(seed, epoch, index)`` before every sample,
  so a sample's random augmentations are the same whichever worker loads it and however many
  workers there are. A tuner may then change ``num_workers`` mid-run without changing what the model
  sees. Keys reach the dataset as :class:`SampleKey` values, from :class:`KeyedSampler` or
  :func:`keyed_indices`.
"""

from __future__ import annotations

import hashlib
import logging
import operator
import os
import random
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

__all__ = [
    "KeyedSampler",
    "SampleKey",
    "SeedReport",
    "SeededDataset",
    "SpeedFlags",
    "keyed_indices",
    "sample_seed",
    "seed_everything",
    "torch_speed_flags",
]

logger = logging.getLogger("loadertune")

T_co = TypeVar("T_co", covariant=True)

_U64 = 2**64
_U32_MASK = 0xFFFF_FFFF
# Python's random.seed(int) runs MT19937 init_by_array over the int's 32-bit words, and
# np.random.seed(array) runs the very same init_by_array: fed the same words, random.random() and
# np.random.rand() return identical numbers. A third word that Python's key never has (our seeds
# are < 2**64, so at most two words) keeps the two streams apart.
_NUMPY_KEY_TAG = 0x6E70_7931  # "npy1"
# Part of the sample_seed contract: changing it changes every augmentation of every run.
_SAMPLE_SEED_PERSON = b"loadertune.s1"

_COST_DETERMINISTIC = (
    "cudnn.deterministic=True: cuDNN may only use deterministic convolution algorithms, often the "
    "slow ones (convolution-heavy training can run up to ~3x slower); keep only if bit-exact "
    "reproducibility is required"
)
_COST_NO_BENCHMARK = (
    "cudnn.benchmark=False: cuDNN picks convolution algorithms by heuristic instead of timing them; "
    "fixed-shape convolution nets are often faster with True (which varies the choice between runs)"
)
_COST_DETERMINISTIC_ALGORITHMS = (
    "torch.use_deterministic_algorithms(True): ops take deterministic, often slower paths (or raise "
    "where none exists) and fill uninitialized memory; keep only if bit-exact reproducibility is "
    "required"
)


@dataclass(frozen=True)
class SpeedFlags:
    """The torch settings that trade speed for bit-exact reproducibility, as they are now.

    Attributes:
        cudnn_benchmark: ``torch.backends.cudnn.benchmark``.
        cudnn_deterministic: ``torch.backends.cudnn.deterministic``.
        deterministic_algorithms: ``torch.are_deterministic_algorithms_enabled()``.
        deterministic_algorithms_warn_only: ``torch.is_deterministic_algorithms_warn_only_enabled()``.
        costs: One line per flag set in the slow direction, saying what it costs; empty when none.
    """

    cudnn_benchmark: bool
    cudnn_deterministic: bool
    deterministic_algorithms: bool
    deterministic_algorithms_warn_only: bool
    costs: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """The flags as a plain dict (JSON-ready)."""
        return asdict(self)


@dataclass(frozen=True)
class SeedReport:
    """What :func:`seed_everything` did.

    Attributes:
        seed: The seed given to ``random.seed`` and ``torch.manual_seed``.
        numpy_seed: What ``np.random.seed`` received: the seed itself when below 2**32, otherwise
            a tuple of 32-bit words, since numpy's legacy seeding takes no larger int.
        pythonhashseed: The value written to ``os.environ["PYTHONHASHSEED"]``. It only affects
            subprocesses started afterwards; the running interpreter's ``hash()`` is fixed at start.
        deterministic: Whether the deterministic-kernel flags were requested.
        cublas_workspace_config: ``CUBLAS_WORKSPACE_CONFIG`` after the call, or None when unset.
        changed: The names of the :class:`SpeedFlags` fields this call changed.
        flags: The speed flags after the call.
    """

    seed: int
    numpy_seed: int | tuple[int, ...]
    pythonhashseed: str
    deterministic: bool
    cublas_workspace_config: str | None
    changed: tuple[str, ...]
    flags: SpeedFlags


class SampleKey(NamedTuple):
    """The key :class:`SeededDataset` is indexed with: which sample, and in which epoch.

    A NamedTuple pickles as a class reference plus two ints, which keeps the index queue to the
    workers cheap.

    Attributes:
        epoch: The epoch the sample is drawn for (0-based).
        index: The index into the wrapped dataset.
    """

    epoch: int
    index: int


def _check_u64(name: str, value: Any) -> int:
    """``value`` as an int in [0, 2**64), or a ValueError naming ``name``."""
    if type(value) is not int:
        # bool is an int to Python but almost always a mistake here.
        if isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{name} must be an int in [0, 2**64), got the bool {value!r}")
        try:
            value = operator.index(value)
        except TypeError:
            raise ValueError(
                f"{name} must be an int in [0, 2**64), got {type(value).__name__} {value!r}"
            ) from None
    if not 0 <= value < _U64:
        raise ValueError(f"{name} must be an int in [0, 2**64), got {value!r}")
    return value


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for one sample, stable across processes, machines and Python runs.

    It is the 8-byte BLAKE2b digest (personalised with ``b"loadertune.s1"``), read as a
    little-endian int, of the three values packed as little-endian unsigned 64-bit ints.
    Python's ``hash()`` is deliberately not used: it is salted per interpreter.

    Args:
        seed: The run's seed, in [0, 2**64).
        epoch: The epoch, in [0, 2**64).
        index: The sample's index in the dataset, in [0, 2**64).

    Returns:
        An int in [0, 2**64).

    Raises:
        ValueError: If any argument is not an int in [0, 2**64) (bools are refused).
    """
    packed = struct.pack(
        "<QQQ", _check_u64("seed", seed), _check_u64("epoch", epoch), _check_u64("index", index)
    )
    digest = hashlib.blake2b(packed, digest_size=8, person=_SAMPLE_SEED_PERSON).digest()
    return int.from_bytes(digest, "little")


def _numpy_key(value: int) -> tuple[int, int, int]:
    return (value & _U32_MASK, value >> 32, _NUMPY_KEY_TAG)


def _reseed_global_rngs(value: int) -> None:
    random.seed(value)
    np.random.seed(_numpy_key(value))
    # Only the CPU generator: dataset code runs on the CPU (CUDA is unusable in forked workers), and
    # torch.manual_seed would also reseed every CUDA generator, i.e. the training process's dropout
    # at num_workers=0. It also costs ~170 us against ~1 us for the CPU generator alone.
    # Its mt19937 keeps only the low 32 bits of a seed, so among a million samples ~100 pairs share
    # torch draws; random and numpy use all 64 bits.
    torch.default_generator.manual_seed(value)


def _save_global_rngs() -> tuple[Any, Any, torch.Tensor]:
    return random.getstate(), np.random.get_state(), torch.default_generator.get_state()


def _restore_global_rngs(state: tuple[Any, Any, torch.Tensor]) -> None:
    python_state, numpy_state, torch_state = state
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    torch.default_generator.set_state(torch_state)


def _split_key(key: Any) -> tuple[Any, Any]:
    if isinstance(key, tuple):
        if len(key) != 2:
            raise ValueError(
                f"SeededDataset keys are SampleKey(epoch, index) or an int index, got the "
                f"{len(key)}-tuple {key!r}"
            )
        return key
    return 0, key


class SeededDataset(Dataset[T_co]):
    """Wraps a map-style dataset so each sample's randomness depends only on (seed, epoch, index).

    Before loading a sample it reseeds ``random``, numpy's legacy global RNG (``np.random.*``) and
    torch's CPU generator from :func:`sample_seed`. Augmentations drawn from those RNGs inside
    ``__getitem__`` are then the same whichever worker loads the sample and however many workers
    there are, and the same across runs.

    Index it with :class:`SampleKey` values (use :class:`KeyedSampler` or :func:`keyed_indices` to
    produce them); a plain int index means epoch 0. The epoch travels inside each key, so persistent
    workers, whose copy of the dataset never sees the main process change, still use the right one.

    In the training process (``num_workers=0``) the three global RNG states are saved before loading
    and restored afterwards, so model-side randomness such as dropout is unaffected. Batches go
    through ``__getitems__``, which saves and restores once per batch. Worker processes skip this:
    their RNG state is theirs alone.

    Not covered: RNGs the dataset owns (``np.random.default_rng()``, a ``torch.Generator``), CUDA
    generators, and randomness in ``collate_fn`` (it runs once per batch, after the last sample).
    Loading from several threads of one process is not supported: the threads share the global RNGs.
    Keep the wrapper outermost (``Subset(SeededDataset(...))`` would pass it plain ints).

    Args:
        dataset: A map-style dataset (has ``__getitem__``; not an ``IterableDataset``).
        seed: The run's seed, an int in [0, 2**64).

    Raises:
        ValueError: If ``dataset`` is an ``IterableDataset`` or has no ``__getitem__``, or ``seed``
            is not an int in [0, 2**64).
    """

    def __init__(self, dataset: Dataset[T_co], seed: int) -> None:
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                "SeededDataset needs a map-style dataset (indexed through __getitem__), got the "
                f"IterableDataset {type(dataset).__name__}: its samples have no index to derive a "
                "seed from. Seed its workers with a worker_init_fn instead (for example one calling "
                "seed_everything(sample_seed(seed, epoch, worker_id))); the stream then depends on "
                "num_workers."
            )
        if not hasattr(dataset, "__getitem__"):
            raise ValueError(
                f"SeededDataset needs a map-style dataset with __getitem__, got "
                f"{type(dataset).__name__}"
            )
        self.dataset = dataset
        self.seed = _check_u64("seed", seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r}, seed={self.seed})"

    def _load(self, key: Any) -> T_co:
        epoch, index = _split_key(key)
        value = sample_seed(self.seed, epoch, index)
        _reseed_global_rngs(value)
        # The validated int, so the wrapped dataset sees what it would without the wrapper.
        return self.dataset[operator.index(index)]

    def __getitem__(self, key: SampleKey | int) -> T_co:
        """Loads one sample after reseeding the global RNGs from its key.

        Args:
            key: A :class:`SampleKey`, an ``(epoch, index)`` tuple, or an int index (epoch 0).

        Returns:
            Whatever the wrapped dataset returns for the index.

        Raises:
            ValueError: If the key is malformed or its epoch or index is not in [0, 2**64).
        """
        if get_worker_info() is not None:
            return self._load(key)
        state = _save_global_rngs()
        try:
            return self._load(key)
        finally:
            _restore_global_rngs(state)

    def __getitems__(self, keys: Sequence[SampleKey | int]) -> list[T_co]:
        """Loads a batch, one ``__getitem__`` of the wrapped dataset per key.

        The wrapped dataset's own ``__getitems__`` is bypassed on purpose: it would draw a whole
        batch's randomness from one stream, so a sample would depend on its batch-mates. In the
        training process the RNG states are saved and restored once for the whole batch.

        Args:
            keys: The batch's keys, as for :meth:`__getitem__`.

        Returns:
            The samples, in key order (DataLoader then hands them to ``collate_fn``).
        """
        if get_worker_info() is not None:
            return [self._load(key) for key in keys]
        state = _save_global_rngs()
        try:
            return [self._load(key) for key in keys]
        finally:
            _restore_global_rngs(state)


def keyed_indices(indices: Iterable[int], epoch: int) -> Iterator[SampleKey]:
    """Turns an index stream into the keys :class:`SeededDataset` expects.

    Args:
        indices: Dataset indices, e.g. a sampler or the remainder of an epoch's order.
        epoch: The epoch all these indices belong to.

    Returns:
        An iterator of ``SampleKey(epoch, index)``, lazily following ``indices``.

    Raises:
        ValueError: If ``epoch`` is not an int in [0, 2**64) (checked at once, not on first use).
    """
    epoch = _check_u64("epoch", epoch)
    return (SampleKey(epoch, index) for index in indices)


class KeyedSampler(Sampler[SampleKey]):
    """A sampler yielding ``SampleKey(epoch, index)`` for each index of a wrapped sampler.

    Call :meth:`set_epoch` before each epoch, as with ``DistributedSampler``; the sampler runs in
    the training process, so this works with persistent workers too.

    Args:
        sampler: Any iterable of dataset indices (a torch sampler, a list, a range).
        epoch: The starting epoch.

    Raises:
        ValueError: If ``epoch`` is not an int in [0, 2**64).
    """

    def __init__(self, sampler: Iterable[int], epoch: int = 0) -> None:
        self.sampler = sampler
        self.epoch = _check_u64("epoch", epoch)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch for later iterations, and forwards it to the wrapped sampler if it has
        ``set_epoch`` (so a ``DistributedSampler`` reshuffles).

        Args:
            epoch: The epoch, an int in [0, 2**64).

        Raises:
            ValueError: If ``epoch`` is not an int in [0, 2**64).
        """
        self.epoch = _check_u64("epoch", epoch)
        inner_set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(inner_set_epoch):
            inner_set_epoch(self.epoch)

    def __iter__(self) -> Iterator[SampleKey]:
        return keyed_indices(self.sampler, self.epoch)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]


def torch_speed_flags() -> SpeedFlags:
    """Reads the torch flags that trade speed for reproducibility, with what each one costs.

    Returns:
        The current flags; ``costs`` holds one line for each flag set in the slow direction.
        ``cudnn.benchmark=False`` is torch's default and is listed too: it leaves convolution
        speed unclaimed for fixed-shape inputs.
    """
    benchmark = bool(torch.backends.cudnn.benchmark)
    cudnn_deterministic = bool(torch.backends.cudnn.deterministic)
    algorithms = torch.are_deterministic_algorithms_enabled()
    costs = []
    if cudnn_deterministic:
        costs.append(_COST_DETERMINISTIC)
    if not benchmark:
        costs.append(_COST_NO_BENCHMARK)
    if algorithms:
        costs.append(_COST_DETERMINISTIC_ALGORITHMS)
    return SpeedFlags(
        cudnn_benchmark=benchmark,
        cudnn_deterministic=cudnn_deterministic,
        deterministic_algorithms=algorithms,
        deterministic_algorithms_warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
        costs=tuple(costs),
    )


def seed_everything(seed: int, *, deterministic: bool = False) -> SeedReport:
    """Seeds ``random``, numpy's legacy global RNG and torch; optionally forces deterministic kernels.

    Seeding alone makes initialisation, data order and augmentations repeatable at full speed; GPU
    arithmetic may still differ in the last bits between runs. ``deterministic=True`` removes that
    too, at a price: it sets ``cudnn.deterministic=True``, ``cudnn.benchmark=False`` and
    ``torch.use_deterministic_algorithms(True)`` (strict: an op without a deterministic
    implementation raises, naming itself; call ``torch.use_deterministic_algorithms(True,
    warn_only=True)`` afterwards to get warnings instead), sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
    unless already set, and logs a WARNING on the ``loadertune`` logger with the cost.
    ``deterministic=False`` leaves all of those as they are, neither setting nor clearing them.

    ``torch.manual_seed`` seeds the CPU and every CUDA device (lazily if CUDA is not yet
    initialised). ``PYTHONHASHSEED`` is set to ``seed % 2**32`` (the largest Python accepts) and
    only affects subprocesses started afterwards.

    Args:
        seed: An int in [0, 2**64).
        deterministic: Whether to force deterministic kernels (slow; see above).

    Returns:
        A :class:`SeedReport` of what was set and which flags changed.

    Raises:
        ValueError: If ``seed`` is not an int in [0, 2**64) (bools are refused), or
            ``deterministic`` is not a bool.
    """
    seed = _check_u64("seed", seed)
    if not isinstance(deterministic, bool):
        raise ValueError(
            f"deterministic must be True or False, got {deterministic!r}; for warnings instead of "
            "errors call torch.use_deterministic_algorithms(True, warn_only=True) afterwards"
        )
    before = torch_speed_flags()

    random.seed(seed)
    # Seeds below 2**32 go in as the int, so existing np.random.seed(seed) runs are reproduced.
    numpy_seed: int | tuple[int, ...] = seed if seed <= _U32_MASK else _numpy_key(seed)
    np.random.seed(numpy_seed)
    torch.manual_seed(seed)
    pythonhashseed = str(seed & _U32_MASK)
    os.environ["PYTHONHASHSEED"] = pythonhashseed

    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        late = (
            " CUDA is already initialised: cuBLAS handles created before this call ignore "
            "CUBLAS_WORKSPACE_CONFIG, so seed before any CUDA work."
            if torch.cuda.is_initialized()
            else ""
        )
        # WARNING, not INFO: the usual victim copied deterministic=True from a template and would
        # never see an INFO line, while paying for it on every step.
        logger.warning(
            "seed_everything(deterministic=True): cudnn.deterministic=True, cudnn.benchmark=False "
            "and deterministic algorithms can make convolution-heavy training up to ~3x slower. "
            "Keep them only if bit-exact reproducibility is required; seeding alone "
            "(deterministic=False) already repeats data order and augmentations.%s",
            late,
        )

    after = torch_speed_flags()
    changed = tuple(
        name
        for name in (
            "cudnn_benchmark",
            "cudnn_deterministic",
            "deterministic_algorithms",
            "deterministic_algorithms_warn_only",
        )
        if getattr(before, name) != getattr(after, name)
    )
    return SeedReport(
        seed=seed,
        numpy_seed=numpy_seed,
        pythonhashseed=pythonhashseed,
        deterministic=deterministic,
        cublas_workspace_config=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        changed=changed,
        flags=after,
    )
