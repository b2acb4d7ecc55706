"""Loading the TARGET of ``loadertune probe``: ``pkg.module:name`` or ``path/to/file.py:name``.

The name may be dotted (``module:factory.loader``) and may name a Dataset, a DataLoader, or a
callable taking no arguments that returns one of those.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any

from loadertune.cli import UsageError

__all__ = ["Target", "load_target", "parse_spec"]

_FORM = "write TARGET as pkg.module:name or path/to/file.py:name"


@dataclass(frozen=True)
class Target:
    """What a TARGET named.

    Attributes:
        spec: The TARGET text as given.
        dataset: The dataset to load from.
        loader: The DataLoader, when the target is (or returned) one; its collate_fn, sampler and
            other settings are kept when measuring.
    """

    spec: str
    dataset: Any
    loader: Any | None = None


def parse_spec(spec: str) -> tuple[str, str, bool]:
    """Splits a TARGET into (module or file, attribute path, is a file).

    Raises:
        UsageError: No ``:name`` part, or an empty side.
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"TARGET {spec!r} has no ':name' part; {_FORM}")
    is_file = where.endswith(".py") or os.sep in where or "/" in where
    if not all(part.isidentifier() for part in name.split(".")):
        raise UsageError(f"TARGET {spec!r}: {name!r} is not a Python name; {_FORM}")
    return where, name, is_file


def load_target(spec: str) -> Target:
    """Imports a TARGET and resolves it to a dataset (and its DataLoader, if any).

    Args:
        spec: ``pkg.module:name`` or ``path/to/file.py:name``.

    Returns:
        The :class:`Target`.

    Raises:
        UsageError: The module does not import, the name is missing, a callable fails or needs
            arguments, or the object is neither a Dataset nor a DataLoader. The message says
            which and what to do; the original exception is chained for ``--debug``.
    """
    where, name, is_file = parse_spec(spec)
    module = _import_file(where, spec) if is_file else _import_module(where, spec)
    obj: Any = module
    path: list[str] = []
    for part in name.split("."):
        path.append(part)
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(
                f"TARGET {spec!r}: {where} has no {'.'.join(path)!r}; check the name after the ':'"
            ) from None
    return _resolve(obj, spec)


def _import_module(name: str, spec: str) -> Any:
    # A console script's sys.path starts at its own directory; `python -m` starts at the current
    # one. Look in the current directory either way, as a user naming their module expects.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            raise UsageError(
                f"TARGET {spec!r}: no module named {exc.name!r}; run from the directory that holds "
                "it, install it, or give a file path (path/to/file.py:name)"
            ) from exc
        raise _import_error(name, spec, exc) from exc
    except Exception as exc:
        raise _import_error(name, spec, exc) from exc


def _import_file(path: str, spec: str) -> Any:
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise UsageError(f"TARGET {spec!r}: no file {path!r}; check the path before the ':'")
    if not full.endswith(".py"):
        raise UsageError(f"TARGET {spec!r}: {path!r} is not a .py file; {_FORM}")
    # A stable, unique module name: spawned workers and pickling find the module by it.
    stem = os.path.splitext(os.path.basename(full))[0]
    digest = hashlib.sha1(full.encode()).hexdigest()[:8]
    mod_name = f"_loadertune_target_{stem if stem.isidentifier() else 'file'}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    # The file's siblings import as they would when it runs as a script.
    directory = os.path.dirname(full)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    module_spec = importlib.util.spec_from_file_location(mod_name, full)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"TARGET {spec!r}: cannot load {path!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[mod_name]
        raise _import_error(path, spec, exc) from exc
    return module


def _import_error(where: str, spec: str, exc: BaseException) -> UsageError:
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return UsageError(
        f"TARGET {spec!r}: importing {where} failed with {type(exc).__name__}"
        + (f": {detail}" if detail else "")
        + "; fix the error (run with --debug for the traceback)"
    )


def _resolve(obj: Any, spec: str) -> Target:
    kind = _kind(obj)
    if kind is None and callable(obj):
        _check_no_arguments(obj, spec)
        try:
            made = obj()
        except Exception as exc:
            raise UsageError(
                f"TARGET {spec!r}: calling it raised {type(exc).__name__}: {exc}; "
                "fix it (run with --debug for the traceback)"
            ) from exc
        kind = _kind(made)
        if kind is None:
            raise UsageError(
                f"TARGET {spec!r}: calling it returned {_describe(made)}, not a Dataset or a "
                "DataLoader; return one of those"
            )
        obj = made
    if kind is None:
        raise UsageError(
            f"TARGET {spec!r} is {_describe(obj)}; name a Dataset, a DataLoader, or a function "
            "taking no arguments that returns one"
        )
    if kind == "loader":
        return Target(spec=spec, dataset=obj.dataset, loader=obj)
    return Target(spec=spec, dataset=obj)


def _kind(obj: Any) -> str | None:
    if isinstance(obj, type):
        return None  # a class: call it to get an instance
    # Without torch imported, nothing can be a torch Dataset; a wrong TARGET fails fast then.
    data = sys.modules.get("torch.utils.data")
    if data is not None:
        if isinstance(obj, data.DataLoader):
            return "loader"
        if isinstance(obj, (data.Dataset, data.IterableDataset)):
            return "dataset"
    # Duck-typed map-style datasets (a list, a numpy array...) work with DataLoader too.
    if (
        hasattr(obj, "__getitem__")
        and hasattr(obj, "__len__")
        and not isinstance(obj, (str, bytes, dict))
    ):
        return "dataset"
    return None


def _check_no_arguments(obj: Any, spec: str) -> None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call decide
    required = [
        p.name
        for p in signature.parameters.values()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if required:
        raise UsageError(
            f"TARGET {spec!r} needs argument(s) {', '.join(required)}; "
            "name a Dataset or DataLoader "
            "object, or a function taking no arguments (wrap yours: def make(): return ...)"
        )


def _describe(obj: Any) -> str:
    if obj is None:
        return "None"
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}"
    name = type(obj).__qualname__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"
