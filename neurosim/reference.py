"""The reference execution: a circuit run literally, synapse by synapse.

Nothing here uses autograd across synapses. The forward pass drives each population with its
synapses' literal products (``unfold`` + matrix products for convolutions); the feedback pass
walks the populations in reverse, sends each post error back through the rule's feedback
matrix, and forms every local update from the signals present at its synapse. Autograd is used
only *inside* a population (its pooling, batch norm and nonlinearity are population-local).

Feedback pathways are walked literally too: the output error ``e`` enters every pathway's
target as ``pathway.ref_feedback(e)`` (added to whatever error that population receives from
its consumers), and a synapse whose rule sends nothing back (no feedback matrix, as in direct
feedback alignment) adds nothing to its presynaptic population's error.

It is slow and obvious on purpose: it is the ground truth the compiled execution is tested
against, for every rule and synapse kind.
"""

from __future__ import annotations

import torch


def reference_backward(circuit, x: torch.Tensor, loss_fn) -> torch.Tensor:
    """Run one engaged step literally and write every local update into ``.grad``.

    ``loss_fn(output_activity) -> scalar``. Returns the loss (detached). Gradients are
    accumulated as ``loss.backward()`` would, so the same optimizer applies them.
    """
    drives, acts = {}, {circuit.input_name: x.detach()}
    for name in circuit.order()[1:]:
        drive = None
        for syn, pre in circuit.incoming(name):
            with torch.no_grad():
                d = acts[pre] if syn is None else syn.ref_forward(acts[pre])
            drive = d if drive is None else drive + d
        u = drive.detach().requires_grad_(True)
        with torch.enable_grad():
            acts[name] = circuit.populations[name](u)
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
        post_error = grads[0]
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


def _accumulate(params, grads) -> None:
    for p, g in zip(params, grads):
        if p is None or g is None or not p.requires_grad:
            continue
        p.grad = g.detach().clone() if p.grad is None else p.grad + g

