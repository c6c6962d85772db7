"""Backpropagation: the reference rule, whose feedback path reads the forward weights."""

from typing import ClassVar

import attrs

from neurosim.rules.base import PlasticityRule


@attrs.frozen
class Backprop(PlasticityRule):
    """Errors return through ``W`` itself (weight transport); ``ΔW = −η δ_y xᵀ``."""

    name: ClassVar[str] = "bp"
    transports: ClassVar[str] = "weights"

    def feedback_matrix(self, w, feedback):
        return w
