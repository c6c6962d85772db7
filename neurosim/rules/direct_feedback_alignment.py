"""Direct feedback alignment (Nøkland 2016): the output error reaches every hidden population
through a fixed random pathway of its own."""

from typing import ClassVar

import attrs

from neurosim.rules.base import PlasticityRule, register_rule


@register_rule
@attrs.frozen
class DirectFeedbackAlignment(PlasticityRule):
    """Synapses send no error back; ``ΔW = −η δ_y xᵀ`` from the error at their post's drive.

    A synapse under this rule keeps no feedback weight and delivers nothing to its presynaptic
    population (``feedback_matrix`` is ``None``). The error at its post population comes from
    elsewhere: the loss for the output population, and for a hidden population ``l`` a
    ``FeedbackPathway`` from the output, which delivers ``B_l e`` (``e`` the output error,
    ``B_l`` fixed random) to the population's activity; the population's own derivative
    (nonlinearity, batch norm) turns it into ``δ_y``, and the synapse forms its usual local
    product ``δ_y ⊗ x``.

    ``direct_feedback`` tells circuit builders (``build_mlp``, ``build_resnet``) to call
    ``Circuit.add_direct_feedback()``: a fixed random pathway from the output to the post
    population of every synapse except those into the output. Populations no synapse drives
    (a ResNet's residual sums and pooling) receive no direct error, and identity pathways carry
    the error of their post population, which under this rule is none.

    Spatial populations. Into a population of shape ``(C, H, W)`` the pathway sends one error
    per channel, ``(B_l e)_c`` with ``B_l`` of shape ``C × K``, the same at every position of
    the channel. Nøkland's own code gives every unit its own random weight (``B_l`` of
    ``C·H·W × K``), and so does BioTorch for dense layers; BioTorch's convolutions deliver the
    tiled output error through a random ``k×k`` kernel, which makes it vary with position near
    the borders and, at stride 2, with the parity of the position. ``neurosim.core.pathways`` says
    more.
    """

    name: ClassVar[str] = "dfa"
    transports: ClassVar[str] = "nothing"
    direct_feedback: ClassVar[bool] = True
    backward_reads_weight: ClassVar[bool] = False
    # On digits the first steps at lr 0.05 (the other rules' rate) spike the loss past the
    # divergence guard (--max-loss-ratio) and the run is stopped; lr 0.02 trains smoothly (the
    # README's digits table has the result and its command).
    presets: ClassVar[dict] = {"mlp_digits": {"lr": 0.02}}

    def feedback_matrix(self, w, feedback):
        return None  # nothing goes back to the presynaptic population
