"""neurosim.models.convert: plain torch.nn models become circuits that compute the same function."""

import pytest
import torch
import torch.nn as nn
import torchvision

import neurosim
from neurosim.models import build_resnet, export_weights
from neurosim.models.convert import ConversionError, convert, copy_weights
from benchmarks.native import native_resnet
from neurosim.rules import Backprop, FeedbackAlignment, UniformSignConcordant

pytestmark = pytest.mark.usefixtures("one_thread")


def _same(model, circuit, x, target, train):
    model.train(train)
    circuit.train(train)
    mapping = circuit.converted_from
    out_m, out_c = model(x), circuit(x)
    torch.testing.assert_close(out_c, out_m, rtol=1e-8, atol=1e-10)
    if not train:
        return
    nn.functional.cross_entropy(out_m, target).backward()
    nn.functional.cross_entropy(out_c, target).backward()
    params = dict(circuit.named_parameters())
    modules = dict(model.named_modules())
    for path, prefix in mapping.items():
        for key, p in modules[path].named_parameters():
            torch.testing.assert_close(params[f"{prefix}.{key}"].grad, p.grad, rtol=1e-8, atol=1e-10)
        for key, b in modules[path].named_buffers():
            torch.testing.assert_close(dict(circuit.named_buffers())[f"{prefix}.{key}"], b, rtol=1e-8, atol=1e-10)


def test_native_resnet18_converts_and_matches_under_backprop():
    model = native_resnet("resnet18", 10, (3, 16, 16), width=0.25).double()
    circuit = convert(model, Backprop(), example_input=torch.zeros(1, 3, 16, 16, dtype=torch.float64),
                      copy_weights=True)
    assert len(circuit.synapses) == 21  # 20 convolutions and the classifier
    assert circuit.populations[circuit.output_name].shape == (10,)
    assert any(p.pool == "global_avg" for p in circuit.populations.values())
    assert "identity" in str(circuit)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64)
    target = torch.randint(0, 10, (4,), generator=g)
    _same(model, circuit, x, target, train=True)
    _same(model, circuit, x, target, train=False)


def test_mlp_converts_and_matches():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 3)).double()
    circuit = neurosim.convert(model, Backprop(), example_input=torch.zeros(2, 3, 4, dtype=torch.float64))
    circuit.double()
    copy_weights(model, circuit)
    assert [p.activation for p in circuit.populations.values()] == ["identity", "relu", "identity"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (5,), generator=g)
    _same(model, circuit, x, target, train=False)
    _same(model, circuit, x, target, train=True)


class _Functional(nn.Module):
    """Functional activations, torch.add residuals, a view flatten, BatchNorm1d after a linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        h = torch.nn.functional.relu(torch.add(self.bn(self.conv2(h)), h))
        h = torch.tanh(self.bn1(self.fc(h.view(h.size(0), -1))))
        return torch.sigmoid(self.out(h))


def test_functional_forms_convert():
    model = _Functional().double()
    circuit = convert(model, Backprop(), example_input=torch.zeros(2, 3, 8, 8, dtype=torch.float64),
                      copy_weights=True)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64)
    for train in (False, True):
        model.train(train)
        circuit.train(train)
        torch.testing.assert_close(circuit(x), model(x), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("depth, synapses", [("resnet18", 21), ("resnet50", 54)])
def test_torchvision_resnets_convert_and_match_under_backprop(depth, synapses):
    """torchvision's own model, max-pool and all: the same outputs, gradients and batch-norm
    statistics, in train and eval mode."""
    model = getattr(torchvision.models, depth)(num_classes=10).double()
    circuit = convert(model, Backprop(), example_input=torch.zeros(1, 3, 32, 32, dtype=torch.float64),
                      copy_weights=True)
    assert len(circuit.synapses) == synapses
    pool = circuit.populations["maxpool"]  # after the stem's ReLU: a population of its own
    assert (pool.pool, pool.pool_kernel, pool.pool_stride, pool.pool_padding) == ("max", 3, 2, 1)
    assert pool.shape == (64, 8, 8) and ("relu", "maxpool") in circuit.identities
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    target = torch.randint(0, 10, (4,), generator=g)
    _same(model, circuit, x, target, train=True)
    _same(model, circuit, x, target, train=False)


class _Pools(nn.Module):
    """Max-pools in every form: folded into a convolution's drive (batch norm and ReLU after it),
    functional with tuple arguments, and on a residual sum."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.pool(self.conv(x))))
        h = nn.functional.max_pool2d(h, (3, 3), stride=(2, 2), padding=1)
        h = torch.max_pool2d(self.conv2(h) + h, 2)
        return self.fc(h.flatten(1))


def test_max_pools_convert_and_fold():
    model = _Pools().double()
    circuit = convert(model, Backprop(), example_input=torch.zeros(2, 3, 16, 16, dtype=torch.float64),
                      copy_weights=True)
    pools = {n: (p.pool_kernel, p.pool_stride, p.pool_padding, p.norm is not None, p.activation)
             for n, p in circuit.populations.items() if p.pool == "max"}
    # conv → pool → bn → relu is one population; the others pool whatever reaches them.
    assert sorted(pools.values()) == [(2, 2, 0, False, "identity"), (2, 2, 0, True, "relu"),
                                      (3, 2, 1, False, "identity")]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, 16, 16, generator=g, dtype=torch.float64)
    target = torch.randint(0, 3, (5,), generator=g)
    _same(model, circuit, x, target, train=True)
    _same(model, circuit, x, target, train=False)


@pytest.mark.parametrize("pool, message", [
    (nn.MaxPool2d(2, dilation=2), r"'1' \(MaxPool2d\): dilation 2"),
    (nn.MaxPool2d(2, ceil_mode=True), r"'1' \(MaxPool2d\): ceil_mode=True"),
    (nn.MaxPool2d(2, return_indices=True), r"'1' \(MaxPool2d\): return_indices=True"),
    (nn.MaxPool2d((2, 3)), r"'1' \(MaxPool2d\): kernel \(2, 3\).*only square windows"),
])
def test_inexpressible_max_pools_refused(pool, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), pool)
    with pytest.raises(ConversionError, match=message):
        convert(model, Backprop(), example_input=torch.zeros(1, 3, 12, 12))


class _FunctionalDilatedPool(nn.Module):
    def forward(self, x):
        return nn.functional.max_pool2d(x, 2, dilation=2)


def test_functional_max_pool_refusal_names_the_node():
    with pytest.raises(ConversionError, match=r"node 'max_pool2d' \(function max_pool2d\): dilation 2"):
        convert(_FunctionalDilatedPool(), Backprop(), example_input=torch.zeros(1, 3, 12, 12))


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_unsupported_models_refused():
    avg = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    with pytest.raises(ValueError, match=r"'1' \(AvgPool2d\)"):
        convert(avg, Backprop(), example_input=torch.zeros(1, 3, 8, 8))
    with pytest.raises(neurosim.UserError, match=r"'cat'.*concatenation"):
        convert(_Cat(), Backprop(), example_input=torch.zeros(1, 4))
    drop = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    with pytest.raises(ConversionError, match=r"'1' \(Dropout\)"):
        convert(drop, Backprop(), example_input=torch.zeros(1, 4))
    dilated = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2))
    with pytest.raises(ConversionError, match="dilation"):
        convert(dilated, Backprop(), example_input=torch.zeros(1, 3, 8, 8))
    circular = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"))
    with pytest.raises(ConversionError, match="padding_mode"):
        convert(circular, Backprop(), example_input=torch.zeros(1, 3, 8, 8))


# -- copy_weights / export_weights and build_resnet circuits -------------------------------------

def test_export_weights_gives_a_trained_circuit_to_torchvision():
    """A resnet18_imagenet circuit, trained one step (weights and batch-norm statistics moved),
    exported into a fresh torchvision resnet18: the same outputs in eval mode."""
    circuit = build_resnet("resnet18_imagenet", FeedbackAlignment(), seed=1).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    drawn = circuit.synapses["layer3_0_conv2"].weight.detach().clone()
    opt = torch.optim.SGD(circuit.parameters(), lr=0.5)
    nn.functional.cross_entropy(circuit(x), torch.tensor([3, 500, 999])).backward()
    opt.step()
    assert not torch.equal(circuit.synapses["layer3_0_conv2"].weight, drawn)
    model = torchvision.models.resnet18().double()
    assert export_weights(circuit, model) is model
    assert neurosim.export_weights is export_weights
    circuit.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), circuit(x), rtol=1e-10, atol=1e-12)
    assert torch.equal(model.layer2[0].downsample[1].running_var,
                       circuit.populations["layer2_0_sc"].norm.running_var)


def test_export_weights_refuses_a_different_width_naming_the_tensor():
    circuit = build_resnet("resnet18_imagenet", Backprop(), width=0.5)
    model = torchvision.models.resnet18()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    with pytest.raises(ConversionError, match=r"model conv1\.weight \(64, 3, 7, 7\) does not match circuit "
                                              r"synapses\.conv1\.weight \(32, 3, 7, 7\)"):
        export_weights(circuit, model)
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())  # nothing copied


def test_copy_and_export_refuse_whatever_is_left_unpaired():
    circuit = build_resnet("resnet18_imagenet", Backprop(), num_classes=10, in_shape=(3, 32, 32))
    with pytest.raises(ConversionError, match=r"model layer1\.2\.conv1\.weight has no counterpart"):
        export_weights(circuit, torchvision.models.resnet34(num_classes=10))
    with pytest.raises(ConversionError, match=r"model has no module 'conv1' \(circuit synapses\.conv1\)"):
        copy_weights(nn.Sequential(nn.Linear(2, 2)), circuit)
    headless = torchvision.models.resnet18()
    headless.fc = nn.Identity()
    circuit.converted_from = {k: v for k, v in circuit.converted_from.items() if k != "fc"}
    with pytest.raises(ConversionError, match=r"circuit synapses\.fc\.weight has no counterpart in the model"):
        copy_weights(headless, circuit)
    del circuit.converted_from
    with pytest.raises(ConversionError, match="no module mapping"):
        export_weights(circuit, headless)


def test_copy_weights_from_torchvision_into_a_build_resnet_circuit():
    """torchvision's resnet18 into build_resnet's resnet18_imagenet: the same function, and the
    rule's derived feedback state (uSF's scale) measured again from the copied weights."""
    model = torchvision.models.resnet18(num_classes=10).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics other than the initial ones
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    circuit = build_resnet("resnet18_imagenet", UniformSignConcordant(), num_classes=10, in_shape=(3, 32, 32)).double()
    assert copy_weights(model, circuit) is circuit
    syn = circuit.synapses["layer4_1_conv2"]
    torch.testing.assert_close(syn.weight, model.layer4[1].conv2.weight, rtol=0, atol=0)
    torch.testing.assert_close(syn.feedback, syn.weight.detach().pow(2).mean().sqrt().expand_as(syn.feedback))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    _same(model, circuit, x, None, train=False)
