"""ImageNet ResNets as circuits: max-pooling populations, torchvision's layout, their presets.

A max-pooling population must give the same updates in the reference and the compiled
execution under every registered rule; the ImageNet ResNet circuits must compute what
torchvision's ``resnet18``/``resnet50`` compute, outputs and gradients, under backprop.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from neurosim.common.errors import UserError
from neurosim.core.circuit import Circuit
from neurosim.core.reference import reference_backward
from neurosim.models import IMAGENET_RESNETS, build_resnet, export_weights
from benchmarks.native import native_resnet
from neurosim.rules import RULES as REGISTRY
from neurosim.rules import Backprop
from neurosim.training.config import PRESETS, RULE_NAMES, preset

RULES = {name: cls.example for name, cls in REGISTRY.items()}


pytestmark = pytest.mark.usefixtures("one_thread")


def grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_updates(compiled, x, target, rule):
    """One engaged step, compiled and literal, on copies of one circuit: the same loss, the same
    gradients of every parameter and the same batch-norm statistics."""
    literal = copy.deepcopy(compiled)
    loss_fn = lambda out: F.cross_entropy(out, target)
    loss = loss_fn(compiled(x))
    loss.backward()
    ref_loss = reference_backward(literal, x, loss_fn)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    a, b = grads(compiled), grads(literal)
    assert a.keys() == b.keys() and a
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{rule}, {n}: {m}")
    for (n, t), (_, u) in zip(compiled.named_buffers(), literal.named_buffers()):
        torch.testing.assert_close(t, u, msg=lambda m, n=n: f"{rule}, {n}: {m}")


# -- max-pooling populations ---------------------------------------------------------------------

def max_pool_circuit(rule, seed, folded):
    """A stem as torchvision's (conv → batch norm → ReLU, then a 3×3/2 max-pool population fed by
    an identity pathway), a residual block on the pooled map, and a max-pool with a synapse into
    it and a norm and nonlinearity after it (``folded``), or a plain 2×2 one."""
    c = Circuit(rule=rule, seed=seed)
    c.input("x", (3, 11, 11))
    c.population("stem", (4, 6, 6), activation="relu", norm="batch")
    c.conv("x", "stem", 3, stride=2, padding=1)
    c.max_pool("stem", "stem_pool", 3, stride=2, padding=1)
    c.population("a", (4, 3, 3), activation="relu", norm="batch")
    c.conv("stem_pool", "a", 3, padding=1, bias=False)
    c.population("res", (4, 3, 3), activation="relu")
    c.identity("a", "res")
    c.identity("stem_pool", "res")
    if folded:  # pool(Σ drives) → batch norm → tanh, with a synapse and an identity summed first
        c.population("mp", (4, 2, 2), activation="tanh", norm="batch", pool="max", pool_kernel=2, pool_stride=1)
        c.conv("res", "mp", 1)
        c.identity("res", "mp")
    else:
        c.max_pool("res", "mp", 2)
    c.population("y", 5)
    c.dense("mp", "y")
    if getattr(rule, "direct_feedback", False):
        c.add_direct_feedback()
    return c.double()


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("folded", [False, True])
def test_max_pool_compiled_equals_reference(rule, folded):
    c = max_pool_circuit(RULES[rule](), 0 if folded else 1, folded)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 3, 11, 11, dtype=torch.float64, generator=g)
    assert_same_updates(c, x, torch.arange(6) % 5, rule)


def test_reference_routes_max_pool_error_to_the_winner():
    """Overlapping windows: a position that wins two windows receives both their errors."""
    c = Circuit(rule=Backprop())
    c.input("x", (1, 3, 3))
    c.population("h", (1, 3, 3))
    c.conv("x", "h", 1, bias=False)
    c.max_pool("h", "p", 2, stride=1)
    c.population("y", 1)
    c.dense("p", "y", bias=False)
    c.double()
    with torch.no_grad():
        c.synapses["x->h"].weight.fill_(1.0)
        c.synapses["p->y"].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    x = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    x[0, 0, 1, 1] = 1.0  # the centre wins all four windows
    x[0, 0, 0, 0] = 0.5
    reference_backward(c, x, lambda out: out.sum())
    # ΔW of the 1×1 synapse is Σ over positions of error × input: only the centre carries error
    # (1+2+3+4) and input 1; the corner, which won no window, none.
    torch.testing.assert_close(c.synapses["x->h"].weight.grad.flatten(), torch.tensor([10.0], dtype=torch.float64))


def test_max_pool_population_checks_its_window():
    c = Circuit(rule=Backprop())
    c.input("x", (2, 8, 8))
    with pytest.raises(ValueError, match="needs pool_kernel"):
        c.population("p", (2, 4, 4), pool="max")
    with pytest.raises(ValueError, match="pool_padding must be a whole number from 0 to half the kernel"):
        c.population("p", (2, 4, 4), pool="max", pool_kernel=2, pool_padding=2)
    with pytest.raises(ValueError, match=r"apply to pool='max' only"):
        c.population("p", (2, 8, 8), pool_kernel=2)
    with pytest.raises(ValueError, match=r"shape is \(C, H, W\)"):
        c.population("p", (2,), pool="max", pool_kernel=2)
    c.population("p", (2, 3, 3), pool="max", pool_kernel=2)
    with pytest.raises(ValueError, match=r"max-pools \(kernel 2, stride 2, padding 0\) a drive of shape "
                                         r"\(2, 8, 8\) to \(2, 4, 4\)"):
        c.identity("x", "p")
    pool = c.max_pool("x", "q", 3, 2, 1)
    assert pool.shape == (2, 4, 4) and "pool=max3x3/2 pad=1" in repr(c)


# -- ImageNet ResNets ----------------------------------------------------------------------------

@pytest.mark.parametrize("depth, synapses", [("resnet18", 21), ("resnet34", 37), ("resnet50", 54)])
def test_imagenet_resnets_have_torchvisions_parameters_and_names(depth, synapses):
    c = build_resnet(f"{depth}_imagenet", Backprop())
    tv = getattr(torchvision.models, depth)()
    assert sum(p.numel() for p in c.parameters()) == sum(p.numel() for p in tv.parameters())
    assert len(c.synapses) == synapses
    assert c.synapses["conv1"].kind.describe() == "conv7x7 3->64 stride=2 pad=3"
    assert c.populations["stem_pool"].shape == (64, 56, 56) and c.populations["logits"].shape == (1000,)
    # Every torchvision module with state has its circuit counterpart, and the reverse.
    mapping = c.converted_from
    assert {m for m, mod in tv.named_modules() if list(mod.parameters(recurse=False))} == set(mapping)
    assert {n.rsplit(".", 1)[0] for n in dict(c.named_parameters())} == {v for v in mapping.values()}
    native = native_resnet(f"{depth}_imagenet")
    assert native.state_dict().keys() == tv.state_dict().keys()


@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])
def test_imagenet_circuit_equals_torchvision_under_backprop(depth):
    """Full width, torchvision's own model, float64, train mode: same outputs, same gradients of
    every weight, same batch-norm statistics."""
    circuit = build_resnet(f"{depth}_imagenet", Backprop(), seed=3).double()
    tv = export_weights(circuit, getattr(torchvision.models, depth)().double())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=g)
    y = torch.tensor([7, 993])
    out_c, out_t = circuit(x), tv(x)
    torch.testing.assert_close(out_c, out_t, rtol=1e-10, atol=1e-12)
    F.cross_entropy(out_c, y).backward()
    F.cross_entropy(out_t, y).backward()
    mapping, theirs = circuit.converted_from, dict(circuit.named_parameters())
    for name, p in tv.named_parameters():
        module, leaf = name.rsplit(".", 1)
        torch.testing.assert_close(theirs[f"{mapping[module]}.{leaf}"].grad, p.grad, rtol=1e-9, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")
    buffers = dict(circuit.named_buffers())
    for name, b in tv.named_buffers():
        module, leaf = name.rsplit(".", 1)
        assert torch.equal(buffers[f"{mapping[module]}.{leaf}"], b), name
    circuit.eval()
    tv.eval()
    with torch.no_grad():
        torch.testing.assert_close(circuit(x), tv(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_reduced_imagenet_resnet_compiled_equals_reference(rule):
    c = build_resnet("resnet18_imagenet", RULES[rule](), num_classes=6, in_shape=(3, 32, 32), width=0.0625,
                     seed=2).double()
    assert "stem_pool" not in {p.target for p in c.feedback_pathways.values()}
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert_same_updates(c, x, torch.arange(4), rule)


# -- presets -------------------------------------------------------------------------------------

def test_every_rule_has_imagenet_presets_with_the_imagenet_recipe():
    for rule in RULE_NAMES:
        for model in IMAGENET_RESNETS:
            cfg = preset(f"{rule}_{model}")
            assert (cfg.rule, cfg.model, cfg.data, cfg.stream, cfg.image_size) == (rule, model, "imagenet", "auto", 224)
            assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_batch, cfg.momentum) == (90, 256, 0.1, 256, 0.9)
            assert (cfg.weight_decay, cfg.milestones, cfg.lr_gamma) == (1e-4, (30, 60, 80), 0.1)
            assert cfg.init == "kaiming_normal" and cfg.crop_padding == 0 and not cfg.flip
            cfg.make_rule()


def test_imagenet_presets_take_each_rules_resnet_settings():
    cifar, imagenet = preset("wm_resnet18"), preset("wm_resnet18_imagenet")
    assert imagenet.rule_params == cifar.rule_params and imagenet.wm_sleep_every == 4


def test_imagenet_presets_are_resnets_to_the_override_checks():
    assert preset("kp_resnet50_imagenet", width=0.25).width == 0.25
    with pytest.raises(UserError, match="--hidden applies to MLPs only"):
        preset("kp_resnet50_imagenet", hidden=(64,))
    with pytest.raises(UserError, match="use the preset bp_resnet18_imagenet instead"):
        preset("kp_resnet18_imagenet", rule="bp")
    with pytest.raises(UserError, match="use the preset kp_resnet18 instead"):
        preset("kp_resnet18_imagenet", model="resnet18")
    assert {f"bp_{m}" for m in IMAGENET_RESNETS} <= set(PRESETS)
