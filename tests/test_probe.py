"""probe_angles: a pure function of the circuit and a batch, called here without a Monitor."""

import torch
import torch.nn.functional as F

from neurosim.models import build_mlp, build_resnet
from neurosim.observe.probe import probe_angles
from neurosim.rules import Backprop, FeedbackAlignment, KolenPollack
from neurosim.rules.direct_feedback_alignment import DirectFeedbackAlignment


def data(n=32, shape=(8,), classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g), torch.randint(0, classes, (n,), generator=g)


def test_backprop_delivers_backprop_errors():
    c = build_mlp(Backprop(), 8, (16, 12), 4)
    x, y = data()
    delta, grad = probe_angles(c, x, y, F.cross_entropy, list(c.synapses.values()), None)
    assert delta.shape == grad.shape == (3,) and delta.dtype == grad.dtype == torch.float64
    assert delta.abs().max() < 1e-3 and grad.abs().max() < 1e-3


def test_feedback_alignment_and_dfa_do_not_and_the_output_synapse_always_does():
    x, y = data()
    for rule in (FeedbackAlignment(), DirectFeedbackAlignment()):
        c = build_mlp(rule, 8, (16, 12), 4)
        delta, grad = probe_angles(c, x, y, F.cross_entropy, list(c.synapses.values()), None)
        assert (delta[:-1] > 10).all() and (grad[:-1] > 10).all(), rule.name
        assert delta[-1] < 1e-3 and grad[-1] < 1e-3, rule.name  # its error comes from the loss


def test_a_subset_of_synapses_in_the_order_given():
    c = build_mlp(FeedbackAlignment(), 8, (16, 12), 4)
    x, y = data()
    every, _ = probe_angles(c, x, y, F.cross_entropy, list(c.synapses.values()), None)
    some, _ = probe_angles(c, x, y, F.cross_entropy, [c.synapses["h2->y"], c.synapses["x->h1"]], None)
    torch.testing.assert_close(some, every[[2, 0]])


def test_probing_changes_nothing_in_the_circuit():
    c = build_resnet("resnet18", KolenPollack(decay=0.01), 10, (3, 8, 8), width=0.0625)
    x, y = data(16, (3, 8, 8), 10)
    F.cross_entropy(c(x), y).backward()  # .grad populated, as between steps
    state = {k: v.clone() for k, v in c.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in c.named_parameters() if p.grad is not None}
    rules = {n: s.rule for n, s in c.synapses.items()}
    delta, grad = probe_angles(c, x, y, F.cross_entropy, list(c.synapses.values()), None)
    assert torch.isfinite(delta).all() and torch.isfinite(grad).all() and (delta[:-1] > 1).any()
    for k, v in c.state_dict().items():  # weights and batch-norm running statistics
        assert torch.equal(v, state[k]), k
    for n, p in c.named_parameters():
        assert (n in grads) == (p.grad is not None) and (p.grad is None or torch.equal(p.grad, grads[n])), n
    assert all(s.rule is rules[n] for n, s in c.synapses.items())
    assert c.mode == "engaged"
