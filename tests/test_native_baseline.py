"""The native ResNet baseline does exactly the work of a circuit under backprop.

The step-time benchmark (``benchmarks/step_time.py``) reports circuits' speed as a ratio to
``benchmarks/native.py``; that ratio means something only if the two compute the same
function and the same gradients. Checked here in float64, train mode (batch norm on batch
statistics), for a basic-block and a bottleneck ResNet.
"""

import pytest
import torch
import torch.nn.functional as F

from neurosim.models import build_resnet
from benchmarks.native import circuit_names, copy_from_circuit, native_resnet
from neurosim.rules import Backprop, FeedbackAlignment

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
    native = copy_from_circuit(native_resnet(depth, 7, (3, size, size), WIDTH, seed=seed + 1).double(), circuit)
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

    mapping = circuit_names(native)
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


def test_copy_covers_every_native_tensor_and_ignores_feedback():
    circuit = build_resnet("resnet50", FeedbackAlignment(), num_classes=5, in_shape=(3, 8, 8), width=WIDTH)
    native = copy_from_circuit(native_resnet("resnet50", 5, (3, 8, 8), WIDTH, seed=9), circuit)
    assert torch.equal(native.layer2[0].downsample[0].weight, circuit.synapses["layer2_0_shortcut"].weight)
    assert torch.equal(native.layer3[2].bn3.weight, circuit.populations["layer3_2_c"].norm.weight)
    assert torch.equal(native.fc.bias, circuit.synapses["fc"].bias)
    n_native = sum(p.numel() for p in native.parameters())
    n_forward = sum(p.numel() for n, p in circuit.named_parameters() if not n.endswith(".feedback"))
    assert n_native == n_forward


def test_copy_refuses_a_different_architecture():
    circuit = build_resnet("resnet18", Backprop(), num_classes=5, in_shape=(3, 8, 8), width=WIDTH)
    with pytest.raises(ValueError, match="shape mismatch"):
        copy_from_circuit(native_resnet("resnet18", 5, (3, 8, 8), 2 * WIDTH), circuit)
    with pytest.raises(ValueError):
        copy_from_circuit(native_resnet("resnet50", 5, (3, 8, 8), WIDTH), circuit)


@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])
def test_native_init_draws_what_build_resnet_draws(depth):
    """Built alone (no copy), the native model with a seed equals the backprop circuit with it."""
    circuit = build_resnet(depth, Backprop(), num_classes=5, in_shape=(3, 8, 8), width=WIDTH, seed=4)
    native = native_resnet(depth, 5, (3, 8, 8), WIDTH, seed=4)
    mapping, theirs = circuit_names(native), circuit.state_dict()
    for name, t in native.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        assert torch.equal(t, theirs[f"{mapping[module]}.{leaf}"]), name


def test_the_native_twin_lives_beside_the_benchmarks_not_in_the_library():
    """What only the benchmarks and the tests use is no part of the installed package."""
    import importlib.util

    import benchmarks.native

    assert importlib.util.find_spec("neurosim.models.native") is None
    assert benchmarks.native.native_resnet is native_resnet
