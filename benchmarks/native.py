"""Plain PyTorch ResNets: the native baseline that compiled circuits are measured against.

It serves the benchmarks and the tests only, so it lives beside the benchmarks, outside the
library (``from native import native_resnet`` in a benchmark, ``from benchmarks.native import
native_resnet`` from the repository root).

``native_resnet(depth, ...)`` builds the *same* network as ``neurosim.models.build_resnet`` —
both walk one description of the layout, ``neurosim.models.resnet.resnet_spec`` — as an
ordinary ``nn.Module`` trained with ordinary autograd: the spec's stem (convolution, batch norm,
ReLU, and for the ``*_imagenet`` models torchvision's 3×3 stride-2 max-pool), its blocks (one
generic ``Block``: the spec's convolutions each with its batch norm and, but for the last, a
ReLU; a 1×1 convolution + batch norm ``downsample`` where the spec has a shortcut;
``out += identity`` before the last ReLU), global average pooling and the linear classifier.
With the same seed it draws the same initial weights as the circuit.

Module names are the spec's torchvision paths (an ImageNet model's ``state_dict`` has exactly the
keys of ``torchvision.models.resnet18()``'s): ``conv1``/``bn1`` (stem), ``maxpool``,
``layer2[0].conv1``, ``layer2[0].bn1``, ``layer2[0].downsample[0]`` (shortcut conv),
``layer2[0].downsample[1]`` (its batch norm), ``fc``. ``circuit.converted_from`` of a
``build_resnet`` circuit maps them to the circuit's state, so
``neurosim.models.export_weights(circuit, native)`` gives the native model a circuit's forward
weights, biases and batch-norm state: the two then compute the same function and (under
``Backprop``) the same gradients, the benchmark compares equal work, and the tests in
``tests/test_native_baseline.py`` and ``tests/test_imagenet_models.py`` check that it does.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from neurosim.models.resnet import BlockSpec, ConvSpec, resnet_spec

__all__ = ["NativeResNet", "Block", "native_resnet"]


def _conv(spec: ConvSpec) -> nn.Conv2d:
    return nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel, stride=spec.stride, padding=spec.padding,
                     bias=spec.bias)


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[1]


class Block(nn.Module):
    """A residual block of a ``BlockSpec``: torchvision's ``BasicBlock`` for two convolutions,
    its ``Bottleneck`` (v1.5) for three, with torchvision's attribute names."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.steps = tuple((_leaf(c.module), _leaf(c.norm), c.relu) for c in spec.convs)
        for c in spec.convs:
            setattr(self, _leaf(c.module), _conv(c))
            setattr(self, _leaf(c.norm), nn.BatchNorm2d(c.out_channels))
        self.relu = nn.ReLU(inplace=True)
        sc = spec.shortcut
        self.downsample = None if sc is None else nn.Sequential(_conv(sc), nn.BatchNorm2d(sc.out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = x
        for conv, bn, relu in self.steps:
            out = getattr(self, bn)(getattr(self, conv)(out))
            if relu:
                out = self.relu(out)
        out += identity
        return self.relu(out)


class NativeResNet(nn.Module):
    """A ResNet (CIFAR or ImageNet stem) as plain modules: the reference for speed and memory of circuits."""

    def __init__(self, depth: str, num_classes: int | None = None, in_shape=None, width: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        spec = resnet_spec(depth, num_classes, in_shape, width)
        self.spec = spec
        self.depth, self.width, self.in_shape = depth, width, spec.in_shape
        stem, p, fc = spec.stem, spec.max_pool, spec.fc
        self.names = (stem.module, stem.norm, None if p is None else p.module, fc.module)
        setattr(self, stem.module, _conv(stem))
        setattr(self, stem.norm, nn.BatchNorm2d(stem.out_channels))
        self.relu = nn.ReLU(inplace=True)
        if p is not None:
            setattr(self, p.module, nn.MaxPool2d(p.kernel, p.stride, p.padding))
        stages: dict[str, list[Block]] = {}
        for b in spec.blocks:
            stages.setdefault(b.stage, []).append(Block(b))
        self.stages = tuple(stages)
        for name, blocks in stages.items():
            setattr(self, name, nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        setattr(self, fc.module, nn.Linear(fc.in_features, fc.out_features, bias=fc.bias))
        self._init(generator or torch.Generator().manual_seed(0))

    @torch.no_grad()
    def _init(self, g: torch.Generator) -> None:
        # torchvision's ResNet init (kaiming normal, fan_out) for convolutions, unit batch norm,
        # PyTorch's default U(±1/√fan_in) for the classifier — the draws build_resnet makes, in
        # its order (the spec's).
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
        conv, bn, pool, fc = self.names
        x = self.relu(getattr(self, bn)(getattr(self, conv)(x)))
        if pool is not None:
            x = getattr(self, pool)(x)
        for stage in self.stages:
            x = getattr(self, stage)(x)
        return getattr(self, fc)(torch.flatten(self.avgpool(x), 1))

def native_resnet(depth: str, num_classes: int | None = None, in_shape=None, width: float = 1.0,
                  seed: int = 0) -> NativeResNet:
    """The plain-PyTorch twin of ``build_resnet(depth, rule, num_classes, in_shape, width, seed)``."""
    return NativeResNet(depth, num_classes, in_shape, width, torch.Generator().manual_seed(seed))
