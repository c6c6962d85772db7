"""Datasets decoded once and held on the training device: `load_dataset` turns a spec (a declared
name such as ``digits`` or ``cifar10``, or a folder of class subfolders) into an `ImageData`,
whole train and test splits as uint8 N×C×H×W tensors on the device with the per-channel
statistics needed to normalise them. `BatchStream` (`neurosim.data.batches`) draws batches from it.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import torch

from neurosim.common.errors import DataError
from neurosim.data.folders import load_folder
from neurosim.data.registry import DATASETS, Dataset, Request, Splits, folder_root

__all__ = ["ImageData", "channel_stats", "load_dataset"]


def _tensor_repr(t: torch.Tensor) -> str:
    return f"<{t.dtype} {tuple(t.shape)} on {t.device}>"


@attrs.frozen(eq=False)
class ImageData:
    """A labelled image dataset resident on one device, ready for `BatchStream`.

    Images are uint8 N×C×H×W; labels are int64 class indices into `classes`. `mean` and `std`
    are per-channel statistics of the train split in [0, 1] pixel units, used to normalise
    inputs.
    """

    name: str
    train_x: torch.Tensor = attrs.field(repr=_tensor_repr)
    train_y: torch.Tensor = attrs.field(repr=_tensor_repr)
    test_x: torch.Tensor = attrs.field(repr=_tensor_repr)
    test_y: torch.Tensor = attrs.field(repr=_tensor_repr)
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes (the size of the output population)."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.train_x.shape[1:]
        return int(c), int(h), int(w)



def load_dataset(
    spec: str,
    data_dir: str | os.PathLike = "data",
    val_per_class: int | None = None,
    synthetic_size: tuple[int, int] = (1024, 256),
    device: str | torch.device = "cpu",
    seed: int = 0,
    download: bool = True,
    progress=None,
) -> ImageData:
    """Load the dataset named by `spec` onto `device`.

    `spec` is one of:

    - a name declared with `register_dataset` (``DATASETS``): its loader's splits, e.g.
      ``"digits"`` (scikit-learn's 8×8 handwritten digits, 1 channel, with a stratified 20 % test
      split drawn with `seed`); ``"cifar10"`` / ``"cifar100"`` (the python-format files of the
      official archive in ``<data_dir>/cifar-10-batches-py/`` or ``<data_dir>/cifar-100-python/``,
      downloaded there when missing and `download` is true; the test split is the official test
      set, the classes are the (fine) label names in label order; the files' structure is
      validated, and an md5 that differs from the official file's is a warning); ``"synthetic"``
      (`synthetic_size` = (n_train, n_test) random 3×32×32 images in 10 classes, each class with
      its own colour and pattern under noise; for tests and smoke runs).
    - a named folder (``"imagenet"``: ``<data_dir>/imagenet``) or any other path: a folder of
      class subfolders of images (the `ImageFolder` layout), or ImageNet's ``train/`` +
      ``val/`` layout of two such folders. In one tree the last `val_per_class` images of each
      class in sorted file order form the test split (default 10 % of each class, at least one);
      the training split is put in one fixed random order. Decoded images are cached under
      ``<data_dir>/cache/`` so later loads skip decoding.

    `val_per_class` applies to folders only. Problems the user can fix raise `DataError`.
    `progress(what, done, total, unit)`, if given, is told how decoding a folder and writing its
    cache go (``done == total`` when one ends): minutes for tens of thousands of JPEGs.
    """
    device = torch.device(device)
    data_dir = Path(data_dir)
    dataset = DATASETS.get(spec)
    if dataset is not None and not dataset.is_folder:
        name = spec
        splits = dataset.load(Request(data_dir, seed, download, tuple(synthetic_size), progress))
        _check_declared(dataset, splits)
    else:
        root = folder_root(spec, data_dir)
        name = spec if dataset is not None else str(root)
        splits = load_folder(root, data_dir, val_per_class, progress)
    tx, ty, vx, vy, classes = splits
    if len(tx) == 0:
        raise DataError(f"dataset {name!r} has no training images")
    # Statistics from the host copy: the same numbers on every device, and no CUDA bincount
    # (which has no deterministic implementation) in a deterministic run.
    mean, std = channel_stats(tx)
    tx, ty, vx, vy = (t.to(device) for t in (tx, ty, vx, vy))
    return ImageData(name, tx, ty, vx, vy, tuple(classes), mean, std)


def _check_declared(dataset: Dataset, splits: Splits) -> None:
    """Refuse a loader's result that is not uint8 N×C×H×W images with one int64 label each, or
    that differs from what its declaration says is known before loading (a fault of the loader,
    so a `ValueError`, not a `DataError`)."""
    def wrong(what):
        return ValueError(f"the loader of dataset {dataset.name!r} returned {what}")

    if not isinstance(splits, Splits):
        splits = Splits(*splits)
    for x, y, split in ((splits.train_x, splits.train_y, "training"), (splits.test_x, splits.test_y, "test")):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.ndim != 4:
            raise wrong(f"{split} images that are not a uint8 N×C×H×W tensor")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.shape != (len(x),):
            raise wrong(f"{split} labels that are not one int64 class index per image")
        if len(x) and tuple(x.shape[1:]) != tuple(splits.train_x.shape[1:]):
            raise wrong(f"{split} images of shape {tuple(x.shape[1:])} but training images of "
                        f"{tuple(splits.train_x.shape[1:])}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(splits.classes)):
            raise wrong(f"{split} labels outside [0, {len(splits.classes)}), the number of its class names")
    if dataset.image_shape is not None and tuple(splits.train_x.shape[1:]) != dataset.image_shape:
        raise wrong(f"images of shape {tuple(splits.train_x.shape[1:])}; it is declared with {dataset.image_shape}")
    if dataset.classes is not None and len(splits.classes) != dataset.classes:
        raise wrong(f"{len(splits.classes)} classes; it is declared with {dataset.classes}")


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of uint8 images, in [0, 1] units.

    Counts each channel's 256 pixel values exactly and takes the moments of that histogram in
    float64, which is exact and needs no float copy of the images.
    """
    values = torch.arange(256, dtype=torch.float64, device=x.device)
    mean, std = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = hist.sum()
        m = (hist * values).sum() / n
        var = ((hist * values.square()).sum() / n - m.square()).clamp_min(0.0)
        mean.append(float(m) / 255.0)
        std.append(float(var.sqrt()) / 255.0)
    return tuple(mean), tuple(std)
