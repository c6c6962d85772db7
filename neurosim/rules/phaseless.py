"""Phaseless alignment learning (PAL; Max et al. 2024): feedback weights learn from the circuit's
own intrinsic noise, always on, while the task runs — a weight mirror without sleep."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import attrs

if TYPE_CHECKING:  # rule modules load torch only where they compute (see neurosim.rules)
    import torch

from neurosim.rules.base import LocalSignals, PlasticityRule, random_feedback, register_rule


@register_rule
@attrs.frozen
class PhaselessAlignment(PlasticityRule):
    """Errors return through ``B``; ``B`` learns in time, during every presentation, from the two
    signals present at the feedback synapse (Max, Kriener, Pineda García, Nowotny, Jaras, Senn &
    Petrovici, "Learning efficient backprojections across cortical hierarchies in real time",
    Nature Machine Intelligence 2024; arXiv:2212.10249):

        ``τ_w dB/dt = rate · (⟨r̂_post ξ_preᵀ⟩ / σ²  −  decay · B)``      (in ``W``'s layout)

    - ``ξ_pre``: the intrinsic noise the presynaptic population (the one the feedback synapse
      returns errors to) adds to its own drive, ``a_pre = f(u + ξ_pre)`` — known at those
      neurons, as in the paper, where each neuron's noise enters its somatic potential;
    - ``r̂_post``: the postsynaptic population's activity high-passed with ``tau_hp``,
      ``τ_hp dr̂/dt = −r̂ + τ_hp da_post/dt`` (Euler: ``r̂_t = (1 − dt/τ_hp) r̂_{t−1} + a_t − a_{t−1}``,
      0 at a presentation's first step). The high-pass strips the slow, stimulus-driven part of
      the activity and keeps the fast fluctuations, which the noise below drives through ``W``:
      ``r̂_post ≈ f'_post W f'_pre ξ_pre + (what the post population's own noise adds)``;
    - ``⟨·⟩`` the mean over the batch's co-activations (and a convolution's positions).

    Since the post population's own noise is independent of ``ξ_pre``,
    ``E[r̂ ξᵀ]/σ² = E[f'_post W f'_pre]`` for white noise, ordered propagation and activities that
    follow their drive (``τ = dt``); less for noise correlated in time, as the high-pass removes
    part of its slow component, or for leaky activities, which pass on only part of each step's
    noise. ``B`` turns toward that, so toward ``W`` (the design's ``Bᵀ → Wᵀ``), without reading
    it, with no phase and no sleep; for ReLU units ``W`` masked by how often post and pre units
    are active together, which on digits lies 11–22° off ``W`` (docs/results.md). It is
    local: the feedback synapse reads the activity of the neurons it starts at and the noise of
    the neurons it ends at. ``decay`` is the paper's regulariser ``α`` (their "vanilla" one,
    ``−αB``); it bounds ``B`` at ``E[f' W f']/decay``.

    Where this differs from the paper, and why:

    - the noise ``σ`` and its correlation time belong to the circuit in time
      (``TimeSettings.noise``, ``tau_noise``: an Ornstein–Uhlenbeck process, as in the paper, or
      white), not to the rule; the update is divided by the noise's variance ``σ²`` (passed by
      the time execution), which the paper folds into its learning rate ``η_bw``: ``rate`` is
      ``η_bw σ²`` measured against the optimizer's learning rate, so ``B``'s fixed point does
      not depend on how loud the noise is;
    - rate neurons with instantaneous or leaky activities (``neurosim.core.dynamics``), not the
      paper's dendritic microcircuits with prospective (look-ahead) voltages; the noise enters
      the drive, before the nonlinearity, as in their deep-network (latent equilibrium) code;
    - ``B`` learns while a stimulus is presented and during the settle after it (always on),
      but the circuit returns to rest between presentations, as every run in time here does;
    - ``B`` of a synapse leaving the input population learns nothing but its decay: the input
      carries no intrinsic noise (nor does it in the paper), and its errors go nowhere.

    Outside the time execution ``B`` does not learn at all: the discrete backward sends errors
    through it and forms no feedback update (``feedback_learns = "time"``), which is feedback
    alignment; ``needs_time`` tells the training loop to refuse such a run.
    """

    name: ClassVar[str] = "pal"
    feedback_learns: ClassVar[str] = "time"
    needs_time: ClassVar[bool] = True
    backward_reads_weight: ClassVar[bool] = False  # errors return through B; W is never read
    rate: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0), metadata={
        "help": "rate of B's update, as a multiple of the optimizer's learning rate"})
    decay: float = attrs.field(default=1.0, validator=attrs.validators.ge(0.0), metadata={
        "help": "the regulariser α: decay of B; B settles at ⟨f'·W·f'⟩ / decay"})
    tau_hp: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0), metadata={
        "help": "time constant of the high-pass of the postsynaptic activity (at least --dt)", "unit": "time"})

    presets: ClassVar[dict] = {
        # In time, with the literal execution (the one docs/results.md's PAL runs used): 20 steps per
        # stimulus, noise 0.5 in every hidden and output drive. B shares the optimizer with W, so
        # plain SGD: under momentum 0.9 B lags W by ~20 steps (the heavy ball's √0.9 per step,
        # whatever the rate) and W ran away within 3-6 epochs on digits; plain SGD instead, at
        # lr 0.1: at 0.2 the loss spiked in epochs 3-7 and one seed of three diverged, at 0.1
        # three seeds trained smoothly (docs/results.md "A phase-free weight mirror (PAL)
        # against the sleep").
        "mlp_digits": {"dynamics": "time", "execution": "reference", "duration": 20.0, "noise": 0.5,
                       "lr": 0.1, "momentum": 0.0},
    }

    @classmethod
    def example(cls):
        return cls(rate=0.5, decay=0.3, tau_hp=2.0)

    def init_feedback(self, w, init, generator):
        return random_feedback(w, init, generator)

    def feedback_matrix(self, w, feedback):
        return feedback

    def time_feedback_update(self, s: LocalSignals, std: float) -> torch.Tensor:
        """The gradient for ``B`` at one step in time: ``rate·(−⟨r̂ ξᵀ⟩/σ² + decay·B)``, with
        ``s.pre`` the presynaptic noise ``ξ``, ``s.post`` the high-passed postsynaptic activity
        ``r̂``, ``s.own`` ``B`` and ``std`` the noise's standard deviation ``σ`` (0: no noise,
        so no correlation to learn from: the decay alone)."""
        if std == 0:
            return s.own.mul(self.rate * self.decay)
        events = s.pre.shape[0] * s.kind.positions(s.pre.shape[1:])  # co-activations per weight
        update = s.product().mul(-self.rate / (events * std**2))
        return update.add_(s.own, alpha=self.rate * self.decay) if self.decay else update
