"""loadertune: keeps PyTorch training jobs from starving for data.

Wrap a DataLoader with :func:`tune`; it watches GPU utilization (NVML), CPU and RAM (psutil) and
how long the loop waits for batches, diagnoses what limits the job, and either logs what to
change (``mode="recommend"``) or rebuilds the loader live (``mode="apply"``).

Importing the package is cheap: torch, pynvml and the rest load when a name is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it. Resolved on first use (PEP 562) so that
# ``import loadertune`` imports neither torch nor pynvml.
_EXPORTS = {
    "Bounds": "loadertune.planning",
    "Diagnosis": "loadertune.diagnosis",
    "Environment": "loadertune.diagnosis",
    "Event": "loadertune.events",
    "GpuReading": "loadertune.sources.base",
    "HostReading": "loadertune.sources.base",
    "LoaderConfig": "loadertune.config",
    "LoadertuneError": "loadertune.errors",
    "NvmlGpu": "loadertune.sources.nvml",
    "Recommendation": "loadertune.planning",
    "ReconfigureError": "loadertune.errors",
    "Sampler": "loadertune.sampler",
    "SchedulerNotScalableError": "loadertune.errors",
    "Snapshot": "loadertune.sampler",
    "Thresholds": "loadertune.diagnosis",
    "TunedLoader": "loadertune.tuned",
    "WindowMetrics": "loadertune.metrics",
    "diagnose": "loadertune.diagnosis",
    "read_events": "loadertune.events",
    "scale_lr": "loadertune.lr",
    "seed_everything": "loadertune.seeding",
    "tune": "loadertune.tuned",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from loadertune.config import LoaderConfig
    from loadertune.diagnosis import Diagnosis, Environment, Thresholds, diagnose
    from loadertune.errors import LoadertuneError, ReconfigureError, SchedulerNotScalableError
    from loadertune.events import Event, read_events
    from loadertune.lr import scale_lr
    from loadertune.metrics import WindowMetrics
    from loadertune.planning import Bounds, Recommendation
    from loadertune.sampler import Sampler, Snapshot
    from loadertune.seeding import seed_everything
    from loadertune.sources.base import GpuReading, HostReading
    from loadertune.sources.nvml import NvmlGpu
    from loadertune.tuned import TunedLoader, tune


# Submodules reachable as attributes, e.g. ``loadertune.sim.SimulatedGpu``.
_SUBMODULES = ("lr", "seeding", "sim")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"loadertune.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loadertune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
