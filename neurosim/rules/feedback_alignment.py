"""Feedback alignment (Lillicrap et al. 2016): a fixed random feedback matrix."""

from typing import ClassVar

import attrs

from neurosim.rules.base import PlasticityRule, random_feedback, register_rule


@register_rule
@attrs.frozen
class FeedbackAlignment(PlasticityRule):
    """Errors return through a random ``B`` drawn at construction (seeded) that never changes."""

    name: ClassVar[str] = "fa"
    backward_reads_weight: ClassVar[bool] = False
    presets: ClassVar[dict] = {"mlp_original": {"lr": 0.2}}  # the weight-mirror authors' rate

    def init_feedback(self, w, init, generator):
        return random_feedback(w, init, generator)

    def feedback_matrix(self, w, feedback):
        return feedback
