from __future__ import annotations

import pytest
from torch.utils.data import DataLoader

from loadertune.config import LoaderConfig


def test_from_loader_reads_settings():
    loader = DataLoader(list(range(10)), batch_size=4, num_workers=2, prefetch_factor=3, persistent_workers=True)
    c = LoaderConfig.from_loader(loader)
    assert c == LoaderConfig(num_workers=2, batch_size=4, prefetch_factor=3, pin_memory=False, persistent_workers=True)


def test_zero_workers_normalises_worker_only_settings():
    c = LoaderConfig(num_workers=0, prefetch_factor=4, persistent_workers=True)
    assert c.prefetch_factor is None and c.persistent_workers is False
    assert LoaderConfig(num_workers=0).replace(num_workers=2).prefetch_factor == 2


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_workers": -1}, "num_workers"),
        ({"num_workers": 1.5}, "num_workers"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"prefetch_factor": 0, "num_workers": 1}, "prefetch_factor"),
    ],
)
def test_bad_values_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoaderConfig(**kwargs)


def test_replace_rejects_unknown_names():
    with pytest.raises(ValueError, match=r"unknown loader setting.*num_worker.*choose from"):
        LoaderConfig().replace(num_worker=3)


def test_diff_and_describe():
    a = LoaderConfig(num_workers=0, batch_size=8)
    b = a.replace(num_workers=4)
    assert a.diff(b) == {"num_workers": (0, 4), "prefetch_factor": (None, 2)}
    assert "num_workers=4" in b.describe()
    assert b.to_dict()["num_workers"] == 4
