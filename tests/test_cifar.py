"""Tests for the CIFAR-10/CIFAR-100 loader (neurosim.data, python-format files of the official archives).

Tiny files are written in the official on-disk format by `write_cifar`; the real CIFAR-100 copy
under ../shared/data is used where present. No test touches the network.
"""

import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.utils as tv_utils
from torchvision.datasets import CIFAR10, CIFAR100

from neurosim.common.errors import DataError
from neurosim.data import channel_stats, load_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data"
SHARED_CIFAR100 = SHARED_DATA / "cifar-100-python"

CLASSES = {"cifar10": CIFAR10, "cifar100": CIFAR100}
LABEL_KEY = {"cifar10": "labels", "cifar100": "fine_labels"}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every download fails as it would offline; tests that expect a download replace this."""

    def offline(*args, **kwargs):
        raise RuntimeError("no network in tests")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)


# --- writing files in the official format ------------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as python 2 byte strings (BINSTRING), as the official archives hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + len(raw).to_bytes(4, "little") + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_string
    dispatch[bytes] = _save_py2_string


def dump(path: Path, obj: dict, keys: str = "str") -> None:
    """Pickle a CIFAR dict with `keys` = "str" (python 3), "bytes" (python 3, bytes keys) or "py2"."""
    if keys == "bytes":
        obj = {k.encode(): v for k, v in obj.items()}
    with open(path, "wb") as f:
        if keys == "py2":
            _Py2Pickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f, protocol=2)


class Fake:
    """Tiny CIFAR files written by `write_cifar`, and the contents a loader must return."""

    def __init__(self, spec, folder, entries, meta, train_files, test_files, keys):
        self.spec, self.folder, self.entries, self.meta = spec, folder, entries, meta
        self.train_files, self.test_files, self.keys = train_files, test_files, keys
        self.label_key = LABEL_KEY[spec]
        self.meta_file = CLASSES[spec].meta["filename"]
        self.names_key = CLASSES[spec].meta["key"]

    def expected(self, files):
        x = np.concatenate([self.entries[f]["data"] for f in files]).reshape(-1, 3, 32, 32)
        y = sum((list(self.entries[f][self.label_key]) for f in files), [])
        return x, y

    def rewrite(self, fname, **changes):
        """Write file `fname` again with some entries changed (None removes one)."""
        obj = dict(self.meta if fname == self.meta_file else self.entries[fname])
        obj.update(changes)
        dump(self.folder / fname, {k: v for k, v in obj.items() if v is not None}, self.keys)


def write_cifar(root: Path, spec: str, keys: str = "str", seed: int = 0) -> Fake:
    """Write tiny CIFAR-10/100 files in the layout and format of the official archive under `root`."""
    cls = CLASSES[spec]
    folder = root / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_classes = NUM_CLASSES[spec]
    train_files = [f for f, _ in cls.train_list]
    test_files = [f for f, _ in cls.test_list]
    entries = {}
    for i, fname in enumerate(train_files + test_files):
        n = 4 + i
        entry = {"batch_label": f"batch {i}", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 LABEL_KEY[spec]: rng.integers(0, n_classes, n).tolist(),
                 "filenames": [f"img{j}.png" for j in range(n)]}
        if spec == "cifar100":
            entry["coarse_labels"] = [0] * n
        dump(folder / fname, entry, keys)
        entries[fname] = entry
    meta = {cls.meta["key"]: [f"class_{i}" for i in range(n_classes)]}
    if spec == "cifar100":
        meta["coarse_label_names"] = [f"super_{i}" for i in range(20)]
    else:
        meta["num_cases_per_batch"] = 10000
    dump(folder / cls.meta["filename"], meta, keys)
    return Fake(spec, folder, entries, meta, train_files, test_files, keys)


def load(spec, root, **kw):
    """`load_dataset` with the md5 warning (which tiny files always raise) silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*md5")
        return load_dataset(spec, data_dir=root, **kw)


def error(spec, root) -> str:
    with pytest.raises(DataError) as err:
        load(spec, root, download=False)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --- reading -----------------------------------------------------------------------------------

@pytest.mark.parametrize("keys", ["str", "bytes", "py2"])
@pytest.mark.parametrize("spec", ["cifar10", "cifar100"])
def test_round_trip(tmp_path, spec, keys):
    fake = write_cifar(tmp_path, spec, keys)
    d = load(spec, tmp_path, download=False)
    assert d.name == spec and d.image_shape == (3, 32, 32)
    assert d.classes == tuple(fake.meta[fake.names_key]) and d.num_classes == NUM_CLASSES[spec]
    assert all(type(c) is str for c in d.classes)
    tx, ty = fake.expected(fake.train_files)
    vx, vy = fake.expected(fake.test_files)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert np.array_equal(d.train_x.numpy(), tx) and d.train_y.tolist() == ty
    assert np.array_equal(d.test_x.numpy(), vx) and d.test_y.tolist() == vy


@pytest.mark.parametrize("protocol", [0, 3, 4, 5])
def test_other_pickle_protocols_and_array_labels(tmp_path, protocol):
    fake = write_cifar(tmp_path, "cifar10")
    entry = dict(fake.entries["data_batch_2"], labels=np.array(fake.entries["data_batch_2"]["labels"]))
    with open(fake.folder / "data_batch_2", "wb") as f:
        pickle.dump(entry, f, protocol=protocol)
    d = load("cifar10", tmp_path, download=False)
    assert np.array_equal(d.train_x.numpy(), fake.expected(fake.train_files)[0])


def test_matching_md5_loads_silently_and_mismatch_warns_once(tmp_path, monkeypatch):
    import hashlib

    fake = write_cifar(tmp_path, "cifar100")
    md5 = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in fake.folder.iterdir()}
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("cifar100", data_dir=tmp_path, download=False)

    monkeypatch.setattr(CIFAR100, "test_list", [["test", "0" * 32]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": "0" * 32})
    with pytest.warns(UserWarning) as record:
        d = load_dataset("cifar100", data_dir=tmp_path, download=False)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "test, meta" in msg and "train" not in msg.split(" in ")[0]
    assert "md5" in msg and "validated" in msg and "used" in msg and str(fake.folder) in msg
    assert record[0].filename == __file__  # points at the caller of load_dataset
    assert len(d.test_x) == len(fake.entries["test"]["data"])


def test_subset_sizes_are_accepted(tmp_path):
    fake = write_cifar(tmp_path, "cifar100")
    fake.rewrite("test", data=fake.entries["test"]["data"][:2], fine_labels=fake.entries["test"]["fine_labels"][:2],
                 filenames=["a.png", "b.png"])
    d = load("cifar100", tmp_path, download=False)
    assert len(d.test_x) == len(d.test_y) == 2


# --- broken files ------------------------------------------------------------------------------

def test_truncated_file(tmp_path):
    fake = write_cifar(tmp_path, "cifar10")
    path = fake.folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:2000])
    msg = error("cifar10", tmp_path)
    assert str(path) in msg and "truncated or corrupt" in msg and "cifar-10-python.tar.gz" in msg


def test_garbage_file(tmp_path):
    fake = write_cifar(tmp_path, "cifar10")
    (fake.folder / "test_batch").write_bytes(b"garbage")
    msg = error("cifar10", tmp_path)
    assert str(fake.folder / "test_batch") in msg and "truncated or corrupt" in msg


def test_not_a_dict(tmp_path):
    fake = write_cifar(tmp_path, "cifar100")
    with open(fake.folder / "train", "wb") as f:
        pickle.dump([1, 2, 3], f)
    msg = error("cifar100", tmp_path)
    assert str(fake.folder / "train") in msg and "list" in msg


@pytest.mark.parametrize("spec", ["cifar10", "cifar100"])
def test_missing_key(tmp_path, spec):
    fake = write_cifar(tmp_path, spec, keys="bytes")
    fname = fake.train_files[0]
    fake.rewrite(fname, **{fake.label_key: None})
    msg = error(spec, tmp_path)
    assert str(fake.folder / fname) in msg and f"no '{fake.label_key}' entry" in msg and "data" in msg


@pytest.mark.parametrize("data,problem", [
    (np.zeros((5, 3071), np.uint8), "shape (5, 3071)"),
    (np.zeros((5, 32, 32, 3), np.uint8), "shape (5, 32, 32, 3)"),
    (np.zeros((5, 3072), np.float32), "dtype float32"),
    (np.zeros((5, 3072), np.int64), "dtype int64"),
    ([[0] * 3072] * 5, "'data' is a list"),
])
def test_bad_data(tmp_path, data, problem):
    fake = write_cifar(tmp_path, "cifar10")
    fake.rewrite("data_batch_2", data=data, labels=[0] * 5)
    msg = error("cifar10", tmp_path)
    assert str(fake.folder / "data_batch_2") in msg and problem in msg and "(N, 3072)" in msg


@pytest.mark.parametrize("spec,bad", [("cifar10", 10), ("cifar100", 100), ("cifar100", -1)])
def test_label_out_of_range(tmp_path, spec, bad):
    fake = write_cifar(tmp_path, spec, keys="py2")
    fname = fake.test_files[0]
    labels = list(fake.entries[fname][fake.label_key])
    labels[2] = bad
    fake.rewrite(fname, **{fake.label_key: labels})
    msg = error(spec, tmp_path)
    assert str(fake.folder / fname) in msg
    assert f"outside [0, {NUM_CLASSES[spec]})" in msg and f"first {bad} at image 2" in msg


def test_label_count_mismatch(tmp_path):
    fake = write_cifar(tmp_path, "cifar100")
    fake.rewrite("train", fine_labels=fake.entries["train"]["fine_labels"][:-1])
    msg = error("cifar100", tmp_path)
    assert str(fake.folder / "train") in msg and "has 3 labels but 'data' has 4 images" in msg


def test_labels_that_are_not_integers(tmp_path):
    fake = write_cifar(tmp_path, "cifar10")
    fake.rewrite("data_batch_1", labels=["cat"] * 4)
    msg = error("cifar10", tmp_path)
    assert str(fake.folder / "data_batch_1") in msg and "integer class indices" in msg


@pytest.mark.parametrize("spec", ["cifar10", "cifar100"])
def test_meta_with_wrong_number_of_names(tmp_path, spec):
    fake = write_cifar(tmp_path, spec)
    n = NUM_CLASSES[spec]
    fake.rewrite(fake.meta_file, **{fake.names_key: [f"c{i}" for i in range(n - 1)]})
    msg = error(spec, tmp_path)
    assert str(fake.folder / fake.meta_file) in msg and f"lists {n - 1} class names; expected {n}" in msg


def test_meta_without_names(tmp_path):
    fake = write_cifar(tmp_path, "cifar100")
    fake.rewrite("meta", fine_label_names=None)
    msg = error("cifar100", tmp_path)
    assert str(fake.folder / "meta") in msg and "no 'fine_label_names' entry" in msg


def test_forbidden_global_is_refused_without_running_it(tmp_path):
    fake = write_cifar(tmp_path, "cifar10")
    marker = tmp_path / "ran"
    # Protocol 0 by hand: {'data': os.system('touch <marker>')}.
    evil = f"(dp0\nS'data'\np1\ncos\nsystem\np2\n(S'touch {marker}'\np3\ntp4\nRp5\ns.".encode()
    (fake.folder / "data_batch_4").write_bytes(evil)
    msg = error("cifar10", tmp_path)
    assert str(fake.folder / "data_batch_4") in msg and "os.system" in msg and "could run code" in msg
    assert not marker.exists()


def test_codecs_encode_only_does_latin1(tmp_path):
    fake = write_cifar(tmp_path, "cifar10")
    # {'data': _codecs.encode('x', 'rot13')}: the global python 3 uses for bytes, with another codec.
    evil = b"(dp0\nS'data'\np1\nc_codecs\nencode\np2\n(S'x'\nS'rot13'\ntp3\nRp4\ns."
    (fake.folder / "data_batch_1").write_bytes(evil)
    msg = error("cifar10", tmp_path)
    assert str(fake.folder / "data_batch_1") in msg and "_codecs.encode" in msg


# --- missing files and download ----------------------------------------------------------------

@pytest.mark.parametrize("spec,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python")])
def test_missing_files_name_the_folder(tmp_path, spec, folder):
    msg = error(spec, tmp_path)
    cls = CLASSES[spec]
    assert str(tmp_path / folder) in msg and "download=False" in msg
    assert cls.filename in msg and cls.url in msg and cls.meta["filename"] in msg


def test_one_missing_file_is_named(tmp_path):
    fake = write_cifar(tmp_path, "cifar10")
    (fake.folder / "data_batch_5").unlink()
    msg = error("cifar10", tmp_path)
    assert "missing data_batch_5;" in msg and str(fake.folder) in msg


def test_failed_download_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset("cifar100", data_dir=tmp_path, download=True)
    msg = str(err.value)
    assert "download failed: RuntimeError: no network in tests" in msg
    assert str(tmp_path / "cifar-100-python") in msg and "train, test, meta" in msg
    assert "cifar-100-python.tar.gz" in msg and CIFAR100.url in msg and "\n" not in msg


@pytest.mark.parametrize("spec", ["cifar10", "cifar100"])
def test_download_is_called_for_missing_files(tmp_path, monkeypatch, spec):
    calls = []

    def fake_download(url, download_root, extract_root=None, filename=None, md5=None, remove_finished=False):
        calls.append(dict(url=url, download_root=download_root, extract_root=extract_root, filename=filename,
                          md5=md5))
        write_cifar(Path(download_root), spec)  # what extracting the archive leaves behind

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", fake_download)
    cls = CLASSES[spec]
    d = load(spec, tmp_path, download=True)
    assert calls == [dict(url=cls.url, download_root=str(tmp_path), extract_root=None, filename=cls.filename,
                          md5=cls.tgz_md5)]
    assert d.num_classes == NUM_CLASSES[spec]
    load(spec, tmp_path, download=True)  # present now: no second download
    assert len(calls) == 1


def test_no_download_when_files_are_present_or_not_asked(tmp_path, monkeypatch):
    def must_not_download(*args, **kwargs):
        raise AssertionError("downloaded")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", must_not_download)
    error("cifar10", tmp_path)  # download=False
    write_cifar(tmp_path, "cifar10")
    load("cifar10", tmp_path, download=True)


# --- the real CIFAR-100 copy -------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_cifar100():
    if not SHARED_CIFAR100.is_dir():
        pytest.skip(f"real CIFAR-100 files not present at {SHARED_CIFAR100}")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        d = load_dataset("cifar100", data_dir=SHARED_DATA, download=False)
    # This copy's train/test md5s differ from the official ones (placeholder filenames); the
    # official files load silently. Either way, nothing else may be reported.
    for w in record:
        assert "md5" in str(w.message) and "meta" not in str(w.message), str(w.message)
    return d


def test_real_cifar100_sizes_and_classes(real_cifar100):
    d = real_cifar100
    assert d.train_x.shape == (50000, 3, 32, 32) and d.test_x.shape == (10000, 3, 32, 32)
    assert len(d.train_y) == 50000 and len(d.test_y) == 10000
    assert d.num_classes == 100
    assert d.classes[:5] == ("apple", "aquarium_fish", "baby", "bear", "beaver")
    assert d.classes[-1] == "worm"
    assert torch.bincount(d.train_y, minlength=100).tolist() == [500] * 100
    assert torch.bincount(d.test_y, minlength=100).tolist() == [100] * 100


def test_real_cifar100_channel_statistics(real_cifar100):
    mean, std = channel_stats(real_cifar100.train_x)
    assert mean == real_cifar100.mean
    assert mean == pytest.approx((0.5071, 0.4865, 0.4409), abs=1e-3)
    assert std == pytest.approx((0.2673, 0.2564, 0.2762), abs=1e-3)
