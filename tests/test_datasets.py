"""The dataset registry (``neurosim.data.registry``): a named dataset is one file that declares
itself with ``@register_dataset``, and every place that reads a spec (loading, the decision to
stream, the check before a run) knows it from that declaration alone."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neurosim.common.errors import DataError
from neurosim.data import (
    DATASET_NAMES,
    DATASETS,
    check_data,
    dataset_names,
    folder_root,
    folder_splits,
    folder_training_order,
    load_dataset,
    register_dataset,
)
from neurosim.data.stream import open_folder, wants_stream

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "neurosim" / "data"

TINY = '''
import torch

from neurosim.data import Request, Splits, register_dataset


@register_dataset("tiny", about="six 2x3 greyscale images in two classes", image_shape=(1, 2, 3), classes=2,
                  train_images=4, test_images=2)
def tiny(request: Request) -> Splits:
    g = torch.Generator().manual_seed(request.seed)
    x = torch.randint(0, 256, (6, 1, 2, 3), generator=g, dtype=torch.uint8)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    return Splits(x[:4], y[:4], x[4:], y[4:], ("left", "right"))
'''

PETS = '''
from pathlib import Path

from neurosim.data import register_dataset
from neurosim.common.errors import DataError


@register_dataset("pets", about="photos of pets, one folder per kind, in <data-dir>/pets", folder=True)
def pets(data_dir: Path) -> Path:
    root = data_dir / "pets"
    if not root.is_dir():
        raise DataError(f"the pets are not at {root}; put a folder per kind of pet there")
    return root
'''


@pytest.fixture
def declare(tmp_path, monkeypatch):
    """Writes a module holding ``source`` and imports it, as a dataset file of its own would be;
    the datasets it declares are forgotten afterwards."""
    before = set(DATASETS)
    folder = tmp_path / "modules"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    names = []

    def write_and_import(name: str, source: str):
        (folder / f"{name}.py").write_text(textwrap.dedent(source))
        names.append(name)
        return importlib.import_module(name)

    yield write_and_import
    for name in names:
        sys.modules.pop(name, None)
    for name in set(DATASETS) - before:
        del DATASETS[name]


def write_tree(root: Path, per_class: int = 3, size=(5, 4), classes=("cat", "dog")) -> None:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name / f"{i}.png")


# --- a new named dataset is one file ----------------------------------------------------------------

def test_a_dataset_loaded_into_memory_is_one_file(declare, tmp_path):
    assert "tiny" not in DATASETS
    declare("tiny_dataset", TINY)
    assert "tiny" in DATASET_NAMES and dataset_names()[-1] == "tiny"
    tiny = DATASETS["tiny"]
    assert (tiny.about, tiny.image_shape, tiny.classes, tiny.family) == (
        "six 2x3 greyscale images in two classes", (1, 2, 3), 2, "tiny")
    assert not tiny.is_folder and not tiny.reads_data_dir

    d = load_dataset("tiny", data_dir=tmp_path, seed=5)
    assert d.name == "tiny" and d.classes == ("left", "right") and d.image_shape == (1, 2, 3)
    assert len(d.train_x) == 4 and len(d.test_x) == 2
    assert torch.equal(d.train_x, load_dataset("tiny", data_dir=tmp_path, seed=5).train_x)
    # Held in memory, never streamed; nothing to check on disk.
    assert not wants_stream("tiny", tmp_path, "auto") and not wants_stream("tiny", tmp_path, "off")
    with pytest.raises(DataError, match="tiny is small and always held on the device"):
        wants_stream("tiny", tmp_path, "on")
    check_data("tiny", tmp_path / "nowhere")


def test_a_named_folder_is_one_file(declare, tmp_path):
    declare("pets_dataset", PETS)
    assert "pets" in DATASETS and DATASETS["pets"].is_folder and DATASETS["pets"].family == "folder"
    assert "pets" not in DATASET_NAMES and "pets" in dataset_names(folders=True)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="the pets are not at"):
        check_data("pets", data_dir)
    with pytest.raises(DataError, match="the pets are not at"):
        load_dataset("pets", data_dir=data_dir)
    with pytest.raises(DataError, match="the pets are not at"):
        wants_stream("pets", data_dir, "auto")

    write_tree(data_dir / "pets", per_class=5)
    check_data("pets", data_dir)
    assert folder_root("pets", data_dir) == (data_dir / "pets").resolve()
    # Decoded into memory, or streamed, as any folder given by path.
    d = load_dataset("pets", data_dir=data_dir, val_per_class=1)
    assert d.name == "pets" and d.classes == ("cat", "dog") and d.image_shape == (3, 4, 5)
    assert len(d.train_x) == 8 and len(d.test_x) == 2
    assert not wants_stream("pets", data_dir, "auto") and wants_stream("pets", data_dir, "on")
    streamed = open_folder("pets", data_dir, 1, image_size=8)
    assert streamed.name == "pets" and streamed.classes == d.classes
    assert len(streamed.train[0]) == 8 and len(streamed.val[0]) == 2


def test_a_loader_is_held_to_its_declaration(declare, tmp_path):
    declare("tiny_dataset", TINY.replace("image_shape=(1, 2, 3)", "image_shape=(3, 2, 3)"))
    with pytest.raises(ValueError, match=r"loader of dataset 'tiny' returned images of shape \(1, 2, 3\); it is "
                                         r"declared with \(3, 2, 3\)"):
        load_dataset("tiny", data_dir=tmp_path)


def test_declarations_that_cannot_stand_are_refused(declare):
    declare("tiny_dataset", TINY)
    with pytest.raises(ValueError, match="dataset name 'tiny' is taken by tiny_dataset.tiny"):
        register_dataset("tiny", about="another")(lambda request: None)
    with pytest.raises(ValueError, match="short lower-case word"):
        register_dataset("My Data", about="x")
    with pytest.raises(ValueError, match="one line"):
        register_dataset("fine", about="")
    with pytest.raises(ValueError, match="channels, height, width"):
        register_dataset("fine", about="x", image_shape=(8, 8))


# --- the datasets that come with neurosim ------------------------------------------------------------

def test_the_named_datasets_and_imagenet_are_declared_once():
    assert DATASET_NAMES == ("digits", "cifar10", "cifar100", "synthetic")
    assert dataset_names(folders=True) == ("digits", "cifar10", "cifar100", "synthetic", "imagenet")
    assert DATASETS["digits"].image_shape == (1, 8, 8) and DATASETS["digits"].train_images == 1437
    assert {DATASETS[n].family for n in ("cifar10", "cifar100")} == {"cifar"}
    assert DATASETS["cifar100"].classes == 100 and DATASETS["cifar10"].reads_data_dir
    assert DATASETS["imagenet"].is_folder and all(DATASETS[n].about for n in DATASETS)


def test_imagenet_is_found_under_the_data_dir_and_decoded_or_streamed_alike(tmp_path):
    with pytest.raises(DataError, match="ImageNet is not at .*cannot be downloaded"):
        check_data("imagenet", tmp_path)
    with pytest.raises(DataError, match="ImageNet is not at"):
        load_dataset("imagenet", data_dir=tmp_path)
    root = tmp_path / "imagenet"
    write_tree(root / "train", per_class=4)
    write_tree(root / "val", per_class=2)
    assert folder_root("imagenet", tmp_path) == root.resolve()
    assert wants_stream("imagenet", tmp_path, "auto")
    # Decoded into memory (--stream off), the train/ + val/ layout keeps its two splits: val/ is
    # the test split, not a class of its own.
    d = load_dataset("imagenet", data_dir=tmp_path)
    assert d.name == "imagenet" and d.classes == ("cat", "dog")
    assert len(d.train_x) == 8 and len(d.test_x) == 4
    classes, (train_paths, train_labels), (val_paths, val_labels) = folder_splits(root)
    order = folder_training_order(len(train_paths))
    assert d.train_y.tolist() == [train_labels[i] for i in order] and d.test_y.tolist() == val_labels
    first = np.asarray(Image.open(train_paths[int(order[0])])).transpose(2, 0, 1)
    assert np.array_equal(d.train_x[0].numpy(), first)


def test_an_unknown_spec_names_every_dataset(tmp_path):
    with pytest.raises(DataError) as err:
        check_data(str(tmp_path / "nope"), tmp_path)
    assert "not one of digits, cifar10, cifar100, synthetic, imagenet, and not a folder" in str(err.value)


# --- what the package may import ------------------------------------------------------------------

def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_data_imports_nothing_of_circuits_or_training():
    allowed = ("neurosim.common", "neurosim.data")
    for path in sorted(PACKAGE.glob("*.py")):
        for module, _ in _imports(path):
            if module == "neurosim" or module.startswith("neurosim."):
                assert module.startswith(allowed), f"{path.name} imports {module}"


def test_no_module_of_the_package_imports_private_names_of_another():
    for path in sorted(PACKAGE.glob("*.py")):
        for module, names in _imports(path):
            if module.startswith("neurosim."):
                assert not [n for n in names if n.startswith("_")], f"{path.name} imports {names} from {module}"


def test_importing_the_package_and_its_registry_loads_no_pytorch():
    probe = ("import sys, neurosim.data; from neurosim.data import DATASETS, DATASET_NAMES, folder_root; "
             "assert list(DATASETS) and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
