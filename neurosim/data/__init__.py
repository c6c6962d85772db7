"""Datasets, and the batches of device tensors a run trains on: the named datasets (declared with
`register_dataset` in `registry`, those that come with neurosim in `named`; CIFAR's files read by
`cifar`) and folders of images (listed, split, decoded and cached by `folders`, one image's pixels
and size by `images`), either decoded once into memory (`load_dataset` → `ImageData`, batched by
`BatchStream` in `batches`) or streamed from disk as a run trains (`stream`: whether a run
streams, and its splits; `folder_stream`: `FolderStream`). The two meet in one public seam: the
streamed side imports only public names of the others, and both give the same splits and
training order for a folder. This package may import `neurosim.common` and nothing else of neurosim: data knows nothing of circuits or training.

The names below are loaded on first use, so ``import neurosim.data`` and the registry
(``DATASETS``, ``DATASET_NAMES``) do not load PyTorch.
"""

import importlib

from neurosim.data import named  # noqa: F401  (declares the datasets that come with neurosim)
from neurosim.data.registry import (
    DATASET_NAMES,
    DATASETS,
    Dataset,
    Request,
    Splits,
    check_data,
    dataset_names,
    folder_root,
    register_dataset,
)

# public name -> the module that defines it, imported on first use
_HOMES = {
    "ImageData": "loading", "load_dataset": "loading", "channel_stats": "loading",
    "Augmentation": "batches", "BatchStream": "batches", "crop_and_flip": "batches", "derive_seed": "batches",
    "scan_folder": "folders", "folder_splits": "folders", "held_out": "folders",
    "folder_training_order": "folders", "cache_path": "folders", "load_folder": "folders",
    "TooLarge": "images", "too_large_error": "images", "max_image_pixels": "images", "header_size": "images",
    "image_size": "images",
    "FolderStream": "folder_stream", "StreamedData": "stream", "open_folder": "stream", "wants_stream": "stream",
}
# Names that modules outside the package still import under their old private spelling.
_FORMER = {"_scan_folder": ("folders", "scan_folder")}

__all__ = ["DATASETS", "DATASET_NAMES", "Dataset", "Request", "Splits", "check_data", "dataset_names",
           "folder_root", "register_dataset", *_HOMES]


def __getattr__(name: str):
    if name in _HOMES:
        home, attr = _HOMES[name], name
    elif name in _FORMER:
        home, attr = _FORMER[name]
    else:
        raise AttributeError(f"module 'neurosim.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"neurosim.data.{home}"), attr)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted([*globals(), *_HOMES])
