"""The probe: how far the errors a circuit delivers are from backprop's, on one fixed batch.

``probe_angles`` runs the batch forward and backward twice on the circuit as it is — once with
its rules, once as backprop (``Circuit.backprop_truth``: every rule swapped for ``Backprop``,
feedback pathways off) — with ``torch.autograd.grad``, so no ``.grad`` is touched, and restores
the batch-norm running statistics afterwards: probing does not change training. It holds no
state and reads no value on the host; its angles stay on the device.
"""

from __future__ import annotations

import math

import torch

from neurosim.core.analysis import angle_deg
from neurosim.core.sync_bn import local_statistics


def probe_batch(stream, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of a ``BatchStream``'s epoch 0: a fixed probe batch that is a pure
    function of the stream's seed, so a resumed run probes with the same one."""
    xs, ys, have = [], [], 0
    for x, y in stream.epoch(0):
        xs.append(x)
        ys.append(y)
        have += len(y)
        if have >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def probe_angles(circuit, x: torch.Tensor, y: torch.Tensor, loss_fn, synapses,
                 autocast_dtype: torch.dtype | None = None, stats: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Delta angles and update angles (degrees) of ``synapses`` on the batch ``(x, y)``.

    ``delta_angles[i]``: between the error the circuit delivers to synapse ``i``'s output (the
    gradient of ``loss_fn(circuit(x), y)`` with respect to it) and the error backprop delivers.
    ``grad_angles[i]``: between the rule's update ``ΔW`` and the true gradient of the loss with
    respect to ``W``. Both are float64 device vectors, one value per synapse, NaN where the
    synapse's output does not reach the loss. Both passes run under ``autocast_dtype`` autocast
    when one is given (the training precision, so the angles describe the errors training
    really delivers). ``stats``, if a list, receives the probe batch's loss and top-1 accuracy
    (percent) under the circuit's forward pass, as two device scalars.
    """
    synapses = list(synapses)
    buffers = [b for pop in circuit.populations.values() for b in pop.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        # Batch statistics of the probe batch alone: under torchrun the probe runs on rank 0 only,
        # and synchronised batch norm must not wait for ranks that are not probing.
        with local_statistics():
            err, dw, loss, out = _probe_pass(circuit, x, y, loss_fn, synapses, autocast_dtype)
            with circuit.backprop_truth():
                true_err, true_dw, _, _ = _probe_pass(circuit, x, y, loss_fn, synapses, autocast_dtype)
        if stats is not None:
            stats += [loss.detach().double(), (out.argmax(1) == y).double().mean() * 100]
    finally:
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)
    return _angles(err, true_err, x.device), _angles(dw, true_dw, x.device)


def _angles(a, b, device) -> torch.Tensor:
    # A synapse whose output does not reach the loss has no error: NaN, not an exception.
    # torch.full fills on the device: no host-to-device copy.
    return torch.stack([torch.full((), math.nan, dtype=torch.float64, device=device)
                        if u is None or v is None else angle_deg(u, v) for u, v in zip(a, b)])


def _probe_pass(circuit, x, y, loss_fn, synapses, autocast_dtype):
    """Errors at each synapse's output and its weight update, via autograd.grad; the loss and output."""
    outputs = [None] * len(synapses)

    def keep(i):
        def hook(module, inputs, output):
            outputs[i] = output
        return hook

    handles = [syn.register_forward_hook(keep(i)) for i, syn in enumerate(synapses)]
    try:
        with torch.enable_grad(), torch.autocast(x.device.type, autocast_dtype,
                                                 enabled=autocast_dtype is not None):
            out = circuit(x).float()
            loss = loss_fn(out, y)
            grads = torch.autograd.grad(loss, outputs + [syn.weight for syn in synapses],
                                        allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    s = len(synapses)
    return list(grads[:s]), list(grads[s:]), loss, out.detach()
