"""What the rules' docstrings and the README's rule table say is what the code does: the formulas
are checked numerically here, the descriptions of the references against their known behaviour,
and measured numbers stay in the docs next to their commands, not in the code."""

import inspect
import re
from pathlib import Path

import torch
import torch.nn.functional as F

import neurosim.core.pathways as pathways
import neurosim.rules.direct_feedback_alignment as dfa_module
import neurosim.rules.kolen_pollack as kp_module
import neurosim.rules.sign_concordant as sc_module
import neurosim.rules.weight_mirror as wm_module
from neurosim.core.pathways import FeedbackPathway
from neurosim.models import build_mlp
from neurosim.rules import KolenPollack, WeightMirror
from neurosim.rules.sign_concordant import UniformSignConcordant

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_kolen_pollack_decay_is_scaled_by_the_learning_rate_as_documented():
    eta, lam = 0.3, 0.1
    c = build_mlp(KolenPollack(decay=lam), 5, (4,), 3, seed=0)
    syn = next(iter(c.synapses.values()))
    w0, b0 = syn.weight.detach().clone(), syn.feedback.detach().clone()
    opt = torch.optim.SGD([p for p in c.parameters() if p.requires_grad], lr=eta)
    x, y = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)), torch.arange(7) % 3
    opt.zero_grad()
    F.cross_entropy(c(x), y).backward()
    product = syn.weight.grad - lam * w0  # δ_y xᵀ, the signal product both synapses share
    opt.step()
    # ΔW = −η (δ xᵀ + λW), ΔB = −η (x δᵀ + λB) — not −η δ xᵀ − λW
    torch.testing.assert_close(syn.weight.detach(), w0 - eta * (product + lam * w0))
    torch.testing.assert_close(syn.feedback.detach(), b0 - eta * (product + lam * b0))
    torch.testing.assert_close(syn.weight.detach() - syn.feedback.detach(), (1 - eta * lam) * (w0 - b0))
    doc = KolenPollack.__doc__
    assert "``ΔW = −η (δ_y xᵀ + λW)``" in doc and "``ΔB = −η (x δ_yᵀ + λB)``" in doc
    assert "`ΔB = −η(x δᵀ + λB)`" in README and "−η x δᵀ − λB" not in README
    assert "``ΔB = −η x δ_yᵀ − λB``" not in inspect.getsource(kp_module)


def test_weight_mirror_response_leaves_the_forward_bias_out_and_says_so():
    def sleep_update(bias_value):
        c = build_mlp(WeightMirror(response="sigmoid", sigma=0.05), 6, (), 3, seed=0)
        syn = next(iter(c.synapses.values()))
        with torch.no_grad():
            syn.bias.fill_(bias_value)
        return syn.sleep_update((6,), 32, torch.Generator().manual_seed(1))

    torch.testing.assert_close(sleep_update(0.0), sleep_update(3.0))  # the bias is not read in sleep
    rule = WeightMirror(response="sigmoid")
    torch.testing.assert_close(rule.respond(torch.tensor([0.0, 2.0])), torch.tensor([0.0, 2.0]).sigmoid() - 0.5)
    doc = " ".join(WeightMirror.__doc__.split())
    assert "``σ(Wξ + b)``" in doc and "the bias is left out" in doc


def test_usf_docstring_describes_biotorch_scaling_as_it_is():
    source = " ".join(inspect.getsource(sc_module).split())
    assert "without its scaling option" not in source and "it is always applied" not in source
    assert "no layer reads it" in source  # BioTorch's schema option that its layers ignore
    assert "used ``M`` itself" not in source  # not what Liao et al.'s abstract describes
    assert "weight_replaced" in UniformSignConcordant.__doc__


def test_direct_feedback_into_a_spatial_population_is_one_error_per_channel():
    """neurosim's design: every position of a channel receives the same error. BioTorch's
    convolutional DFA (a random k×k kernel applied by a transposed convolution to the tiled
    output error) does not give that at stride 2, as the docstrings now say."""
    g = torch.Generator().manual_seed(0)
    p = FeedbackPathway("y", "h", (4,), (3, 6, 6), generator=g)
    assert tuple(p.feedback.shape) == (3, 4)
    e = torch.randn(2, 4, generator=g)
    d = p(e)
    assert d.shape == (2, 3, 6, 6) and torch.equal(d, d[:, :, :1, :1].expand_as(d))
    torch.testing.assert_close(p.ref_feedback(e), d)

    kernel = torch.randn(4, 3, 3, 3, generator=g)  # BioTorch's (K, C_in, k, k) feedback kernel
    for stride, distinct in ((1, 1), (2, 4)):
        out = 8 // stride
        tiled = e[:1, :, None, None].expand(1, 4, out, out)
        delivered = torch.nn.grad.conv2d_input((1, 3, 8, 8), kernel, tiled, stride=stride, padding=1)
        interior = delivered[0, 0, 2:6, 2:6]
        assert torch.unique(interior.round(decimals=5)).numel() == distinct  # uniform only at stride 1

    for text in (pathways.__doc__, dfa_module.DirectFeedbackAlignment.__doc__):
        flat = " ".join(text.split())
        assert "uniform over space away from the borders" not in flat
        assert "every unit its own random weight" in flat and "stride 2" in flat


def test_no_measured_numbers_in_the_rules_code():
    """Timings and accuracies go stale: they live in the docs, with the commands that give them."""
    for module in (kp_module, sc_module, wm_module, dfa_module):
        source = inspect.getsource(module)
        assert not re.search(r"\d+\.\d+ ?%|\d+(\.\d+)?x native|trains (smoothly )?to \d", source), module.__name__

