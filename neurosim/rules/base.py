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

    A feedback update gets two more signals where its rule names them in ``feedback_reads``:
    ``drive``, the forward projection ``W·pre`` of the same input (without bias) — what the
    feedback synapse receives from the neurons it starts at, local to it — and ``weight``, ``W``
    itself: weight transport to the feedback synapse, which a rule that asks for it must say.
    ``literal`` is True in the reference execution (updates formed with the kinds' literal ops).
    """

    kind: object
    pre: torch.Tensor
    post: torch.Tensor
    own: torch.Tensor | None
    formed: torch.Tensor | None = None
    drive: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    literal: bool = False

    def product(self) -> torch.Tensor:
        if self.formed is not None:
            return self.formed
        return self.kind.ref_product(self.post, self.pre)


# The most any sleep count may be (2**31-1 = 2,147,483,647). A mirror batch costs at least tens
# of microseconds on any device (a kernel launch per sleeping synapse and an optimizer step),
# so that many mirror batches, or steps between sleeps, already take more than a day: a larger
# count is a typo or a unit mistake, and a sleep that long would look hung, not be a schedule.
# Noise images and co-activations per mirror batch are held on the device at once: 2**31 of
# them cannot be. The bound also keeps every count within a 32-bit index.
SLEEP_COUNT_MAX = 2**31 - 1


def _count(low: int, unit: str, per_batch: bool = False):
    """The validators of a sleep count: at least ``low``, and at most ``SLEEP_COUNT_MAX``, with a
    message that names the option (``--wm-sleep-before``) and why there is a bound. ``per_batch``:
    a count of what one mirror batch holds (images, co-activations)."""
    def at_most(inst, att, value):
        if value > SLEEP_COUNT_MAX:
            option = f"--{inst.name}-{att.name.replace('_', '-')}" if hasattr(inst, "name") else att.name
            why = ("more than any device's memory holds in one mirror batch" if per_batch else
                   "which at tens of microseconds each would already take more than a day")
            raise ValueError(f"{option} {value:,} is beyond any run: at most {SLEEP_COUNT_MAX:,} (2**31-1) "
                             f"{unit}, {why}")
    return [attrs.validators.ge(low), at_most]


@attrs.frozen
class SleepSchedule:
    """When the circuit sleeps: ``before`` mirror batches before training (-1: as many as one
    epoch has training batches), then ``batches`` mirror batches after every ``every`` engaged
    steps."""

    before: int = attrs.field(default=0, validator=_count(-1, "mirror batches"))
    every: int = attrs.field(default=1, validator=_count(1, "engaged steps"))
    batches: int = attrs.field(default=1, validator=_count(0, "mirror batches"))

    def due(self, step: int) -> int:
        """How many mirror batches follow engaged step number ``step`` (counted from 1)."""
        return self.batches if step % self.every == 0 else 0


SLEEP_DRIVES = ("noise", "data")


@attrs.frozen
class SleepPhase:
    """How a rule sleeps: its ``schedule`` (``SleepSchedule``), the sleep optimizer's ``rate``
    for its feedback weights, the noise images per mirror batch (``batch_size``; 0: the training
    batch size) and the co-activations per weight each synapse's mirror batch holds at least
    (``events``; 0: no minimum). Every sleeping synapse is asked for its own rule's phase: the
    training loop gives each distinct rate its own group in the sleep optimizer, each distinct
    schedule its own sleeps, and each synapse its own mirror batch.

    ``drive`` says what the presynaptic population fires in sleep: ``"noise"`` (the rule's
    ``draw_noise``) or ``"data"`` — its activity on the training batch of the engaged step the
    sleep follows (the first batch of the first epoch for the sleep before training), with the
    circuit's batch norm frozen (``Circuit.activities``), so a sleep replays what the circuit
    saw. A data-driven mirror batch is that batch: ``batch_size`` and ``events`` stay 0."""

    schedule: SleepSchedule = attrs.field(factory=SleepSchedule)
    rate: float = attrs.field(default=0.05, validator=attrs.validators.gt(0.0))
    batch_size: int = attrs.field(default=0, validator=_count(0, "noise images", per_batch=True))
    events: int = attrs.field(default=0, validator=_count(0, "co-activations", per_batch=True))
    drive: str = attrs.field(default="noise", validator=attrs.validators.in_(SLEEP_DRIVES))

    def __attrs_post_init__(self):
        if self.drive == "data" and (self.batch_size or self.events):
            raise ValueError("a sleep driven by data replays the training batch: its batch_size and events "
                             f"must be 0, got {self.batch_size} and {self.events}")


@attrs.frozen
class PlasticityRule:
    """Base of the rules: which matrix carries feedback, and the local updates of W and B.

    Updates are returned as gradients in the optimizer's convention (``p ← p − lr·grad``), so any
    ``torch.optim`` optimizer applies them. ``transports`` says what the feedback path reads from
    the forward weights: ``"weights"`` (not biologically plausible), ``"signs"``, or ``"nothing"``.

    Phases: every rule takes part in the engaged phase; one that also sleeps declares it in
    ``sleep_phase`` and the sleep hooks below. The training loop asks each synapse's own rule,
    so one circuit may mix rules. The per-batch ``redraw`` and the builders' ``direct_feedback``
    are declared here too, with defaults that change nothing.
    """

    name: ClassVar[str] = "rule"
    transports: ClassVar[str] = "nothing"
    # When the feedback weight learns: None (never, or has none), "engaged", "sleep", or "time":
    # during a presentation in time only (``neurosim.core.dynamics.time_backward``), from signals
    # that exist only there. Such a rule has ``time_feedback_update(signals, noise_std)`` (the
    # gradient for its feedback weight at one step: ``signals.pre`` the presynaptic population's
    # intrinsic noise, ``.post`` the postsynaptic activity high-passed with the rule's ``tau_hp``,
    # ``.own`` the feedback weight) and ``needs_time``; the discrete executions give it no
    # feedback update, and its feedback weight is among ``Circuit.engaged_parameters``.
    feedback_learns: ClassVar[str | None] = None
    # Whether the rule learns only in time (``--dynamics time``): outside it, it would silently be
    # another rule (PAL's feedback weight would stay fixed: feedback alignment), so runs refuse it.
    needs_time: ClassVar[bool] = False
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
    # Signals the engaged feedback update reads besides pre, post and its own weight (see
    # ``LocalSignals``): "drive" (``W·pre``, local) and/or "weight" (``W``: weight transport).
    feedback_reads: ClassVar[tuple[str, ...]] = ()
    # Whether circuit builders (``build_mlp``, ``build_resnet``) give the circuit direct feedback
    # pathways from the output to every synapse's post population (``Circuit.add_direct_feedback``).
    direct_feedback: ClassVar[bool] = False

    # The phases a rule takes part in. Every rule is engaged (the task's steps: ``forward_update``,
    # ``feedback_update``). A rule that also sleeps has ``feedback_learns = "sleep"``, says how in
    # ``sleep_phase`` (its ``SleepPhase``), and learns in ``sleep_update`` from the noise it draws
    # (``draw_noise``) and the response that noise drives (``respond``); the training loop asks each
    # sleeping synapse's own rule for all of these, never the circuit's default rule.

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

    def redraw(self, feedback: torch.Tensor | None, init, generator: torch.Generator | None = None) -> None:
        """Called for every synapse at the start of each engaged batch (``Circuit.new_batch``),
        before its forward: a rule whose feedback is drawn anew per batch (brSF) refills
        ``feedback`` in place, drawing with ``init(tensor, generator)``; by default nothing changes."""

    @property
    def sleep_phase(self) -> SleepPhase | None:
        """How this rule sleeps (``SleepPhase``: schedule, rate, batch size, events); None: it does
        not sleep. A rule whose ``feedback_learns`` is ``"sleep"`` must say."""
        return None

    def draw_noise(self, shape, generator, device, dtype, memory_format=None) -> torch.Tensor:
        """The presynaptic activity of one mirror batch, of ``shape``, on ``device``, drawn from
        ``generator`` (None: ``device``'s default) in ``memory_format``; default: standard normal."""
        import torch

        memory_format = torch.contiguous_format if memory_format is None else memory_format
        where = torch.device(device) if generator is None else generator.device
        xi = torch.empty(shape, device=where, dtype=dtype, memory_format=memory_format).normal_(generator=generator)
        return xi.to(device, non_blocking=True)

    def respond(self, drive: torch.Tensor) -> torch.Tensor:
        """The postsynaptic response to the sleep drive ``Wξ``; default: the drive itself."""
        return drive

    def mirror_batch(self, batch: int, positions: int) -> int:
        """Noise images in one synapse's mirror batch: ``batch``, or as many more as it takes to
        give the phase's ``events`` co-activations per weight when one image gives ``positions``."""
        events = self.sleep_phase.events if self.sleep_phase is not None else 0
        return max(batch, -(-events // positions))

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
