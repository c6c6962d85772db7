"""Image folders streamed from disk, for datasets too big to decode once and hold on the device.

`neurosim.data.load_dataset` decodes a whole folder once and keeps it on the device as uint8
tensors; that stops working well short of ImageNet (1.28 M images of varied sizes, hundreds of
GB decoded). Here images are read and decoded batch by batch by `DataLoader` worker processes
while the device trains on the previous batches (`FolderStream`, in
`neurosim.data.folder_stream`).

`wants_stream` decides whether a run streams its data, `open_folder` gives a streamed folder's
classes and splits (`folder_splits`: ImageNet's ``train/`` + ``val/`` layout, or one tree with a
held-out tail per class, found without opening any image): the splits and the training order
are those the folder has when it is decoded into memory.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from pathlib import Path

import attrs

from neurosim.common.errors import DataError
from neurosim.data import images
from neurosim.data.folder_stream import FolderStream, crop_box
from neurosim.data.folders import cache_path, folder_splits, folder_training_order, is_split_layout, scan_folder
from neurosim.data.images import header_size
from neurosim.data.registry import DATASET_NAMES, DATASETS, folder_root

__all__ = ["AUTO_STREAM_BYTES", "FolderStream", "IMAGENET_MEAN", "IMAGENET_STD", "StreamedData", "crop_box",
           "folder_root", "folder_splits", "header_size", "open_folder", "wants_stream"]

# torchvision's ImageNet channel statistics. A streamed folder is normalised with them: measuring
# a million images' statistics would cost about as much as an epoch, and every ImageNet recipe
# (and every pretrained torchvision model) uses these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# "auto" streams a single-tree folder whose images, decoded, would exceed this many bytes.
AUTO_STREAM_BYTES = 4 << 30
_SIZE_SAMPLE = 16


@attrs.frozen(eq=False)
class StreamedData:
    """A folder dataset a run reads from disk as it trains: its classes and its two splits.

    Stands where `neurosim.data.ImageData` stands for data held on the device (``name``,
    ``classes``, ``mean``, ``std``, ``image_shape``, ``num_classes``)."""

    name: str
    classes: tuple[str, ...]
    train: tuple[list, list]  # (paths, labels), in the fixed training order
    val: tuple[list, list]
    image_size: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.image_size, self.image_size


def wants_stream(spec: str, data_dir: str | os.PathLike, mode: str) -> bool:
    """Whether a run streams ``spec`` (``mode`` is the run's ``stream`` setting).

    The named datasets loaded into memory (``DATASET_NAMES``: digits, CIFAR, synthetic) are
    small and always held on the device. A named folder (imagenet) is found where its declaration
    says (`folder_root`) and decided as any folder: ``auto`` streams a folder in ImageNet's
    train/ + val/ layout, one whose images differ in size and one whose decoded images would
    exceed ``AUTO_STREAM_BYTES``, by the images' headers (`_mixed_or_large`). A folder decoded before, as it is now, has a cache of its decoded images
    (one size, or it would not have been decoded): its size decides without reading any header."""
    if spec in DATASET_NAMES:
        if mode == "on":
            raise DataError(f"--stream on reads image folders from disk; {spec} is small and always held on the "
                            f"device: use --stream auto (or off), or --data with a folder")
        return False
    if mode != "auto":
        return mode == "on"
    root = folder_root(spec, data_dir)
    if is_split_layout(root):
        return True
    _, paths, labels = scan_folder(root)
    try:
        decoded = cache_path(root, Path(data_dir), paths, labels).stat().st_size
    except OSError:
        return _mixed_or_large(paths)
    return decoded > AUTO_STREAM_BYTES


def _mixed_or_large(paths: Sequence[str]) -> bool:
    """Whether the images differ in size, or would take more than ``AUTO_STREAM_BYTES`` decoded
    (3 bytes a pixel), by their headers: a sample first, where a folder of many sizes shows it,
    then, unless the sample's size alone decides, every image, where one odd image shows (a
    9000×9000 scan among thumbnails). Images that cannot be read are passed over: the loader
    names them."""
    step = max(1, len(paths) // _SIZE_SAMPLE)
    first = None
    for path in itertools.chain(paths[::step][:_SIZE_SAMPLE], paths):
        size = images.image_size(path)
        if size is None:
            continue
        if first is None:
            first = size
            if len(paths) * 3 * size[0] * size[1] > AUTO_STREAM_BYTES:
                return True
        elif size != first:
            return True
    return False


def open_folder(spec: str, data_dir: str | os.PathLike, val_per_class: int | None, image_size: int,
                train_limit: int = 0) -> StreamedData:
    """The splits of a streamed folder; the training split in one fixed random order (the same
    that `load_dataset` gives a folder), so its first ``train_limit`` images are a fair subset."""
    root = folder_root(spec, data_dir)
    classes, (train_paths, train_labels), val = folder_splits(root, val_per_class)
    order = folder_training_order(len(train_paths)).tolist()
    if train_limit:
        order = order[:train_limit]
    train = ([train_paths[i] for i in order], [train_labels[i] for i in order])
    name = spec if spec in DATASETS else str(root)  # a named folder keeps its name
    return StreamedData(name, classes, train, val, image_size)
