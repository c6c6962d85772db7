"""What every plasticity rule is written against: the signals present at one synapse."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import attrs

from neurosim.rules.registry import RULES, register_rule  # noqa: F401  (rule files import them from here)

if TYPE_CHECKING:  # rule modules load torch only where they compute (see neurosim.rules)
    import torch


@attrs.define
class LocalSignals:
    """The signals at one synapse, as the matrix being updated sees them.

    ``pre`` is the presynaptic activity (or sleep noise), ``post`` the postsynaptic error (or the
    response the noise drives), ``own`` the weight being updated (``W`` for the forward synapse,
    the feedback weight for the feedback synapse) — nothing else. A feedback update therefore
    cannot read ``W``: it is not among its signals.

    ``product()`` is the Hebbian correlation ``Σ post ⊗ pre`` in the layout of ``W``. In the
    compiled execution it arrives already formed (by the same backward call that forms the
    feedback drive) and is shared by every update that needs it; in the reference execution it
    is recomputed literally on every call, so each update is visibly built from its own signals.
    """

    kind: object
    pre: torch.Tensor
    post: torch.Tensor
    own: torch.Tensor | None
    formed: torch.Tensor | None = None

    def product(self) -> torch.Tensor:
        if self.formed is not None:
            return self.formed
        return self.kind.ref_product(self.post, self.pre)


@attrs.frozen
class PlasticityRule:
    """Base of the rules: which matrix carries feedback, and the local updates of W and B.

    Updates are returned as gradients in the optimizer's convention (``p ← p − lr·grad``), so any
    ``torch.optim`` optimizer applies them. ``transports`` says what the feedback path reads from
    the forward weights: ``"weights"`` (not biologically plausible), ``"signs"``, or ``"nothing"``.
    """

    name: ClassVar[str] = "rule"
    transports: ClassVar[str] = "nothing"
    # When the feedback weight learns: None (never, or has none), "engaged" or "sleep".
    feedback_learns: ClassVar[str | None] = None
    # Whether the engaged feedback update follows from the forward update (``feedback_from_forward``).
    feedback_follows_forward: ClassVar[bool] = False
    # Settings of this rule's presets, per model family ("mlp_digits", "mlp_original", "resnet"),
    # written as command-line fields: the rule's own as "<name>_<field>", others as they are.
    presets: ClassVar[dict] = {}
    # Whether the compiled backward reads ``W`` (to send errors through it or its signs, or to
    # decay it). A rule that does not lets the synapse keep no copy of ``W`` for the backward:
    # under autocast that copy is a low-precision tensor as large as the weight.
    backward_reads_weight: ClassVar[bool] = True
    # Whether the rule's engaged updates are exactly autograd's gradients of the forward pass
    # (errors back through ``W`` itself, ``ΔW = δ_y ⊗ x``, no feedback weight): backprop. The
    # compiled execution then runs the synapse under native autograd; the reference one is
    # unchanged, and the tests compare the two as for every rule.
    native_backward: ClassVar[bool] = False

    @classmethod
    def example(cls) -> "PlasticityRule":
        """An instance for the rule-generic tests (non-default settings where defaults hide terms)."""
        return cls()

    def init_feedback(self, w: torch.Tensor, init, generator: torch.Generator) -> torch.Tensor | None:
        """The synapse's feedback state at construction (None when the rule keeps none)."""
        return None

    def weight_replaced(self, w: torch.Tensor, feedback: torch.Tensor | None) -> None:
        """The synapse's ``W`` was overwritten with ``w`` (``neurosim.models.convert.copy_weights`` copies a
        model's trained weights in). A rule whose feedback state was derived from the initial
        ``W`` derives it again from ``w``, in place; by default nothing changes (a feedback weight
        drawn independently of ``W`` stays as drawn)."""

    def feedback_matrix(self, w: torch.Tensor, feedback: torch.Tensor | None) -> torch.Tensor:
        """The matrix (in ``W``'s layout) through which post errors reach presynaptic neurons.

        Every rule names its own; the base class has none to offer."""
        raise TypeError(f"{type(self).__name__} does not say which matrix carries feedback")

    def forward_update(self, s: LocalSignals) -> torch.Tensor:
        """Gradient for ``W`` from the forward synapse's local signals; default: ``δ_y ⊗ x``."""
        return s.product()

    def feedback_update(self, s: LocalSignals) -> torch.Tensor | None:
        """Gradient for the feedback weight in an engaged step (None: it does not learn then)."""
        return None

    def feedback_from_forward(self, gw: torch.Tensor, w: torch.Tensor, feedback: torch.Tensor) -> torch.Tensor | None:
        """The engaged feedback update, given ``gw``, the forward update of the same synapse from
        the same signals, and the weights ``w`` and ``feedback`` as they are now; None where it
        does not follow from ``gw`` (then ``feedback_follows_forward`` is False).

        For runs on several processes: ``gw`` arrives averaged over the processes, and what this
        derives from it on every process is the average of their feedback updates, so the
        all-reduce carries ``ΔW`` alone (``neurosim.training.distributed.wrap``). It must equal
        ``feedback_update`` on the feedback synapse's own signals, as the rule-generic test checks."""
        return None

    def sleep_update(self, s: LocalSignals) -> torch.Tensor | None:
        """Gradient for the feedback weight in a sleep step (None: the rule does not sleep)."""
        return None

    @property
    def sleeps(self) -> bool:
        return self.feedback_learns == "sleep"

    def describe(self) -> str:
        fields = ", ".join(f"{a.name}={getattr(self, a.name)!r}" for a in attrs.fields(type(self)))
        return f"{type(self).__name__}({fields})"


def random_feedback(w: torch.Tensor, init, generator: torch.Generator) -> torch.Tensor:
    """A feedback weight drawn independently of ``W`` from the same distribution."""
    import torch

    b = torch.empty_like(w)
    init(b, generator)
    return b
