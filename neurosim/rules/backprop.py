"""Backpropagation: the reference rule, whose feedback path reads the forward weights."""

from typing import ClassVar

import attrs

from neurosim.rules.base import PlasticityRule, register_rule


@register_rule
@attrs.frozen
class Backprop(PlasticityRule):
    """Errors return through ``W`` itself (weight transport); ``ΔW = −η δ_y xᵀ``."""

    name: ClassVar[str] = "bp"
    transports: ClassVar[str] = "weights"
    native_backward: ClassVar[bool] = True
    presets: ClassVar[dict] = {"mlp_original": {"lr": 0.2}}  # the weight-mirror authors' rate

    def feedback_matrix(self, w, feedback):
        return w
