"""`FolderStream`: batches of one split of an image folder, read and decoded from disk by
`DataLoader` worker processes while the device trains on the previous batches, with the standard
ImageNet transforms (RandomResizedCrop + flip for training, Resize + CenterCrop for evaluation).

Like `neurosim.data.BatchStream`, every batch is a pure function of (seed, epoch, index): the
epoch's order comes from a generator seeded with (seed, epoch) and each image's crop and flip
from one seeded with (seed, epoch, its position in the epoch). So a run resumed mid-epoch sees
the batches it would have seen, whatever the number of workers, and the ranks of a distributed
run together see exactly the batches one process with their summed batch would.
"""

from __future__ import annotations

import functools
import io
import math
import multiprocessing
import os
import re
import types
import warnings
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import attrs
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from neurosim.common.errors import DataError
from neurosim.data.batches import derive_seed
from neurosim.data.images import (
    JPEG_MAGIC,
    TooLarge,
    UnsupportedMode,
    failure_reason,
    header_size,
    max_image_pixels,
    open_image,
    pixels,
    too_large_error,
)

__all__ = ["FolderStream", "crop_box"]

# RandomResizedCrop's defaults: the crop covers 8 %..100 % of the image area, with an aspect
# ratio between 3:4 and 4:3 (drawn uniformly in log space), then is resized to the output size.
_CROP_SCALE = (0.08, 1.0)
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_CROP_TRIES = 10
# Evaluation resizes the shorter side to image_size / 0.875 (256 for 224) and keeps the centre.
_EVAL_CROP_FRACTION = 0.875
# Batches each worker prepares ahead of the one being trained on.
_PREFETCH = 2
# File signatures of the formats torchvision decodes itself; anything else goes to Pillow.
_TORCHVISION_MAGIC = (JPEG_MAGIC, b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")
_DECODE_MODES = ("auto", "cpu", "device")


@functools.cache
def _tv() -> types.SimpleNamespace:
    """torchvision's decoding (``io``) and transforms (``TF``), imported at first use: importing
    torchvision takes a second or more (its models import the compiler), which every command that
    reads no image folder would otherwise pay as it starts."""
    import torchvision.io as io
    import torchvision.transforms.v2.functional as TF

    return types.SimpleNamespace(io=io, TF=TF)


# --- per-image transforms ------------------------------------------------------------------------

def crop_box(seed: int, epoch: int, position: int, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """The training crop (top, left, height, width) and flip of the image at `position` in `epoch`.

    RandomResizedCrop's rule (torchvision's `RandomResizedCrop.make_params`, default scale and
    ratio) with a flip at p = 0.5, but every draw comes from a generator seeded with
    (seed, epoch, position): the choice does not depend on which process or rank prepares the
    image, or on where the epoch was started. All draws are made up front, so the uniforms an
    image gets do not depend on how many tries the rule needed.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, position, 2))
    u = torch.rand(3 + 2 * _CROP_TRIES, generator=g, dtype=torch.float64).tolist()
    flip = u[0] < 0.5
    area = height * width
    log_lo, log_hi = math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])
    for t in range(_CROP_TRIES):
        target = area * (_CROP_SCALE[0] + (_CROP_SCALE[1] - _CROP_SCALE[0]) * u[3 + 2 * t])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[4 + 2 * t])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            # Uniform offsets in [0, height - h] and [0, width - w] (min() guards u == 1 - eps).
            top = min(int(u[1] * (height - h + 1)), height - h)
            left = min(int(u[2] * (width - w + 1)), width - w)
            return top, left, h, w, flip
    # No try fitted (a very elongated image): the largest central crop within the ratio range.
    in_ratio = width / height
    if in_ratio < _CROP_RATIO[0]:
        w, h = width, int(round(width / _CROP_RATIO[0]))
    elif in_ratio > _CROP_RATIO[1]:
        h, w = height, int(round(height * _CROP_RATIO[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w, flip


def _transform(img: torch.Tensor, train: bool, size: int, seed: int, epoch: int, position: int) -> torch.Tensor:
    """One decoded uint8 3×H×W image (on any device) as the uint8 3×size×size network input.

    Training: `crop_box`'s crop resized to size×size (bilinear, antialiased) and its flip.
    Evaluation: shorter side resized to round(size / 0.875), then the central size×size.
    """
    if train:
        top, left, h, w, flip = crop_box(seed, epoch, position, img.shape[-2], img.shape[-1])
        out = _tv().TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
        return _tv().TF.horizontal_flip(out) if flip else out
    out = _tv().TF.resize(img, [round(size / _EVAL_CROP_FRACTION)], antialias=True)
    return _tv().TF.center_crop(out, [size, size])


# --- reading and decoding ------------------------------------------------------------------------

@contextmanager
def _torchvision_decoders():
    """Silence the deprecation notice torchvision >= 0.29 gives on every decoder call.

    Its decoders are what this module is built on (TorchCodec, their successor, is not a
    dependency); without this a run would print the notice several times per image.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        yield


def _read_bytes(path: str) -> torch.Tensor | str:
    """A file's bytes as a uint8 tensor, or why it cannot be read (a str).

    Read with Python rather than `torchvision.io.read_file`, whose errors carry its C++ source
    location instead of the OS's reason, and which refuses empty files without saying so plainly.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        return failure_reason(exc, path)
    if not data:
        return "the file is empty"
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _is_jpeg(data: torch.Tensor) -> bool:
    return bytes(data[:3].tolist()) == JPEG_MAGIC


def _over_limit(data: torch.Tensor, path: str, max_pixels: int | None) -> TooLarge | None:
    """A `TooLarge` if the image whose file bytes are ``data`` has more than ``max_pixels``, read
    from its header (JPEG, PNG, GIF: the formats torchvision decodes, with no limit of its own)."""
    if max_pixels is None:
        return None
    buf = memoryview(data.numpy())
    size = header_size(lambda offset, n: bytes(buf[offset:offset + n]))
    if size is None or size[0] * size[1] <= max_pixels:
        return None
    return TooLarge(path, size[0], size[1], max_pixels)


def _to_uint8_rgb(img: torch.Tensor) -> torch.Tensor:
    """A decoded C×H×W image as uint8 with 3 channels.

    16-bit samples become round(v / 257), as `neurosim.data.images.pixels` reduces them; one channel is
    repeated (decoders asked for RGB already give three); of an animated GIF (N×C×H×W) the
    first frame is kept, as Pillow reads it.
    """
    if img.ndim == 4:
        img = img[0]
    if img.dtype != torch.uint8:
        img = ((img.to(torch.int32) + 128) // 257).to(torch.uint8)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.contiguous()


def _decode_cpu(data: torch.Tensor, path: str, max_pixels: int | None = None) -> torch.Tensor | str | TooLarge:
    """An image file's bytes as uint8 3×H×W RGB, or why they cannot be decoded (a str), or a
    `TooLarge` for an image over ``max_pixels`` (`max_image_pixels`).

    JPEG, PNG and GIF go through torchvision's decoders (libjpeg-turbo, libpng); other formats
    (BMP, PPM/PGM, TIFF, WebP, ...) and files torchvision rejects through Pillow, converted to
    RGB by `pixels`'s rules (palette, alpha, CMYK, 16-bit greyscale).
    """
    too_large = _over_limit(data, path, max_pixels)
    if too_large is not None:
        return too_large
    head = bytes(data[:8].tolist())
    if head.startswith(_TORCHVISION_MAGIC):
        try:
            with _torchvision_decoders():
                return _to_uint8_rgb(_tv().io.decode_image(data, mode=_tv().io.ImageReadMode.RGB))
        except RuntimeError:
            pass  # e.g. a damaged file: Pillow tries it too, and gives a readable reason if it fails
    try:
        with open_image(io.BytesIO(data.numpy().tobytes())) as im:
            w, h = im.size
            if max_pixels is not None and w * h > max_pixels:
                return TooLarge(path, w, h, max_pixels)
            a = pixels(im)
    except MemoryError:
        raise
    except UnsupportedMode as exc:
        return str(exc)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        # Pillow names the in-memory file it was given ("cannot identify image file <_io.BytesIO
        # object at 0x...>"); the caller names the path.
        return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", failure_reason(exc, path)) or type(exc).__name__
    # Pillow's arrays can be read-only, which torch.from_numpy warns about: copied only then.
    t = torch.from_numpy(np.require(a, requirements=["C", "W"]))
    return _to_uint8_rgb(t[None] if t.ndim == 2 else t.permute(2, 0, 1))


def _batch_problem(paths: Sequence[str], items: Sequence) -> DataError:
    """The error for a batch some of whose images could not be decoded: those over the size
    limit first (`too_large_error`, as for a folder decoded up front), else the
    unreadable ones."""
    large = [d for d in items if isinstance(d, TooLarge)]
    if large:
        return too_large_error(large)
    return _unreadable([(p, d) for p, d in zip(paths, items) if isinstance(d, str)])


def _unreadable(bad: Sequence[tuple[str, str]], show: int = 3) -> DataError:
    """One error naming the unreadable images of a batch (full paths) and why each failed."""
    listed = "; ".join(f"{path} ({reason})" for path, reason in bad[:show])
    more = f" and {len(bad) - show} more in the same batch" if len(bad) > show else ""
    if len(bad) == 1:
        return DataError(f"an image cannot be read: {listed}; remove or replace it")
    return DataError(f"{len(bad)} images cannot be read: {listed}{more}; remove or replace them")


class _PathTable:
    """Many file paths in two numpy arrays (all bytes, and offsets) rather than a list of str.

    Forked DataLoader workers share the parent's memory copy-on-write, but merely reading a
    Python object writes its reference count, so a list of 1.28 M path strings is gradually
    copied into every worker. Two flat arrays are read without being written, and pickle
    compactly where workers are spawned.
    """

    def __init__(self, paths: Sequence[str | os.PathLike]):
        encoded = [os.fsencode(p) for p in paths]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.data[self.offsets[i]:self.offsets[i + 1]].tobytes())


class _ImageFiles(Dataset):
    """The map-style dataset the workers index: one image per key (index, epoch, position).

    With `transform` true an item is the network input (uint8 3×S×S), decoded and transformed
    here. Otherwise a JPEG is left as its file bytes (uint8, 1-D) for the main process to decode
    in one batched call on the device, and any other format is decoded here (uint8 3×H×W, not
    yet transformed): only JPEGs have a device decoder, and the workers' CPUs decode the rest
    better than the main process could. An image that cannot be read gives the reason (a str) in
    place of the tensor, and one over `max_pixels` a `TooLarge`, so that the main process raises
    one `DataError` naming it rather than passing on a worker's traceback.
    """

    def __init__(self, paths: _PathTable, labels: np.ndarray, train: bool, size: int, seed: int, transform: bool,
                 max_pixels: int | None = None):
        self.paths, self.labels = paths, labels
        self.train, self.size, self.seed, self.transform = train, size, seed, transform
        self.max_pixels = max_pixels  # taken here, in the main process: workers may be spawned

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int, int]):
        index, epoch, position = key
        path = self.paths[index]
        data = _read_bytes(path)
        if isinstance(data, torch.Tensor):
            if self.transform or not _is_jpeg(data):
                data = _decode_cpu(data, path, self.max_pixels)
                if self.transform and isinstance(data, torch.Tensor):
                    data = _transform(data, self.train, self.size, self.seed, epoch, position)
            else:  # the device's decoder, which has no size limit of its own, gets the bytes
                data = _over_limit(data, path, self.max_pixels) or data
        return data, int(self.labels[index]), path, epoch, position


@attrs.frozen
class _Collate:
    """Turns a list of `_ImageFiles` items into a batch: "x", "y" (int64 labels), "paths", "keys".

    With `stack`, "x" is the transformed images stacked (N×3×S×S uint8); otherwise, or where
    some file failed, "x" lists the items as they are (bytes, images, reasons), so the main
    process can decode the rest and report every failure of the batch at once.
    """

    stack: bool

    def __call__(self, items) -> dict:
        data = [d for d, _, _, _, _ in items]
        ok = self.stack and all(isinstance(d, torch.Tensor) for d in data)
        return {
            "x": torch.stack(data) if ok else data,
            "y": torch.tensor([label for _, label, _, _, _ in items], dtype=torch.int64),
            "paths": [path for _, _, path, _, _ in items],
            "keys": [(epoch, position) for _, _, _, epoch, position in items],
        }


# --- order and sharding --------------------------------------------------------------------------

@attrs.frozen
class _Layout:
    """Which images each rank's batches hold, epoch by epoch (see `FolderStream`)."""

    n: int
    batch_size: int
    train: bool
    seed: int
    rank: int
    world: int

    def num_batches(self) -> int:
        if self.train:
            if self.world == 1:
                return math.ceil(self.n / self.batch_size)
            return self.n // (self.batch_size * self.world)
        lo, hi = self.shard()
        return math.ceil((hi - lo) / self.batch_size)

    def num_images(self) -> int:
        if self.train:
            return self.n if self.world == 1 else self.num_batches() * self.batch_size
        lo, hi = self.shard()
        return hi - lo

    def shard(self) -> tuple[int, int]:
        """Evaluation: the contiguous run of positions this rank evaluates."""
        return self.rank * self.n // self.world, (self.rank + 1) * self.n // self.world

    def order(self, epoch: int) -> torch.Tensor | None:
        """The epoch's permutation of the images (training), the same on every rank; None in evaluation."""
        if not self.train:
            return None
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        return torch.randperm(self.n, generator=g)

    def positions(self, index: int) -> range:
        """Positions in the epoch's order of the images in this rank's batch `index`."""
        if not 0 <= index < self.num_batches():
            raise IndexError(f"batch {index} out of range for {self.num_batches()} batches per epoch")
        b = self.batch_size
        if self.train:
            start = index * b * self.world + self.rank * b
            return range(start, min(start + b, self.n))
        lo, hi = self.shard()
        return range(lo + index * b, min(lo + (index + 1) * b, hi))


class _BatchKeys:
    """The DataLoader's batch sampler: the keys of batches `start`.. of one epoch.

    Set to an epoch and a first batch before each pass over the loader; batches before `start`
    are never asked for, so resuming mid-epoch decodes nothing twice. It lives in the main
    process only (workers receive the keys), so setting it between passes is safe even with
    persistent workers.
    """

    def __init__(self, layout: _Layout):
        self.layout = layout
        self.epoch, self.start = 0, 0

    def __len__(self) -> int:
        return max(0, self.layout.num_batches() - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        # The epoch and start are taken now, not when the first batch is asked for.
        return self._keys(self.epoch, self.start)

    def _keys(self, epoch: int, start: int) -> Iterator[list[tuple[int, int, int]]]:
        order = self.layout.order(epoch)
        for index in range(start, self.layout.num_batches()):
            pos = self.layout.positions(index)
            images = pos if order is None else order[pos.start:pos.stop].tolist()
            yield [(int(i), epoch, p) for i, p in zip(images, pos)]


def _mp_context():
    """Fork where the platform has it (workers start at once and share the path table); else the default.

    Everything the workers need is picklable and defined at module level, so spawn works too.
    """
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return None


def _shut_down(loader: DataLoader) -> None:
    """Stop a DataLoader's persistent worker processes now rather than when it is collected."""
    it = getattr(loader, "_iterator", None)
    if it is not None:
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        loader._iterator = None


# --- the stream ----------------------------------------------------------------------------------

class FolderStream:
    """Batches of normalised float images read from image files, for one rank of a run.

    Order: in training, epoch e's order is ``torch.randperm(N)`` from a CPU generator seeded
    with ``derive_seed(seed, e)``, the same on every rank; global batch k is
    ``order[k*B*world:(k+1)*B*world]`` and rank r takes its slice ``[r*B:(r+1)*B]``. With
    world > 1 an incomplete last global batch is dropped, so every rank has the same number of
    full batches and averaging their gradients gives the global batch mean; with world == 1 the
    last partial batch is kept. In evaluation the images keep their order, rank r takes the
    contiguous shard ``[r*N//world:(r+1)*N//world]`` and cuts it into batches; nothing is
    dropped.

    Transforms: training crops with `crop_box` (RandomResizedCrop, scale 0.08..1, ratio 3/4..4/3,
    plus a horizontal flip at p = 0.5), seeded by (seed, epoch, position in the epoch's order);
    evaluation resizes the shorter side to round(image_size / 0.875) and keeps the centre. Images
    are made RGB. The uint8 result is normalised on the device, (x/255 - mean)/std, as one
    multiply-add.

    Loading: a `DataLoader` with `workers` processes (0: in this process), kept alive between
    epochs, prepares batches ahead. `decode` says where images are decoded: ``"cpu"``: in the
    workers, which also crop and resize; ``"device"``: the workers only read JPEG files' bytes
    (and decode other formats, which have no device decoder, on their CPUs), this process decodes
    the batch's JPEGs in one `decode_jpeg` call on `device` (the GPU's nvJPEG on CUDA) and crops
    and resizes every image there; ``"auto"``: ``"device"`` on CUDA, ``"cpu"`` otherwise. Both
    give the same crops and flips for an image. An unreadable image raises a `DataError` naming
    it (and any other of its batch) when its batch is reached; so does an image over
    `max_image_pixels` (Pillow's decompression-bomb limit), with the message a folder
    decoded up front gives, before any decoder sees it.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int], batch_size: int, *,
                 train: bool, mean: Sequence[float], std: Sequence[float], seed: int,
                 image_size: int = 224, rank: int = 0, world: int = 1, workers: int = 4,
                 device: str | torch.device = "cpu", channels_last: bool = False, decode: str = "auto"):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        if batch_size < 1 or image_size < 1 or workers < 0:
            raise ValueError("batch_size and image_size must be >= 1 and workers >= 0")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world) with world >= 1, got rank {rank} of {world}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need 3 values, one per RGB channel")
        if decode not in _DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(_DECODE_MODES)}, got {decode!r}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.image_size = int(image_size)
        self.train, self.channels_last = bool(train), bool(channels_last)
        self.decode = decode if decode != "auto" else ("device" if self.device.type == "cuda" else "cpu")
        self._layout = _Layout(len(paths), self.batch_size, self.train, int(seed), int(rank), int(world))
        if self.train and len(paths) == 0:
            raise DataError("the training split has no images")
        if self.train and len(self) == 0:
            raise DataError(
                f"the training split has {len(paths)} images, fewer than one global batch of "
                f"{self.batch_size} per rank × {world} ranks; use a smaller batch or fewer processes"
            )
        self.num_images = self._layout.num_images()

        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # (x/255 - mean)/std as one multiply-add per element.
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = -mean_t / std_t

        in_workers = self.decode == "cpu"
        self._max_pixels = max_image_pixels()
        files = _ImageFiles(_PathTable(paths), np.asarray(labels, dtype=np.int64), self.train,
                            self.image_size, int(seed), transform=in_workers, max_pixels=self._max_pixels)
        self._sampler = _BatchKeys(self._layout)
        extra = {}
        if workers > 0:
            extra = dict(persistent_workers=True, prefetch_factor=_PREFETCH, multiprocessing_context=_mp_context())
        # A generator of the stream's own: the DataLoader draws its workers' base seed from it each
        # time an iterator starts (every pass without workers, the first with them). From the
        # process-wide generator that draw would move the run's saved RNG state by one draw per
        # pass, and a run resumed mid-epoch (one more start) would save another state than one
        # never stopped. Nothing reads the workers' seeds: every crop is seeded by its position.
        self._loader = DataLoader(files, batch_sampler=self._sampler, num_workers=int(workers),
                                  collate_fn=_Collate(stack=in_workers), pin_memory=self.device.type == "cuda",
                                  generator=torch.Generator().manual_seed(int(seed)), **extra)
        # The pass over the loader that may draw from it now (see `epoch`); None once closed.
        self._owner: object | None = object()
        self._decode_stream = None  # CUDA: the stream JPEGs are decoded on (see _decode_jpegs)
        self._finalizer = weakref.finalize(self, _shut_down, self._loader)

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        return self._layout.num_batches()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image: (3, image_size, image_size)."""
        return 3, self.image_size, self.image_size

    def indices(self, epoch: int, index: int) -> torch.Tensor:
        """Positions in `paths` of the images in this rank's batch `index` of `epoch` (reads no file)."""
        pos = self._layout.positions(index)
        order = self._layout.order(epoch)
        if order is None:
            return torch.arange(pos.start, pos.stop)
        return order[pos.start:pos.stop]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `epoch` from batch `start` on (for resuming mid-epoch), as (x, y) on the device.

        x is float32 N×3×S×S, normalised (channels-last if asked), y int64 N. Batches before
        `start` are not read. Only the latest pass over a stream may be drawn from: starting
        another one (a new `epoch` call) ends the one before.
        """
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if self._owner is None:
            raise RuntimeError("this FolderStream is closed")
        self._sampler.epoch, self._sampler.start = int(epoch), int(start)
        token = self._owner = object()
        # Started here, not on the first next(), so the workers begin reading at once.
        batches = iter(self._loader)
        return self._draw(batches, token)

    def _draw(self, batches, token) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            # With persistent workers every pass shares one loader iterator: a pass that a later
            # `epoch` call replaced must not take that pass's batches.
            if self._owner is not token:
                raise RuntimeError("this pass over the FolderStream was ended by a later epoch() call or close()")
            try:
                batch = next(batches)
            except StopIteration:
                return
            yield self._finish(batch)

    def _finish(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch as normalised float images and labels on the device."""
        y = batch["y"].to(self.device, non_blocking=True)
        if self.decode == "cpu":
            x = batch["x"]
            if isinstance(x, list):  # some files could not be read or decoded
                raise _batch_problem(batch["paths"], x)
            x = x.to(self.device, non_blocking=True)
        else:
            x = self._decode_on_device(batch["x"], batch["paths"], batch["keys"])
        out = x.to(torch.float32).mul_(self._scale).add_(self._shift)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out, y

    def _decode_on_device(self, data: list[torch.Tensor | str], paths: list[str],
                          keys: list[tuple[int, int]]) -> torch.Tensor:
        """Decode a batch's JPEGs in one `decode_jpeg` call on the device, then transform every image there.

        `data` holds, per image, the JPEG file's bytes (1-D), the image the worker decoded
        (3×H×W, other formats), why it could not be read (a str), or a `TooLarge`.
        """
        images: list[torch.Tensor | str | TooLarge | None] = [
            d if not isinstance(d, torch.Tensor) or d.ndim == 3 else None for d in data
        ]
        jpegs = [i for i, img in enumerate(images) if img is None]
        if jpegs:
            try:
                decoded = self._decode_jpegs([data[i] for i in jpegs])
            except RuntimeError:
                decoded = None  # one bad or unsupported file fails the whole call: try them one by one
            for n, i in enumerate(jpegs):
                if decoded is not None:
                    images[i] = decoded[n]
                    continue
                try:
                    images[i] = self._decode_jpegs([data[i]])[0]
                except RuntimeError:
                    # A damaged file, or a JPEG flavour the device decoder lacks (e.g. CMYK):
                    # the CPU decoders, with Pillow behind them, decide and give the reason.
                    images[i] = _decode_cpu(data[i], paths[i], self._max_pixels)
        if not all(isinstance(img, torch.Tensor) for img in images):
            raise _batch_problem(paths, images)
        return torch.stack([
            _transform(_to_uint8_rgb(img.to(self.device, non_blocking=True)), self.train, self.image_size,
                       self._layout.seed, epoch, position)
            for img, (epoch, position) in zip(images, keys)
        ])

    def _decode_jpegs(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        """``decode_jpeg`` on the device, ordered with the training's CUDA stream.

        torchvision's CUDA decoder allocates its outputs on the calling stream but decodes on a
        private stream that does not wait for it: called on the training stream, it could write
        into memory that the previous step freed while that step's queued kernels still read it.
        So it is called on a stream of its own that holds nothing else, and its outputs are
        marked as used by the training stream, which waits for the decode before reading them:
        the allocator then reuses an output's memory only once the training stream is past it.
        """
        with _torchvision_decoders():
            if self.device.type != "cuda":
                return list(_tv().io.decode_jpeg(data, mode=_tv().io.ImageReadMode.RGB, device=self.device))
            if self._decode_stream is None:
                self._decode_stream = torch.cuda.Stream(self.device)
            training = torch.cuda.current_stream(self.device)
            with torch.cuda.stream(self._decode_stream):
                images = list(_tv().io.decode_jpeg(data, mode=_tv().io.ImageReadMode.RGB, device=self.device))
            training.wait_stream(self._decode_stream)
            for img in images:
                img.record_stream(training)
            return images

    def close(self) -> None:
        """Stop the worker processes. Also done when the stream is garbage-collected."""
        self._owner = None
        self._finalizer()

    def __repr__(self) -> str:
        split = "train" if self.train else "eval"
        return (f"FolderStream({split}, {self._layout.n} images, batch {self.batch_size}, "
                f"rank {self._layout.rank}/{self._layout.world}, {len(self)} batches, "
                f"{self.image_size}px, decode={self.decode})")
