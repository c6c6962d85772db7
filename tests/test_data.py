"""Tests for dataset loading and device-resident batching (neurosim.data)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neurosim.common.errors import DataError
from neurosim.data import BatchStream, ImageData, crop_and_flip, folders, images, load_dataset

SHARED_CIFAR_JPG = Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpg/train"


# --- digits and synthetic ----------------------------------------------------------------------

def test_digits_shapes_split_and_determinism():
    d = load_dataset("digits", seed=3)
    assert isinstance(d, ImageData)
    assert d.num_classes == 10 and d.classes == tuple(str(i) for i in range(10))
    assert d.image_shape == (1, 8, 8)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert len(d.train_x) + len(d.test_x) == 1797
    assert len(d.test_x) == pytest.approx(0.2 * 1797, abs=1)
    assert int(d.train_x.max()) == 255 and int(d.train_x.min()) == 0
    # Stratified: every class is in the test split in about its share.
    assert torch.bincount(d.test_y, minlength=10).min() >= 30
    again = load_dataset("digits", seed=3)
    assert torch.equal(d.train_x, again.train_x) and torch.equal(d.test_y, again.test_y)
    other = load_dataset("digits", seed=4)
    assert not torch.equal(d.test_y, other.test_y)
    assert len(d.mean) == len(d.std) == 1


def test_mean_std_match_float64_reference():
    d = load_dataset("digits")
    x = d.train_x.to(torch.float64) / 255
    assert d.mean[0] == pytest.approx(float(x.mean()), abs=1e-12)
    assert d.std[0] == pytest.approx(float(x.std(unbiased=False)), abs=1e-12)


def test_synthetic_is_deterministic_and_class_dependent():
    d = load_dataset("synthetic", synthetic_size=(200, 50), seed=1)
    assert d.train_x.shape == (200, 3, 32, 32) and d.test_x.shape == (50, 3, 32, 32)
    assert d.num_classes == 10
    assert torch.equal(d.train_x, load_dataset("synthetic", synthetic_size=(200, 50), seed=1).train_x)
    assert not torch.equal(d.train_x, load_dataset("synthetic", synthetic_size=(200, 50), seed=2).train_x)
    # A nearest-class-mean classifier on the train split beats chance on the test split.
    tx, vx = d.train_x.float().flatten(1), d.test_x.float().flatten(1)
    centres = torch.stack([tx[d.train_y == c].mean(0) for c in range(10)])
    acc = (torch.cdist(vx, centres).argmin(1) == d.test_y).float().mean()
    assert acc > 0.5


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path / "nope"), data_dir=tmp_path)
    msg = str(err.value)
    for name in ("digits", "cifar10", "cifar100", "synthetic", "class subfolders"):
        assert name in msg


# --- folders of class subfolders ---------------------------------------------------------------

def _write_tree(root: Path, per_class: dict[str, int], mode: str = "RGB", size=(6, 5), seed=0):
    """Write PNGs root/<class>/<i>.png; return {class: [arrays in file order]}."""
    rng = np.random.default_rng(seed)
    out = {}
    for cls_name, n in per_class.items():
        (root / cls_name).mkdir(parents=True)
        out[cls_name] = []
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(a, mode).save(root / cls_name / f"{i:03d}.png")
            out[cls_name].append(a)
    return out


def test_folder_rgb_decoding_order_and_split(tmp_path):
    tree = tmp_path / "tree"
    arrays = _write_tree(tree, {"zebra": 5, "ant": 4, "mole": 3})
    d = load_dataset(str(tree), data_dir=tmp_path / "data", val_per_class=1)
    assert d.classes == ("ant", "mole", "zebra")
    assert d.image_shape == (3, 5, 6)
    order = folders.folder_training_order(9).numpy()
    assert d.train_y.tolist() == np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])[order].tolist()
    assert d.test_y.tolist() == [0, 1, 2]
    expect_train = [a for c in d.classes for a in arrays[c][:-1]]
    expect_test = [arrays[c][-1] for c in d.classes]
    assert np.array_equal(d.train_x.numpy(), np.stack(expect_train).transpose(0, 3, 1, 2)[order])
    assert np.array_equal(d.test_x.numpy(), np.stack(expect_test).transpose(0, 3, 1, 2))


def test_folder_order_matches_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder

    tree = tmp_path / "tree"
    _write_tree(tree, {"b": 3, "a": 2})
    (tree / "a" / "sub").mkdir()
    Image.new("RGB", (6, 5)).save(tree / "a" / "sub" / "000.PNG")
    (tree / "a" / "notes.txt").write_text("not an image")
    classes, paths, labels = folders.scan_folder(tree)
    ref = ImageFolder(str(tree))
    assert classes == ref.classes
    assert list(zip(paths, labels)) == ref.samples


def test_folder_default_split_is_a_tenth_at_least_one(tmp_path):
    tree = tmp_path / "tree"
    _write_tree(tree, {"a": 25, "b": 3}, size=(2, 2))
    d = load_dataset(str(tree), data_dir=tmp_path / "data")
    assert torch.bincount(d.test_y).tolist() == [2, 1]


def test_folder_greyscale_keeps_one_channel_and_mixed_becomes_rgb(tmp_path):
    grey = tmp_path / "grey"
    arrays = _write_tree(grey, {"a": 2, "b": 2}, mode="L")
    d = load_dataset(str(grey), data_dir=tmp_path / "data", val_per_class=1)
    assert d.image_shape == (1, 5, 6)
    assert np.array_equal(d.train_x[0, 0].numpy(), arrays["a"][0])

    mixed = tmp_path / "mixed"
    _write_tree(mixed, {"a": 2}, mode="L")
    rgb = _write_tree(mixed / "b_parent", {"b": 2}, mode="RGB")  # nested below a class folder
    d = load_dataset(str(mixed), data_dir=tmp_path / "data", val_per_class=1)
    assert d.image_shape == (3, 5, 6)
    grey_img = d.train_x[0]
    assert torch.equal(grey_img[0], grey_img[1]) and torch.equal(grey_img[0], grey_img[2])
    assert np.array_equal(d.train_x[1].numpy(), rgb["b"][0].transpose(2, 0, 1))


def test_folder_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    _write_tree(tree, {"a": 3, "b": 3})
    first = load_dataset(str(tree), data_dir=tmp_path / "data", val_per_class=1)
    cached = list((tmp_path / "data" / "cache").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".npz"

    def no_decoding(paths, progress=None):
        raise AssertionError("decoded again although cached")

    monkeypatch.setattr(folders, "_decode_images", no_decoding)
    second = load_dataset(str(tree), data_dir=tmp_path / "data", val_per_class=2)
    unsorted = lambda d, n: d.train_x[torch.argsort(folders.folder_training_order(n))]
    assert torch.equal(unsorted(first, 4)[[0, 2]], unsorted(second, 2))
    assert not list(tree.rglob("*.npz"))

    # Changing a file changes the key, so the stale cache is not used.
    img = tree / "a" / "000.png"
    Image.new("RGB", (6, 5)).save(img)
    os.utime(img, ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset(str(tree), data_dir=tmp_path / "data")


def test_folder_mixed_sizes_name_the_file(tmp_path):
    tree = tmp_path / "tree"
    _write_tree(tree, {"a": 2, "b": 2})
    Image.new("RGB", (7, 7)).save(tree / "b" / "009.png")
    with pytest.raises(DataError) as err:
        load_dataset(str(tree), data_dir=tmp_path / "data")
    assert "009.png" in str(err.value) and "7x7" in str(err.value) and "6x5" in str(err.value)


def test_folder_that_is_not_a_tree(tmp_path):
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match="class subfolders"):
        load_dataset(str(tmp_path / "flat"), data_dir=tmp_path / "data")
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        load_dataset(str(tmp_path / "flat"), data_dir=tmp_path / "data")


def test_folder_unreadable_image(tmp_path):
    tree = tmp_path / "tree"
    _write_tree(tree, {"a": 2, "b": 2})
    (tree / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        load_dataset(str(tree), data_dir=tmp_path / "data")
    msg = str(err.value)
    assert msg.startswith(f"1 image in {tree} cannot be read: ")
    assert os.path.join("a", "bad.png") + " (cannot identify image file)" in msg
    assert str(tmp_path) not in msg.split(": ", 1)[1]  # the reason does not repeat the path
    assert not (tmp_path / "data" / "cache").exists()


def _bad_files(tree: Path) -> list[str]:
    """Seven unreadable images spread over two classes: junk, empty, truncated; in path order."""
    (tree / "a" / "bad0.png").write_bytes(b"not a png")
    (tree / "a" / "bad1.png").write_bytes(b"")
    whole = (tree / "a" / "000.png").read_bytes()
    (tree / "a" / "bad2.png").write_bytes(whole[:len(whole) // 2])
    for i in range(3, 7):
        (tree / "b" / f"bad{i}.jpg").write_bytes(b"junk" * i)
    return [os.path.join("a", f"bad{i}.png") for i in range(3)] + [
        os.path.join("b", f"bad{i}.jpg") for i in range(3, 7)]


def test_folder_reports_every_unreadable_image_at_once(tmp_path):
    tree = tmp_path / "tree"
    _write_tree(tree, {"a": 2, "b": 2})
    bad = _bad_files(tree)
    with pytest.raises(DataError) as err:
        load_dataset(str(tree), data_dir=tmp_path / "data")
    msg = str(err.value)
    assert msg.startswith(f"7 images in {tree} cannot be read, e.g. {bad[0]} (cannot identify image file), ")
    assert msg.endswith(" and 2 more; remove or replace them")
    shown = [name for name in bad if name in msg]
    assert shown == bad[:5]
    assert "truncated" in msg or "broken" in msg  # the truncated PNG's own reason is given


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the decoding pool needs two CPUs")
def test_folder_pool_reports_every_unreadable_image(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    _write_tree(tree, {"a": 2, "b": 2})
    _bad_files(tree)
    paths = folders.scan_folder(tree)[1]
    with pytest.raises(DataError) as serial:
        folders._decode_images(paths)
    monkeypatch.setattr(folders, "_POOL_MIN_FILES", 1)
    monkeypatch.setattr(folders, "_decode_chunk", _decode_chunk_in_worker_only)
    with pytest.raises(DataError) as pooled:
        folders._decode_images(paths)
    assert str(pooled.value) == str(serial.value)
    assert str(pooled.value).startswith(f"7 images in {tree} cannot be read")


_PARENT_PID = os.getpid()


def _decode_chunk_in_worker_only(paths):
    """`_decode_chunk`, refusing to run in the test process, so the pool is known to be used."""
    assert os.getpid() != _PARENT_PID, "decoded in the test process, not the pool"
    return _ORIGINAL_DECODE_CHUNK(paths)


_ORIGINAL_DECODE_CHUNK = folders._decode_chunk


def test_folder_needs_two_classes(tmp_path):
    tree = tmp_path / "tree"
    _write_tree(tree, {"cat": 3})
    with pytest.raises(DataError) as err:
        load_dataset(str(tree), data_dir=tmp_path / "data")
    assert f"needs at least two classes; found only 'cat' in {tree}" in str(err.value)
    # A tree one level too high (its only class folder holds the classes) gets a pointer down.
    outer = tmp_path / "outer"
    _write_tree(outer / "train", {"cat": 1, "dog": 1})
    with pytest.raises(DataError, match="found only 'train'") as err:
        load_dataset(str(outer), data_dir=tmp_path / "data")
    assert f"If {outer / 'train'} holds the class folders (cat, dog), pass that folder instead" in str(err.value)


def test_folder_val_per_class_zero_holds_nothing_out(tmp_path):
    tree = tmp_path / "tree"
    _write_tree(tree, {"a": 2, "b": 3})
    d = load_dataset(str(tree), data_dir=tmp_path / "data", val_per_class=0)
    assert d.train_x.shape == (5, 3, 5, 6) and sorted(d.train_y.tolist()) == [0, 0, 1, 1, 1]
    assert d.test_x.shape == (0, 3, 5, 6) and d.test_y.shape == (0,)
    assert len(d.mean) == 3


# --- pixel modes -------------------------------------------------------------------------------

def _png16(path: Path, samples: np.ndarray) -> None:
    """Write a 16-bit PNG by hand: greyscale (H×W), greyscale+alpha (H×W×2), RGB (H×W×3) or RGBA."""
    import struct
    import zlib

    channels = 1 if samples.ndim == 2 else samples.shape[-1]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    h, w = samples.shape[:2]
    raw = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _to8(v: np.ndarray) -> np.ndarray:
    """The expected 8-bit value of 16-bit samples: round(v / 257), in float64."""
    return np.round(v.astype(np.float64) / 257).astype(np.uint8)


def test_folder_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    tree = tmp_path / "tree"
    ramp = np.linspace(0, 65535, 30).round().astype(np.uint16).reshape(5, 6)
    expect = _to8(ramp)
    assert expect[0, 0] == 0 and expect[-1, -1] == 255 and len(np.unique(expect)) == 30
    (tree / "a").mkdir(parents=True)
    (tree / "b").mkdir()
    Image.fromarray(ramp).save(tree / "a" / "0.png")                        # Pillow writes I;16
    Image.fromarray(ramp[::-1].astype(">u2")).save(tree / "a" / "1.png")    # from I;16B
    _png16(tree / "b" / "0.png", ramp.T.copy().reshape(5, 6))              # written by hand
    (tree / "b" / "1.pgm").write_bytes(b"P5\n6 5\n65535\n" + ramp.astype(">u2").tobytes())  # opens as "I"
    for f, mode in [("a/0.png", "I;16"), ("a/1.png", "I;16"), ("b/0.png", "I;16"), ("b/1.pgm", "I")]:
        with Image.open(tree / f) as im:
            assert im.mode in (mode, "I"), (f, im.mode)
    d = load_dataset(str(tree), data_dir=tmp_path / "data", val_per_class=0)
    assert d.image_shape == (1, 5, 6)
    got = d.train_x[torch.argsort(folders.folder_training_order(4))][:, 0].numpy()
    assert np.array_equal(got[0], expect)
    assert np.array_equal(got[1], expect[::-1])
    assert np.array_equal(got[2], _to8(ramp.T.copy().reshape(5, 6)))
    assert np.array_equal(got[3], expect)
    # The exact rounding over the whole 16-bit range.
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    with Image.fromarray(every) as im:
        assert np.array_equal(images.pixels(im), _to8(every))


def test_folder_48_and_64_bit_rgb_pngs_are_not_clipped(tmp_path):
    tree = tmp_path / "tree"
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    rgba = rng.integers(0, 65536, (5, 6, 4), dtype=np.uint16)
    (tree / "a").mkdir(parents=True)
    (tree / "b").mkdir()
    _png16(tree / "a" / "rgb48.png", rgb)
    _png16(tree / "b" / "rgba64.png", rgba)
    d = load_dataset(str(tree), data_dir=tmp_path / "data", val_per_class=0)
    assert d.image_shape == (3, 5, 6)
    got = d.train_x[torch.argsort(folders.folder_training_order(2))].numpy().astype(int)
    # Pillow reduces these itself, to each sample's high byte: within one level of round(v / 257).
    for img, samples in zip(got, (rgb, rgba[..., :3])):
        assert np.abs(img.transpose(1, 2, 0) - _to8(samples).astype(int)).max() <= 1
        assert img.std() > 30


def test_folder_refuses_modes_without_a_faithful_8bit_form(tmp_path):
    tree = tmp_path / "tree"
    _write_tree(tree, {"a": 2, "b": 2})
    Image.fromarray(np.full((5, 6), 0.5, dtype=np.float32)).save(tree / "a" / "float.tif")
    Image.fromarray(np.full((5, 6), 70000, dtype=np.int32)).save(tree / "b" / "int32.tif")
    with pytest.raises(DataError) as err:
        load_dataset(str(tree), data_dir=tmp_path / "data")
    msg = str(err.value)
    assert msg.startswith(f"2 images in {tree} cannot be read")
    assert os.path.join("a", "float.tif") + " (mode 'F', 32-bit floating-point pixels" in msg
    assert os.path.join("b", "int32.tif") + " (mode 'I', 32-bit integer pixels" in msg


def test_folder_other_8bit_modes_become_rgb(tmp_path):
    tree = tmp_path / "tree"
    _write_tree(tree, {"a": 1, "b": 1})
    rgb = np.random.default_rng(1).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).quantize(16).save(tree / "a" / "p.png", transparency=0)
    Image.fromarray(rgb).convert("CMYK").save(tree / "b" / "cmyk.tif")
    Image.fromarray(rgb[..., 0]).convert("1").save(tree / "b" / "one.png")
    paths = folders.scan_folder(tree)[1]
    x = folders._decode_images(paths)
    assert x.shape == (5, 3, 5, 6)
    for path, img in zip(paths, x):
        with Image.open(path) as im:
            assert np.array_equal(img, np.asarray(im.convert("RGB")).transpose(2, 0, 1)), path


# --- the decoded-image cache -------------------------------------------------------------------

def _truncated(cache: Path) -> bytes:
    return cache.read_bytes()[: cache.stat().st_size // 2]


def _wrong_shape(cache: Path) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((2, 3, 5, 6), dtype=np.uint8))
    return buf.getvalue()


def _pickled(cache: Path) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, images=np.array([object()], dtype=object))
    return buf.getvalue()


@pytest.mark.parametrize("corrupt", [lambda c: b"", lambda c: b"\x00junk" * 100, _truncated, _wrong_shape, _pickled],
                         ids=["empty", "junk", "truncated", "wrong-shape", "pickled"])
def test_folder_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, corrupt):
    import warnings

    tree = tmp_path / "tree"
    _write_tree(tree, {"a": 3, "b": 3})
    first = load_dataset(str(tree), data_dir=tmp_path / "data", val_per_class=1)
    (cache,) = (tmp_path / "data" / "cache").iterdir()
    good = cache.read_bytes()
    cache.write_bytes(corrupt(cache))
    with pytest.warns(UserWarning) as caught:
        second = load_dataset(str(tree), data_dir=tmp_path / "data", val_per_class=1)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert str(cache) in msg and "rebuilt" in msg and "If you trust" not in msg
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_x, second.test_x)
    assert list((tmp_path / "data" / "cache").iterdir()) == [cache]
    with np.load(cache) as z, np.load(__import__("io").BytesIO(good)) as g:
        assert np.array_equal(z["images"], g["images"])

    # The rebuilt cache is used as it is: no warning, no decoding.
    monkeypatch.setattr(folders, "_decode_images", _no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = load_dataset(str(tree), data_dir=tmp_path / "data", val_per_class=1)
    assert torch.equal(first.train_x, third.train_x)


def _no_decoding(paths, progress=None):
    raise AssertionError("decoded again although cached")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the decoding pool needs two CPUs")
def test_folder_pool_decoding_matches_serial(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    _write_tree(tree, {"a": 6, "b": 5})
    paths = folders.scan_folder(tree)[1]
    serial = folders._decode_images(paths)
    monkeypatch.setattr(folders, "_POOL_MIN_FILES", 1)
    assert np.array_equal(folders._decode_images(paths), serial)
    (tree / "b" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        folders._decode_images(folders.scan_folder(tree)[1])


def test_folder_val_per_class_too_large(tmp_path):
    tree = tmp_path / "tree"
    _write_tree(tree, {"a": 2, "b": 3})
    with pytest.raises(DataError, match="val_per_class"):
        load_dataset(str(tree), data_dir=tmp_path / "data", val_per_class=2)


@pytest.mark.skipif(not SHARED_CIFAR_JPG.is_dir(), reason=f"real CIFAR-10 JPEGs not present at {SHARED_CIFAR_JPG}")
def test_real_cifar10_jpegs(tmp_path):
    """A few real JPEGs per class, linked into a small tree so the test stays fast."""
    classes = sorted(p.name for p in SHARED_CIFAR_JPG.iterdir() if p.is_dir())
    tree = tmp_path / "tree"
    for c in classes:
        (tree / c).mkdir(parents=True)
        for src in sorted((SHARED_CIFAR_JPG / c).iterdir())[:3]:
            (tree / c / src.name).symlink_to(src)
    d = load_dataset(str(tree), data_dir=tmp_path / "data", val_per_class=1)
    assert d.classes == tuple(classes) and len(classes) == 10
    assert d.image_shape == (3, 32, 32)
    assert d.train_x.shape[0] == 20 and d.test_x.shape[0] == 10
    first = sorted((SHARED_CIFAR_JPG / classes[0]).iterdir())[0]
    with Image.open(first) as im:
        held_at = int(torch.argsort(folders.folder_training_order(20))[0])
        assert np.array_equal(d.train_x[held_at].numpy(), np.asarray(im.convert("RGB")).transpose(2, 0, 1))
    assert all(0.2 < m < 0.8 for m in d.mean)


# --- BatchStream -------------------------------------------------------------------------------

def _images(n=23, c=3, h=6, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


def _stream(x, **kw):
    args = dict(batch_size=5, mean=(0.5,) * x.shape[1], std=(0.25,) * x.shape[1], shuffle=True, seed=7)
    args.update(kw)
    return BatchStream(x, torch.arange(len(x)), **args)


def _normalise(x_uint8, mean, std):
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x_uint8.float() / 255 - m) / s


def test_stream_length_and_drop_last():
    x = _images(23)
    assert len(_stream(x)) == 5
    assert len(_stream(x, drop_last=True)) == 4
    assert len(_stream(x, batch_size=23)) == 1
    with pytest.raises(IndexError):
        _stream(x, drop_last=True).batch(0, 4)


def test_stream_is_stateless_and_deterministic():
    x = _images()
    s = _stream(x, crop_padding=2, flip=True)
    forward = [s.batch(e, i) for e in range(3) for i in range(len(s))]
    backward = [s.batch(e, i) for e in reversed(range(3)) for i in reversed(range(len(s)))][::-1]
    fresh = _stream(x, crop_padding=2, flip=True)
    fresh_out = [fresh.batch(e, i) for e in range(3) for i in range(len(s))]
    for (a, ya), (b, yb), (c, yc) in zip(forward, backward, fresh_out):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert torch.equal(ya, yb) and torch.equal(ya, yc)
    # Resuming mid-epoch yields the remaining batches exactly.
    resumed = list(fresh.epoch(1, start=2))
    assert len(resumed) == len(s) - 2
    for (a, ya), (b, yb) in zip(resumed, forward[len(s) + 2:2 * len(s)]):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    # A different seed gives a different stream.
    other = _stream(x, crop_padding=2, flip=True, seed=8)
    assert not torch.equal(other.batch(0, 0)[1], forward[0][1])


def test_stream_permutation_covers_every_sample_once():
    s = _stream(_images(23))
    orders = []
    for e in range(3):
        ys = torch.cat([y for _, y in s.epoch(e)])
        assert sorted(ys.tolist()) == list(range(23))
        orders.append(ys.tolist())
    assert orders[0] != orders[1] != orders[2]
    dropped = _stream(_images(23), drop_last=True)
    ys = torch.cat([y for _, y in dropped.epoch(0)])
    assert len(ys) == 20 and len(set(ys.tolist())) == 20


def test_stream_without_shuffle_keeps_stored_order():
    x = _images(23)
    s = _stream(x, shuffle=False)
    for e in range(2):
        ys = [y.tolist() for _, y in s.epoch(e)]
        assert ys == [list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)]
    xb, _ = s.batch(0, 4)
    assert torch.allclose(xb, _normalise(x[20:], (0.5,) * 3, (0.25,) * 3), atol=1e-6)


def test_stream_normalisation_values():
    x = torch.stack([torch.full((2, 3, 3), v, dtype=torch.uint8) for v in (0, 51, 255)])
    s = BatchStream(x, torch.zeros(3, dtype=torch.int64), 3, mean=(0.2, 0.4), std=(0.5, 0.1),
                    shuffle=False, seed=0)
    xb, _ = s.batch(0, 0)
    assert xb.dtype == torch.float32
    for i, v in enumerate((0, 51, 255)):
        assert torch.allclose(xb[i, 0], torch.full((3, 3), (v / 255 - 0.2) / 0.5), atol=1e-6)
        assert torch.allclose(xb[i, 1], torch.full((3, 3), (v / 255 - 0.4) / 0.1), atol=1e-5)


def _naive_crop_flip(x, p, oy, ox, flip):
    """Per-image reference: numpy zero pad, slice, mirror."""
    out = []
    h, w = x.shape[2:]
    for img, dy, dx, f in zip(x.numpy(), oy.tolist(), ox.tolist(), flip.tolist()):
        padded = np.pad(img, ((0, 0), (p, p), (p, p)))
        crop = padded[:, dy:dy + h, dx:dx + w]
        out.append(crop[:, :, ::-1] if f else crop)
    return torch.from_numpy(np.ascontiguousarray(np.stack(out)))


def test_crop_and_flip_matches_naive_reference():
    x = _images(40, h=7, w=6)
    g = torch.Generator().manual_seed(1)
    for p in (0, 1, 3):
        oy = torch.randint(0, 2 * p + 1, (40,), generator=g)
        ox = torch.randint(0, 2 * p + 1, (40,), generator=g)
        flip = torch.rand(40, generator=g) < 0.5
        assert torch.equal(crop_and_flip(x, p, oy, ox, flip), _naive_crop_flip(x, p, oy, ox, flip))


def test_stream_batch_uses_its_augmentation():
    x = _images(23, h=7, w=6)
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    s = _stream(x, crop_padding=3, flip=True, mean=mean, std=std)
    for e, i in [(0, 0), (2, 4), (5, 1)]:
        aug = s.augmentation(e, i)
        idx = s.indices(e, i)
        assert aug.offset_y.min() >= 0 and aug.offset_y.max() <= 6
        ref = _naive_crop_flip(x[idx], 3, aug.offset_y, aug.offset_x, aug.flip)
        xb, yb = s.batch(e, i)
        assert torch.equal(yb, idx)
        assert torch.allclose(xb, _normalise(ref, mean, std), atol=1e-5)
    # Offsets cover the whole range over many batches.
    big = _stream(_images(2000, h=4, w=4), batch_size=2000, crop_padding=2)
    assert set(big.augmentation(0, 0).offset_x.tolist()) == set(range(5))


def test_stream_flip_only():
    x = _images(400, h=4, w=5)
    s = _stream(x, batch_size=400, shuffle=False, flip=True, mean=(0.0,) * 3, std=(1 / 255,) * 3)
    xb, _ = s.batch(0, 0)
    flip = s.augmentation(0, 0).flip
    assert 120 < int(flip.sum()) < 280
    expect = torch.where(flip[:, None, None, None], x.flip(-1), x).float()
    assert torch.allclose(xb, expect, atol=1e-3)
    no_flip = _stream(x, batch_size=400, shuffle=False, flip=False).augmentation(0, 0).flip
    assert not no_flip.any()


def test_stream_channels_last():
    x = _images(10)
    s = _stream(x, channels_last=True, crop_padding=1, flip=True)
    xb, _ = s.batch(0, 0)
    assert xb.is_contiguous(memory_format=torch.channels_last)
    plain, _ = _stream(x, crop_padding=1, flip=True).batch(0, 0)
    assert torch.equal(xb, plain)


def test_stream_rejects_bad_input():
    with pytest.raises(ValueError):
        BatchStream(torch.zeros(2, 1, 3, 3), torch.zeros(2), 1, (0.0,), (1.0,), False, 0)
    with pytest.raises(ValueError):
        BatchStream(_images(2), torch.zeros(2), 1, (0.0,), (1.0,), False, 0)
