"""Sign symmetry (Liao et al. 2016; Xiao et al. 2018): feedback shares only the signs of W."""

from typing import ClassVar

import attrs
import torch

from neurosim.rules.base import PlasticityRule


@attrs.frozen
class SignSymmetry(PlasticityRule):
    """``B = sign(W)·scale``, formed from the current ``W`` whenever an error is sent back.

    ``scale`` is one constant per synapse fixed at construction: the root-mean-square of the
    initial ``W`` (so ``‖B‖ = ‖W₀‖``). Only signs travel from forward to feedback synapses, never
    magnitudes. The synapse's feedback state is that 0-d scale.
    """

    name: ClassVar[str] = "ss"
    transports: ClassVar[str] = "signs"

    def init_feedback(self, w, init, generator):
        return w.detach().pow(2).mean().sqrt()

    def feedback_matrix(self, w, feedback):
        return torch.sign(w).mul_(feedback)
