"""The DataLoader settings loadertune reads, recommends and changes."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


def check_seconds(name: str, value: Any) -> float:
    """``value`` as a positive, finite number of seconds; else a ValueError naming ``name``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


#: The fields of :class:`LoaderConfig` that a user may change through ``reconfigure``.
CONFIG_FIELDS = ("num_workers", "batch_size", "prefetch_factor", "pin_memory", "persistent_workers")

#: torch's own default for ``prefetch_factor`` when workers are used.
DEFAULT_PREFETCH_FACTOR = 2


@dataclass(frozen=True)
class LoaderConfig:
    """The tunable settings of a DataLoader.

    Attributes:
        num_workers: Worker processes; 0 loads in the training process.
        batch_size: Samples per batch, or None when the user supplies a ``batch_sampler`` or
            disables automatic batching.
        prefetch_factor: Batches each worker loads ahead; None when ``num_workers`` is 0.
        pin_memory: Whether batches are copied to page-locked memory.
        persistent_workers: Whether workers survive from one epoch to the next.
    """

    num_workers: int = 0
    batch_size: int | None = 1
    prefetch_factor: int | None = None
    pin_memory: bool = False
    persistent_workers: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.num_workers, int) or isinstance(self.num_workers, bool) or self.num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0, got {self.num_workers!r}")
        if self.batch_size is not None and (
            not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be an int >= 1 or None, got {self.batch_size!r}")
        if self.prefetch_factor is not None and (
            not isinstance(self.prefetch_factor, int) or self.prefetch_factor < 1
        ):
            raise ValueError(f"prefetch_factor must be an int >= 1 or None, got {self.prefetch_factor!r}")
        # torch refuses these combinations at DataLoader construction; normalise instead so a
        # recommendation is always a loader that can be built.
        if self.num_workers == 0:
            object.__setattr__(self, "prefetch_factor", None)
            object.__setattr__(self, "persistent_workers", False)
        elif self.prefetch_factor is None:
            object.__setattr__(self, "prefetch_factor", DEFAULT_PREFETCH_FACTOR)

    @classmethod
    def from_loader(cls, loader: Any) -> LoaderConfig:
        """Reads the settings of an existing ``torch.utils.data.DataLoader``."""
        return cls(
            num_workers=int(loader.num_workers),
            batch_size=loader.batch_size,
            prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
            pin_memory=bool(loader.pin_memory),
            persistent_workers=bool(loader.persistent_workers),
        )

    def replace(self, **changes: Any) -> LoaderConfig:
        """Returns a copy with ``changes`` applied; unknown names raise ``ValueError``."""
        unknown = sorted(set(changes) - set(CONFIG_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown loader setting(s) {', '.join(unknown)}; choose from {', '.join(CONFIG_FIELDS)}"
            )
        return dataclasses.replace(self, **changes)

    def diff(self, other: LoaderConfig) -> dict[str, tuple[Any, Any]]:
        """The settings that differ, as ``{name: (self's value, other's value)}``."""
        return {
            name: (getattr(self, name), getattr(other, name))
            for name in CONFIG_FIELDS
            if getattr(self, name) != getattr(other, name)
        }

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (JSON-ready)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """A short human-readable form, e.g. ``num_workers=4 batch_size=64``."""
        return " ".join(f"{k}={v}" for k, v in self.to_dict().items())
