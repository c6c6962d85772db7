"""The datasets that come with neurosim, declared by name: digits, cifar10, cifar100, synthetic
and the ImageNet folder.

Each loader imports what it needs (PyTorch, scikit-learn, the CIFAR reader) when it runs, so the
declarations themselves cost nothing to import.
"""

from __future__ import annotations

from pathlib import Path

from neurosim.common.errors import DataError
from neurosim.data.registry import Request, Splits, register_dataset


@register_dataset("digits", about="scikit-learn's 8×8 handwritten digits (1,797 images, 10 classes)",
                  image_shape=(1, 8, 8), classes=10, train_images=1437, test_images=360)
def digits(request: Request) -> Splits:
    """1 channel, scaled from 0..16 to 0..255, with a stratified 20 % test split drawn with the seed."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    loaded = load_digits()
    images = np.rint(loaded.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = loaded.target.astype(np.int64)
    tr_x, te_x, tr_y, te_y = train_test_split(
        images, labels, test_size=0.2, stratify=labels, random_state=request.seed
    )
    classes = tuple(str(c) for c in loaded.target_names)
    return Splits(torch.from_numpy(tr_x), torch.from_numpy(tr_y),
                  torch.from_numpy(te_x), torch.from_numpy(te_y), classes)


@register_dataset("cifar10", about="CIFAR-10: 32×32 colour images in 10 classes, downloaded into --data-dir",
                  image_shape=(3, 32, 32), classes=10, train_images=50000, test_images=10000,
                  family="cifar", reads_data_dir=True)
def cifar10(request: Request) -> Splits:
    """The python-format files of the official archive in ``<data_dir>/cifar-10-batches-py/``."""
    from neurosim.data.cifar import load_cifar

    return Splits(*load_cifar("cifar10", request.data_dir, request.download))


@register_dataset("cifar100", about="CIFAR-100: 32×32 colour images in 100 classes, downloaded into --data-dir",
                  image_shape=(3, 32, 32), classes=100, train_images=50000, test_images=10000,
                  family="cifar", reads_data_dir=True)
def cifar100(request: Request) -> Splits:
    """The python-format files of the official archive in ``<data_dir>/cifar-100-python/``; the
    fine labels."""
    from neurosim.data.cifar import load_cifar

    return Splits(*load_cifar("cifar100", request.data_dir, request.download))


@register_dataset("synthetic", about="random 32×32 colour images in 10 classes, for tests and smoke runs",
                  image_shape=(3, 32, 32), classes=10)
def synthetic(request: Request, num_classes: int = 10) -> Splits:
    """``request.synthetic_size`` = (n_train, n_test) images, each class with its own colour and
    pattern under noise, drawn from the seed on the CPU (the same images on every device)."""
    import torch
    import torch.nn.functional as F

    size = request.synthetic_size
    n_train, n_test = (int(n) for n in size)
    if n_train < 1 or n_test < 0:
        raise DataError(f"synthetic_size must be (n_train >= 1, n_test >= 0), got {size}")
    g = torch.Generator().manual_seed(request.seed)
    colour = torch.rand(num_classes, 3, 1, 1, generator=g) * 128 + 64
    coarse = torch.randn(num_classes, 3, 4, 4, generator=g)
    pattern = F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False) * 32

    def draw(n):
        y = torch.randperm(n, generator=g) % num_classes
        x = colour[y] + pattern[y] + torch.randn(n, 3, 32, 32, generator=g) * 48
        return x.round_().clamp_(0, 255).to(torch.uint8), y.to(torch.int64)

    classes = tuple(f"class{i}" for i in range(num_classes))
    return Splits(*draw(n_train), *draw(n_test), classes)


@register_dataset("imagenet", about="ImageNet (ILSVRC-2012): its train/ and val/ class folders in "
                                    "<data-dir>/imagenet, read from disk as a run trains", folder=True)
def imagenet(data_dir: Path) -> Path:
    """``<data_dir>/imagenet``, which must hold ImageNet's train/ and val/ class folders."""
    root = data_dir / "imagenet"
    if not root.is_dir():
        raise DataError(
            f"ImageNet is not at {root}, and it cannot be downloaded (image-net.org asks for a "
            "registration). Put its train/ and val/ class folders there (val/ sorted into class "
            "folders, as torchvision's ImageFolder reads it), give --data-dir the folder above, "
            "or pass the folder itself as --data /path/to/imagenet")
    return root
