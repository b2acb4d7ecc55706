"""The public surface: what ``__all__`` promises, what each name is, and that importing is cheap."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import loadertune

ROOT = Path(__file__).resolve().parent.parent

#: The public API as documented. A name added or dropped must show up here, on purpose.
PUBLIC = {
    "Bounds",
    "Diagnosis",
    "Environment",
    "Event",
    "GpuReading",
    "HostReading",
    "LoaderConfig",
    "LoadertuneError",
    "NvmlGpu",
    "Recommendation",
    "ReconfigureError",
    "Sampler",
    "SchedulerNotScalableError",
    "Snapshot",
    "Thresholds",
    "TunedLoader",
    "WindowMetrics",
    "__version__",
    "diagnose",
    "read_events",
    "scale_lr",
    "seed_everything",
    "tune",
}
ERRORS = {"LoadertuneError", "ReconfigureError", "SchedulerNotScalableError"}
FUNCTIONS = {"diagnose", "read_events", "scale_lr", "seed_everything", "tune"}


def test_all_is_sorted_and_is_the_documented_api():
    assert loadertune.__all__ == sorted(loadertune.__all__)
    assert set(loadertune.__all__) == PUBLIC
    assert set(loadertune.__all__) <= set(dir(loadertune))


@pytest.mark.parametrize("name", sorted(PUBLIC - {"__version__"}))
def test_every_name_is_the_object_it_names(name):
    value = getattr(loadertune, name)
    # Whichever module defines it (they move in refactors), it is the named loadertune object.
    assert value.__name__ == name
    assert value.__module__.startswith("loadertune.")
    assert getattr(importlib.import_module(value.__module__), name) is value
    if name in FUNCTIONS:
        assert callable(value) and not isinstance(value, type)
    else:
        assert isinstance(value, type)
    if name in ERRORS:
        assert issubclass(value, loadertune.LoadertuneError)


def test_version_is_the_packages():
    # tomllib is 3.11+; the project supports 3.10, and one line needs no TOML parser.
    (version,) = re.findall(r'(?m)^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text())
    assert loadertune.__version__ == version


def _fresh(code: str) -> list[str]:
    """Output lines of ``code`` run in a new interpreter (import order fixed, no test's leftovers)."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=100
    )
    return out.stdout.splitlines()


@pytest.mark.timeout(120)
def test_diagnose_is_the_function_when_used_first():
    assert _fresh(
        "import loadertune; print(loadertune.diagnose.__module__, callable(loadertune.diagnose))"
    ) == ["loadertune.diagnosis True"]


@pytest.mark.timeout(120)
def test_diagnose_stays_the_function_after_its_module_is_imported():
    # The module is named by a noun (diagnosis), so importing it (tune() does) cannot rebind
    # the package attribute `diagnose` to a module.
    code = "import loadertune, loadertune.diagnosis, loadertune.tuned; print(callable(loadertune.diagnose))"
    assert _fresh(code) == ["True"]


def test_submodules_are_reachable_as_attributes():
    assert loadertune.sim is importlib.import_module("loadertune.sim")
    assert loadertune.sim.SimulatedGpu.__module__ == "loadertune.sim"
    assert loadertune.lr.scale_lr is loadertune.scale_lr
    assert loadertune.seeding.seed_everything is loadertune.seed_everything


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_thing"):
        loadertune.no_such_thing  # noqa: B018


@pytest.mark.timeout(120)
def test_import_is_cheap():
    code = (
        "import sys, loadertune; "
        "heavy = [m for m in ('torch', 'pynvml', 'matplotlib', 'rich', 'numpy', 'psutil') if m in sys.modules]; "
        "print(','.join(heavy)); "
        # The first use of a name does load what it needs: laziness, not absence.
        "loadertune.tune; print('torch' in sys.modules)"
    )
    assert _fresh(code) == ["", "True"]
