"""Folders of class subfolders of images (torchvision's ImageFolder layout), and ImageNet's
``train/`` + ``val/`` layout of two such folders: listing their images and splits without
opening any (`scan_folder`, `folder_splits`), and decoding every image once into one uint8 array,
cached on disk so that later loads skip decoding (`load_folder`).

The splits and the training order are the same whether a folder is decoded here or streamed
from disk (`neurosim.data.stream`).
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import re
import secrets
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import torch

from neurosim.common.errors import DataError
from neurosim.data.images import TooLarge, failure_reason, max_image_pixels, open_image, pixels, too_large_error
from neurosim.data.registry import Splits, dataset_names

__all__ = ["scan_folder", "folder_splits", "held_out", "folder_training_order", "cache_path", "load_folder"]

# Bump when the layout of the decoded-folder cache changes, so old caches are not misread.
_CACHE_FORMAT = 1
# Below this many files a process pool costs more to start than it saves.
_POOL_MIN_FILES = 2048
# torchvision.datasets.folder.IMG_EXTENSIONS
_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --- listing -------------------------------------------------------------------------------------

def scan_folder(root: Path) -> tuple[list[str], list[str], list[int]]:
    """Classes, image paths and labels of an ImageFolder tree, in torchvision's ImageFolder order.

    Same rules as `torchvision.datasets.folder.make_dataset` (sorted class folders, sorted walk
    following links, the same image extensions), without importing torchvision for it. A tree
    needs at least two classes: with one, every image has the same label and any classifier
    scores 100 %.
    """
    hint = (f"Valid dataset names are {', '.join(dataset_names(folders=True))}; a path must be a folder of "
            "class subfolders of images (e.g. train/cat/0001.png).")
    try:
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        paths, labels, empty = [], [], []
        for label, name in enumerate(classes):
            found = 0
            for folder, _, fnames in sorted(os.walk(os.path.join(root, name), followlinks=True)):
                for fname in sorted(fnames):
                    if fname.lower().endswith(_IMG_EXTENSIONS):
                        paths.append(os.path.join(folder, fname))
                        labels.append(label)
                        found += 1
            if not found:
                empty.append(name)
    except OSError as exc:
        raise DataError(f"cannot read {root}: {exc}. {hint}") from None
    if not classes:
        raise DataError(f"{root} has no class subfolders. {hint}")
    if empty:
        raise DataError(
            f"{root}: class folder(s) {', '.join(empty)} hold no images "
            f"({', '.join(_IMG_EXTENSIONS)}). {hint}"
        )
    if len(classes) == 1:
        only = root / classes[0]
        try:
            inner = sorted(e.name for e in os.scandir(only) if e.is_dir())
        except OSError:
            inner = []
        nested = ""
        if len(inner) >= 2:
            listed = ", ".join(inner[:3]) + (", ..." if len(inner) > 3 else "")
            nested = f" If {only} holds the class folders ({listed}), pass that folder instead."
        raise DataError(
            f"a folder dataset needs at least two classes; found only {classes[0]!r} in {root}, so "
            "every image would have the same label and training would reach a meaningless 100 %. "
            f"Put each class's images in its own subfolder (e.g. train/cat/0001.png, train/dog/0001.png).{nested}"
        )
    return classes, paths, labels



def held_out(root: Path, classes: Sequence[str], labels: Sequence[int], val_per_class: int | None) -> np.ndarray:
    """Which images of a folder form its evaluation split (a bool mask over its images, which
    `scan_folder` lists class by class): the last ``val_per_class`` of each class in sorted
    file order, by default 10 % of each class and at least one."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes)).tolist()
    mask = np.zeros(len(labels), dtype=bool)
    start = 0
    for name, count in zip(classes, counts):
        # val_per_class=0 holds nothing out (the evaluation split is empty; evaluating says so).
        k = max(1, count // 10) if val_per_class is None else int(val_per_class)
        if k < 0 or k >= count:
            raise DataError(
                f"class {name!r} in {root} has {count} images; cannot hold out {k} of them "
                "for validation and still train on it (choose a smaller val_per_class)"
            )
        mask[start + count - k:start + count] = True
        start += count
    return mask


def folder_training_order(n: int) -> torch.Tensor:
    """The fixed order in which a folder's ``n`` training images (sorted by class) are held."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


def folder_splits(root: str | os.PathLike, val_per_class: int | None = None
                  ) -> tuple[tuple[str, ...], tuple[list[str], list[int]], tuple[list[str], list[int]]]:
    """The classes and the (paths, labels) of the training and validation images under `root`.

    Two layouts are understood:

    - ImageNet's: `root` holds ``train/`` and ``val/``, each a folder of class subfolders with the
      same class names. Both are used as they are; `val_per_class` is ignored.
    - one folder of class subfolders (what `neurosim.data.load_dataset` reads): the last
      `val_per_class` images of each class in sorted file order are the validation split
      (default 10 % of each class, at least one), the rest the training split, exactly as
      `load_dataset` splits a folder.

    Only file names are read, never the images, so this is quick even for ImageNet. Paths and
    labels are in ImageFolder order (by class, then sorted file order); labels index the class
    tuple. Problems the user can fix raise `DataError`.
    """
    classes, paths, labels, is_val = _listing(Path(root).expanduser(), val_per_class)
    train = [(p, y) for p, y, v in zip(paths, labels, is_val) if not v]
    val = [(p, y) for p, y, v in zip(paths, labels, is_val) if v]
    return (tuple(classes),
            ([p for p, _ in train], [y for _, y in train]),
            ([p for p, _ in val], [y for _, y in val]))


def is_split_layout(root: Path) -> bool:
    """Whether ``root`` is in ImageNet's layout: a ``train/`` and a ``val/`` folder of class subfolders."""
    return (root / "train").is_dir() and (root / "val").is_dir()


def _listing(root: Path, val_per_class: int | None) -> tuple[list[str], list[str], list[int], np.ndarray]:
    """The classes, image paths and labels of the folder at `root`, and which images form the
    validation split (a bool mask): in ImageNet's layout those of ``val/``, listed after those
    of ``train/``; otherwise `held_out`'s, with the images in `scan_folder`'s order."""
    if is_split_layout(root):
        train_dir, val_dir = root / "train", root / "val"
        classes, train_paths, train_labels = scan_folder(train_dir)
        val_classes, val_paths, val_labels = scan_folder(val_dir)
        if classes != val_classes:
            raise DataError(_class_mismatch(train_dir, classes, val_dir, val_classes))
        is_val = np.zeros(len(train_paths) + len(val_paths), dtype=bool)
        is_val[len(train_paths):] = True
        return classes, train_paths + val_paths, train_labels + val_labels, is_val
    classes, paths, labels = scan_folder(root)
    return classes, paths, labels, held_out(root, classes, labels, val_per_class)


def _class_mismatch(train_dir: Path, train: Sequence[str], val_dir: Path, val: Sequence[str],
                    show: int = 5) -> str:
    """Why the class folders of train/ and val/ do not match, naming the classes that differ."""
    def listed(names):
        more = f" and {len(names) - show} more" if len(names) > show else ""
        return ", ".join(names[:show]) + more

    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    parts = []
    if only_train:
        parts.append(f"only in {train_dir}: {listed(only_train)}")
    if only_val:
        parts.append(f"only in {val_dir}: {listed(only_val)}")
    return (f"the class folders of {train_dir} ({len(train)}) and {val_dir} ({len(val)}) differ ("
            f"{'; '.join(parts)}); both splits need the same classes, each in its own subfolder "
            "(e.g. train/n01440764/ and val/n01440764/)")


# --- the decoded-image cache ---------------------------------------------------------------------

# Bump when decoding gives different pixels for some files (16-bit images, which were once
# clipped to white), so that caches holding the old result are rebuilt rather than reused.
_DECODE_REVISION = 2


def cache_path(root: Path, data_dir: Path, paths: Sequence[str], labels: Sequence[int]) -> Path:
    h = hashlib.sha256(f"neurosim-folder-cache-v{_CACHE_FORMAT}-d{_DECODE_REVISION}\n".encode())
    prefix = len(str(root)) + 1  # paths are os.path.join(root, ...)
    for path, label in zip(paths, labels):
        try:
            st = os.stat(path)
            state = f"{st.st_size}\t{st.st_mtime_ns}"
        except OSError:
            state = "unreadable"  # e.g. a dangling link; decoding reports it with the others
        h.update(f"{path[prefix:]}\t{label}\t{state}\n".encode())
    tag = re.sub(r"[^A-Za-z0-9._-]+", "_", str(root)).strip("_")[-80:]
    return data_dir / "cache" / f"{tag}-{h.hexdigest()[:16]}.npz"


def _cache_problem(images, n: int) -> str | None:
    """Why a cached array is not the N×C×H×W uint8 images of `n` files, or None if it is."""
    if not isinstance(images, np.ndarray):
        return f"it holds a {type(images).__name__}, not an array"
    if images.dtype != np.uint8 or images.ndim != 4:
        return f"it holds a {images.dtype} array of shape {tuple(images.shape)}, not uint8 N×C×H×W images"
    if len(images) != n or images.shape[1] not in (1, 3) or 0 in images.shape[2:]:
        return f"it holds images of shape {tuple(images.shape)}, not {n} images of 1 or 3 channels"
    return None


def _read_cache(path: Path, n: int) -> np.ndarray | None:
    """The cached images of a folder, or None on a miss.

    A cache file that exists but cannot be used (empty, truncated, not an npz, the wrong
    contents) is a miss as well: it is reported in a warning and deleted, and the caller decodes
    the images again and writes a new one, so one bad file cannot break every later load.
    """
    try:
        # Opened here, not by np.load, which leaves the file open when it is not a zip archive.
        with open(path, "rb") as f:
            magic = f.read(4)
            if magic != b"PK\x03\x04":  # np.load would take anything else for a pickle
                problem = "the file is empty" if not magic else "it is not an npz archive"
            else:
                f.seek(0)
                with np.load(f, allow_pickle=False) as z:
                    images = z["images"]
                problem = _cache_problem(images, n)
    except FileNotFoundError:
        return None
    except Exception as exc:  # np.load raises OSError, EOFError, ValueError, BadZipFile, zlib.error, ...
        detail = " ".join(str(exc).split()).split(". ")[0].rstrip(".")  # numpy's first sentence
        problem = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    if problem is None:
        return images
    warnings.warn(
        f"the decoded-image cache {path} cannot be used ({problem}); it is deleted and rebuilt "
        "from the images",
        stacklevel=4,
    )
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # writing the new cache replaces it, or warns that it cannot
    return None


def _write_cache(path: Path, images: np.ndarray, progress=None) -> None:
    # Written under a unique temporary name and renamed, so a reader never sees half a file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            what = f"caching the decoded images in {path} ({images.nbytes / 1e6:.0f} MB)"
            if progress is not None:
                progress(what, 0, 1, "")
            with open(tmp, "xb") as f:
                np.savez(f, images=images)
            os.replace(tmp, path)
            if progress is not None:
                progress(what, 1, 1, "")
        finally:
            if tmp.exists():
                tmp.unlink()
    except OSError as exc:
        warnings.warn(f"could not cache decoded images at {path}: {exc}", stacklevel=3)


# --- decoding ------------------------------------------------------------------------------------

def _decode_chunk(paths: Sequence[str]) -> list[np.ndarray | str | TooLarge]:
    """Decode images with `pixels`; an image that cannot be read gives the reason (a str)
    instead, one over `max_image_pixels` a `TooLarge` (before it is decoded).

    Failures are returned rather than raised so that every bad file of a folder can be reported
    at once, from worker processes (forked: they hold this process's limit) as from this one.
    """
    max_pixels = max_image_pixels()
    out: list[np.ndarray | str | TooLarge] = []
    for path in paths:
        try:
            with open_image(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    out.append(TooLarge(path, w, h, max_pixels))
                    continue
                out.append(pixels(im))
        except MemoryError:
            raise
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
            out.append(failure_reason(exc, path))
    return out


def _unreadable_error(paths: Sequence[str], bad: Sequence[tuple[str, str]], show: int = 5) -> DataError:
    """One error for all unreadable images: how many, the first `show` of them, and why."""
    root = os.path.commonpath([os.path.dirname(p) for p in paths])
    listed, last = [], None
    for path, reason in bad[:show]:
        name = os.path.relpath(path, root)
        listed.append(name if reason == last else f"{name} ({reason})")
        last = reason
    if len(bad) == 1:
        return DataError(f"1 image in {root} cannot be read: {listed[0]}; remove or replace it")
    more = f" and {len(bad) - show} more" if len(bad) > show else ""
    return DataError(
        f"{len(bad)} images in {root} cannot be read, e.g. {', '.join(listed)}{more}; "
        "remove or replace them"
    )


def _decode_images(paths: Sequence[str], progress=None) -> np.ndarray:
    """Decode every image once into one uint8 N×C×H×W array (C = 1 if all are greyscale, else 3).

    Large trees are decoded by a pool of forked processes; PIL holds the GIL for too much of the
    work on small images for threads to help. Every image is tried before any failure is
    reported, so one `DataError` names all the unreadable ones.
    """
    if not paths:
        raise DataError("no images to decode")
    what = f"decoding {len(paths):,} images of {os.path.commonpath([os.path.dirname(p) for p in paths])}"

    def decoded(parts):  # the chunks' results in order, with progress as each arrives
        arrays = []
        for part in parts:
            arrays += part
            if progress is not None:
                progress(what, len(arrays), len(paths), " images")
        return arrays

    arrays = None
    workers = min(os.cpu_count() or 1, 16)
    if len(paths) >= _POOL_MIN_FILES and workers > 1 and "fork" in multiprocessing.get_all_start_methods():
        chunk = max(256, math.ceil(len(paths) / (workers * 8)))
        chunks = [paths[i:i + chunk] for i in range(0, len(paths), chunk)]
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                arrays = decoded(pool.map(_decode_chunk, chunks))
        except (BrokenProcessPool, OSError):
            arrays = None  # a pool that cannot start or dies falls back to decoding here
    if arrays is None:
        arrays = decoded(_decode_chunk(paths[i:i + 256]) for i in range(0, len(paths), 256))

    large = [a for a in arrays if isinstance(a, TooLarge)]
    if large:
        raise too_large_error(large)
    bad = [(path, a) for path, a in zip(paths, arrays) if isinstance(a, str)]
    if bad:
        raise _unreadable_error(paths, bad)
    h, w = arrays[0].shape[:2]
    for path, a in zip(paths, arrays):
        if a.shape[:2] != (h, w):
            raise DataError(
                f"image {path} is {a.shape[1]}x{a.shape[0]} but {paths[0]} is {w}x{h}: a folder held in memory "
                "needs images of one size. Stream it from disk instead with --stream on, which resizes every "
                "image to --image-size, or give every image the same size"
            )
    channels = 1 if all(a.ndim == 2 for a in arrays) else 3
    out = np.empty((len(arrays), channels, h, w), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a if a.ndim == 2 else a.transpose(2, 0, 1)  # 'L' broadcasts to 3 channels
    return out


# --- loading -------------------------------------------------------------------------------------

def load_folder(root: Path, data_dir: Path, val_per_class: int | None, progress=None) -> Splits:
    """The images of the folder at ``root`` decoded, as `Splits` on the CPU: the split of
    `folder_splits`, the training split in `folder_training_order`. The decoded images are cached
    under ``<data_dir>/cache/``, keyed by every file's name, size and modification time, so a
    later load of an unchanged folder reads one file instead of decoding; a cache that cannot be
    used is rebuilt. `progress` is told how decoding and caching go (see `load_dataset`)."""
    classes, paths, labels, is_val = _listing(root, val_per_class)
    cache = cache_path(root, data_dir, paths, labels)
    images = _read_cache(cache, len(paths))
    if images is None:
        images = _decode_images(paths, progress)
        _write_cache(cache, images, progress)
    x = torch.from_numpy(images)
    y = torch.as_tensor(labels, dtype=torch.int64)

    is_test = torch.from_numpy(is_val)
    # A folder lists its images class by class; CIFAR's files hold them in one fixed random
    # order. Give the training split such an order too (always the same one), so that a run
    # without shuffling (the original weight-mirror recipe) still sees every class in a batch.
    train = torch.nonzero(~is_test).flatten()
    train = train[folder_training_order(len(train))]
    return Splits(x[train], y[train], x[is_test], y[is_test], tuple(classes))
