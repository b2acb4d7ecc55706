"""The in-process half of ``loadertune run``: patches torch's DataLoader to watch every user loader.

:mod:`loadertune._boot.sitecustomize` calls :func:`install` right after
``torch.utils.data.dataloader`` has executed (torch itself may still be importing, so nothing
here touches torch at import time). Three methods are patched:

- ``DataLoader.__init__`` records where the loader was created (the first frame outside torch,
  the frameworks and the loader's own ``__init__`` chain);
- ``DataLoader.__iter__`` starts an epoch of the loader's :class:`~loadertune.observation.
  Observation`. In recommend mode it returns the very iterator torch built (same object, same
  seed draws) after tagging it; in apply mode it returns ``iter()`` of a ``TunedLoader`` made
  once per loader, unless ``tune()`` refuses the loader, which is then observed instead;
- ``_BaseDataLoaderIter.__next__`` times tagged iterators: two clock readings around torch's own
  ``__next__``.

DataLoaders built by loadertune itself (``_loadertune_internal``, or iterated from loadertune's
own code) pass through untouched. At interpreter exit each process writes its report into
``LOADERTUNE_RUN_DIR`` (see :mod:`loadertune.runreport`); it also rewrites it whenever a window
closes, so a job killed by a signal still leaves its last state.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import weakref
from typing import Any

from loadertune.observation import Observation, Site

__all__ = ["ENV_PREFIX", "install", "observations"]

logger = logging.getLogger("loadertune")

#: Environment variables through which ``loadertune run`` configures its child processes.
ENV_PREFIX = "LOADERTUNE_RUN_"

# Files whose frames never name a loader's creation site: torch, the frameworks, loadertune.
_LIBRARY_PARTS = (
    f"{os.sep}torch{os.sep}",
    f"{os.sep}lightning{os.sep}",
    f"{os.sep}pytorch_lightning{os.sep}",
    f"{os.sep}lightning_fabric{os.sep}",
    f"{os.sep}accelerate{os.sep}",
    f"{os.sep}transformers{os.sep}",
    f"{os.sep}torchdata{os.sep}",
)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_MARK = "_loadertune_observation"


class _State:
    """Everything the patches share, in one object (one process, set up once)."""

    def __init__(self) -> None:
        self.installed = False
        self.pid = os.getpid()
        self.run_dir = ""
        self.run_id = ""
        self.mode = "recommend"
        self.options: Any = None
        self.rank: int | None = None
        self.observations: list[Observation] = []
        self.by_loader: weakref.WeakKeyDictionary[Any, Observation] = weakref.WeakKeyDictionary()
        self.lock = threading.Lock()
        self.local = threading.local()
        self.exit_registered = False
        self.handler: logging.Handler | None = None
        self.original_init: Any = None
        self.original_iter: Any = None
        self.original_next: Any = None


_state = _State()


def observations() -> list[Observation]:
    """The loaders observed in this process so far, in order of first iteration."""
    return list(_state.observations)


def install(module: Any) -> None:
    """Patches the DataLoader of ``module`` (``torch.utils.data.dataloader``); once per process.

    Args:
        module: The executed ``torch.utils.data.dataloader`` module.

    Raises:
        ValueError: The ``LOADERTUNE_RUN_*`` environment is incomplete or holds bad options.
    """
    if _state.installed:
        return
    _configure(os.environ)
    loader_cls = module.DataLoader
    iter_cls = module._BaseDataLoaderIter
    _state.original_init = loader_cls.__init__
    _state.original_iter = loader_cls.__iter__
    _state.original_next = iter_cls.__next__
    loader_cls.__init__ = _patched_init
    loader_cls.__iter__ = _patched_iter
    iter_cls.__next__ = _patched_next
    _state.installed = True
    # A forked child (a user's multiprocessing worker) must not report its parent's loaders.
    os.register_at_fork(after_in_child=_forget)


def _configure(environ: Any) -> None:
    from loadertune.options import TuneOptions

    _state.run_dir = environ[ENV_PREFIX + "DIR"]
    _state.run_id = environ.get(ENV_PREFIX + "ID", "")
    raw = environ.get(ENV_PREFIX + "OPTIONS", "{}")
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{ENV_PREFIX}OPTIONS is not JSON ({exc}): {raw!r}") from None
    _state.mode = fields.get("mode", "recommend")
    _state.options = TuneOptions(**fields)
    _state.rank = process_rank(environ)
    if environ.get(ENV_PREFIX + "QUIET") != "1":
        _add_stderr_handler(_state.rank)


def process_rank(environ: Any) -> int | None:
    """The process's rank under torchrun and friends (``RANK``, else ``LOCAL_RANK``), or None."""
    for name in ("RANK", "LOCAL_RANK"):
        value = environ.get(name)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return None


def _add_stderr_handler(rank: int | None) -> None:
    # loadertune's lines go to stderr, marked, whatever logging setup the job has (or lacks);
    # not propagated, so a job that logs to stderr itself does not print them twice.
    who = f"rank {rank}: " if rank is not None else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[loadertune] {who}%(message)s"))
    logger.addHandler(handler)
    _state.handler = handler
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _forget() -> None:
    _state.pid = os.getpid()
    _state.observations = []
    _state.by_loader = weakref.WeakKeyDictionary()
    _state.lock = threading.Lock()
    _state.local = threading.local()


# -- the patches -----------------------------------------------------------------------------
def _patched_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _state.original_init(self, *args, **kwargs)
    try:
        if "_loadertune_site" not in self.__dict__:
            self._loadertune_site = _creation_site(self)
    except Exception:  # never let the bookkeeping break a DataLoader
        pass


def _patched_iter(self: Any) -> Any:
    original = _state.original_iter
    if _internal(self) or getattr(_state.local, "busy", False):
        return original(self)
    try:
        obs = _observation_for(self, sys._getframe(1).f_globals.get("__name__", ""))
    except Exception as exc:
        logger.warning("not watching a DataLoader: %s: %s", type(exc).__name__, exc)
        return original(self)
    if obs.tuned is not None:
        obs.epoch_started()
        _state.local.busy = True
        try:
            return iter(obs.tuned)
        finally:
            _state.local.busy = False
    obs.epoch_started()
    it = original(self)
    try:
        it.__dict__[_MARK] = obs
    except AttributeError:  # an iterator without a __dict__: it cannot be timed
        obs.fail(TypeError(f"{type(it).__name__} iterators cannot be timed"))
        return it
    if obs.config.num_workers:
        obs.note_workers(it)
    if type(it).__next__ is not _patched_next:
        # A subclass overriding __next__ is out of the patch's reach.
        obs.fail(TypeError(f"its iterator class {type(it).__name__} overrides __next__; not timed"))
    return it


def _patched_next(self: Any) -> Any:
    obs = self.__dict__.get(_MARK)
    if obs is None:
        return _state.original_next(self)
    batch = obs.next(_state.original_next, self)
    if obs.window_closed:
        _write_report(final=False)
    return batch


# -- helpers ---------------------------------------------------------------------------------
def _internal(loader: Any) -> bool:
    """A DataLoader loadertune built (TunedLoader's own), or one iterated from loadertune."""
    if getattr(loader, "_loadertune_internal", False):
        return True
    # Two frames up: the caller of iter(); a loader iterated by loadertune's own code is its own.
    caller = sys._getframe(2)
    name = caller.f_globals.get("__name__", "")
    return name.startswith("loadertune.") and name != "loadertune.instrument"


def _observation_for(loader: Any, caller: str) -> Observation:
    obs = _state.by_loader.get(loader)
    if obs is not None:
        return obs
    with _state.lock:
        obs = _state.by_loader.get(loader)
        if obs is not None:
            return obs
        site = getattr(loader, "_loadertune_site", None) or _creation_site(loader)
        index = len(_state.observations)
        obs = Observation(site, index, loader, _state.options, _log_file(index, site))
        obs.iterated_by = caller
        if _state.mode == "apply":
            _tune(obs, loader)
        _state.observations.append(obs)
        _state.by_loader[loader] = obs
        if not _state.exit_registered:
            # Imported now, not at exit: a module imported during finalization may run exec()
            # on a string (dataclasses do), which makes CPython forget an uncaught
            # KeyboardInterrupt, and the job would exit 1 instead of dying of SIGINT.
            import loadertune.runreport  # noqa: F401

            atexit.register(_at_exit)
            _state.exit_registered = True
    return obs


def _tune(obs: Observation, loader: Any) -> None:
    """Wraps ``loader`` with ``tune(mode="apply")``, or notes why it stays observed only."""
    import torch

    reason = _refusal(loader, torch.is_grad_enabled(), obs.iterated_by)
    if reason is not None and obs.site.via.split(".")[0] == "transformers" and "accelerate" in reason:
        reason = (
            "the Hugging Face Trainer made it and hands it to accelerate, which orders and shards "
            "it inside its own iteration; make the change below in TrainingArguments"
        )
    if reason is None:
        import dataclasses

        from loadertune.tuned import TunedLoader

        # Every window of the tuned loader refreshes the process report, as observed ones do.
        sinks = (*_state.options.sinks, _on_tuned_event)
        options = dataclasses.replace(_state.options, log_file=obs.log_file, sinks=sinks)
        _state.local.busy = True
        try:
            obs.tuned = TunedLoader(loader, options)
        except ValueError as exc:
            reason = f"tune() refused it: {exc}"
        finally:
            _state.local.busy = False
    obs.not_tuned = reason


def _on_tuned_event(event: Any) -> None:
    if event.kind in ("window", "change", "revert", "fault"):
        _write_report(final=False)


def _refusal(loader: Any, grad_enabled: bool, caller: str) -> str | None:
    """Why apply mode must not replace this loader's iteration, or None.

    Args:
        loader: The DataLoader.
        grad_enabled: Autograd's mode at its first ``iter()``.
        caller: The module that called ``iter()`` on it.
    """
    if caller.split(".")[0] == "accelerate":
        return (
            "it was prepared by accelerate, which synchronizes its order (and shards it across "
            "processes) inside its own iteration; tune() the plain DataLoader before "
            "accelerator.prepare() instead (docs/distributed.md)"
        )
    cls = type(loader)
    if cls.__iter__ is not _patched_iter:
        return f"its class {cls.__name__} has its own __iter__, which loadertune would bypass"
    for part in (loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)):
        module = type(part).__module__ if part is not None else ""
        if module.split(".")[0] == "accelerate":
            return (
                f"it is sharded by accelerate ({type(part).__name__}), which synchronizes its "
                "order inside its own iteration; see docs/distributed.md to tune it before "
                "accelerator.prepare()"
            )
    if not grad_enabled:
        return "it is iterated with autograd off (evaluation): only training loaders are tuned"
    return None


def _creation_site(loader: Any) -> Site:
    """The first frame outside torch, the frameworks, loadertune and the loader's __init__s.

    ``Site.via`` names the framework module the user's code called into to get the loader
    (``transformers.trainer`` for a Trainer's loaders): the change to make is then in that
    framework's settings rather than in a ``DataLoader(...)`` call.
    """
    import linecache

    frame = sys._getframe(1)
    fallback = None
    via = ""
    while frame is not None:
        code = frame.f_code
        path = code.co_filename
        own_init = code.co_name == "__init__" and frame.f_locals.get("self") is loader
        if not own_init and not path.startswith(_PACKAGE_DIR) and not path.startswith("<frozen"):
            if fallback is None:
                fallback = frame
            if not any(part in path for part in _LIBRARY_PARTS):
                break
            via = frame.f_globals.get("__name__", "")
        frame = frame.f_back
    if frame is None:
        frame, via = fallback, ""
    if frame is None:
        return Site("<unknown>", 0, "<unknown>")
    name = frame.f_code.co_filename
    path = name if name.startswith("<") else os.path.abspath(name)
    return Site(path, frame.f_lineno, frame.f_code.co_name, linecache.getline(name, frame.f_lineno).strip(), via)


def _file_stem() -> str:
    if _state.rank is None:
        return f"pid{_state.pid}"
    return f"rank{_state.rank}-pid{_state.pid}"


def _log_file(index: int, site: Site) -> str:
    stem = os.path.splitext(site.name.replace(":", "-"))[0] if ":" in site.name else "loader"
    line = site.name.rsplit(":", 1)[-1]
    return os.path.join(_state.run_dir, f"{_file_stem()}-loader{index}-{stem}-{line}.jsonl")


def _write_report(final: bool) -> None:
    from loadertune.runreport import ProcessReport, write_process_report

    try:
        report = ProcessReport.collect(
            run_id=_state.run_id,
            pid=_state.pid,
            rank=_state.rank,
            mode=_state.mode,
            observations=_state.observations,
            final=final,
        )
        write_process_report(_state.run_dir, _file_stem(), report)
    except Exception as exc:  # the job must never fail over its report
        logger.warning("could not write the report: %s: %s", type(exc).__name__, exc)


def _at_exit() -> None:
    if os.getpid() != _state.pid or not _state.observations:
        return
    # Each session logs its summary as it closes; the parent's report says it all, once.
    quiet = logging.WARNING if _state.handler is not None else None
    if quiet is not None:
        _state.handler.setLevel(quiet)
    for obs in _state.observations:
        obs.close()
    _write_report(final=True)
