"""Circuit builders."""

from neurosim.models.mlp import build_mlp
from neurosim.models.resnet import DEPTHS as RESNETS, IMAGENET_RESNETS, build_resnet

__all__ = ["build_mlp", "build_resnet", "RESNETS", "IMAGENET_RESNETS"]
