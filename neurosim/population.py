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
POOLS = ("none", "global_avg")


class NeuronPopulation(nn.Module):
    """A population of neurons with a per-sample ``shape`` (``(n,)`` or ``(C, H, W)``).

    Its activity is ``f(norm(pool(Σ drives)))``: the sum of every incoming pathway's drive,
    optionally pooled (``global_avg`` turns ``C×H×W`` into ``C``), optionally batch-normalised
    (population-local state), through the nonlinearity ``activation``. An input population has
    no incoming pathways; its activity is the data.
    """

    def __init__(self, name: str, shape, activation: str = "identity", norm: str | None = None,
                 pool: str = "none"):
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
        ``(C, H, W)`` with ``C`` its size (the first pathway fixes ``H, W``)."""
        shape = tuple(shape)
        if self.pool == "none":
            if shape != self.shape:
                raise ValueError(f"population {self.name!r} has shape {self.shape} but receives drive of shape {shape}")
            return
        if len(shape) != 3 or len(self.shape) != 1 or shape[0] != self.shape[0]:
            raise ValueError(f"population {self.name!r} pools {shape} to {self.shape}: channels must match")
        if self.pooled_from is not None and shape != self.pooled_from:
            raise ValueError(f"population {self.name!r} pools drives of shape {self.pooled_from}, not {shape}")
        self.pooled_from = shape

    def forward(self, drive: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """The activity for a summed ``drive``; ``fresh`` says no one else holds that tensor."""
        if self.pool == "global_avg":
            drive, fresh = drive.mean((2, 3)), True
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
        if self.pool != "none":
            parts.append(f"pool={self.pool}")
        if self.norm is not None:
            parts.append("batchnorm")
        return ", ".join(parts)
