"""Tests for image folders streamed from disk (neurosim.data.stream)."""

import math
import multiprocessing
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

from neurosim.common.errors import DataError
from neurosim.data.stream import FolderStream, crop_box, folder_splits

# The reference images below are decoded with torchvision, which notes its decoders' deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

SIZE = 32
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
# (width, height) of the generated images: square, landscape and portrait, so crops differ.
SHAPES = ((64, 64), (64, 48), (48, 72))


def _image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A smooth random RGB picture (a colour ramp plus a few blocks), so crops and resizes show."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    img = (base + 2 * xx[..., None] * rng.integers(-1, 2, 3) + yy[..., None] * rng.integers(-1, 2, 3)) % 256
    for _ in range(3):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[y0:y0 + 8, x0:x0 + 8] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def make_tree(root, classes=("cat", "dog", "eel"), per_class=10, seed=0, formats=("png", "jpg")):
    """An ImageFolder tree: mixed PNG/JPEG of mixed sizes, one greyscale and one palette image."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            w, h = SHAPES[(i + c) % len(SHAPES)]
            im = Image.fromarray(_image(rng, w, h))
            if c == 0 and i == 1:
                im = im.convert("L")
            if c == 1 and i == 2:
                im = im.convert("P")
            fmt = formats[i % len(formats)]
            im.save(folder / f"{i:03d}.{fmt}", quality=90) if fmt == "jpg" else im.save(folder / f"{i:03d}.{fmt}")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("stream") / "tree")


@pytest.fixture(scope="module")
def files(tree):
    """All 30 images of the tree, as (paths, labels) in ImageFolder order."""
    classes, (tp, tl), (vp, vl) = folder_splits(tree, val_per_class=0)
    assert vp == [] and len(tp) == 30
    return tp, tl


def stream(paths, labels, batch_size=4, **kw):
    kw = {"train": True, "mean": MEAN, "std": STD, "seed": 7, "image_size": SIZE, "workers": 0, **kw}
    return FolderStream(paths, labels, batch_size, **kw)


def collect(s, epoch=0, start=0):
    return [(x.clone(), y.clone()) for x, y in s.epoch(epoch, start)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def reference_input(path, train, seed=7, epoch=0, position=0):
    """The uint8 network input of one image, built directly from torchvision's functions."""
    img = decode_image(path, mode=ImageReadMode.RGB)
    if not train:
        return TF.center_crop(TF.resize(img, [round(SIZE / 0.875)], antialias=True), [SIZE, SIZE])
    top, left, h, w, flip = crop_box(seed, epoch, position, img.shape[1], img.shape[2])
    out = TF.resized_crop(img, top, left, h, w, [SIZE, SIZE], antialias=True)
    return TF.horizontal_flip(out) if flip else out


def normalised(u8):
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (u8.float() / 255 - mean) / std


# --- splits ------------------------------------------------------------------------------------

def test_held_out_split_takes_the_last_files_of_each_class(tree):
    classes, (tp, tl), (vp, vl) = folder_splits(tree, None)
    assert classes == ("cat", "dog", "eel")
    # Default: 10 % of each class, at least one; the last file in sorted order.
    assert [p.rsplit("/", 2)[1:] for p in vp] == [["cat", "009.jpg"], ["dog", "009.jpg"], ["eel", "009.jpg"]]
    assert vl == [0, 1, 2] and len(tp) == 27 and tl == sorted(tl)
    classes, (tp, tl), (vp, vl) = folder_splits(tree, 3)
    assert len(vp) == 9 and vl == [0] * 3 + [1] * 3 + [2] * 3
    assert [p[-7:] for p in vp[:3]] == ["007.jpg", "008.png", "009.jpg"]
    assert not set(tp) & set(vp) and len(tp) + len(vp) == 30
    with pytest.raises(DataError, match="cannot hold out 10"):
        folder_splits(tree, 10)


def test_imagenet_layout_and_class_mismatch(tmp_path):
    make_tree(tmp_path / "inet" / "train", per_class=3)
    make_tree(tmp_path / "inet" / "val", per_class=2, seed=1)
    classes, (tp, tl), (vp, vl) = folder_splits(tmp_path / "inet", val_per_class=1)  # ignored here
    assert classes == ("cat", "dog", "eel")
    assert len(tp) == 9 and len(vp) == 6 and vl == [0, 0, 1, 1, 2, 2]
    assert all("/train/" in p for p in tp) and all("/val/" in p for p in vp)

    shutil.rmtree(tmp_path / "inet" / "val" / "eel")
    make_tree(tmp_path / "inet" / "val", classes=("fox",), per_class=1)
    with pytest.raises(DataError) as err:
        folder_splits(tmp_path / "inet", None)
    msg = str(err.value)
    assert "only in" in msg and "eel" in msg and "fox" in msg

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        folder_splits(tmp_path / "empty", None)


# --- batches -----------------------------------------------------------------------------------

def test_shapes_dtypes_normalisation_and_transforms(files):
    paths, labels = files
    s = stream(paths, labels, 4, train=True)
    assert len(s) == 8 and s.batch_size == 4 and s.num_images == 30 and s.image_shape == (3, SIZE, SIZE)
    batches = collect(s, epoch=2)
    assert [len(y) for _, y in batches] == [4] * 7 + [2]  # one process keeps the partial batch
    for j, (x, y) in enumerate(batches):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, SIZE, SIZE) and y.dtype == torch.int64
        idx = s.indices(2, j)
        assert torch.equal(y, torch.tensor(labels)[idx])
        # Each image is its RandomResizedCrop + flip, normalised by one multiply-add.
        for i, (k, pos) in enumerate(zip(idx.tolist(), range(j * 4, j * 4 + len(y)))):
            ref = normalised(reference_input(paths[k], True, epoch=2, position=pos))
            torch.testing.assert_close(x[i], ref, rtol=0, atol=1e-5)

    ev = stream(paths, labels, 8, train=False, channels_last=True)
    x, y = next(iter(ev.epoch(0)))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, torch.tensor(labels[:8]))
    for i in range(8):
        torch.testing.assert_close(x[i], normalised(reference_input(paths[i], False)), rtol=0, atol=1e-5)
    # The greyscale image (cat/001) comes out with three equal channels.
    raw = x[1] * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    torch.testing.assert_close(raw[0], raw[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(raw[0], raw[2], rtol=0, atol=1e-5)


def test_crop_box_follows_random_resized_crop_bounds():
    areas, ratios, flips = [], [], []
    for pos in range(400):
        top, left, h, w, flip = crop_box(3, 1, pos, 48, 64)
        assert 0 <= top <= 48 - h and 0 <= left <= 64 - w and h > 0 and w > 0
        areas.append(h * w / (48 * 64))
        ratios.append(w / h)
        flips.append(flip)
    assert 0.07 <= min(areas) and max(areas) <= 1.0 and 0.7 <= min(ratios) and max(ratios) <= 1.4
    assert 0.4 < np.mean(flips) < 0.6
    assert crop_box(3, 1, 5, 48, 64) == crop_box(3, 1, 5, 48, 64) != crop_box(3, 2, 5, 48, 64)
    # An image too elongated for any try: the largest central crop of ratio 4:3.
    assert crop_box(0, 0, 0, 10, 1000)[:4] == (0, (1000 - 13) // 2, 10, 13)


def test_deterministic_resumable_and_different_each_epoch(files):
    paths, labels = files
    s = stream(paths, labels, 4)
    full = collect(s, epoch=1)
    assert_same(full, collect(stream(paths, labels, 4), epoch=1))  # a fresh stream: the same batches
    for j in (1, 5, 7):
        assert_same(collect(s, epoch=1, start=j), full[j:])
    assert collect(s, epoch=1, start=8) == []
    other = collect(s, epoch=2)
    assert not torch.equal(s.indices(1, 0), s.indices(2, 0))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(full, other))
    # Every image once per epoch.
    assert sorted(torch.cat([s.indices(2, j) for j in range(len(s))]).tolist()) == list(range(30))
    # Another seed, another order.
    assert not torch.equal(stream(paths, labels, 4, seed=8).indices(1, 0), s.indices(1, 0))


def test_worker_processes_give_the_same_batches_and_close(files):
    paths, labels = files
    before = set(multiprocessing.active_children())
    s = stream(paths, labels, 4, workers=2)
    try:
        single = stream(paths, labels, 4)
        for epoch in (0, 1):  # the second pass reuses the persistent workers
            assert_same(collect(s, epoch), collect(single, epoch))
        assert_same(collect(s, 1, start=6), collect(single, 1, start=6))
        # A pass abandoned half way, then a new one: the stale one may not steal its batches.
        stale = s.epoch(0)
        next(stale)
        fresh = collect(s, 0, start=3)
        assert_same(fresh, collect(single, 0, start=3))
        with pytest.raises(RuntimeError, match="later epoch"):
            next(stale)
        assert set(multiprocessing.active_children()) - before
    finally:
        s.close()
    assert not set(multiprocessing.active_children()) - before
    with pytest.raises(RuntimeError, match="closed"):
        s.epoch(0)


def test_two_ranks_together_equal_one_process_with_twice_the_batch(files):
    paths, labels = files
    ranks = [stream(paths, labels, 4, rank=r, world=2) for r in (0, 1)]
    single = stream(paths, labels, 8)
    # 30 images in global batches of 8: three full ones; the last 6 images are dropped.
    assert [len(r) for r in ranks] == [3, 3] and [r.num_images for r in ranks] == [12, 12] and len(single) == 4
    per_rank = [collect(r, epoch=3) for r in ranks]
    whole = collect(single, epoch=3)
    for j in range(3):
        x = torch.cat([per_rank[0][j][0], per_rank[1][j][0]])
        y = torch.cat([per_rank[0][j][1], per_rank[1][j][1]])
        assert torch.equal(x, whole[j][0]) and torch.equal(y, whole[j][1])
    # Resuming one rank mid-epoch gives the same batches too.
    assert_same(collect(ranks[1], epoch=3, start=2), per_rank[1][2:])


def test_training_drop_rule(files):
    paths, labels = files
    for world, batches in ((1, 8), (2, 3), (3, 2)):
        s = stream(paths, labels, 4, world=world, rank=world - 1)
        assert len(s) == batches
        sizes = [len(s.indices(0, j)) for j in range(len(s))]
        assert sizes == ([4] * 7 + [2] if world == 1 else [4] * batches)
        assert s.num_images == sum(sizes)
    with pytest.raises(DataError, match="fewer than one global batch"):
        stream(paths, labels, 4, world=8)
    with pytest.raises(ValueError, match="rank"):
        stream(paths, labels, 4, world=2, rank=2)


def test_evaluation_shards_are_contiguous_disjoint_and_cover_everything(files):
    paths, labels = files
    world, seen = 4, []
    for r in range(world):
        s = stream(paths, labels, 3, train=False, rank=r, world=world)
        idx = [s.indices(0, j) for j in range(len(s))]
        assert len(s) == math.ceil(s.num_images / 3)
        shard = torch.cat(idx).tolist()
        assert shard == list(range(r * 30 // world, (r + 1) * 30 // world))
        assert torch.equal(s.indices(0, 0), s.indices(5, 0))  # evaluation is not shuffled
        seen += shard
    assert seen == list(range(30))
    # The batches hold those images: the last rank's labels, in order.
    ys = torch.cat([y for _, y in collect(s)])
    assert torch.equal(ys, torch.tensor(labels[3 * 30 // world:]))


def test_device_decode_path_equals_cpu_path(files):
    paths, labels = files
    png = [(p, y) for p, y in zip(paths, labels) if p.endswith(".png")]
    pp, pl = [p for p, _ in png], [y for _, y in png]
    for train in (True, False):
        cpu = collect(stream(pp, pl, 4, train=train, decode="cpu"), epoch=4)
        dev = collect(stream(pp, pl, 4, train=train, decode="device"), epoch=4)
        assert_same(cpu, dev)
    # JPEGs too (decoded in one batched decode_jpeg call), and the mixed folder as a whole.
    cpu = collect(stream(paths, labels, 6, decode="cpu"), epoch=4)
    dev = collect(stream(paths, labels, 6, decode="device"), epoch=4)
    for (xc, yc), (xd, yd) in zip(cpu, dev):
        assert torch.equal(yc, yd)
        torch.testing.assert_close(xd, xc, rtol=0, atol=0.1)


@pytest.mark.parametrize("decode,workers", [("cpu", 0), ("device", 0), ("cpu", 2)])
def test_corrupt_image_names_the_file_and_resume_skips_it(tmp_path, decode, workers):
    tree = make_tree(tmp_path / "tree", per_class=4)
    bad = tree / "cat" / "000.png"
    bad.write_bytes(b"this is not an image" * 10)
    classes, (paths, labels), _ = folder_splits(tree, val_per_class=0)
    s = stream(paths, labels, 4, train=False, decode=decode, workers=workers)
    try:
        with pytest.raises(DataError) as err:
            collect(s)
        msg = str(err.value)
        assert str(bad) in msg and "Traceback" not in msg and "cannot" in msg
        # Resuming after the batch that holds it reads nothing of that batch.
        assert len(collect(s, start=1)) == len(s) - 1
    finally:
        s.close()


@pytest.mark.cuda
def test_cuda_decodes_jpegs_on_the_gpu_with_the_same_crops(files):
    paths, labels = files
    dev = stream(paths, labels, 6, device="cuda", workers=2)
    try:
        assert dev.decode == "device"  # "auto" on CUDA
        gpu = collect(dev, epoch=4)
    finally:
        dev.close()
    cpu = collect(stream(paths, labels, 6, decode="cpu"), epoch=4)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    for (xg, yg), (xc, yc) in zip(gpu, cpu):
        assert xg.device.type == "cuda" and xg.dtype == torch.float32 and xg.shape == xc.shape
        assert torch.equal(yg.cpu(), yc)
        # Same crops and flips; the pixels differ only by decoder and resize rounding.
        diff = ((xg.cpu() - xc) * std * 255).abs()
        assert float(diff.mean()) < 3


@pytest.mark.cuda
def test_cuda_decoding_waits_for_nothing_and_overwrites_nothing_the_training_stream_holds(files):
    """Decoding while the training stream is still busy: queued kernels read tensors that are
    already freed (their memory back in the allocator) when the batch is decoded. The decoded
    batch equals the one decoded on an idle GPU, and the tensors the queued work wrote hold
    what it computed."""
    paths, labels = files
    dev = stream(paths, labels, 6, device="cuda", workers=0)
    try:
        idle = collect(dev, epoch=2)
        torch.cuda.synchronize()
        busy, checks = [], []
        for x, y in dev.epoch(2):
            busy.append((x, y))
            a = torch.randn(4096, 4096, device="cuda")
            for _ in range(4):  # a long queue on the training stream, reading `a`
                a = a @ a.T / 4096
            checks.append(a.norm())
            del a  # freed while the kernels that read it are still queued
        torch.cuda.synchronize()
    finally:
        dev.close()
    assert all(bool(torch.isfinite(c)) for c in checks)
    for (xb, yb), (xi, yi) in zip(busy, idle):
        assert torch.equal(yb, yi)
        assert torch.equal(xb, xi)
