"""Checkpoint and resume a tuned loader anywhere, with any loader settings.

loadertune keeps the epoch's sample stream in the training process, so a checkpoint needs no
per-worker state: the epoch's order is fixed by the RNG states at the epoch's start (a
``RandomSampler``'s generator, the loader's generator for the base seed, the global RNG), and
the position is the number of the sampler's items the loop consumed (in-flight batches do not
count). Resuming restores those states, creates the sampler's iterator, skips ``position``
items (indices only, no data is loaded) and serves the rest: exactly once, in the untuned
order, whatever ``num_workers``, ``prefetch_factor``, ``pin_memory``, ``persistent_workers`` or
(for batches loadertune re-cuts) batch size the resumed loader has. The generators end the
epoch in the state an uninterrupted run leaves them in, so the following epochs match too.

The state is plain data (dicts, lists, ints, floats, bytes), so ``torch.save`` (also with
``torch.load(weights_only=True)``), pickle and Lightning checkpoints carry it. Its size does not
depend on the dataset: ~11 KB with a shuffled sampler (two 5 KB Mersenne-Twister states).

What is not replayed: a custom sampler drawing from anything but torch's RNGs (Python's
``random``, numpy) or drawing from the global RNG after its first item; an IterableDataset's
position (its own order cannot be cut: a mid-epoch checkpoint resumes at the start of the
interrupted epoch, see :func:`load_loader_state`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from typing import TYPE_CHECKING, Any

import torch

from loadertune.config import LoaderConfig

if TYPE_CHECKING:
    from loadertune.tuned import TunedLoader

__all__ = ["FORMAT", "VERSION", "EpochStart", "load_loader_state", "loader_state"]

logger = logging.getLogger("loadertune")

#: The ``format`` field of every state :func:`loader_state` returns.
FORMAT = "loadertune.TunedLoader"
#: The state's layout version; a state of another version is refused.
VERSION = 1

_MISSING = object()


def _rng_bytes(state: torch.Tensor) -> bytes:
    return state.numpy().tobytes()


def _rng_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _generators(loader: Any, source: Any) -> list[Any]:
    """The generators an epoch's order may come from: the loader's (base seed), the sampler's,
    and the one of the sampler a user's batch_sampler wraps (None where there is none)."""
    inner = getattr(source, "sampler", None)
    found = [loader.generator, getattr(source, "generator", None), getattr(inner, "generator", None)]
    return [g if isinstance(g, torch.Generator) else None for g in found]


def _roles(generators: list[Any]) -> list[int | None]:
    """Each generator slot as an index into the distinct generators (one object may fill several)."""
    distinct: list[Any] = []
    roles: list[int | None] = []
    for g in generators:
        if g is None:
            roles.append(None)
            continue
        for i, d in enumerate(distinct):
            if d is g:
                roles.append(i)
                break
        else:
            distinct.append(g)
            roles.append(len(distinct) - 1)
    return roles


def _distinct(generators: list[Any]) -> list[Any]:
    out: list[Any] = []
    for g in generators:
        if g is not None and all(g is not d for d in out):
            out.append(g)
    return out


def _epoch_sampler(source: Any) -> Any:
    """The object holding ``set_epoch``/``epoch`` (a DistributedSampler, maybe inside a batch sampler)."""
    for s in (source, getattr(source, "sampler", None)):
        if s is not None and callable(getattr(s, "set_epoch", None)):
            return s
    return None


@dataclass
class EpochStart:
    """The RNG states an epoch's order comes from, and how far into the epoch to resume.

    Attributes:
        generators: The distinct ``torch.Generator`` states (loader, sampler), as bytes.
        roles: For the loader's, the sampler's and an inner sampler's generator: its index in
            ``generators``, or None where there is no generator.
        global_rng: The global torch RNG state at the epoch's start (None for an epoch not
            started yet: the global RNG belongs to the training script, which restores it).
        base_seed_drawn: Whether the base seed of a persistent-workers loader was drawn before.
        sampler_epoch: The sampler's ``epoch`` (DistributedSampler) the order was drawn with.
        position: Items of the epoch consumed before (skipped on resume).
    """

    generators: tuple[bytes, ...]
    roles: tuple[int | None, ...]
    global_rng: bytes | None
    base_seed_drawn: bool
    sampler_epoch: int | None = None
    position: int = 0

    def __post_init__(self) -> None:
        self._user_rng: torch.Tensor | None = None

    @classmethod
    def capture(cls, loader: Any, source: Any, *, base_seed_drawn: bool, global_rng: bool = True) -> EpochStart:
        """The states now, before the epoch's iterator is created (one copy per generator)."""
        gens = _generators(loader, source)
        epoch_sampler = _epoch_sampler(source)
        epoch = getattr(epoch_sampler, "epoch", None)
        return cls(
            generators=tuple(_rng_bytes(g.get_state()) for g in _distinct(gens)),
            roles=tuple(_roles(gens)),
            global_rng=_rng_bytes(torch.get_rng_state()) if global_rng else None,
            base_seed_drawn=base_seed_drawn,
            sampler_epoch=epoch if isinstance(epoch, int) else None,
        )

    def begin(self, loader: Any, source: Any) -> EpochStart:
        """Puts the saved states back before the resumed epoch's iterator is created.

        The global RNG is swapped in only until :meth:`skip` has made the epoch's draws, then
        the training script's own state comes back.
        """
        gens = _generators(loader, source)
        for g, state in zip(_distinct(gens), self.generators, strict=True):
            g.set_state(_rng_tensor(state))
        if self.sampler_epoch is not None:
            epoch_sampler = _epoch_sampler(source)
            if epoch_sampler is not None:
                epoch_sampler.set_epoch(self.sampler_epoch)
        if self.global_rng is not None:
            self._user_rng = torch.get_rng_state()
            torch.set_rng_state(_rng_tensor(self.global_rng))
        return self

    def skip(self, it: Iterator[Any]) -> Iterator[Any]:
        """Skips the items consumed before the checkpoint; a no-op for an epoch not resumed."""
        try:
            n = self.position
            if n and next(islice(it, n - 1, n), _MISSING) is _MISSING:
                raise ValueError(
                    f"the sampler ran out before the checkpoint's position {n}: the dataset or "
                    "sampler is not built the same way as when the state was saved"
                )
            if self._user_rng is not None:
                # A RandomSampler without a generator draws its seed at its first item.
                first = list(islice(it, 1))
                it = chain(first, it)
        finally:
            if self._user_rng is not None:
                torch.set_rng_state(self._user_rng)
                self._user_rng = None
        return it

    def to_dict(self) -> dict[str, Any]:
        return {
            "generators": list(self.generators),
            "roles": list(self.roles),
            "global_rng": self.global_rng,
            "base_seed_drawn": self.base_seed_drawn,
            "sampler_epoch": self.sampler_epoch,
            "position": self.position,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EpochStart:
        return cls(
            generators=tuple(bytes(g) for g in data["generators"]),
            roles=tuple(data["roles"]),
            global_rng=None if data["global_rng"] is None else bytes(data["global_rng"]),
            base_seed_drawn=bool(data["base_seed_drawn"]),
            sampler_epoch=data["sampler_epoch"],
            position=int(data["position"]),
        )


# -- what identifies the stream ------------------------------------------------------------------
def _len(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


def _world(source: Any) -> tuple[int, int]:
    """(world size, rank) the sampler shards for: its own, else torch.distributed's, else (1, 0)."""
    for s in (source, getattr(source, "sampler", None)):
        replicas, rank = getattr(s, "num_replicas", None), getattr(s, "rank", None)
        if isinstance(replicas, int) and isinstance(rank, int):
            return replicas, rank
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _fingerprint(tuned: TunedLoader) -> dict[str, Any]:
    source = tuned._pipeline.order.source()
    inner = getattr(source, "sampler", None)
    world, rank = _world(source)
    return {
        "kind": tuned._pipeline.kind,
        "sampler": type(source).__name__ + (f"({type(inner).__name__})" if inner is not None else ""),
        "dataset_len": _len(tuned.loader.dataset),
        "sampler_len": _len(source) if source is not None else None,
        "batch_sampler_size": getattr(source, "batch_size", None) if tuned._pipeline.kind == "batch_sampler" else None,
        "world_size": world,
        "rank": rank,
    }


# -- saving --------------------------------------------------------------------------------------
def loader_state(tuned: TunedLoader) -> dict[str, Any]:
    """The state of ``tuned`` for :meth:`TunedLoader.state_dict` (see the module docs)."""
    pipeline = tuned._pipeline
    mid_epoch = pipeline.in_epoch or (pipeline.kind == "iterable" and pipeline.src_it is not None)
    if pipeline.in_epoch:
        start = pipeline.order.start
        epoch_start = EpochStart(
            start.generators,
            start.roles,
            start.global_rng,
            start.base_seed_drawn,
            start.sampler_epoch,
            position=pipeline.position(),
        )
    elif pipeline.kind != "iterable":
        # Between epochs the next epoch starts from the generators as they are now; the global
        # RNG is the training script's to restore, the sampler's epoch its set_epoch's.
        epoch_start = EpochStart.capture(
            tuned.loader, pipeline.order.source(), base_seed_drawn=pipeline.order.base_seed_drawn, global_rng=False
        )
        epoch_start.sampler_epoch = None
    else:
        epoch_start = None
    session = tuned._session
    return {
        "format": FORMAT,
        "version": VERSION,
        "epoch": tuned.epoch,
        "step": tuned.step,
        "mid_epoch": bool(mid_epoch),
        "source": _fingerprint(tuned),
        "epoch_start": epoch_start.to_dict() if epoch_start is not None else None,
        "base_seed_once": pipeline.order.base_seed_once,
        "config": tuned.config.to_dict(),
        "mode": tuned.mode,
        "controller": session.controller.state_dict(),
        "follower": tuned._follower.state_dict(tuned.config.batch_size),
        "seed": tuned.options.seed,
    }


# -- loading -------------------------------------------------------------------------------------
def _mismatch(field: str, saved: Any, now: Any, fix: str) -> ValueError:
    return ValueError(f"cannot resume: {field} was {saved!r} when the state was saved, now {now!r}; {fix}")


def check_state(tuned: TunedLoader, state: Any) -> None:
    """Raises a ValueError naming the first field of ``state`` that does not fit ``tuned``."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(
            "not a TunedLoader state: pass what TunedLoader.state_dict() returned "
            f"(a dict with format={FORMAT!r})"
        )
    if state.get("version") != VERSION:
        raise _mismatch(
            "format version",
            state.get("version"),
            VERSION,
            "this loadertune reads only its own state version: resume with the loadertune that "
            "saved it, or start the epoch afresh without load_state_dict",
        )
    saved, now = state["source"], _fingerprint(tuned)
    fixes = {
        "kind": "build the DataLoader as before (map-style or iterable dataset, batch_size= or "
        "a batch_sampler)",
        "sampler": "build the DataLoader with the same sampler (shuffle=, sampler=, batch_sampler=)",
        "dataset_len": "resume on the same dataset; a changed dataset cannot continue the epoch "
        "(start a new run, or load the state at an epoch boundary of the old one)",
        "batch_sampler_size": "build your batch_sampler with the same batch size (loadertune "
        "keeps a batch_sampler's batches whole)",
    }
    for field, fix in fixes.items():
        if saved.get(field) != now[field]:
            raise _mismatch(field.replace("_", " "), saved.get(field), now[field], fix)
    if state["mid_epoch"] and saved["kind"] != "iterable":
        if saved["world_size"] != now["world_size"]:
            raise _mismatch(
                "world size",
                saved["world_size"],
                now["world_size"],
                "a DistributedSampler shards by world size, so the rest of an interrupted epoch "
                "cannot be served exactly once on another one: resume on the same world size, or "
                "from a checkpoint taken at an epoch boundary (which any world size can load)",
            )
        if saved["rank"] != now["rank"]:
            raise _mismatch("rank", saved["rank"], now["rank"], "load each rank's own state (save one per rank)")
        if saved["sampler_len"] != now["sampler_len"]:
            raise _mismatch(
                "sampler length",
                saved["sampler_len"],
                now["sampler_len"],
                "build the sampler as before (num_samples=, replacement=, drop_last=)",
            )
    if state["seed"] != tuned.options.seed:
        raise _mismatch(
            "seed",
            state["seed"],
            tuned.options.seed,
            "pass the same tune(seed=...) as the saved run: the samples' draws depend on it",
        )


def load_loader_state(tuned: TunedLoader, state: dict[str, Any], *, warm_start: bool = True) -> None:
    """Loads ``state`` into a fresh ``tuned`` (see :meth:`TunedLoader.load_state_dict`).

    Everything is checked before anything changes: a mismatch leaves ``tuned`` as it was.
    """
    pipeline = tuned._pipeline
    if pipeline.in_epoch or pipeline.src_it is not None:
        raise ValueError(
            "load_state_dict() must come before iterating: call it on the fresh tune() of the "
            "resumed run, before the first iter()"
        )
    check_state(tuned, state)
    try:
        start = EpochStart.from_dict(state["epoch_start"]) if state["epoch_start"] is not None else None
        config = LoaderConfig(**state["config"])
        epoch, step = int(state["epoch"]), int(state["step"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed TunedLoader state ({exc!r}); pass what TunedLoader.state_dict() returned") from None
    if start is not None:
        gens = _generators(tuned.loader, tuned._pipeline.order.source())
        if tuple(_roles(gens)) != start.roles:
            raise _mismatch(
                "generators (loader, sampler, inner sampler)",
                list(start.roles),
                _roles(gens),
                "build the DataLoader with a generator= where the saved one had one (and none "
                "where it had none)",
            )

    session = tuned._session
    controller = session.controller
    target = tuned.config
    if warm_start:
        controller.load_state_dict(state["controller"])
        settled = LoaderConfig(**state["controller"]["config"])
        if tuned.mode == "apply":
            target = settled
            if pipeline.kind != "sampler":
                target = target.replace(batch_size=tuned.config.batch_size)
            if target.num_workers > controller.bounds.max_workers:
                target = target.replace(num_workers=controller.bounds.max_workers)
        if target != settled:
            controller.note_external_change(target)
        controller.config = target
        if target != tuned.config:
            # Nothing is built yet: the first iter() builds the tuned loader directly.
            pipeline.config = target
            tuned.config = target
    pipeline.order.base_seed_once = bool(state["base_seed_once"])
    if start is not None:
        if state["mid_epoch"]:
            pipeline.order.resume_at = start
        else:
            start.position = 0
            pipeline.order.resume_at = start
    tuned.epoch, tuned.step = epoch, step
    tuned._follower.load_state_dict(state["follower"], batch_size=tuned.config.batch_size, step=step)
    if state["mid_epoch"] and pipeline.kind == "iterable":
        logger.warning(
            "resuming an IterableDataset mid-epoch: its own order cannot be cut, so epoch %d "
            "starts again from its beginning (checkpoint at epoch boundaries to avoid repeats)",
            epoch,
        )
    position = start.position if start is not None and state["mid_epoch"] else 0
    logger.info(
        "resumed at epoch %d, %s, with %s%s",
        epoch,
        f"position {position}" if state["mid_epoch"] else "its start",
        tuned.config.describe(),
        " (warm start: the tuned configuration and what the controller learned)" if warm_start else "",
    )
    session.events_log.emit(
        "resume",
        step,
        epoch,
        position=position,
        mid_epoch=bool(state["mid_epoch"]),
        saved_config=config.to_dict(),
        config=tuned.config.to_dict(),
        warm_start=warm_start,
    )
