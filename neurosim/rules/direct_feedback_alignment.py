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

    Spatial populations. By default (``per_unit=False``, neurosim's design) the pathway into a
    population of shape ``(C, H, W)`` sends one error per channel, ``(B_l e)_c`` with ``B_l`` of
    shape ``C × K``, the same at every position of the channel. With ``per_unit=True`` it sends
    every unit (channel × position) its own error, ``B_l`` of shape ``C·H·W × K`` with one row
    per unit (row ``(c·H + h)·W + w``) and ``B_l e`` reshaped to ``(C, H, W)``: the form of
    Nøkland's own code, which gives every unit its own random weight, and of BioTorch's dense
    layers. Dense populations, and spatial ones of one position, are the same either way.
    BioTorch's convolutions instead deliver the tiled output error through a random ``k×k``
    kernel, which makes it vary with position near the borders and, at stride 2, with the parity
    of the position. ``neurosim.core.pathways`` says more.

    Per unit holds ``H·W`` times the floats of per channel, and nothing refuses it (the memory
    estimate of ``neurosim run`` counts ``B_l`` with the circuit's buffers). ResNet-18 (width 1)
    on CIFAR-100: its 20 pathways reach 614,400 units, so ``B`` is 614,400 × 100 =
    61,440,000 floats (246 MB in float32, 5.5 times the circuit's 11.2 million parameters) per unit,
    against 4,800 × 100 = 480,000 floats (1.9 MB) per channel. Checkpoints keep ``B_l`` under the
    same name either way; one saved per channel loads only into a per-channel circuit.
    """

    name: ClassVar[str] = "dfa"
    transports: ClassVar[str] = "nothing"
    direct_feedback: ClassVar[bool] = True
    backward_reads_weight: ClassVar[bool] = False
    # On digits the first steps at lr 0.05 (the other rules' rate) spike the loss past the
    # divergence guard (--max-loss-ratio) and the run is stopped; lr 0.02 trains smoothly (the
    # README's digits table has the result and its command).
    presets: ClassVar[dict] = {"mlp_digits": {"lr": 0.02}}
    per_unit: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool), metadata={
        "help": "give every unit of a spatial population its own row of B (C·H·W × classes, as Nøkland's code) "
                "instead of one per channel"})

    @classmethod
    def example(cls):
        return cls(per_unit=True)  # per channel is per unit with tied rows; per unit shows each unit's row

    def feedback_matrix(self, w, feedback):
        return None  # nothing goes back to the presynaptic population
