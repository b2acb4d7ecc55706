"""Loading a probe TARGET: every form that works, and every mistake with a message that helps."""

from __future__ import annotations

import textwrap
import uuid

import pytest
from torch.utils.data import DataLoader

from loadertune.cli import UsageError
from loadertune.cli.target import load_target, parse_spec

SOURCE = """
import torch
from torch.utils.data import DataLoader, Dataset

class Squares(Dataset):
    def __len__(self):
        return 10
    def __getitem__(self, i):
        return torch.tensor([i * i])

dataset = Squares()
loader = DataLoader(dataset, batch_size=4, collate_fn=lambda b: torch.cat(b))
rows = [1, 2, 3]
number = 42

def make_loader():
    return DataLoader(Squares(), batch_size=2)

def make_nothing():
    return None

def make_with(size):
    return Squares()

def make_broken():
    raise OSError("bucket not mounted")

class Holder:
    inner = Squares()
"""


@pytest.fixture
def module_file(tmp_path):
    path = tmp_path / f"data_{uuid.uuid4().hex[:8]}.py"
    path.write_text(textwrap.dedent(SOURCE))
    return path


def _values(dataset):
    return [int(dataset[i]) for i in range(len(dataset))]


SQUARES = [i * i for i in range(10)]


def test_a_dataset_in_a_file(module_file):
    target = load_target(f"{module_file}:dataset")
    assert type(target.dataset).__name__ == "Squares"
    assert _values(target.dataset) == SQUARES
    assert target.loader is None
    assert target.spec == f"{module_file}:dataset"


def test_a_loader_keeps_the_loader(module_file):
    target = load_target(f"{module_file}:loader")
    assert isinstance(target.loader, DataLoader)
    assert target.loader.batch_size == 4
    assert target.dataset is target.loader.dataset
    # The loader's own collate_fn is kept: batches are flat, as the file's lambda makes them.
    assert next(iter(target.loader)).tolist() == [0, 1, 4, 9]


def test_a_factory_is_called(module_file):
    target = load_target(f"{module_file}:make_loader")
    assert isinstance(target.loader, DataLoader) and target.loader.batch_size == 2
    assert _values(target.dataset) == SQUARES
    # A fresh loader from the factory, not the module-level one.
    assert target.loader is not load_target(f"{module_file}:loader").loader


def test_a_dataset_class_is_instantiated(module_file):
    target = load_target(f"{module_file}:Squares")
    assert not isinstance(target.dataset, type)  # an instance, not the class
    assert _values(target.dataset) == SQUARES
    assert target.dataset is not load_target(f"{module_file}:dataset").dataset


def test_a_dotted_name(module_file):
    a = load_target(f"{module_file}:Holder.inner").dataset
    b = load_target(f"{module_file}:Holder.inner").dataset
    assert a is b  # the attribute itself, reached through the class
    assert _values(a) == SQUARES


def test_a_plain_sequence_is_a_map_style_dataset(module_file):
    target = load_target(f"{module_file}:rows")
    assert target.dataset == [1, 2, 3] and target.loader is None


def test_a_relative_path_and_a_module_name_from_the_current_directory(module_file, monkeypatch):
    monkeypatch.chdir(module_file.parent)
    monkeypatch.syspath_prepend(str(module_file.parent))
    assert _values(load_target(f"{module_file.name}:dataset").dataset) == SQUARES
    assert _values(load_target(f"{module_file.stem}:dataset").dataset) == SQUARES


def test_loading_the_same_file_twice_reuses_the_module(module_file):
    a = load_target(f"{module_file}:dataset")
    b = load_target(f"{module_file}:dataset")
    assert a.dataset is b.dataset


def test_parse_spec_tells_files_from_modules():
    assert parse_spec("pkg.mod:obj") == ("pkg.mod", "obj", False)
    assert parse_spec("dir/x.py:obj.attr") == ("dir/x.py", "obj.attr", True)
    assert parse_spec("x.py:obj") == ("x.py", "obj", True)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("missing", "has no 'missing'"),
        ("Holder.gone", "has no 'Holder.gone'"),
        ("number", "is an int; name a Dataset, a DataLoader"),
        ("make_nothing", "returned None, not a Dataset"),
        ("make_with", "needs argument(s) size"),
        ("make_broken", "calling it raised OSError: bucket not mounted"),
    ],
)
def test_wrong_names_and_objects(module_file, name, says):
    with pytest.raises(UsageError) as info:
        load_target(f"{module_file}:{name}")
    assert says in str(info.value)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("no_colon_here", "has no ':name' part"),
        ("mod:", "has no ':name' part"),
        (":name", "has no ':name' part"),
        ("mod:not-a-name", "is not a Python name"),
        ("surely_no_such_module_xyz:thing", "no module named 'surely_no_such_module_xyz'"),
        ("does/not/exist.py:thing", "no file 'does/not/exist.py'"),
    ],
)
def test_bad_specs(spec, says):
    with pytest.raises(UsageError) as info:
        load_target(spec)
    assert says in str(info.value)


def test_a_file_that_does_not_import(tmp_path):
    broken = tmp_path / "broken_syntax.py"
    broken.write_text("def oops(:\n")
    with pytest.raises(UsageError, match=r"importing .* failed with SyntaxError") as info:
        load_target(f"{broken}:x")
    assert isinstance(info.value.__cause__, SyntaxError)  # kept for --debug


def test_a_module_whose_own_import_fails_names_its_error(tmp_path, monkeypatch):
    name = f"needs_missing_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("import surely_absent_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(
        UsageError, match="ModuleNotFoundError: No module named 'surely_absent_dependency_xyz'"
    ):
        load_target(f"{name}:x")


def test_a_file_that_is_not_python(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("x")
    with pytest.raises(UsageError, match=r"not a \.py file"):
        load_target(f"{tmp_path}/data.txt:x")
