from __future__ import annotations

import subprocess
import sys

import loadertune


def test_all_is_sorted_and_every_name_resolves():
    assert loadertune.__all__ == sorted(loadertune.__all__)
    for name in loadertune.__all__:
        assert getattr(loadertune, name) is not None, name
    assert set(loadertune.__all__) <= set(dir(loadertune))


def test_submodules_are_reachable_as_attributes():
    assert loadertune.sim.SimulatedGpu is not None
    assert callable(loadertune.lr.scale_lr)
    assert callable(loadertune.seeding.seed_everything)


def test_unknown_name_is_an_attribute_error():
    try:
        loadertune.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_import_is_cheap():
    code = (
        "import sys, loadertune; "
        "heavy = [m for m in ('torch', 'pynvml', 'matplotlib', 'rich', 'numpy', 'psutil') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
