"""Batches of normalised float images drawn from images held on the device: `BatchStream`, with
its random crops and flips done as batched tensor ops there (`crop_and_flip`).

Every batch is a pure function of (seed, epoch, index) through `derive_seed`, so a run restarted
from a checkpoint taken mid-epoch sees exactly the batches it would have seen; the streamed
folders (`neurosim.data.stream`) derive their orders and crops from the same function.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import attrs
import torch
import torch.nn.functional as F

__all__ = ["Augmentation", "BatchStream", "crop_and_flip", "derive_seed"]


def derive_seed(*parts: int) -> int:
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
            g = self._generator(derive_seed(self.seed, epoch))
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
        g = self._generator(derive_seed(self.seed, epoch, index, 1))
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
