"""Weight mirror (Akrout et al. 2019): feedback weights learn in a sleep phase driven by noise."""

from typing import ClassVar

import attrs
import torch

from neurosim.rules.base import PlasticityRule, random_feedback


@attrs.frozen
class SleepSchedule:
    """When the circuit sleeps: ``before`` mirror batches before training (-1: as many as one
    epoch has training batches), then ``batches`` mirror batches after every ``every`` engaged
    steps."""

    before: int = attrs.field(default=0, validator=attrs.validators.ge(-1))
    every: int = attrs.field(default=1, validator=attrs.validators.ge(1))
    batches: int = attrs.field(default=1, validator=attrs.validators.ge(0))

    def due(self, step: int) -> int:
        """How many mirror batches follow engaged step number ``step`` (counted from 1)."""
        return self.batches if step % self.every == 0 else 0


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
    ``response = "sigmoid"`` passes ``Wξ`` through a sigmoid, as in the authors' NumPy code,
    measured from the neuron's resting rate ``σ(0) = ½``: the resting rate carries no
    information about ``W`` and, multiplied by the noise, would swamp the Hebbian signal (with
    noise of ±0.05 and 3072 inputs, by a factor of about 300 per batch).
    """

    name: ClassVar[str] = "wm"
    feedback_learns: ClassVar[str] = "sleep"
    sigma: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    noise: str = attrs.field(default="gaussian", validator=attrs.validators.in_(("gaussian", "uniform")))
    decay: float = attrs.field(default=1.0, validator=attrs.validators.ge(0.0))
    response: str = attrs.field(default="linear", validator=attrs.validators.in_(("linear", "sigmoid")))
    schedule: SleepSchedule = attrs.field(factory=SleepSchedule)

    def init_feedback(self, w, init, generator):
        return random_feedback(w, init, generator)

    def feedback_matrix(self, w, feedback):
        return feedback

    def draw_noise(self, shape, generator, device, dtype) -> torch.Tensor:
        """Zero-mean noise of standard deviation ``sigma`` for the presynaptic neurons, on ``device``.

        The noise is drawn where ``generator`` lives (``None``: the default generator of
        ``device``) and moved to ``device`` if that is elsewhere: a CPU generator drives a CUDA
        circuit reproducibly, at the cost of a host-to-device copy per mirror batch (pass
        ``torch.Generator(device)`` to avoid it).
        """
        device = torch.device(device)
        where = device if generator is None else generator.device
        if self.noise == "gaussian":
            xi = torch.randn(shape, generator=generator, device=where, dtype=dtype)
            if self.sigma != 1:
                xi.mul_(self.sigma)
        else:
            half = self.sigma * 3**0.5  # uniform on [−a, a] has std a/√3
            xi = torch.rand(shape, generator=generator, device=where, dtype=dtype).mul_(2 * half).sub_(half)
        return xi.to(device, non_blocking=True)

    def respond(self, drive: torch.Tensor) -> torch.Tensor:
        """The postsynaptic response to the noise drive ``Wξ``."""
        return torch.sigmoid(drive) - 0.5 if self.response == "sigmoid" else drive

    def sleep_update(self, s):
        # −⟨ξ rᵀ⟩/σ² + decay·B, formed in place on the fresh product tensor.
        update = s.product().mul(-1.0 / (s.kind.events(s.pre) * self.sigma**2))
        return update.add_(s.own, alpha=self.decay) if self.decay else update
