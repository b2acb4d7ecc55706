"""What a tuned loader may use: the GPU source to read and the CPU and RAM bounds of this rank."""

from __future__ import annotations

import logging
from typing import Any

from loadertune.planning import Bounds, default_max_workers

__all__ = ["node_bounds", "resolve_gpu"]

logger = logging.getLogger("loadertune")


def resolve_gpu(gpu: Any) -> Any:
    """The GPU source for ``gpu``: ``"auto"``, None, or a source object.

    ``"auto"`` is NVML for the current CUDA device when CUDA and NVML both work, else None (no
    GPU metrics; the diagnosis then goes by the loop's waiting alone).

    Raises:
        ValueError: ``gpu`` is another string or an object without ``read()``.
    """
    if gpu is None or gpu is False:
        return None
    if isinstance(gpu, str) and gpu == "auto":
        import torch

        if not torch.cuda.is_available():
            return None
        try:
            from loadertune.sources.nvml import NvmlGpu

            return NvmlGpu(torch.cuda.current_device())
        except Exception as exc:  # auto means best effort: no NVML, no GPU metrics
            logger.info("no GPU metrics (%s)", exc)
            return None
    if isinstance(gpu, str) or not callable(getattr(gpu, "read", None)):
        raise ValueError(
            "gpu must be 'auto', None or an object with read() (loadertune.NvmlGpu, "
            f"loadertune.sim.SimulatedGpu), got {gpu!r}"
        )
    return gpu


def node_bounds(max_workers: int | None, ram_budget_share: float, local_world_size: int = 1) -> Bounds:
    """The bounds of this rank: its share of the node's usable CPUs and of the available RAM.

    Args:
        max_workers: Hard cap on workers, or None for the default (8 per usable CPU).
        ram_budget_share: Share of the RAM available now that all workers together may use.
        local_world_size: Ranks on this node sharing its CPUs and RAM.
    """
    from loadertune.sources.host import usable_cpus

    share = max(1, local_world_size)
    cpus = max(1, usable_cpus() // share)
    try:
        import psutil

        ram: int | None = int(psutil.virtual_memory().available * ram_budget_share / share)
    except Exception:  # no RAM figure, no RAM bound
        ram = None
    return Bounds(
        usable_cpus=cpus,
        max_workers=max_workers or default_max_workers(cpus),
        ram_budget_bytes=ram,
    )
