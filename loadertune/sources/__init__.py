"""Where measurements come from: GPUs (NVML or simulated) and the host (psutil)."""

from loadertune.sources.base import GpuReading, GpuSource, HostReading

__all__ = ["GpuReading", "GpuSource", "HostReading"]
