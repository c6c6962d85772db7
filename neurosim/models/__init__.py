"""Circuit builders (the MLP, the CIFAR and ImageNet ResNets), ``convert``, which turns a
PyTorch model into an equal circuit, and ``copy_weights``/``export_weights``, which move weights
between a circuit and a plain model of the same layout. Every model is declared with
``register_model`` (``registry.py``; the built-in ones in ``families.py``): its name, family,
presets and builder. The builders are loaded on first use: the model names alone (what a
configuration checks) need no PyTorch.

May import ``neurosim.common``, ``neurosim.rules`` and ``neurosim.core``.
"""

import importlib

from neurosim.models.families import DEPTHS as RESNETS
from neurosim.models.families import IMAGENET_RESNETS

_BUILDERS = {"build_mlp": "neurosim.models.mlp", "build_resnet": "neurosim.models.resnet",
             "copy_weights": "neurosim.models.convert", "export_weights": "neurosim.models.convert"}

__all__ = ["build_mlp", "build_resnet", "copy_weights", "export_weights", "RESNETS", "IMAGENET_RESNETS"]


def __getattr__(name: str):
    if name not in _BUILDERS:
        raise AttributeError(f"module 'neurosim.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_BUILDERS[name]), name)
