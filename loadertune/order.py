"""Each epoch's sample order, drawn as a plain DataLoader would draw it, and resumed mid-epoch.

loadertune builds its own DataLoaders on the user's sampler, so the order of an epoch (and of
every epoch after it) must come from the same RNG draws, in the same sequence, as the untuned
loader's: the sampler's iterator first, then the workers' base seed from the loader's
generator. The RNG states an epoch starts from are captured (a checkpoint saves them) and, on
resume, put back before the order is drawn again and what was consumed is skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from loadertune.config import LoaderConfig

if TYPE_CHECKING:
    from loadertune.checkpoint import EpochStart

__all__ = ["EpochOrder"]


class EpochOrder:
    """Where each epoch's order comes from, for one wrapped loader.

    Args:
        loader: The user's DataLoader (its sampler and generator are drawn from, as torch would).
        kind: How it makes its batches (``pipeline.StreamKind``; an IterableDataset's order is its
            own: only ``generator`` is used).
        config: The configuration the run starts with.

    Attributes:
        base_seed_once: Whether the workers' base seed is drawn once for the run (a plain
            persistent-workers loader keeps its first iterator) rather than once per epoch; a
            resumed run keeps the saved one.
        base_seed_drawn: Whether a base seed was drawn yet.
        start: The RNG states at the start of the epoch being served (None before the first).
        resume_at: Set by ``load_state_dict``: the interrupted epoch the next one continues.
        generator: The built loaders' own generator, seeded with each base seed: they never
            draw from the user's or the global RNG.
    """

    def __init__(self, loader: DataLoader, kind: str, config: LoaderConfig) -> None:
        self.loader = loader
        self.kind = kind
        self.base_seed_once = config.persistent_workers and config.num_workers > 0
        self.base_seed_drawn = False
        self.start: EpochStart | None = None
        self.resume_at: EpochStart | None = None
        self.generator = torch.Generator()

    def source(self) -> Any:
        """What the epoch's order is drawn from: the user's batch_sampler, or the sampler (None
        for an IterableDataset)."""
        loader = self.loader
        if self.kind == "iterable":
            return None
        if self.kind == "batch_sampler":
            return loader.batch_sampler
        if self.kind == "sampler":
            return loader.batch_sampler.sampler
        return loader.sampler

    def begin(self) -> Iterator[Any]:
        """Draws a new epoch's order; returns its items, past what a resumed epoch consumed."""
        from loadertune.checkpoint import EpochStart

        loader, source = self.loader, self.source()
        resume, self.resume_at = self.resume_at, None
        if resume is not None:
            self.base_seed_drawn = resume.base_seed_drawn
            start = resume.begin(loader, source)
        else:
            start = EpochStart.capture(loader, source, base_seed_drawn=self.base_seed_drawn)
        # The sampler's iterator first, then the base seed: the order in which a plain
        # DataLoader consumes its RNG, so this epoch's and later epochs' orders match it.
        source_iter = iter(source)
        if not (self.base_seed_once and self.base_seed_drawn):
            base = int(torch.empty((), dtype=torch.int64).random_(generator=loader.generator).item())
            self.base_seed_drawn = True
            self.generator.manual_seed(base)
        self.start = start
        return start.skip(source_iter)
