"""The named datasets, each declared once with `register_dataset` where it is defined.

A declaration says what a name means: a line for help texts, what is known of the data before
it is loaded (one image's shape, the number of classes, training and test images), and either
how to load it into memory (the decorated function takes a `Request` and returns `Splits`) or,
for a named folder of images such as ImageNet (``folder=True``), where that folder is (the
decorated function takes the data directory and returns the folder). A named folder is then read
as any folder is: decoded once into memory or streamed from disk.

``DATASETS`` maps every declared name to its `Dataset`; ``DATASET_NAMES`` is a view of the names
loaded into memory (not folders), read afresh on every use. `folder_root` finds the folder a spec
names and `check_data` refuses, reading no image, a spec that names no dataset. Nothing here
imports PyTorch, so help texts and option checks can list the datasets cheaply.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, MutableMapping
from pathlib import Path
from typing import Any, NamedTuple

import attrs

from neurosim.common.errors import DataError
from neurosim.common.names import LiveNames

__all__ = ["DATASETS", "DATASET_NAMES", "Dataset", "Request", "Splits", "check_data", "dataset_names",
           "folder_root", "register_dataset"]


@attrs.frozen
class Request:
    """What `load_dataset` was asked, as a named dataset's loader receives it: where data is kept
    (``data_dir``: downloads and caches go there), the seed of any random split or draw, whether a
    missing file may be downloaded, the (train, test) sizes of ``synthetic``, and ``progress``
    (``progress(what, done, total, unit)``, or None) for long steps."""

    data_dir: Path
    seed: int = 0
    download: bool = True
    synthetic_size: tuple[int, int] = (1024, 256)
    progress: Callable | None = None


class Splits(NamedTuple):
    """A loaded dataset: uint8 N×C×H×W images and int64 labels of its training and test splits,
    on the CPU, and its class names in label order."""

    train_x: Any
    train_y: Any
    test_x: Any
    test_y: Any
    classes: tuple[str, ...]


@attrs.frozen
class Dataset:
    """One declared dataset (see `register_dataset`)."""

    name: str
    about: str
    family: str
    image_shape: tuple[int, int, int] | None = None
    classes: int | None = None
    train_images: int | None = None
    test_images: int | None = None
    reads_data_dir: bool = False
    load: Callable[[Request], Splits] | None = None
    locate: Callable[[Path], Path] | None = None

    @property
    def is_folder(self) -> bool:
        """Whether the name means a folder of images (read as any folder is) rather than data a
        loader of its own puts into memory."""
        return self.locate is not None


class DatasetRegistry(MutableMapping):
    """Declared datasets by name, in declaration order. ``del DATASETS[name]`` forgets one."""

    def __init__(self):
        self._datasets: dict[str, Dataset] = {}

    def __getitem__(self, name):
        return self._datasets[name]

    def __contains__(self, name):
        return isinstance(name, str) and name in self._datasets

    def __iter__(self):
        return iter(self._datasets)

    def __len__(self):
        return len(self._datasets)

    def __setitem__(self, name, dataset):
        if not isinstance(dataset, Dataset) or dataset.name != name:
            raise TypeError(f"DATASETS[{name!r}] must be a Dataset named {name!r}; declare datasets with "
                            "@register_dataset")
        self._datasets[name] = dataset

    def __delitem__(self, name):
        del self._datasets[name]

    def __repr__(self):
        return f"DatasetRegistry({', '.join(self._datasets)})"


DATASETS = DatasetRegistry()


def dataset_names(folders: bool = False) -> tuple[str, ...]:
    """The declared names in declaration order: those loaded into memory, and with ``folders``
    also the named folders (imagenet)."""
    return tuple(name for name, d in DATASETS.items() if folders or not d.is_folder)


# The datasets loaded into memory, read afresh on every use.
DATASET_NAMES = LiveNames(dataset_names)

_NAME = re.compile(r"[a-z][a-z0-9_-]*")


def register_dataset(name: str, *, about: str, image_shape: tuple[int, int, int] | None = None,
                     classes: int | None = None, train_images: int | None = None, test_images: int | None = None,
                     family: str | None = None, reads_data_dir: bool = False, folder: bool = False):
    """Function decorator that makes ``name`` a dataset everywhere a spec is read (``--data``,
    `load_dataset`, the decision to stream, help texts). A dataset file declares itself once::

        @register_dataset("tiny", about="four 2×2 images in two classes, for tests",
                          image_shape=(1, 2, 2), classes=2, train_images=4, test_images=0)
        def tiny(request: Request) -> Splits:
            x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
            y = torch.tensor([0, 1, 0, 1])
            return Splits(x, y, x[:0], y[:0], ("a", "b"))

    ``about`` is its line in help texts. ``image_shape`` (C, H, W), ``classes``,
    ``train_images`` and ``test_images`` are given where they are known before loading (None
    where they depend on options or on what is on disk); a loaded dataset is checked against
    them. ``family`` groups datasets that the same settings apply to (``cifar`` for cifar10 and
    cifar100; the name itself by default; ``folder`` for named folders); ``reads_data_dir``: the
    data is kept under (or downloaded to) ``--data-dir``.

    With ``folder=True`` the name means a folder of images, and the decorated function takes the
    data directory and returns that folder (raising `DataError`, with where to put it, if it is
    not there); the folder is then listed, split, decoded or streamed as any folder given by
    path. Without it, the decorated function takes a `Request` and returns the `Splits` (images
    on the CPU; `load_dataset` moves them to the device and measures their statistics).
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"a dataset name is a short lower-case word (letters, digits, '-', '_'), not {name!r}")
    if not isinstance(about, str) or not about.strip() or "\n" in about:
        raise ValueError(f"dataset {name!r}: about is one line saying what the dataset is")
    if image_shape is not None and (len(image_shape) != 3 or any(int(n) < 1 for n in image_shape)):
        raise ValueError(f"dataset {name!r}: image_shape is (channels, height, width), not {image_shape!r}")

    def declare(fn: Callable) -> Callable:
        known = DATASETS._datasets.get(name)
        if known is not None:
            defined = known.locate or known.load
            if (defined.__module__, defined.__qualname__) != (fn.__module__, fn.__qualname__):
                raise ValueError(f"dataset name {name!r} is taken by {defined.__module__}.{defined.__qualname__}")
        DATASETS[name] = Dataset(
            name=name, about=about.strip(), family=family or ("folder" if folder else name),
            image_shape=None if image_shape is None else tuple(int(n) for n in image_shape),
            classes=classes, train_images=train_images, test_images=test_images,
            reads_data_dir=reads_data_dir or folder,
            load=None if folder else fn, locate=fn if folder else None)
        return fn

    return declare


def folder_root(spec: str, data_dir: str | os.PathLike) -> Path:
    """The folder a data spec names, resolved: a named folder's (``imagenet``: its declaration
    says where, under ``data_dir``), else the path ``spec`` itself. `DataError` if there is
    none, naming the datasets and what a folder must hold."""
    dataset = DATASETS.get(spec)
    if dataset is not None:
        if not dataset.is_folder:
            raise DataError(f"{spec} is a named dataset loaded into memory, not a folder of images")
        return Path(dataset.locate(Path(data_dir).expanduser())).resolve()
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise DataError(
            f"unknown dataset {spec!r}: not one of {', '.join(dataset_names(folders=True))}, and not a folder. "
            "A path must be a folder of class subfolders of images (e.g. train/cat/0001.png)."
        )
    return root.resolve()


def check_data(spec: str, data_dir: str | os.PathLike) -> None:
    """Refuse (`DataError`) a spec that is neither a declared dataset nor a folder, or a named
    folder that is not where its declaration looks. Reads no image and downloads nothing, so a
    command can check its data before it starts any work."""
    dataset = DATASETS.get(spec)
    if dataset is None or dataset.is_folder:
        folder_root(spec, data_dir)
