"""Neuron populations: where synaptic drives meet, are normalised and pass a nonlinearity."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "identity": None,
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}
POOLS = ("none", "global_avg", "max")


class NeuronPopulation(nn.Module):
    """A population of neurons with a per-sample ``shape`` (``(n,)`` or ``(C, H, W)``).

    Its activity is ``f(norm(pool(Σ drives)))``: the sum of every incoming pathway's drive,
    optionally pooled, optionally batch-normalised (population-local state), through the
    nonlinearity ``activation``. An input population has no incoming pathways; its activity is
    the data.

    Pooling: ``global_avg`` turns ``C×H×W`` drives into ``C`` neurons, each the mean of its
    channel; ``max`` gives each neuron of a ``(C, H', W')`` population the largest drive in its
    window of a ``(C, H, W)`` drive (``pool_kernel``, ``pool_stride`` (default: the kernel) and
    ``pool_padding``, as ``F.max_pool2d`` takes them; padding never wins). Its error goes back
    whole to the position that won. Since pooling comes first, torchvision's ``ReLU → max-pool``
    stem is two populations: the ReLU one, and a max-pooling one fed by an identity pathway.
    """

    def __init__(self, name: str, shape, activation: str = "identity", norm: str | None = None,
                 pool: str = "none", pool_kernel: int | None = None, pool_stride: int | None = None,
                 pool_padding: int = 0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}")
        if pool not in POOLS:
            raise ValueError(f"unknown pool {pool!r}; choose from {POOLS}")
        if norm not in (None, "batch"):
            raise ValueError(f"unknown norm {norm!r}; choose None or 'batch'")
        self.name = name
        self.shape = tuple(int(s) for s in ((shape,) if isinstance(shape, int) else shape))
        self.activation = activation
        self.pool = pool
        self.pool_kernel, self.pool_stride, self.pool_padding = _window(name, self.shape, pool, pool_kernel,
                                                                        pool_stride, pool_padding)
        self.norm_kind = norm
        self._act = ACTIVATIONS[activation]
        self.pooled_from: tuple[int, ...] | None = None  # the (C, H, W) a pooled population sums
        channels = self.shape[0]
        if norm == "batch":
            self.norm = nn.BatchNorm2d(channels) if len(self.shape) == 3 else nn.BatchNorm1d(channels)
        else:
            self.norm = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def check_drive(self, shape: tuple[int, ...]) -> None:
        """Refuse a pathway whose drive cannot be summed into this population.

        Every drive must have the population's shape, or for a pooled population one common
        ``(C, H, W)`` (the first pathway fixes ``H, W``): for ``global_avg`` with ``C`` its size,
        for ``max`` one that its window pools to its own shape."""
        shape = tuple(shape)
        if self.pool == "none":
            if shape != self.shape:
                raise ValueError(f"population {self.name!r} has shape {self.shape} but receives drive of shape {shape}")
            return
        if len(shape) != 3 or shape[0] != self.shape[0]:
            raise ValueError(f"population {self.name!r} pools {shape} to {self.shape}: channels must match")
        if self.pool == "max" and self.pooled_shape(shape) != self.shape:
            raise ValueError(f"population {self.name!r} of shape {self.shape} max-pools (kernel {self.pool_kernel}, "
                             f"stride {self.pool_stride}, padding {self.pool_padding}) a drive of shape {shape} "
                             f"to {self.pooled_shape(shape)}")
        if self.pooled_from is not None and shape != self.pooled_from:
            raise ValueError(f"population {self.name!r} pools drives of shape {self.pooled_from}, not {shape}")
        self.pooled_from = shape

    def pooled_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape a max-pooling population's window makes of a ``(C, H, W)`` drive."""
        k, s, p = self.pool_kernel, self.pool_stride, self.pool_padding
        return (shape[0], *((n + 2 * p - k) // s + 1 for n in shape[1:]))

    def pool_drive(self, drive: torch.Tensor) -> torch.Tensor:
        """The pooling stage alone (the drive itself for an unpooled population)."""
        if self.pool == "global_avg":
            return drive.mean((2, 3))
        if self.pool == "max":
            return F.max_pool2d(drive, self.pool_kernel, self.pool_stride, self.pool_padding)
        return drive

    def forward(self, drive: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """The activity for a summed ``drive``; ``fresh`` says no one else holds that tensor."""
        if self.pool != "none":
            drive, fresh = self.pool_drive(drive), True
        return self.respond(drive, fresh)

    def respond(self, drive: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """The activity for an already pooled drive: normalisation, then the nonlinearity."""
        if self.norm is not None:
            drive, fresh = self.norm(drive), True
        if self.activation == "relu" and fresh:
            # In place, as torchvision's ResNet does: batch norm keeps its input, not its
            # output, and a sum of drives is read by nothing else. Saves one activation-sized
            # tensor per population.
            return F.relu(drive, inplace=True)
        return drive if self._act is None else self._act(drive)

    def extra_repr(self) -> str:
        parts = [f"{self.name!r}", f"shape={self.shape}", self.activation]
        if self.pool == "max":
            parts.append(f"pool=max{self.pool_kernel}x{self.pool_kernel}/{self.pool_stride} pad={self.pool_padding}")
        elif self.pool != "none":
            parts.append(f"pool={self.pool}")
        if self.norm is not None:
            parts.append("batchnorm")
        return ", ".join(parts)


def _window(name: str, shape: tuple[int, ...], pool: str, kernel, stride, padding):
    """A max-pooling population's ``(kernel, stride, padding)``, checked; ``(None, None, 0)`` otherwise."""
    if pool != "max":
        if kernel is not None or stride is not None or padding:
            raise ValueError(f"population {name!r}: pool_kernel, pool_stride and pool_padding apply to pool='max' only")
        if pool == "global_avg" and len(shape) != 1:
            raise ValueError(f"population {name!r} pools globally, so its shape is (C,), not {shape}")
        return None, None, 0
    if len(shape) != 3:
        raise ValueError(f"population {name!r} max-pools over space, so its shape is (C, H, W), not {shape}")
    if kernel is None:
        raise ValueError(f"population {name!r}: pool='max' needs pool_kernel (e.g. 3)")
    stride = kernel if stride is None else stride
    for what, v in (("pool_kernel", kernel), ("pool_stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"population {name!r}: {what} must be a positive whole number, got {v!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= kernel // 2:
        # F.max_pool2d's own limit: a window must always hold at least one real drive.
        raise ValueError(f"population {name!r}: pool_padding must be a whole number from 0 to half the "
                         f"kernel ({kernel // 2}), got {padding!r}")
    return kernel, stride, padding
