"""Datasets held on the training device as uint8 tensors, and the batches a training run draws from them.

`load_dataset` turns a short spec ("digits", "cifar10", "cifar100", "synthetic" or a folder of
class subfolders) into an `ImageData`: whole train and test splits as uint8 N×C×H×W tensors on
the device, with the per-channel statistics needed to normalise them.

`BatchStream` cuts those tensors into batches with random crops and flips done as batched tensor
ops on the device. Every batch is a pure function of (seed, epoch, index), so a run restarted from
a checkpoint taken mid-epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import os
import pickle
import re
import secrets
import threading
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import attrs
import numpy as np
import torch
import torch.nn.functional as F

from neurosim.errors import DataError

__all__ = [
    "DATASET_NAMES",
    "ImageData",
    "load_dataset",
    "Augmentation",
    "BatchStream",
    "crop_and_flip",
]

DATASET_NAMES = ("digits", "cifar10", "cifar100", "synthetic")

# Bump when the layout of the decoded-folder cache changes, so old caches are not misread.
_CACHE_FORMAT = 1
# Below this many files a process pool costs more to start than it saves.
_POOL_MIN_FILES = 2048
# torchvision.datasets.folder.IMG_EXTENSIONS
_IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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
    """Load a dataset named by `spec` onto `device`.

    `spec` is one of:

    - ``"digits"``: scikit-learn's 8×8 handwritten digits, 1 channel, with a stratified 20 %
      test split drawn with `seed`.
    - ``"cifar10"`` / ``"cifar100"``: the python-format files of the official archive in
      ``<data_dir>/cifar-10-batches-py/`` or ``<data_dir>/cifar-100-python/``, downloaded there
      when missing and `download` is true; the test split is the official test set, the classes
      are the (fine) label names in label order. The files' structure is validated; an md5 that
      differs from the official file's is a warning.
    - ``"synthetic"``: `synthetic_size` = (n_train, n_test) random 3×32×32 images in 10
      classes, each class with its own colour and pattern under noise; for tests and smoke runs.
    - anything else: a folder of class subfolders of images (the `ImageFolder` layout). The last
      `val_per_class` images of each class in sorted file order form the test split (default
      10 % of each class, at least one); the training split is put in one fixed random order.
      Decoded images are cached under
      ``<data_dir>/cache/`` so later loads skip decoding.

    `val_per_class` applies to folders only. Problems the user can fix raise `DataError`.
    `progress(what, done, total, unit)`, if given, is told how decoding a folder and writing its
    cache go (``done == total`` when one ends): minutes for tens of thousands of JPEGs.
    """
    device = torch.device(device)
    data_dir = Path(data_dir)
    if spec == "digits":
        name, tx, ty, vx, vy, classes = "digits", *_load_digits(seed)
    elif spec in ("cifar10", "cifar100"):
        name, tx, ty, vx, vy, classes = spec, *_load_cifar(spec, data_dir, download)
    elif spec == "synthetic":
        name, tx, ty, vx, vy, classes = "synthetic", *_make_synthetic(synthetic_size, seed)
    else:
        root = _folder_root(spec)
        name, tx, ty, vx, vy, classes = str(root), *_load_folder(root, data_dir, val_per_class, progress)
    if len(tx) == 0:
        raise DataError(f"dataset {name!r} has no training images")
    # Statistics from the host copy: the same numbers on every device, and no CUDA bincount
    # (which has no deterministic implementation) in a deterministic run.
    mean, std = channel_stats(tx)
    tx, ty, vx, vy = (t.to(device) for t in (tx, ty, vx, vy))
    return ImageData(name, tx, ty, vx, vy, tuple(classes), mean, std)


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


# --- built-in datasets -------------------------------------------------------------------------

def _load_digits(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=seed
    )
    classes = tuple(str(c) for c in digits.target_names)
    return (torch.from_numpy(tr_x), torch.from_numpy(tr_y),
            torch.from_numpy(te_x), torch.from_numpy(te_y), classes)


def _make_synthetic(size: tuple[int, int], seed: int, num_classes: int = 10):
    n_train, n_test = (int(n) for n in size)
    if n_train < 1 or n_test < 0:
        raise DataError(f"synthetic_size must be (n_train >= 1, n_test >= 0), got {size}")
    # Generated on the CPU so the images do not depend on the device they end up on.
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(num_classes, 3, 1, 1, generator=g) * 128 + 64
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
    pattern = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False) * 32

    def draw(n):
        y = torch.randperm(n, generator=g) % num_classes
        x = colour[y] + pattern[y] + torch.randn(n, 3, 32, 32, generator=g) * 48
        return x.round_().clamp_(0, 255).to(torch.uint8), y.to(torch.int64)

    classes = tuple(f"class{i}" for i in range(num_classes))
    return (*draw(n_train), *draw(n_test), classes)


# --- CIFAR: the python-format files of the official archives -----------------------------------

# What each CIFAR variant stores beyond torchvision's record of its files (folder, file names,
# md5 sums, archive URL): the key of the per-image labels and the number of classes.
_CIFAR_LABELS = {"cifar10": ("labels", 10), "cifar100": ("fine_labels", 100)}
_CIFAR_IMAGE = (3, 32, 32)
_CIFAR_ROW = 3 * 32 * 32
_MD5_CHUNK = 1 << 20


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that no CIFAR file needs."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """Stand-in for ``_codecs.encode``, which Python 3 pickles (protocol < 3) use to store bytes.

    Only the latin-1 round trip that `pickle` itself writes is allowed.
    """
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _ForbiddenGlobal("_codecs", f"encode({type(text).__name__}, {encoding!r}, {errors!r})")
    return text.encode("latin1")


def _numpy_pickle_globals() -> dict[tuple[str, str], object]:
    """The globals that pickled numpy arrays refer to, under the module names numpy 1.x and 2.x write.

    The functions are taken from numpy's own `__reduce__` results, so they are the ones the
    installed numpy uses, whatever module it keeps them in.
    """
    probe = np.zeros(1, dtype=np.uint8)
    reconstruct = probe.__reduce__()[0]        # ndarray, protocols 0-4
    frombuffer = probe.__reduce_ex__(5)[0]     # ndarray, protocol 5
    scalar = np.uint8(0).__reduce__()[0]       # numpy scalars
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{core}.multiarray", "scalar")] = scalar
        table[(f"{core}.numeric", "_frombuffer")] = frombuffer
    table[("_codecs", "encode")] = _latin1_encode
    return table


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only what CIFAR files hold: dicts, lists, strings, numbers, numpy arrays.

    A plain `pickle.load` calls whatever global a file names (``os.system`` included), so a
    file from an untrusted copy could run code. Here any global outside the numpy array
    machinery is refused.
    """

    _allowed = _numpy_pickle_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(module, name) from None


def _as_str(value) -> str:
    """A key or class name as text: python 2 pickles and ``encoding="bytes"`` copies give bytes."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.decode("latin1")
    return value


def _read_cifar_pickle(path: Path, hint: str) -> dict:
    """Unpickle one CIFAR file with `_CifarUnpickler` into a dict with str keys; `DataError` otherwise."""
    try:
        with open(path, "rb") as f:
            # latin1 is what numpy needs to rebuild arrays pickled by python 2 (the official
            # files); python 3 bytes stay bytes.
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except _ForbiddenGlobal as exc:
        raise DataError(
            f"{path} is not a CIFAR file: its pickle calls {exc.qualname}, which CIFAR files never "
            "use (they hold only dicts, lists, strings, numbers and numpy arrays); not loading it, "
            f"since unpickling it could run code. {hint}"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}. {hint}") from None
    except Exception as exc:  # pickle raises EOFError, UnpicklingError, ValueError, TypeError, ...
        detail = " ".join(str(exc).split())
        raise DataError(
            f"{path} is truncated or corrupt: unpickling it failed ({type(exc).__name__}: {detail}). {hint}"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR file. {hint}")
    return {_as_str(k): v for k, v in obj.items()}


def _require(path: Path, entry: dict, key: str, what: str, hint: str):
    if key not in entry:
        keys = ", ".join(sorted(str(k) for k in entry)) or "nothing"
        raise DataError(f"{path} has no '{key}' entry ({what}); it holds: {keys}. {hint}")
    return entry[key]


def _read_cifar_batch(path: Path, label_key: str, num_classes: int, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (uint8 N×3×32×32) and labels (int64 N) of one CIFAR batch file, validated."""
    entry = _read_cifar_pickle(path, hint)
    x = _require(path, entry, "data", "the images", hint)
    y = _require(path, entry, label_key, "the labels", hint)
    expect = f"a uint8 array of shape (N, {_CIFAR_ROW}), one 3×32×32 image per row in CHW order"
    if not isinstance(x, np.ndarray):
        raise DataError(f"{path}: 'data' is a {type(x).__name__}, expected {expect}. {hint}")
    if x.ndim != 2 or x.shape[1] != _CIFAR_ROW:
        raise DataError(f"{path}: 'data' has shape {tuple(x.shape)}, expected {expect}. {hint}")
    if x.dtype != np.uint8:
        raise DataError(f"{path}: 'data' has dtype {x.dtype}, expected {expect}. {hint}")
    n = len(x)
    if not isinstance(y, (list, tuple, np.ndarray)):
        raise DataError(f"{path}: '{label_key}' is a {type(y).__name__}, expected a list of {n} class indices. {hint}")
    labels = np.asarray(y)
    if len(labels) != n:
        raise DataError(f"{path}: '{label_key}' has {len(labels)} labels but 'data' has {n} images. {hint}")
    if n and (labels.ndim != 1 or labels.dtype.kind not in "iu"):
        raise DataError(
            f"{path}: '{label_key}' must be {n} integer class indices, got {labels.dtype} of shape "
            f"{tuple(labels.shape)}. {hint}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{path}: '{label_key}' holds {len(bad)} label(s) outside [0, {num_classes}), the first "
            f"{labels[i]} at image {i}. {hint}"
        )
    # Arrays rebuilt from an in-band protocol 5 buffer are read-only; torch wants writable ones.
    x = x.reshape(n, *_CIFAR_IMAGE)
    if not x.flags.writeable:
        x = x.copy()
    return x, labels.astype(np.int64)


def _read_cifar_meta(path: Path, key: str, num_classes: int, hint: str) -> tuple[str, ...]:
    """The class names, in label order, from a CIFAR meta file, validated."""
    names = _require(path, _read_cifar_pickle(path, hint), key, "the class names", hint)
    if not isinstance(names, (list, tuple)) or not all(isinstance(s, (str, bytes)) for s in names):
        raise DataError(f"{path}: '{key}' is not a list of class names. {hint}")
    if len(names) != num_classes:
        raise DataError(f"{path}: '{key}' lists {len(names)} class names; expected {num_classes}. {hint}")
    return tuple(_as_str(s) for s in names)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_MD5_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _load_cifar(spec: str, data_dir: Path, download: bool):
    """CIFAR-10 or CIFAR-100 from the python-format files of the official archive.

    The files are read here rather than through torchvision's dataset classes, which refuse any
    file whose md5 differs from the official one (e.g. a copy rebuilt with other `filenames`).
    Instead every file's structure is checked (keys, `data` N×3072 uint8, one label per image
    in range, the class-name list) and a `DataError` names the file and what is wrong; md5
    sums are still compared with torchvision's record, and a mismatch is a warning. Split
    sizes are not enforced, so a subset of the images loads too. Missing files are downloaded
    with torchvision's archive download when `download` is true.
    """
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets import utils as tv_utils

    cls = CIFAR10 if spec == "cifar10" else CIFAR100
    label_key, num_classes = _CIFAR_LABELS[spec]
    folder = (data_dir / cls.base_folder).resolve()
    train_files = [name for name, _ in cls.train_list]
    test_files = [name for name, _ in cls.test_list]
    meta_file = cls.meta["filename"]
    files = train_files + test_files + [meta_file]

    def missing_files():
        return [name for name in files if not (folder / name).is_file()]

    missing = missing_files()
    if missing:
        why = "download=False"
        if download:
            try:
                tv_utils.download_and_extract_archive(
                    cls.url, download_root=str(data_dir), filename=cls.filename, md5=cls.tgz_md5
                )
            except Exception as exc:  # URLError, RuntimeError (bad md5), OSError, tarfile errors ...
                why = f"download failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
            else:
                why = "not in the downloaded archive"
            missing = missing_files()
        if missing:
            raise DataError(
                f"{spec} not found or incomplete in {folder}/ (missing {', '.join(missing)}; {why}). "
                f"Put the files {', '.join(files)} in {folder}/, e.g. by extracting "
                f"{cls.filename} (from {cls.url}) inside {data_dir.resolve()}/."
            )

    hint = f"Replace it with the file from {cls.filename} ({cls.url})."
    classes = _read_cifar_meta(folder / meta_file, cls.meta["key"], num_classes, hint)

    def split(names):
        parts = [_read_cifar_batch(folder / name, label_key, num_classes, hint) for name in names]
        if len(parts) == 1:
            x, y = parts[0]
        else:
            x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return torch.from_numpy(x), torch.from_numpy(y)

    train_x, train_y = split(train_files)
    test_x, test_y = split(test_files)

    record = {name: md5 for name, md5 in cls.train_list + cls.test_list}
    record[meta_file] = cls.meta["md5"]
    differ = [name for name in files if _md5(folder / name) != record[name]]
    if differ:
        warnings.warn(
            f"{spec}: {', '.join(differ)} in {folder}/ differ from the official {cls.filename} "
            "(md5 not as torchvision records it); their structure was validated (keys, image "
            "shape and dtype, labels, class names) and the data is used as it is.",
            stacklevel=3,
        )
    return train_x, train_y, test_x, test_y, classes


# --- folders of class subfolders ---------------------------------------------------------------

def _folder_root(spec: str) -> Path:
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise DataError(
            f"unknown dataset {spec!r}: not one of {', '.join(DATASET_NAMES)}, and not a folder. "
            "A path must be a folder of class subfolders of images (e.g. train/cat/0001.png)."
        )
    return root.resolve()


def _scan_folder(root: Path) -> tuple[list[str], list[str], list[int]]:
    """Classes, image paths and labels of an ImageFolder tree, in torchvision's ImageFolder order.

    Same rules as `torchvision.datasets.folder.make_dataset` (sorted class folders, sorted walk
    following links, the same image extensions), without importing torchvision for it. A tree
    needs at least two classes: with one, every image has the same label and any classifier
    scores 100 %.
    """
    hint = (f"Valid dataset names are {', '.join(DATASET_NAMES)}; a path must be a folder of "
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


# Bump when decoding gives different pixels for some files (16-bit images, which were once
# clipped to white), so that caches holding the old result are rebuilt rather than reused.
_DECODE_REVISION = 2


def _cache_path(root: Path, data_dir: Path, paths: Sequence[str], labels: Sequence[int]) -> Path:
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


def _load_folder(root: Path, data_dir: Path, val_per_class: int | None, progress=None):
    classes, paths, labels = _scan_folder(root)
    cache = _cache_path(root, data_dir, paths, labels)
    images = _read_cache(cache, len(paths))
    if images is None:
        images = _decode_images(paths, progress)
        _write_cache(cache, images, progress)
    x = torch.from_numpy(images)
    y = torch.as_tensor(labels, dtype=torch.int64)

    is_test = torch.from_numpy(held_out(root, classes, labels, val_per_class))
    # A folder lists its images class by class; CIFAR's files hold them in one fixed random
    # order. Give the training split such an order too (always the same one), so that a run
    # without shuffling (the original weight-mirror recipe) still sees every class in a batch.
    train = torch.nonzero(~is_test).flatten()
    train = train[folder_training_order(len(train))]
    return x[train], y[train], x[is_test], y[is_test], tuple(classes)


def held_out(root: Path, classes: Sequence[str], labels: Sequence[int], val_per_class: int | None) -> np.ndarray:
    """Which images of a folder form its evaluation split (a bool mask over its images, which
    ``_scan_folder`` lists class by class): the last ``val_per_class`` of each class in sorted
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


# Greyscale modes of 16-bit samples (0..65535): 16-bit PNGs and TIFFs open as one of these.
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# Formats whose 32-bit integer mode "I" only ever holds 16-bit samples: older Pillows open 16-bit
# greyscale PNGs as "I", and PGMs of more than 8 bits open as "I" scaled to 0..65535.
_FORMATS_16BIT_I = ("PNG", "PPM")
# 8-bit modes that Pillow converts to RGB by a fixed rule (CMYK, YCbCr, HSV and LAB by their colour
# transforms, alpha dropped, palettes looked up). Pillow itself reduces 48- and 64-bit RGB(A)
# PNGs to "RGB"/"RGBA" by keeping each sample's high byte.
_MODES_TO_RGB = frozenset({"1", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV", "LAB"})
_MODE_NAMES = {"F": "32-bit floating-point pixels", "I": "32-bit integer pixels",
               "La": "greyscale with premultiplied alpha", "I;16S": "signed 16-bit pixels"}


class _UnsupportedMode(Exception):
    """An image whose pixel mode has no faithful 8-bit form."""


def _pixels(im) -> np.ndarray:
    """One opened image as H×W (greyscale) or H×W×3 (RGB) uint8 pixels, without clipping.

    8-bit greyscale stays as it is; 16-bit greyscale is scaled to 8 bits (round(v / 257), so
    0..65535 maps onto 0..255) and stays one channel; the modes in `_MODES_TO_RGB` become RGB.
    Anything else (float, 32-bit integer, ...) has no known value range: `_UnsupportedMode`.
    """
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode in _MODES_16BIT or (mode == "I" and im.format in _FORMATS_16BIT_I):
        a = np.asarray(im)
        if a.ndim != 2 or (a.size and (int(a.min()) < 0 or int(a.max()) > 65535)):
            raise _UnsupportedMode(f"mode {mode!r} with values outside 0..65535")
        # round(v / 257) exactly: v / 257 is never halfway between two integers.
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if mode in _MODES_TO_RGB:
        return np.asarray(im.convert("RGB"))
    what = _MODE_NAMES.get(mode, "pixels with no faithful 8-bit form")
    raise _UnsupportedMode(
        f"mode {mode!r}, {what}, which cannot be reduced to 8 bits without guessing its range; "
        "save it as 8- or 16-bit greyscale or RGB"
    )


def _failure(exc: Exception, path: str) -> str:
    """Why an image could not be read, in a few words and without its path."""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc).replace(repr(path), "").replace(path, "")
    text = " ".join(text.split()).rstrip(" :")
    return text or type(exc).__name__


# --- how big one image may be ------------------------------------------------------------------

def max_image_pixels() -> int | None:
    """The most pixels (width × height) one image of a folder may have, whether the folder is
    decoded up front or streamed: Pillow's decompression-bomb limit, above which Pillow refuses
    to open an image: 2 × ``PIL.Image.MAX_IMAGE_PIXELS``, 178,956,970 by default (13,377 pixels
    square). None where a program switched it off (``PIL.Image.MAX_IMAGE_PIXELS = None``).

    An image that big is almost always a mistake (a scan, a panorama, a crafted file that
    decompresses to gigabytes): decoded it takes over 500 MB, and every epoch would decode it
    again to crop a few hundred pixels. torchvision's decoders, which decode a streamed folder's
    JPEGs and PNGs, have no limit of their own: the limit is applied to the header first."""
    from PIL import Image

    return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


@attrs.frozen
class TooLarge:
    """An image over `max_image_pixels` (``limit``), in place of its pixels."""

    path: str
    width: int
    height: int
    limit: int


def too_large_error(found: Sequence[TooLarge]) -> DataError:
    """The one message for images over the limit, the same for a folder decoded up front and
    one streamed: the first image, its size, the limit and where it comes from, and the others."""
    first = found[0]
    others = ""
    if len(found) > 1:
        named = ", ".join(f"{t.path} ({t.width}x{t.height})" for t in found[1:3])
        others = f"; so are {named}" + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    them = "them" if len(found) > 1 else "it"
    return DataError(
        f"image {first.path} is {first.width}x{first.height} pixels ({first.width * first.height:,}), more than "
        f"the {first.limit:,} an image may have (Pillow's decompression-bomb limit, 2 x PIL.Image.MAX_IMAGE_PIXELS)"
        f"{others}; shrink or remove {them}"
    )


_PILLOW_LIMIT = threading.Lock()


@contextmanager
def _opened(source):
    """``PIL.Image.open(source)`` with Pillow's own decompression-bomb check off: the callers
    compare the size with `max_image_pixels` themselves, so that an image over it is refused with
    one message, and one between half of it and it decodes without Pillow's warning, however the
    folder is read (torchvision's decoders give neither)."""
    from PIL import Image

    with _PILLOW_LIMIT:  # the switch is Pillow's global setting
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    with im:
        yield im


def _decode_chunk(paths: Sequence[str]) -> list[np.ndarray | str | TooLarge]:
    """Decode images with `_pixels`; an image that cannot be read gives the reason (a str)
    instead, one over `max_image_pixels` a `TooLarge` (before it is decoded).

    Failures are returned rather than raised so that every bad file of a folder can be reported
    at once, from worker processes (forked: they hold this process's limit) as from this one.
    """
    max_pixels = max_image_pixels()
    out: list[np.ndarray | str | TooLarge] = []
    for path in paths:
        try:
            with _opened(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    out.append(TooLarge(path, w, h, max_pixels))
                    continue
                out.append(_pixels(im))
        except MemoryError:
            raise
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
            out.append(_failure(exc, path))
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


# --- batches -----------------------------------------------------------------------------------

def _derive_seed(*parts: int) -> int:
    """A 63-bit generator seed that depends on every part, so nearby tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@attrs.frozen(eq=False)
class Augmentation:
    """The random choices for one batch: crop offsets into the padded image and horizontal flips."""

    offset_y: torch.Tensor  # int64 (n,), in [0, 2 * padding]
    offset_x: torch.Tensor  # int64 (n,), in [0, 2 * padding]
    flip: torch.Tensor      # bool (n,)


def crop_and_flip(x: torch.Tensor, padding: int, offset_y: torch.Tensor, offset_x: torch.Tensor,
                  flip: torch.Tensor) -> torch.Tensor:
    """Zero-pad each image by `padding`, cut its H×W window at its own offset, flip where asked.

    One gather over the whole batch: the flip is folded into the column index grid.
    """
    n, c, h, w = x.shape
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    dev = x.device
    rows = offset_y.to(dev)[:, None] + torch.arange(h, device=dev)
    cols_fwd = torch.arange(w, device=dev)
    cols = offset_x.to(dev)[:, None] + torch.where(flip.to(dev)[:, None], cols_fwd.flip(0), cols_fwd)
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return x[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


class BatchStream:
    """Batches of normalised float images from device-resident uint8 images.

    `batch(epoch, index)` is a pure function of (seed, epoch, index): the epoch's order comes from
    a generator seeded with (seed, epoch) and the batch's crops and flips from one seeded with
    (seed, epoch, index), both on the data's device. A run resumed at (epoch, index) therefore
    sees the same batches as one that never stopped (on the same kind of device).
    Without `shuffle`, batches follow the stored order.

    With ``world`` > 1 the stream is rank ``rank``'s share of a distributed run: batch ``index``
    of the epoch is a *global* batch of ``batch_size × world`` samples (the one a single process
    with that batch size would draw, crops and flips included), of which this rank takes the
    ``rank``-th slice of ``batch_size``. An incomplete last global batch is dropped, so every
    rank's batch has the same size and averaging the ranks' gradients gives the global mean.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 mean: Sequence[float], std: Sequence[float], shuffle: bool, seed: int,
                 crop_padding: int = 0, flip: bool = False, drop_last: bool = False,
                 channels_last: bool = False, rank: int = 0, world: int = 1):
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"x must be uint8 N×C×H×W, got {x.dtype} {tuple(x.shape)}")
        if len(y) != len(x):
            raise ValueError(f"x has {len(x)} images but y has {len(y)} labels")
        if batch_size < 1 or crop_padding < 0:
            raise ValueError("batch_size must be >= 1 and crop_padding >= 0")
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        c = x.shape[1]
        if len(mean) != c or len(std) != c:
            raise ValueError(f"mean and std need {c} values, one per channel")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.crop_padding, self.flip = int(crop_padding), bool(flip)
        self.drop_last, self.channels_last = bool(drop_last) or world > 1, bool(channels_last)
        self.rank, self.world = int(rank), int(world)
        std_t = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
        # (x/255 - mean)/std as one multiply-add per element.
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t
        self._perm_epoch: int | None = None  # memo only; the permutation is a function of the epoch
        self._perm: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def global_batch(self) -> int:
        """Samples per step over every rank."""
        return self.batch_size * self.world

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.global_batch if self.drop_last else math.ceil(n / self.global_batch)

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.x.device).manual_seed(seed)

    def permutation(self, epoch: int) -> torch.Tensor | None:
        """The epoch's sample order (int64 on the data's device), or None without shuffling."""
        if not self.shuffle:
            return None
        if self._perm_epoch != epoch:
            g = self._generator(_derive_seed(self.seed, epoch))
            self._perm = torch.randperm(len(self.x), generator=g, device=self.x.device)
            self._perm_epoch = epoch
        return self._perm

    def _span(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range for {len(self)} batches per epoch")
        start = index * self.global_batch
        return start, min(start + self.global_batch, len(self.x))

    def _mine(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch's tensor (the whole of it on a lone process)."""
        if self.world == 1:
            return t
        return t[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def indices(self, epoch: int, index: int) -> torch.Tensor:
        """Positions in `x` of the samples in (global) batch `index` of `epoch`."""
        start, end = self._span(index)
        perm = self.permutation(epoch)
        if perm is None:
            return torch.arange(start, end, device=self.x.device)
        return perm[start:end]

    def augmentation(self, epoch: int, index: int) -> Augmentation:
        """The crop offsets and flips that (global) batch `index` of `epoch` uses."""
        start, end = self._span(index)
        n, dev = end - start, self.x.device
        g = self._generator(_derive_seed(self.seed, epoch, index, 1))
        span = 2 * self.crop_padding + 1
        offset_y = torch.randint(0, span, (n,), generator=g, device=dev)
        offset_x = torch.randint(0, span, (n,), generator=g, device=dev)
        flip = torch.randint(0, 2, (n,), generator=g, device=dev).bool()
        if not self.flip:
            flip = torch.zeros_like(flip)
        return Augmentation(offset_y, offset_x, flip)

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `index` of `epoch`: float32 normalised images and int64 labels, on the data's device."""
        start, end = self._span(index)
        if self.shuffle:
            idx = self._mine(self.indices(epoch, index))
            xb, yb = self.x[idx], self.y[idx]
        else:
            xb, yb = self._mine(self.x[start:end]), self._mine(self.y[start:end])
        if self.crop_padding or self.flip:
            aug = self.augmentation(epoch, index)  # drawn for the global batch, whatever the rank
            xb = crop_and_flip(xb, self.crop_padding, self._mine(aug.offset_y), self._mine(aug.offset_x),
                               self._mine(aug.flip))
        out = xb.to(torch.float32).mul_(self._scale).add_(self._shift)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out, yb

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch` from batch `start` on (for resuming mid-epoch)."""
        for index in range(start, len(self)):
            yield self.batch(epoch, index)
