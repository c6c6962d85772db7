"""The reference execution: a circuit run literally, synapse by synapse.

Nothing here uses autograd across synapses. The forward pass drives each population with its
synapses' literal products (``unfold`` + matrix products for convolutions); the feedback pass
walks the populations in reverse, sends each post error back through the rule's feedback
matrix, and forms every local update from the signals present at its synapse. Pooling is
walked by hand too: a global average hands each position its share of the channel's error, a
max-pooling neuron hands its whole error to the position that won its window (overlapping
windows add up). Autograd is used only *inside* a population, for its batch norm and
nonlinearity (population-local).

Feedback pathways are walked literally too: the output error ``e`` enters every pathway's
target as ``pathway.ref_feedback(e)`` (added to whatever error that population receives from
its consumers), and a synapse whose rule sends nothing back (no feedback matrix, as in direct
feedback alignment) adds nothing to its presynaptic population's error.

It is slow and obvious on purpose: it is the ground truth the compiled execution is tested
against, for every rule and synapse kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_backward(circuit, x: torch.Tensor, loss_fn) -> torch.Tensor:
    """Run one engaged step literally and write every local update into ``.grad``.

    ``loss_fn(output_activity) -> scalar``. Returns the loss (detached). Gradients are
    accumulated as ``loss.backward()`` would, so the same optimizer applies them.
    """
    drives, acts, winners = {}, {circuit.input_name: x.detach()}, {}
    for name in circuit.order()[1:]:
        pop = circuit.populations[name]
        drive = None
        for syn, pre in circuit.incoming(name):
            with torch.no_grad():
                d = acts[pre] if syn is None else syn.ref_forward(acts[pre])
            drive = d if drive is None else drive + d
        with torch.no_grad():
            pooled, winners[name] = _pool(pop, drive)
        u = pooled.detach().requires_grad_(True)
        with torch.enable_grad():
            acts[name] = pop.respond(u)
        drives[name] = u

    out = circuit.output_name
    with torch.enable_grad():
        a = acts[out].detach().requires_grad_(True)
        loss = loss_fn(a)
        errors = {out: torch.autograd.grad(loss, a)[0]}
    if circuit.pathways_enabled:
        e = errors[out]
        for pathway in circuit.feedback_pathways.values():
            with torch.no_grad():
                sent = pathway.ref_feedback(e)
            errors[pathway.target] = sent if pathway.target not in errors else errors[pathway.target] + sent

    for name in reversed(circuit.order()[1:]):
        if name not in errors:
            continue  # no pathway from here reaches the loss
        pop = circuit.populations[name]
        params = [p for p in pop.parameters() if p.requires_grad]
        grads = torch.autograd.grad(acts[name], [drives[name], *params], errors.pop(name))
        with torch.no_grad():
            post_error = _unpool(pop, grads[0], winners.pop(name))
        _accumulate(params, grads[1:])
        for syn, pre in circuit.incoming(name):
            with torch.no_grad():
                sends = syn is None or syn.feedback_matrix() is not None
                if pre != circuit.input_name and sends:
                    sent = post_error if syn is None else syn.ref_feedback(post_error, acts[pre].shape)
                    errors[pre] = sent if pre not in errors else errors[pre] + sent
                if syn is not None:
                    gw, gb, gfb = syn.ref_updates(acts[pre].detach(), post_error)
                    _accumulate([syn.weight, syn.bias, syn.feedback], [gw, gb, gfb])
    return loss.detach()


def _pool(pop, drive: torch.Tensor):
    """A population's pooling of its summed drive, and what its backward needs: the drive's
    shape (global average), or the drive's shape and each neuron's winning position (max)."""
    if pop.pool == "global_avg":
        return drive.mean((2, 3)), drive.shape
    if pop.pool == "max":
        pooled, where = F.max_pool2d_with_indices(drive, pop.pool_kernel, pop.pool_stride, pop.pool_padding)
        return pooled, (drive.shape, where)
    return drive, None


def _unpool(pop, error: torch.Tensor, winners) -> torch.Tensor:
    """The error at a pooled population's neurons, sent back to the positions of its drive."""
    if pop.pool == "global_avg":
        n, c, h, w = winners
        return (error / (h * w)).view(n, c, 1, 1).expand(n, c, h, w)
    if pop.pool == "max":
        shape, where = winners  # flat index into H×W of each window's largest drive
        out = error.new_zeros(shape).flatten(2)
        return out.scatter_add_(2, where.flatten(2), error.flatten(2)).view(shape)
    return error


def _accumulate(params, grads) -> None:
    for p, g in zip(params, grads):
        if p is None or g is None or not p.requires_grad:
            continue
        p.grad = g.detach().clone() if p.grad is None else p.grad + g

