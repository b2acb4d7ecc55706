"""``loadertune run``'s foothold in every Python process of the job.

``loadertune run`` puts this directory first on ``PYTHONPATH``, and Python's ``site`` module
imports ``sitecustomize`` at start-up, so this runs in the launched program and in every Python
process it starts (torchrun's workers, spawned DataLoader workers, ...). It must cost ~nothing:
it imports neither torch nor loadertune. It only

1. runs the ``sitecustomize`` this one shadows, if there is one (a distribution's or the
   user's), so that putting this directory on the path changes nothing else;
2. when ``LOADERTUNE_RUN_DIR`` is set, adds a finder to ``sys.meta_path`` that waits for
   ``torch.utils.data.dataloader`` to be imported and then patches the DataLoader (see
   :mod:`loadertune.instrument`). A process that never imports torch never goes further.

Nothing here may raise: a failure prints one ``[loadertune]`` line and leaves the job alone.
"""

import os
import sys

_TARGET = "torch.utils.data.dataloader"
_HERE = os.path.dirname(os.path.abspath(__file__))
# The directory holding the loadertune package: the job's interpreter may not have it
# installed (a system python running the user's script), and then it is loaded from here.
_PACKAGE_DIR = os.path.dirname(_HERE)


def _chain() -> None:
    """Runs the sitecustomize module this one shadows, under the name ``sitecustomize``."""
    from importlib.machinery import PathFinder
    from importlib.util import module_from_spec

    # Entries naming this directory in any spelling (relative, trailing slash) are skipped.
    others = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    module = module_from_spec(spec)
    # The shadowed module becomes *the* sitecustomize, as if this one were not there.
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


class _DataLoaderWatcher:
    """A meta-path finder that lets the import of torch's dataloader module happen as usual
    and patches it right after it has executed."""

    def __init__(self) -> None:
        self._searching = False

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET or self._searching:
            return None
        self._searching = True
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        original = loader.exec_module

        def exec_module(module):
            original(module)
            _instrument(module)

        # An attribute of this one loader instance: other modules' loaders stay untouched.
        loader.exec_module = exec_module
        # The watcher's work is done: one import, one patch.
        _remove_watcher(self)
        return spec


def _remove_watcher(watcher: object) -> None:
    if watcher in sys.meta_path:
        sys.meta_path.remove(watcher)


def _instrument(module: object) -> None:
    """Imports loadertune's instrumentation and patches ``module``'s DataLoader."""
    try:
        instrument = _import_instrument()
        instrument.install(module)
    except Exception as exc:  # the job must run even if loadertune cannot watch it
        sys.stderr.write(f"[loadertune] not watching this process: {type(exc).__name__}: {exc}\n")


def _import_instrument():
    try:
        import loadertune.instrument as instrument
    except ImportError:
        # Not installed in this interpreter: load the package loadertune run belongs to, and
        # only that package (appending its directory to sys.path would expose its neighbours).
        import importlib.util

        init = os.path.join(_PACKAGE_DIR, "__init__.py")
        spec = importlib.util.spec_from_file_location(
            "loadertune", init, submodule_search_locations=[_PACKAGE_DIR]
        )
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules["loadertune"] = module
        spec.loader.exec_module(module)
        import loadertune.instrument as instrument
    return instrument


def _boot() -> None:
    try:
        _chain()
    except Exception as exc:
        # The shadowed sitecustomize failed: Python would print its error and carry on; so do we.
        sys.stderr.write(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{type(exc).__name__}: {exc}\n")
    if not os.environ.get("LOADERTUNE_RUN_DIR"):
        return
    if _TARGET in sys.modules:  # torch loaded before site ran (unusual): patch it now
        _instrument(sys.modules[_TARGET])
        return
    sys.meta_path.insert(0, _DataLoaderWatcher())


_boot()
