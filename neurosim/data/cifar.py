"""CIFAR-10 and CIFAR-100 from the python-format files of the official archives: read with an
unpickler that builds nothing but what those files hold, validated file by file, downloaded
where missing.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

from neurosim.common.errors import DataError

__all__ = ["load_cifar"]


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


def load_cifar(spec: str, data_dir: Path, download: bool):
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
            stacklevel=4  # the caller of load_dataset,
        )
    return train_x, train_y, test_x, test_y, classes
