"""Kolen-Pollack: forward and feedback synapses learn from the same local product and decay."""

from typing import ClassVar

import attrs

from neurosim.rules.base import PlasticityRule, random_feedback, register_rule


@register_rule
@attrs.frozen
class KolenPollack(PlasticityRule):
    """``ΔW = −η (δ_y xᵀ + λW)`` at the forward synapse, ``ΔB = −η (x δ_yᵀ + λB)`` at the feedback one.

    ``η`` is the optimizer's learning rate and ``λ`` is ``decay``: the rule hands the optimizer
    the gradients ``δ_y xᵀ + λW`` and ``x δ_yᵀ + λB``, so the decay is scaled by the learning rate
    like the product: written as ``−η δ_y xᵀ − λ′W`` with a decay ``λ′`` of its own, the rule has
    ``λ′ = ηλ``. With plain SGD those are the steps taken; momentum or Adam transform both
    gradients alike.

    Each synapse multiplies the two signals present at it: the forward synapse its input ``x``
    and its postsynaptic error ``δ_y``; the feedback synapse its input ``δ_y`` and the activity
    ``x`` of the neuron it returns to. Neither reads the other's weight; ``W`` and ``B`` start as
    independent draws. Because both see the same product and the same decay (and the optimizer
    treats them alike), with plain SGD ``W − Bᵀ`` shrinks by ``(1 − ηλ)`` every step and ``B``
    comes to mirror ``W``. An optimizer's own weight decay, applied to both, adds to ``decay``.

    On several processes only ``ΔW`` is all-reduced: ``ΔB`` is the same (averaged) product with
    ``B``'s own decay, so every process derives it as ``ΔW + λ(B − W)`` (``feedback_from_forward``).
    That is bookkeeping of the compiled execution, which forms the shared product once anyway,
    not a signal the feedback synapse reads; the reference execution forms ``ΔB`` literally.
    """

    name: ClassVar[str] = "kp"
    feedback_learns: ClassVar[str] = "engaged"
    feedback_follows_forward: ClassVar[bool] = True
    decay: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0), metadata={
        "help": "decay λ of W and B alike (added to --weight-decay's)"})
    presets: ClassVar[dict] = {
        "mlp_digits": {"kp_decay": 0.01},
        "mlp_original": {"lr": 0.3},  # the authors' rate; their KP ran with no decay
        # On ResNets the optimizer's weight decay acts on W and B alike and is KP's shared decay.
    }

    @classmethod
    def example(cls):
        return cls(decay=0.05)

    def init_feedback(self, w, init, generator):
        return random_feedback(w, init, generator)

    def feedback_matrix(self, w, feedback):
        return feedback

    @property
    def backward_reads_weight(self) -> bool:
        return self.decay != 0  # errors return through B; W is read only by its decay term

    def forward_update(self, s):
        return s.product() if self.decay == 0 else s.product() + self.decay * s.own

    # The feedback synapse obeys the same law, applied to its own signals and its own weight.
    feedback_update = forward_update

    def feedback_from_forward(self, gw, w, feedback):
        # Both updates are the one product plus their own decay, so ΔB − ΔW = λ(B − W). A copy
        # without decay: two parameters must not share one gradient tensor.
        return gw.clone() if self.decay == 0 else gw + self.decay * (feedback - w)
