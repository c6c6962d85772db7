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
"""

from __future__ import annotations

from neurosim.core.circuit import Circuit
from neurosim.models.families import DEPTHS, IMAGENET_RESNETS, IMAGENET_SUFFIX
from neurosim.rules.base import PlasticityRule


def resnet_layout(model: str) -> tuple[str, tuple[int, ...], bool]:
    """``(block, blocks per stage, imagenet)`` of a ResNet model name (``resnet50_imagenet`` →
    ``("bottleneck", (3, 4, 6, 3), True)``); ``ValueError`` for a name that is none."""
    imagenet = model.endswith(IMAGENET_SUFFIX)
    depth = model[: -len(IMAGENET_SUFFIX)] if imagenet else model
    if depth not in DEPTHS:
        raise ValueError(f"unknown ResNet {model!r}; choose from {', '.join([*DEPTHS, *IMAGENET_RESNETS])}")
    return (*DEPTHS[depth], imagenet)


def build_resnet(depth: str, rule: PlasticityRule, num_classes: int | None = None, in_shape=None,
                 width: float = 1.0, seed: int = 0) -> Circuit:
    """A ResNet circuit; ``depth`` is ``resnet18``, ``resnet34`` or ``resnet50`` (CIFAR) or one of
    those with ``_imagenet`` (torchvision's ImageNet layout).

    Defaults: 100 classes on ``(3, 32, 32)`` images (CIFAR), 1000 classes on ``(3, 224, 224)``
    (ImageNet); the ImageNet stem takes any image of at least 2×2 (it is downsampled 4×).
    A rule with ``direct_feedback`` (DFA) also gets a feedback pathway from ``logits`` to the post
    population of every convolution (``Circuit.add_direct_feedback``); residual sums and the
    pooling populations receive no direct error."""
    block, counts, imagenet = resnet_layout(depth)
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}")
    if num_classes is None:
        num_classes = 1000 if imagenet else 100
    if in_shape is None:
        in_shape = (3, 224, 224) if imagenet else (3, 32, 32)
    expansion = 4 if block == "bottleneck" else 1
    ch = lambda n: max(1, round(n * width))
    c = Circuit(rule=rule, seed=seed)
    c.input("x", in_shape)
    channels, size = ch(64), tuple(in_shape[1:])
    if imagenet:
        size = tuple((s - 1) // 2 + 1 for s in size)  # 7×7, stride 2, padding 3
        c.population("stem", (channels, *size), activation="relu", norm="batch")
        c.conv("x", "stem", 7, stride=2, padding=3, bias=False, init="kaiming_normal", name="conv1")
        # torchvision pools after the ReLU; a population pools before its norm and nonlinearity,
        # so the max-pool is a population of its own.
        c.max_pool("stem", "stem_pool", 3, stride=2, padding=1)
        pre, size = "stem_pool", c.populations["stem_pool"].shape[1:]
    else:
        c.population("stem", (channels, *size), activation="relu", norm="batch")
        c.conv("x", "stem", 3, padding=1, bias=False, init="kaiming_normal", name="conv1")
        pre = "stem"
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), counts), start=1):
        for i in range(n):
            stride = 2 if stage > 1 and i == 0 else 1
            size = tuple((s - 1) // stride + 1 for s in size)
            prefix = f"layer{stage}_{i}"
            out = ch(planes) * expansion
            if block == "basic":
                _basic(c, prefix, pre, ch(planes), size, stride)
                last = f"{prefix}_b"
            else:
                _bottleneck(c, prefix, pre, ch(planes), out, size, stride)
                last = f"{prefix}_c"
            c.population(prefix, (out, *size), activation="relu")
            c.identity(last, prefix)
            if stride != 1 or channels != out:
                c.population(f"{prefix}_sc", (out, *size), norm="batch")
                c.conv(pre, f"{prefix}_sc", 1, stride=stride, bias=False, init="kaiming_normal",
                       name=f"{prefix}_shortcut")
                c.identity(f"{prefix}_sc", prefix)
            else:
                c.identity(pre, prefix)
            pre, channels = prefix, out
    c.population("pool", (channels,), pool="global_avg")
    c.identity(pre, "pool")
    c.population("logits", (num_classes,))
    c.dense("pool", "logits", name="fc")
    if rule.direct_feedback:
        c.add_direct_feedback()  # the output error straight to every synapse's post population
    return c


def _basic(c, prefix, pre, planes, size, stride):
    c.population(f"{prefix}_a", (planes, *size), activation="relu", norm="batch")
    c.conv(pre, f"{prefix}_a", 3, stride=stride, padding=1, bias=False, init="kaiming_normal", name=f"{prefix}_conv1")
    c.population(f"{prefix}_b", (planes, *size), norm="batch")
    c.conv(f"{prefix}_a", f"{prefix}_b", 3, padding=1, bias=False, init="kaiming_normal", name=f"{prefix}_conv2")


def _bottleneck(c, prefix, pre, planes, out, size, stride):
    in_size = c.populations[pre].shape[1:]
    c.population(f"{prefix}_a", (planes, *in_size), activation="relu", norm="batch")
    c.conv(pre, f"{prefix}_a", 1, bias=False, init="kaiming_normal", name=f"{prefix}_conv1")
    c.population(f"{prefix}_b", (planes, *size), activation="relu", norm="batch")
    c.conv(f"{prefix}_a", f"{prefix}_b", 3, stride=stride, padding=1, bias=False, init="kaiming_normal",
           name=f"{prefix}_conv2")
    c.population(f"{prefix}_c", (out, *size), norm="batch")
    c.conv(f"{prefix}_b", f"{prefix}_c", 1, bias=False, init="kaiming_normal", name=f"{prefix}_conv3")
