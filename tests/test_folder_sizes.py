"""The size of a folder's images: which folders ``--stream auto`` streams, what a refusal about
image sizes says, and the one limit on pixels per image, the same whether a folder is decoded up
front (``neurosim.data.folders``) or streamed (``neurosim.data.stream``)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from neurosim.common.errors import DataError
from neurosim.data import folders, images, load_dataset, max_image_pixels, stream
from neurosim.data.stream import FolderStream, folder_splits, header_size, wants_stream

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


def write_tree(root: Path, per_class: int = 24, size=(8, 8), fmt: str = "png") -> list[str]:
    """root/a/*.FMT and root/b/*.FMT, random RGB images of one size; their paths in folder order."""
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(a).save(root / name / f"{i:03d}.{fmt}")
    return folders.scan_folder(root)[1]


def replace(path: str, size, fmt: str | None = None) -> str:
    """Put an image of ``size`` in place of ``path`` (as ``fmt``, under that extension); its path."""
    os.remove(path)
    if fmt is not None:
        path = str(Path(path).with_suffix(f".{fmt}"))
    Image.new("RGB", size, (200, 30, 90)).save(path)
    return path


# --- which folders --stream auto streams ---------------------------------------------------------

def test_auto_streams_a_folder_with_one_large_image_the_sample_misses(tmp_path):
    """README: a folder of mixed sizes streams. The sizes were sampled (16 images): one odd
    image elsewhere left the folder to be decoded up front, which then refused it."""
    tree = tmp_path / "tree"
    paths = write_tree(tree)
    assert not wants_stream(str(tree), tmp_path, "auto")
    sampled = set(paths[::max(1, len(paths) // stream._SIZE_SAMPLE)][:stream._SIZE_SAMPLE])
    odd = next(p for p in reversed(paths) if p not in sampled)
    replace(odd, (300, 200))
    assert wants_stream(str(tree), tmp_path, "auto")
    assert not wants_stream(str(tree), tmp_path, "off")


def test_auto_decides_on_the_decoded_size(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    write_tree(tree, per_class=4, size=(8, 8))  # 8 images of 8x8x3 bytes: 1536 bytes decoded
    monkeypatch.setattr(stream, "AUTO_STREAM_BYTES", 1536)
    assert not wants_stream(str(tree), tmp_path, "auto")
    monkeypatch.setattr(stream, "AUTO_STREAM_BYTES", 1535)
    assert wants_stream(str(tree), tmp_path, "auto")


def test_a_folder_decoded_before_is_decided_by_its_cache_without_reading_headers(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    write_tree(tree, per_class=4)
    load_dataset(str(tree), data_dir=tmp_path)  # decodes it once, and caches it

    def no_headers(path):
        raise AssertionError(f"read the header of {path}")

    monkeypatch.setattr(images, "image_size", no_headers)
    assert not wants_stream(str(tree), tmp_path, "auto")
    monkeypatch.setattr(stream, "AUTO_STREAM_BYTES", 100)
    assert wants_stream(str(tree), tmp_path, "auto")


@pytest.mark.parametrize("fmt", ["png", "jpg", "gif", "bmp"])
def test_image_sizes_come_from_the_headers(tmp_path, fmt):
    path = tmp_path / f"x.{fmt}"
    im = Image.new("RGB", (37, 23), (1, 2, 3))
    if fmt == "jpg":  # metadata segments before the frame header, and a progressive frame
        im.save(path, quality=80, progressive=True, exif=b"Exif\x00\x00" + bytes(3000), icc_profile=bytes(5000))
    else:
        im.save(path)
    assert images.image_size(str(path)) == (37, 23)
    raw = path.read_bytes()
    expected = None if fmt == "bmp" else (37, 23)  # BMP: Pillow reads it (above), not header_size
    assert header_size(lambda offset, n: raw[offset:offset + n]) == expected


# --- what a refusal about image sizes says -------------------------------------------------------

def test_the_refusal_of_mixed_sizes_names_stream_on(tmp_path):
    tree = tmp_path / "tree"
    paths = write_tree(tree, per_class=3)
    odd = replace(paths[-1], (12, 9))
    with pytest.raises(DataError) as err:
        load_dataset(str(tree), data_dir=tmp_path)
    msg = str(err.value)
    assert f"image {odd} is 12x9 but {paths[0]} is 8x8" in msg
    assert "--stream on" in msg


@pytest.mark.slow
def test_a_run_held_in_memory_refuses_mixed_sizes_naming_stream_on(tmp_path):
    tree = tmp_path / "tree"
    paths = write_tree(tree, per_class=3)
    replace(paths[-1], (12, 9))
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "run_circuit.py"), "kp_resnet18",
                           "--data", str(tree), "--stream", "off", "--width", "0.0625", "--epochs", "1",
                           "--device", "cpu", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: image ") and "--stream on" in lines[0], done.stderr
    assert not (tmp_path / "run").exists()


# --- one limit on pixels per image ---------------------------------------------------------------

def test_the_limit_is_pillows_decompression_bomb_limit(monkeypatch):
    assert max_image_pixels() == 2 * Image.MAX_IMAGE_PIXELS == 178_956_970  # Pillow's default
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert max_image_pixels() is None


def streamed_error(paths: list[str], decode: str, workers: int = 0) -> str:
    s = FolderStream(paths, [0] * len(paths), len(paths), train=False, mean=(0.5,) * 3, std=(0.2,) * 3,
                     seed=0, image_size=8, workers=workers, decode=decode)
    try:
        with pytest.raises(DataError) as err:
            next(iter(s.epoch(0)))
        return str(err.value)
    finally:
        s.close()


@pytest.mark.parametrize("fmt", ["png", "jpg", "bmp"])
def test_an_image_over_the_limit_is_refused_alike_decoded_up_front_and_streamed(tmp_path, monkeypatch, fmt):
    """A 400-Mpixel PNG was refused up front (by Pillow, as unreadable) but trained when streamed
    (by torchvision, which has no limit). The limit is lowered here to 1000 pixels (Pillow's
    setting 500): a 40x30 image is over it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    tree = tmp_path / "tree"
    paths = write_tree(tree, per_class=3, size=(20, 20), fmt=fmt)  # 400 pixels: not even Pillow's warning
    big = replace(paths[2], (40, 30), fmt)
    expected = (f"image {big} is 40x30 pixels (1,200), more than the 1,000 an image may have (Pillow's "
                f"decompression-bomb limit, 2 x PIL.Image.MAX_IMAGE_PIXELS); shrink or remove it")
    with pytest.raises(DataError) as up_front:
        load_dataset(str(tree), data_dir=tmp_path)
    assert str(up_front.value) == expected
    _, (train, _), _ = folder_splits(tree, val_per_class=0)
    assert streamed_error(train, "cpu") == expected
    assert streamed_error(train, "device") == expected  # JPEG bytes go to the device's decoder
    if fmt == "png":
        assert streamed_error(train, "cpu", workers=1) == expected


def test_several_images_over_the_limit_are_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    tree = tmp_path / "tree"
    paths = write_tree(tree, per_class=3, size=(12, 12))
    with pytest.raises(DataError) as err:
        load_dataset(str(tree), data_dir=tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"image {paths[0]} is 12x12 pixels (144), more than the 100 ")
    assert f"; so are {paths[1]} (12x12), {paths[2]} (12x12) and 3 more; shrink or remove them" in msg


def test_images_under_the_limit_decode_without_pillows_warning(tmp_path, monkeypatch):
    """Pillow warns from half its limit up; torchvision never does: neither path warns now."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    tree = tmp_path / "tree"
    write_tree(tree, per_class=3, size=(30, 30), fmt="bmp")  # 900 pixels: between 500 and 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        d = load_dataset(str(tree), data_dir=tmp_path)
        _, (train, labels), _ = folder_splits(tree, val_per_class=0)
        s = FolderStream(train, labels, 6, train=False, mean=(0.5,) * 3, std=(0.2,) * 3, seed=0, image_size=8,
                         workers=0)
        x, _ = next(iter(s.epoch(0)))
        s.close()
    assert d.image_shape == (3, 30, 30) and x.shape == (6, 3, 8, 8)
    assert Image.MAX_IMAGE_PIXELS == 500  # Pillow's setting is put back


def test_an_image_pillow_decodes_is_streamed_without_a_warning(tmp_path):
    """Pillow's pixels can be a read-only array, which torch.from_numpy warns about (once per
    process, so in a process of its own)."""
    path = tmp_path / "x.bmp"
    Image.new("RGB", (5, 4), (9, 8, 7)).save(path)
    probe = ("from neurosim.data import folder_stream as s; p = {path!r}; "
             "img = s._decode_cpu(s._read_bytes(p), p); assert img.shape == (3, 4, 5)")
    done = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", probe.format(path=str(path))],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
