"""neurosim.convert: plain torch.nn models become circuits that compute the same function."""

import pytest
import torch
import torch.nn as nn
import torchvision

import neurosim
from neurosim.convert import ConversionError, convert, copy_weights
from neurosim.models.native import native_resnet
from neurosim.rules import Backprop


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def test_torchvision_resnet18_refused_at_its_maxpool():
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(ConversionError, match=r"'maxpool' \(MaxPool2d\).*max-pooling"):
        convert(model, Backprop(), example_input=torch.zeros(1, 3, 32, 32))


class _Cat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


def test_unsupported_models_refused():
    pool = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    with pytest.raises(ValueError, match=r"'1' \(MaxPool2d\)"):
        convert(pool, Backprop(), example_input=torch.zeros(1, 3, 8, 8))
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
