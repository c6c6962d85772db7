"""The native ResNet baseline does exactly the work of a circuit under backprop.

The step-time benchmark (``benchmarks/step_time.py``) reports circuits' speed as a ratio to
``benchmarks/native.py``; that ratio means something only if the two compute the same
function and the same gradients. Checked here in float64, train mode (batch norm on batch
statistics), for a basic-block and a bottleneck ResNet.
"""

import pytest
import torch
import torch.nn.functional as F

from neurosim.models import RESNETS, IMAGENET_RESNETS, build_resnet, export_weights
from neurosim.models.convert import ConversionError
from neurosim.models.resnet import resnet_spec
from benchmarks.native import native_resnet
from neurosim.rules import Backprop, FeedbackAlignment
from neurosim.rules.direct_feedback_alignment import DirectFeedbackAlignment

WIDTH = 0.0625


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 tensors: intra-op threads only add barrier waits (seconds per step when the
    cores are shared), so these tests run single-threaded and restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pair(depth, size, seed=0):
    circuit = build_resnet(depth, Backprop(), num_classes=7, in_shape=(3, size, size), width=WIDTH,
                           seed=seed).double()
    native = export_weights(circuit, native_resnet(depth, 7, (3, size, size), WIDTH, seed=seed + 1).double())
    return circuit, native


@pytest.mark.parametrize("depth,size", [("resnet18", 16), ("resnet50", 16), ("resnet18", 32)])
def test_native_equals_circuit_under_backprop(depth, size):
    circuit, native = _pair(depth, size)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, size, size, dtype=torch.float64, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)

    loss_c = F.cross_entropy(circuit(x), y)
    loss_n = F.cross_entropy(native(x), y)
    loss_c.backward()
    loss_n.backward()
    assert torch.allclose(loss_c, loss_n, rtol=1e-12, atol=1e-12)

    mapping = circuit.converted_from
    theirs = dict(circuit.named_parameters())
    checked = 0
    for name, p in native.named_parameters():
        module, leaf = name.rsplit(".", 1)
        q = theirs[f"{mapping[module]}.{leaf}"]
        assert p.grad is not None and q.grad is not None, name
        assert torch.allclose(p.grad, q.grad, rtol=1e-9, atol=1e-12), name
        checked += 1
    assert checked == len(theirs)  # backprop keeps no feedback weights: every parameter compared
    # Batch-norm running statistics moved identically too.
    buffers = dict(circuit.named_buffers())
    for name, b in native.named_buffers():
        module, leaf = name.rsplit(".", 1)
        assert torch.allclose(b.double(), buffers[f"{mapping[module]}.{leaf}"].double()), name


@pytest.mark.parametrize("rule", [FeedbackAlignment, DirectFeedbackAlignment])
def test_export_covers_every_native_tensor_and_ignores_feedback(rule):
    circuit = build_resnet("resnet50", rule(), num_classes=5, in_shape=(3, 8, 8), width=WIDTH)
    native = export_weights(circuit, native_resnet("resnet50", 5, (3, 8, 8), WIDTH, seed=9))
    assert torch.equal(native.layer2[0].downsample[0].weight, circuit.synapses["layer2_0_shortcut"].weight)
    assert torch.equal(native.layer3[2].bn3.weight, circuit.populations["layer3_2_c"].norm.weight)
    assert torch.equal(native.fc.bias, circuit.synapses["fc"].bias)
    n_native = sum(p.numel() for p in native.parameters())
    n_forward = sum(p.numel() for n, p in circuit.named_parameters() if not n.endswith(".feedback"))
    assert n_native == n_forward


def test_export_refuses_a_different_architecture_naming_the_tensor():
    circuit = build_resnet("resnet18", Backprop(), num_classes=5, in_shape=(3, 8, 8), width=WIDTH)
    wide = native_resnet("resnet18", 5, (3, 8, 8), 2 * WIDTH)
    before = {k: t.clone() for k, t in wide.state_dict().items()}
    with pytest.raises(ConversionError, match=r"model conv1\.weight \(8, 3, 3, 3\) does not match circuit "
                                              r"synapses\.conv1\.weight \(4, 3, 3, 3\)"):
        export_weights(circuit, wide)
    assert all(torch.equal(t, before[k]) for k, t in wide.state_dict().items())  # nothing copied
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight"):
        export_weights(circuit, native_resnet("resnet50", 5, (3, 8, 8), WIDTH))


@pytest.mark.parametrize("depth", [*RESNETS, *IMAGENET_RESNETS])
def test_native_init_draws_what_build_resnet_draws(depth):
    """Built alone (no copy), the native model with a seed equals the backprop circuit with it,
    tensor for tensor along the circuit's own map of module names, and nothing is left over."""
    circuit = build_resnet(depth, Backprop(), num_classes=5, in_shape=(3, 16, 16), width=WIDTH, seed=4)
    native = native_resnet(depth, 5, (3, 16, 16), WIDTH, seed=4)
    mapping, theirs = circuit.converted_from, circuit.state_dict()
    paired = set()
    for name, t in native.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        assert torch.equal(t, theirs[f"{mapping[module]}.{leaf}"]), name
        paired.add(f"{mapping[module]}.{leaf}")
    assert paired == set(theirs)


@pytest.mark.parametrize("depth", ["resnet34", "resnet50", "resnet50_imagenet"])
def test_the_spec_is_what_both_twins_build(depth):
    """Every convolution of ``resnet_spec`` is a synapse of the circuit and a module of the native
    model, with the spec's channels, kernel, stride and padding, its batch norm where the spec
    says and a ReLU exactly where the spec has one; the spec's map is the circuit's."""
    spec = resnet_spec(depth, 6, (3, 16, 16), 0.125)
    circuit = build_resnet(depth, Backprop(), 6, (3, 16, 16), 0.125)
    native = native_resnet(depth, 6, (3, 16, 16), 0.125)
    modules = dict(native.named_modules())
    assert circuit.converted_from == spec.converted_from
    assert {s for s in circuit.synapses} == {c.synapse for c in spec.convs} | {spec.fc.synapse}
    for c in spec.convs:
        syn, m = circuit.synapses[c.synapse], modules[c.module]
        assert syn.post == c.post and syn.bias is None and m.bias is None
        assert syn.kind.describe().startswith(f"conv{c.kernel}x{c.kernel} {c.in_channels}->{c.out_channels}")
        assert (m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding) == (
            c.in_channels, c.out_channels, (c.kernel,) * 2, (c.stride,) * 2, (c.padding,) * 2)
        assert circuit.populations[c.post].activation == ("relu" if c.relu else "identity")
        assert modules[c.norm].num_features == c.out_channels
    assert [b.shortcut is not None for b in spec.blocks] == [
        modules[b.module].downsample is not None for b in spec.blocks]
    assert (native.fc.in_features, native.fc.out_features) == (spec.fc.in_features, 6)
    assert (spec.max_pool is not None) == (("stem", "stem_pool") in circuit.identities)


def test_the_native_twin_lives_beside_the_benchmarks_not_in_the_library():
    """What only the benchmarks and the tests use is no part of the installed package."""
    import importlib.util

    import benchmarks.native

    assert importlib.util.find_spec("neurosim.models.native") is None
    assert benchmarks.native.native_resnet is native_resnet
