"""Evaluation: loss, top-1 and top-5 accuracy of a circuit over a stream of batches, summed on
the device with one host sync at the end (the totals add over processes)."""

from __future__ import annotations

import torch

from neurosim.common.errors import UserError
from neurosim.core.circuit import Circuit
from neurosim.data import BatchStream


def evaluate_stream(model, circuit: Circuit, stream: BatchStream, loss_fn, amp_dtype=None, progress=None) -> dict:
    """Loss, top-1 and top-5 accuracy (percent) of ``model`` over every batch of ``stream``, in
    eval mode; one host sync at the end. ``progress(done, total)`` is told the batches done."""
    return evaluation_result(evaluation_totals(model, circuit, stream, loss_fn, amp_dtype, progress))


@torch.no_grad()
def evaluation_totals(model, circuit: Circuit, stream: BatchStream, loss_fn, amp_dtype=None,
                      progress=None) -> torch.Tensor:
    """``[Σ loss, top-1 hits, top-5 hits, images]`` (float64, on the device) over ``stream`` in eval
    mode; ``progress(done, total)``, if given, is told the batches done as they are queued."""
    previous = circuit.mode
    circuit.set_mode("eval")
    device = stream.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    images = 0  # counted on the host: a count built on the device per batch is a copy, and a sync
    total = len(stream)
    if progress is not None:
        progress(0, total)
    for batch, (x, y) in enumerate(stream.epoch(0), start=1):
        with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
            out = model(x).float()
        top = out.topk(min(5, out.shape[1]), 1).indices
        sums += torch.stack([loss_fn(out, y).double() * y.shape[0], (top[:, 0] == y).sum().double(),
                             (top == y[:, None]).any(1).sum().double()])
        images += y.shape[0]
        if progress is not None:
            progress(batch, total)
    circuit.set_mode(previous)
    return torch.cat([sums, torch.full((1,), float(images), dtype=sums.dtype, device=device)])


def evaluation_result(totals: torch.Tensor) -> dict:
    loss, top1, top5, n = totals.tolist()
    if n == 0:
        raise UserError("the evaluation split is empty; hold out some images (e.g. --val-per-class 50)")
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "images": int(n)}


