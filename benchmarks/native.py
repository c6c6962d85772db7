"""Plain PyTorch ResNets: the native baseline that compiled circuits are measured against.

It serves the benchmarks and the tests only, so it lives beside the benchmarks, outside the
library (``from native import native_resnet`` in a benchmark, ``from benchmarks.native import
native_resnet`` from the repository root).

``native_resnet(depth, ...)`` builds the *same* network as ``neurosim.models.build_resnet`` —
CIFAR stem (3×3, stride 1, no max-pool) or, for the ``*_imagenet`` models, torchvision's
ImageNet stem (7×7 stride-2 convolution, batch norm, ReLU, 3×3 stride-2 max-pool);
torchvision-style ``BasicBlock``/``Bottleneck`` (stride on the 3×3 convolution, a 1×1
convolution + batch norm shortcut where shape changes, ``out += identity`` before the last
ReLU), global average pooling and a linear classifier — as an ordinary ``nn.Module`` trained
with ordinary autograd. ``copy_from_circuit`` gives it a circuit's forward weights, biases and
batch-norm state, so that the two compute the same function and (under ``Backprop``) the same
gradients: the benchmark then compares equal work, and the tests in
``tests/test_native_baseline.py`` and ``tests/test_imagenet_models.py`` check that it does.

Names follow torchvision (an ImageNet model's ``state_dict`` has exactly the keys of
``torchvision.models.resnet18()``'s): ``conv1``/``bn1`` (stem), ``maxpool``,
``layer2[0].conv1``, ``layer2[0].bn1``, ``layer2[0].downsample[0]`` (shortcut conv),
``layer2[0].downsample[1]`` (its batch norm), ``fc``. In the circuit these are the synapses
``conv1``, ``layer2_0_conv1``, ``layer2_0_shortcut``, ``fc`` and the populations ``stem``,
``layer2_0_a`` (``_b``, ``_c``), ``layer2_0_sc`` (the max-pool is the population ``stem_pool``,
which holds no state).
``circuit_names`` and ``copy_from_circuit`` read the module names only, so they serve a
``torchvision.models.resnet18()`` (``34``, ``50``) as well as a ``NativeResNet``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from neurosim.models.resnet import resnet_layout

__all__ = ["NativeResNet", "BasicBlock", "Bottleneck", "native_resnet", "copy_from_circuit", "circuit_names"]


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with batch norm, torchvision's ``BasicBlock`` (expansion 1)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv(cin, planes, 3, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1×1 → 3×3 (strided) → 1×1 convolutions with batch norm, torchvision's ``Bottleneck`` (v1.5)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = _conv(cin, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, out, 1)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(cin, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class NativeResNet(nn.Module):
    """A ResNet (CIFAR or ImageNet stem) as plain modules: the reference for speed and memory of circuits."""

    def __init__(self, depth: str, num_classes: int | None = None, in_shape=None, width: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        kind, counts, imagenet = resnet_layout(depth)
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        num_classes = num_classes or (1000 if imagenet else 100)  # build_resnet's defaults
        in_shape = in_shape or ((3, 224, 224) if imagenet else (3, 32, 32))
        block = BasicBlock if kind == "basic" else Bottleneck
        ch = lambda n: max(1, round(n * width))  # exactly as build_resnet rounds
        self.depth, self.width, self.in_shape = depth, width, tuple(in_shape)
        channels = ch(64)
        self.conv1 = _conv(in_shape[0], channels, 7, 2) if imagenet else _conv(in_shape[0], channels, 3)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet else None
        for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), counts), start=1):
            blocks = []
            for i in range(n):
                stride = 2 if stage > 1 and i == 0 else 1
                blocks.append(block(channels, ch(planes), stride))
                channels = ch(planes) * block.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels, num_classes)
        self._init(generator or torch.Generator().manual_seed(0))

    @torch.no_grad()
    def _init(self, g: torch.Generator) -> None:
        # torchvision's ResNet init (kaiming normal, fan_out) for convolutions, unit batch norm,
        # PyTorch's default U(±1/√fan_in) for the classifier — the draws build_resnet makes.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.weight.shape[0] * math.prod(m.weight.shape[2:])
                m.weight.normal_(0.0, math.sqrt(2 / fan_out), generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, nn.Linear):
                bound = 1 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.uniform_(-bound, bound, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def native_resnet(depth: str, num_classes: int | None = None, in_shape=None, width: float = 1.0,
                  seed: int = 0) -> NativeResNet:
    """The plain-PyTorch twin of ``build_resnet(depth, rule, num_classes, in_shape, width)``."""
    return NativeResNet(depth, num_classes, in_shape, width, torch.Generator().manual_seed(seed))


def circuit_names(native: nn.Module) -> dict[str, str]:
    """Map each native module holding state (``layer2.0.conv1``) to its circuit counterpart:
    a synapse (``synapses.layer2_0_conv1``) or a population's batch norm
    (``populations.layer2_0_a.norm``). ``native`` is a ``NativeResNet`` or a torchvision ResNet."""
    names = {"conv1": "synapses.conv1", "bn1": "populations.stem.norm", "fc": "synapses.fc"}
    for stage in range(1, 5):
        for i, blk in enumerate(getattr(native, f"layer{stage}")):
            p, prefix = f"layer{stage}.{i}", f"layer{stage}_{i}"
            convs = 3 if hasattr(blk, "conv3") else 2  # a bottleneck, ours or torchvision's
            for k, pop in zip(range(1, convs + 1), "abc"):
                names[f"{p}.conv{k}"] = f"synapses.{prefix}_conv{k}"
                names[f"{p}.bn{k}"] = f"populations.{prefix}_{pop}.norm"
            if blk.downsample is not None:
                names[f"{p}.downsample.0"] = f"synapses.{prefix}_shortcut"
                names[f"{p}.downsample.1"] = f"populations.{prefix}_sc.norm"
    return names


@torch.no_grad()
def copy_from_circuit(native: nn.Module, circuit: nn.Module) -> nn.Module:
    """Copy every forward weight, bias and batch-norm parameter and buffer of a ResNet circuit
    into ``native``, a ``NativeResNet`` or a torchvision ResNet (feedback weights have no native
    counterpart and are ignored).

    Raises ``ValueError`` if the two networks differ in any module or shape, so that a silent
    partial copy cannot make a benchmark compare unequal work. Returns ``native``.
    """
    theirs = dict(circuit.state_dict(keep_vars=True))
    mapping = circuit_names(native)
    modules = dict(native.named_modules())
    copied = set()
    for mine, other in mapping.items():
        for key, t in modules[mine].state_dict(keep_vars=True).items():
            src = f"{other}.{key}"
            if src not in theirs or theirs[src] is None:
                raise ValueError(f"circuit has no {src!r} for native {mine}.{key}; not the same architecture")
            if t.shape != theirs[src].shape:
                raise ValueError(f"shape mismatch: native {mine}.{key} {tuple(t.shape)} vs circuit {src} "
                                 f"{tuple(theirs[src].shape)}; build both with the same depth, width and classes")
            t.copy_(theirs[src])
            copied.add(f"{mine}.{key}")
    missing = set(native.state_dict()) - copied
    if missing:
        raise ValueError(f"native state not copied from the circuit: {sorted(missing)}")
    forward = {k for k in theirs if not k.endswith(".feedback") and theirs[k] is not None}
    unused = forward - {f"{mapping[k.rsplit('.', 1)[0]]}.{k.rsplit('.', 1)[1]}" for k in copied}
    if unused:
        raise ValueError(f"circuit state with no native counterpart: {sorted(unused)}")
    return native
