"""ResNet circuits, CIFAR and ImageNet variants: every convolution and the classifier is a plastic synapse.

CIFAR variant (``resnet18``, ``resnet34``, ``resnet50``): a 3×3 stride-1 stem without max-pool,
four stages of widths 64-128-256-512 (times ``width``), global average pooling and a linear
classifier. ImageNet variant (``resnet18_imagenet``, …): torchvision's ``resnet18``/``34``/``50``
layout, a 7×7 stride-2 stem convolution → batch norm → ReLU (population ``stem``) and a 3×3
stride-2 max-pool (population ``stem_pool``, fed by an identity pathway), then the same four
stages (v1.5 bottleneck: the stride is on the 3×3 convolution). Batch norm lives in the
populations; residual merges are populations fed by identity pathways. Synapse names mirror
torchvision's module names (``conv1``, ``layer2_0_conv1``, ``layer2_0_shortcut`` for
``layer2.0.downsample.0``, ``fc``).

The layout is described once, as data: ``resnet_spec`` returns a ``ResNetSpec`` naming every
convolution (circuit synapse and post population, torchvision module paths of the convolution
and its batch norm, channels, kernel, stride, padding, ReLU or not), every block's shortcut and
the classifier. ``build_resnet`` walks it to make the circuit; the plain-PyTorch twin in
``benchmarks/native.py`` walks it to make ordinary modules; ``ResNetSpec.converted_from`` maps
torchvision's module paths to the circuit's state, so that ``copy_weights`` and
``export_weights`` (``neurosim.models.convert``) move weights between a circuit and a
torchvision-named model.
"""

from __future__ import annotations

import attrs

from neurosim.core.circuit import Circuit
from neurosim.models.families import DEPTHS, IMAGENET_RESNETS, IMAGENET_SUFFIX
from neurosim.rules.base import PlasticityRule

STAGE_PLANES = (64, 128, 256, 512)  # channels of each stage's 3×3 convolutions, before width
EXPANSION = {"basic": 1, "bottleneck": 4}  # a block's output channels per plane


def resnet_layout(model: str) -> tuple[str, tuple[int, ...], bool]:
    """``(block, blocks per stage, imagenet)`` of a ResNet model name (``resnet50_imagenet`` →
    ``("bottleneck", (3, 4, 6, 3), True)``); ``ValueError`` for a name that is none."""
    imagenet = model.endswith(IMAGENET_SUFFIX)
    depth = model[: -len(IMAGENET_SUFFIX)] if imagenet else model
    if depth not in DEPTHS:
        raise ValueError(f"unknown ResNet {model!r}; choose from {', '.join([*DEPTHS, *IMAGENET_RESNETS])}")
    return (*DEPTHS[depth], imagenet)


@attrs.frozen
class ConvSpec:
    """One convolution and the batch norm after it: the synapse ``synapse`` into the population
    ``post`` (which holds the batch norm, and a ReLU if ``relu``); ``module`` and ``norm`` are
    torchvision's paths of the ``nn.Conv2d`` and its ``nn.BatchNorm2d``. No bias: the batch norm
    has one."""

    synapse: str
    post: str
    module: str
    norm: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    relu: bool
    bias: bool = False

    def out_size(self, size) -> tuple[int, ...]:
        """The spatial size the convolution makes of ``size``."""
        return tuple((s + 2 * self.padding - self.kernel) // self.stride + 1 for s in size)


@attrs.frozen
class PoolSpec:
    """The stem's max-pool: the population ``population`` (torchvision's ``module``)."""

    population: str
    module: str
    kernel: int
    stride: int
    padding: int


@attrs.frozen
class BlockSpec:
    """A residual block: ``convs`` in order (the last without ReLU), summed with the block's input
    or, where the shape changes, its ``shortcut`` (a 1×1 convolution and batch norm, torchvision's
    ``downsample``) in the population ``name`` (a ReLU); torchvision's path is ``module``
    (``layer2.0``), in the stage ``stage`` (``layer2``)."""

    name: str
    module: str
    stage: str
    convs: tuple[ConvSpec, ...]
    shortcut: ConvSpec | None
    in_channels: int
    out_channels: int


@attrs.frozen
class LinearSpec:
    """The classifier: the synapse ``synapse`` (torchvision's ``module``) from the globally pooled
    population ``pre`` (torchvision's ``avgpool``) to the output population ``post``."""

    synapse: str
    pre: str
    post: str
    module: str
    in_features: int
    out_features: int
    bias: bool = True


@attrs.frozen
class ResNetSpec:
    """Everything ``build_resnet`` and the plain-PyTorch twin build, in construction order."""

    model: str
    block: str  # "basic" or "bottleneck"
    imagenet: bool
    in_shape: tuple[int, ...]
    num_classes: int
    width: float
    stem: ConvSpec
    max_pool: PoolSpec | None
    blocks: tuple[BlockSpec, ...]
    pool: str  # the globally average-pooled population
    fc: LinearSpec

    @property
    def convs(self) -> tuple[ConvSpec, ...]:
        """Every convolution, in the order the circuit draws their weights."""
        out = [self.stem]
        for b in self.blocks:
            out += [*b.convs, *([b.shortcut] if b.shortcut else [])]
        return tuple(out)

    @property
    def converted_from(self) -> dict[str, str]:
        """torchvision module path → circuit state prefix (``layer2.0.bn1`` →
        ``populations.layer2_0_a.norm``), for every module that holds state, in torchvision's order."""
        out = {}
        for conv in self.convs:
            out[conv.module] = f"synapses.{conv.synapse}"
            out[conv.norm] = f"populations.{conv.post}.norm"
        out[self.fc.module] = f"synapses.{self.fc.synapse}"
        return out


def resnet_spec(depth: str, num_classes: int | None = None, in_shape=None, width: float = 1.0) -> ResNetSpec:
    """The layout of ``build_resnet(depth, rule, num_classes, in_shape, width)``; the arguments and
    their defaults are ``build_resnet``'s."""
    block, counts, imagenet = resnet_layout(depth)
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if num_classes is None:
        num_classes = 1000 if imagenet else 100
    if in_shape is None:
        in_shape = (3, 224, 224) if imagenet else (3, 32, 32)
    expansion = EXPANSION[block]
    ch = lambda n: max(1, round(n * width))
    channels = ch(64)
    # torchvision pools after the ReLU; a population pools before its norm and nonlinearity, so
    # the ImageNet stem's max-pool is a population of its own.
    k, s, p = (7, 2, 3) if imagenet else (3, 1, 1)
    stem = ConvSpec("conv1", "stem", "conv1", "bn1", in_shape[0], channels, k, s, p, relu=True)
    max_pool = PoolSpec("stem_pool", "maxpool", 3, 2, 1) if imagenet else None
    blocks = []
    for stage, (planes, n) in enumerate(zip(STAGE_PLANES, counts), start=1):
        for i in range(n):
            stride = 2 if stage > 1 and i == 0 else 1
            name, path = f"layer{stage}_{i}", f"layer{stage}.{i}"
            convs = _block_convs(block, name, path, channels, ch(planes), ch(planes) * expansion, stride)
            out = convs[-1].out_channels
            shortcut = None
            if stride != 1 or channels != out:
                shortcut = ConvSpec(f"{name}_shortcut", f"{name}_sc", f"{path}.downsample.0", f"{path}.downsample.1",
                                    channels, out, 1, stride, 0, relu=False)
            blocks.append(BlockSpec(name, path, f"layer{stage}", convs, shortcut, channels, out))
            channels = out
    fc = LinearSpec("fc", "pool", "logits", "fc", channels, num_classes)
    return ResNetSpec(depth, block, imagenet, tuple(in_shape), num_classes, width, stem, max_pool, tuple(blocks),
                      "pool", fc)


def _block_convs(block: str, name: str, path: str, cin: int, planes: int, out: int, stride: int) -> tuple:
    """A block's convolutions: two 3×3 (basic) or 1×1 → 3×3 → 1×1 (bottleneck v1.5: the stride
    is on the 3×3), each but the last followed by a ReLU."""
    def conv(j, pop, cin, cout, kernel, stride, relu):
        return ConvSpec(f"{name}_conv{j}", f"{name}_{pop}", f"{path}.conv{j}", f"{path}.bn{j}", cin, cout,
                        kernel, stride, kernel // 2, relu)

    if block == "basic":
        return conv(1, "a", cin, planes, 3, stride, True), conv(2, "b", planes, planes, 3, 1, False)
    return (conv(1, "a", cin, planes, 1, 1, True), conv(2, "b", planes, planes, 3, stride, True),
            conv(3, "c", planes, out, 1, 1, False))


def build_resnet(depth: str, rule: PlasticityRule, num_classes: int | None = None, in_shape=None,
                 width: float = 1.0, seed: int = 0) -> Circuit:
    """A ResNet circuit; ``depth`` is ``resnet18``, ``resnet34`` or ``resnet50`` (CIFAR) or one of
    those with ``_imagenet`` (torchvision's ImageNet layout), built from ``resnet_spec``.

    Defaults: 100 classes on ``(3, 32, 32)`` images (CIFAR), 1000 classes on ``(3, 224, 224)``
    (ImageNet); the ImageNet stem takes any image of at least 2×2 (it is downsampled 4×).
    A rule with ``direct_feedback`` (DFA) also gets a feedback pathway from ``logits`` to the post
    population of every convolution (``Circuit.add_direct_feedback``); residual sums and the
    pooling populations receive no direct error. ``circuit.converted_from`` maps torchvision's
    module names to the circuit's state (``ResNetSpec.converted_from``)."""
    spec = resnet_spec(depth, num_classes, in_shape, width)
    c = Circuit(rule=rule, seed=seed)
    c.input("x", spec.in_shape)
    pre = _conv(c, "x", spec.stem)
    if spec.max_pool is not None:
        m = spec.max_pool
        c.max_pool(pre, m.population, m.kernel, stride=m.stride, padding=m.padding)
        pre = m.population
    for b in spec.blocks:
        last = pre
        for conv in b.convs:
            last = _conv(c, last, conv)
        c.population(b.name, (b.out_channels, *c.populations[last].shape[1:]), activation="relu")
        c.identity(last, b.name)
        if b.shortcut is not None:
            c.identity(_conv(c, pre, b.shortcut), b.name)
        else:
            c.identity(pre, b.name)
        pre = b.name
    c.population(spec.pool, (spec.fc.in_features,), pool="global_avg")
    c.identity(pre, spec.pool)
    c.population(spec.fc.post, (spec.fc.out_features,))
    c.dense(spec.fc.pre, spec.fc.post, bias=spec.fc.bias, name=spec.fc.synapse)
    if rule.direct_feedback:
        c.add_direct_feedback()  # the output error straight to every synapse's post population
    c.converted_from = spec.converted_from
    return c


def _conv(c: Circuit, pre: str, conv: ConvSpec) -> str:
    """The post population of ``conv`` (batch norm, ReLU if it has one) and the synapse into it."""
    size = conv.out_size(c.populations[pre].shape[1:])
    c.population(conv.post, (conv.out_channels, *size), activation="relu" if conv.relu else "identity",
                 norm="batch")
    c.conv(pre, conv.post, conv.kernel, stride=conv.stride, padding=conv.padding, bias=conv.bias,
           init="kaiming_normal", name=conv.synapse)
    return conv.post
