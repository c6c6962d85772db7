"""Measures of alignment between forward and feedback pathways, computed on the device."""

import torch


def angle_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between two tensors seen as flat vectors (0-d tensor, no host sync).

    Computed in float64 so that nearly parallel matrices (angles of a few degrees and below)
    are resolved; a zero tensor has angle 90° to everything.
    """
    a = a.detach().flatten().double()
    b = b.detach().flatten().double()
    cos = (a @ b) / (a.norm() * b.norm()).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.rad2deg(torch.arccos(cos.clamp(-1.0, 1.0)))
