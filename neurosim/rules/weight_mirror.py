"""Weight mirror (Akrout et al. 2019): feedback weights learn in a sleep phase driven by noise."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import attrs

if TYPE_CHECKING:  # rule modules load torch only where they compute (see neurosim.rules)
    import torch

from neurosim.rules.base import (  # noqa: F401
    SLEEP_COUNT_MAX,
    PlasticityRule,
    SleepPhase,
    SleepSchedule,
    _count,
    random_feedback,
    register_rule,
)


@register_rule
@attrs.frozen
class WeightMirror(PlasticityRule):
    """Engaged: errors return through ``B``; ``B`` is untouched. Sleep: every synapse's
    presynaptic neurons fire zero-mean noise ``ξ`` (std ``sigma``), the forward weights drive a
    response ``r = f(Wξ)``, and the feedback synapse learns Hebbian-ly from the two signals at it:

        ``ΔB = η_m (⟨ξ rᵀ⟩ / σ²  −  decay · B)``

    with ``⟨·⟩`` the mean over the batch's co-activations. Since ``E[ξ (Wξ)ᵀ] = σ² Wᵀ`` the
    expected update is ``η_m (Wᵀ − decay·B)``: ``B`` turns toward ``Wᵀ``.

    Size control: the decay. It bounds ``B`` at the fixed point ``B* = f'(0)·Wᵀ / decay`` for any
    ``W``, and with the default ``decay = 1`` and a linear response ``B`` converges to ``Wᵀ``
    itself in size as well as direction — so errors keep their scale through deep circuits.
    Dividing by ``σ²`` uses only the known variance of the noise source, not ``W``.
    ``response = "sigmoid"`` passes the drive through a sigmoid, as the authors' NumPy code does,
    but not their whole response: theirs is ``σ(Wξ + b)``, with the layer's forward bias ``b``;
    here the bias is left out (the drive is ``Wξ``, the noise reaching ``W`` alone) and the
    response is ``σ(Wξ) − ½``, measured from the resting rate ``σ(0) = ½``. The resting rate
    carries no information about ``W`` and, multiplied by the noise, would swamp the Hebbian
    signal (by two orders of magnitude in a batch of the authors' CIFAR-10 setting: noise of
    ±0.05, 3072 inputs, 128 noise images); their update ``ξ σ(Wξ + b)ᵀ`` keeps it, and their
    bias moves it to ``σ(b)``.
    """

    name: ClassVar[str] = "wm"
    feedback_learns: ClassVar[str] = "sleep"
    backward_reads_weight: ClassVar[bool] = False  # errors return through B; W is read in sleep only
    # Each field's metadata is its line in --help (and its unit, where it has one).
    sigma: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0), metadata={
        "help": "standard deviation of the sleep noise"})
    noise: str = attrs.field(default="gaussian", validator=attrs.validators.in_(("gaussian", "uniform")), metadata={
        "help": "distribution of the sleep noise"})
    decay: float = attrs.field(default=1.0, validator=attrs.validators.ge(0.0), metadata={
        "help": "decay of B in sleep; B settles at f'(0)·Wᵀ / decay"})
    response: str = attrs.field(default="linear", validator=attrs.validators.in_(("linear", "sigmoid")), metadata={
        "help": "response of the post neurons to the noise drive Wξ"})
    lr: float = attrs.field(default=0.05, validator=attrs.validators.gt(0.0), metadata={
        "help": "learning rate of the sleep optimizer"})
    # The schedule (see SleepSchedule); sleep_before -1: one epoch's worth of mirror batches.
    sleep_before: int = attrs.field(default=0, validator=_count(-1, "mirror batches"), metadata={
        "help": "mirror batches before training; -1: as many as an epoch has training batches", "unit": "batches"})
    sleep_every: int = attrs.field(default=1, validator=_count(1, "engaged steps"), metadata={
        "help": "engaged steps between sleeps", "unit": "steps"})
    sleep_batches: int = attrs.field(default=1, validator=_count(0, "mirror batches"), metadata={
        "help": "mirror batches in each sleep", "unit": "batches"})
    sleep_batch_size: int = attrs.field(default=0, validator=_count(0, "noise images", per_batch=True), metadata={
        "help": "noise images per mirror batch; 0: --batch-size", "unit": "images"})
    # At least this many co-activations per weight in each synapse's mirror batch (0: no minimum).
    # A noise image gives a convolution one per output position but a dense synapse only one, so
    # a classifier learns from far less noise than the convolutions below it (docs/results.md).
    sleep_events: int = attrs.field(default=0, validator=_count(0, "co-activations", per_batch=True), metadata={
        "help": "co-activations per weight in each synapse's mirror batch, at least; 0: no minimum",
        "unit": "events"})

    presets: ClassVar[dict] = {
        # Twenty mirror batches before training, then one after every engaged step. The mirror
        # rate must let B keep pace with W: at wm_lr=0.05 B lags W by ~20 steps and training with
        # momentum diverges even though the angle stays small (docs/design.md).
        "mlp_digits": {"wm_sleep_before": 20, "wm_sleep_batches": 1, "wm_lr": 0.2, "wm_sleep_batch_size": 256},
        # The authors' NumPy code: uniform noise in ±0.05, response through the sigmoid, a full pass
        # of mirror batches before training (-1: as many as there are training batches), one after
        # every SGD step. Decay 0.25 = f'(0) of the sigmoid, so B settles at Wᵀ; their size control
        # was a no-op.
        "mlp_original": {"lr": 0.05, "wm_noise": "uniform", "wm_sigma": 0.05 / 3**0.5, "wm_response": "sigmoid",
                         "wm_decay": 0.25, "wm_lr": 0.01, "wm_sleep_before": -1, "wm_sleep_batches": 1},
        # One mirror batch of 32 noise images after every 4th engaged step. A convolution sees every
        # output position as a co-activation, so 32 images give tens of thousands of events per
        # weight in early layers. Sleeping every step with 8 or 16 images (the same events per step)
        # cost more: small-batch convolutions run slowly and the mirror optimizer touches every B
        # each time (docs/benchmarks.md has the timings and their commands). 200 mirror batches first.
        "resnet": {"wm_sleep_before": 200, "wm_sleep_every": 4, "wm_sleep_batches": 1, "wm_sleep_batch_size": 32,
                   "wm_lr": 0.1, "wm_sigma": 1.0},
    }

    @classmethod
    def example(cls):
        return cls(sigma=0.5)

    @property
    def schedule(self) -> SleepSchedule:
        """When the circuit sleeps, from this rule's sleep settings."""
        return SleepSchedule(before=self.sleep_before, every=self.sleep_every, batches=self.sleep_batches)

    @property
    def sleep_phase(self) -> SleepPhase:
        """This rule's sleep: its schedule, mirror rate ``lr``, ``sleep_batch_size`` and ``sleep_events``."""
        return SleepPhase(self.schedule, self.lr, self.sleep_batch_size, self.sleep_events)

    def init_feedback(self, w, init, generator):
        return random_feedback(w, init, generator)

    def feedback_matrix(self, w, feedback):
        return feedback

    def draw_noise(self, shape, generator, device, dtype, memory_format=None):
        """Zero-mean noise of standard deviation ``sigma`` for the presynaptic neurons, on ``device``.

        The noise is drawn where ``generator`` lives (``None``: the default generator of
        ``device``) and moved to ``device`` if that is elsewhere: a CPU generator drives a CUDA
        circuit reproducibly, at the cost of a host-to-device copy per mirror batch (pass
        ``torch.Generator(device)`` to avoid it). It is laid out in ``memory_format`` (the
        circuit's: channels_last weights get channels_last noise, so the update they receive
        comes out in their own layout; None: contiguous), drawn in that layout's memory order.
        """
        import torch

        memory_format = torch.contiguous_format if memory_format is None else memory_format
        device = torch.device(device)
        where = device if generator is None else generator.device
        xi = torch.empty(shape, device=where, dtype=dtype, memory_format=memory_format)
        if self.noise == "gaussian":
            xi.normal_(generator=generator)
            if self.sigma != 1:
                xi.mul_(self.sigma)
        else:
            half = self.sigma * 3**0.5  # uniform on [−a, a] has std a/√3
            xi.uniform_(generator=generator).mul_(2 * half).sub_(half)
        return xi.to(device, non_blocking=True)

    def respond(self, drive: torch.Tensor) -> torch.Tensor:
        """The postsynaptic response to the noise drive ``Wξ``."""
        return drive.sigmoid() - 0.5 if self.response == "sigmoid" else drive

    def sleep_update(self, s):
        # −⟨ξ rᵀ⟩/σ² + decay·B, formed in place on the fresh product tensor.
        events = s.pre.shape[0] * s.kind.positions(s.pre.shape[1:])  # co-activations per weight
        update = s.product().mul(-1.0 / (events * self.sigma**2))
        return update.add_(s.own, alpha=self.decay) if self.decay else update
