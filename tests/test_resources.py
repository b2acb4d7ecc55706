from __future__ import annotations

import pytest

from loadertune.resources import node_bounds, resolve_gpu
from loadertune.sim import SimulatedGpu
from loadertune.sources.host import usable_cpus


def test_auto_without_cuda_means_no_gpu_source():
    assert resolve_gpu("auto") is None
    assert resolve_gpu(None) is None


def test_a_source_object_is_used_as_is():
    gpu = SimulatedGpu(0.01)
    assert resolve_gpu(gpu) is gpu


@pytest.mark.parametrize("bad", ["cuda:0", 3, object()])
def test_anything_else_is_refused(bad):
    with pytest.raises(ValueError, match="gpu must be 'auto', None or an object with read"):
        resolve_gpu(bad)


def test_bounds_share_the_node_between_local_ranks():
    one = node_bounds(None, 0.5)
    assert one.usable_cpus == usable_cpus() and one.max_workers >= 8
    assert one.ram_budget_bytes is not None and one.ram_budget_bytes > 0
    two = node_bounds(4, 0.5, local_world_size=2)
    assert two.usable_cpus == max(1, usable_cpus() // 2) and two.max_workers == 4
    assert two.ram_budget_bytes < one.ram_budget_bytes
