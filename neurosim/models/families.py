"""The ResNet families a configuration can name, without building anything (no PyTorch needed)."""

DEPTHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
IMAGENET_SUFFIX = "_imagenet"
IMAGENET_RESNETS = tuple(f"{depth}{IMAGENET_SUFFIX}" for depth in DEPTHS)
