"""Batch norm over the global batch of several processes (``--sync-bn``), and the switch that
keeps a population's statistics to its own process (the monitor's probe, on rank 0 alone).

It belongs to the populations it normalises; it reads the process group straight from
``torch.distributed`` (set up by ``neurosim.training.distributed``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

_local_statistics = False


@contextlib.contextmanager
def local_statistics():
    """Within it, synchronised batch norm uses this rank's batch alone (the monitor's probe runs
    on rank 0 only and must not wait for the others)."""
    global _local_statistics
    previous, _local_statistics = _local_statistics, True
    try:
        yield
    finally:
        _local_statistics = previous


class _AllSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradient over ranks: each rank's statistics feed
    every rank's normalisation, so each rank's share of the error comes back from all of them."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over the global batch: per-channel statistics from every rank (one all-reduce
    per forward, one per backward), for 2-d (N, C) and 4-d (N, C, H, W) activity.

    Unlike ``torch.nn.SyncBatchNorm`` it runs on CPU process groups (gloo) too. Its parameters and
    buffers are batch norm's, so checkpoints load either way. Outside training, or alone, it is
    plain batch norm."""

    def _check_input_dim(self, x):
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2-d or 4-d input, got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Rank and size straight from torch.distributed, which TorchDynamo traces; ``world()``
        # builds a frozen attrs object, which it cannot (``--sync-bn true --compile true``).
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not (self.training and not _local_statistics and ranks > 1):
            return super().forward(x)
        rank = dist.get_rank()
        dims = [0, *range(2, x.dim())]
        view = (1, -1) + (1,) * (x.dim() - 2)
        # Statistics in float32 at least (bf16 activity under autocast), float64 kept as it is.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        c = x.shape[1]
        # Each rank's count, mean and sum of squared deviations (two passes: exact for any
        # offset), combined by Chan's rule: the variance comes as a sum of non-negative terms, so
        # a channel of nearly constant activity keeps its small variance accurately.
        count = xf.new_full((1,), x.numel() // c)
        local_mean = xf.mean(dims)
        m2 = (xf - local_mean.view(view)).square().sum(dims)
        rows = [xf.new_zeros(2 * c + 1)] * ranks
        rows[rank] = torch.cat([local_mean, m2, count])
        table = _AllSum.apply(torch.stack(rows))  # (ranks, 2C + 1): every rank's row
        counts = table[:, -1:]
        n = counts.sum()
        mean = (table[:, :c] * counts).sum(0) / n
        var = (table[:, c:2 * c].sum(0) + (counts * (table[:, :c] - mean).square()).sum(0)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        y = (xf - mean.view(view)) * torch.rsqrt(var + self.eps).view(view)
        if self.affine:
            y = y * self.weight.view(view) + self.bias.view(view)
        return y.to(x.dtype)


def sync_batch_norm(circuit: nn.Module) -> int:
    """Swap every population's batch norm for ``SyncBatchNorm`` (keeping its state); returns how many."""
    swapped = 0
    for pop in circuit.populations.values():
        bn = getattr(pop, "norm", None)
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and not isinstance(bn, SyncBatchNorm):
            # Made where and in the precision the old one was (a float64 circuit stays float64).
            like = next((t for t in bn.state_dict().values() if t.is_floating_point()), None)
            where = {} if like is None else {"device": like.device, "dtype": like.dtype}
            sync = SyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, **where)
            sync.load_state_dict(bn.state_dict())
            sync.train(bn.training)
            pop.norm = sync
            swapped += 1
    return swapped
