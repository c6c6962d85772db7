"""Within a presentation: what a synapse's traced pairs see while the probe batch is presented in time.

A circuit run in time (``neurosim.core.dynamics``) learns from signals that rise, overlap and
fade within one presentation of a stimulus. When a ``Monitor`` is given ``time_settings``, at
each of its scatter snapshots it presents its probe batch once, in time, to a copy of the
circuit (``time_backward`` on ``copy.deepcopy``: the run's weights, their ``.grad`` and the
random streams are left as they were) and keeps, for every monitored synapse and each traced
pair ``(W_ji, B_ij)`` (``trace_index``), at every time step:

``time_pre``       the presynaptic signal at unit ``i`` (the eligibility trace, or the activity
                   where there is none), mean over the batch;
``time_error``     the local error at the drive of the postsynaptic unit ``j`` (``δ_j``, what
                   the rule multiplies), mean over the batch;
``time_update``    the running integrated update of ``W_ji`` (ΔW so far, as ``time_backward``
                   accumulates it, decay included);
``time_update_b``  the running integrated update of ``B_ij`` where the rule learns its feedback
                   weight within the presentation (KP while engaged, a rule whose feedback
                   learns in time): the ``feedback_update`` the step hands over, or, from a
                   ``time_backward`` that hands over none, formed by the synapse's own rule
                   (``Synapse.ref_updates``) from the step's signals and integrated with the
                   same factor ``dt/τ_w`` (engaged learners only); NaN for the other rules;

and ``time_w``, ``time_b``: ``W_ji`` and ``B_ij`` (in W's layout) when the presentation starts.
For a convolution ``W[out, in, kh, kw]`` the pre unit is input channel ``in`` (of its group), the
post unit output channel ``out``, their signals averaged over positions as well; a dense
synapse on a spatial population reads its flattened units. The step times are ``time_steps``:
the end of each Euler step, ``(n + 1)·dt``; the stimulus is on up to ``duration``.
"""

from __future__ import annotations

import copy
import inspect
import math

import attrs
import numpy as np
import torch

from neurosim.common.errors import UserError
from neurosim.core.dynamics import TimeSettings, feedback_hops, time_backward
from neurosim.core.kinds import Conv2d

# Per time step, [snapshot, synapse, trace, time]; then the values at the start, [snapshot, synapse, trace].
SERIES = ("time_pre", "time_error", "time_update", "time_update_b")
START = ("time_w", "time_b")


def presentation_steps(circuit, settings: TimeSettings) -> int:
    """The time steps one presentation takes (as ``time_backward`` counts them): the stimulus's,
    then the settling time, by default as long as an error takes to travel the most feedback hops."""
    s = settings
    lag = s.steps(s.delay) + (s.update == "synchronous")
    return s.steps(s.duration) + (s.steps(s.settle) if s.settle is not None else lag * feedback_hops(circuit))


def noise_seed(seed: int, slot: int) -> int:
    """The seed of the generator the presentation at snapshot ``slot`` draws its intrinsic noise
    from, for a monitor of ``seed``: the same on a resume, another at every snapshot."""
    return seed * 1009 + slot


def check_time_settings(circuit, settings, has_probe: bool) -> None:
    """Where the monitor cannot present its probe batch in time, what is wrong: a ``ValueError``
    for settings that are not a ``TimeSettings``, a ``UserError`` for a run without a probe batch
    or with batch norm."""
    if not isinstance(settings, TimeSettings):
        raise ValueError(f"time_settings must be a neurosim.core.dynamics.TimeSettings or None, got "
                         f"{type(settings).__name__}")
    if not has_probe:
        raise UserError("the traces within a presentation present the probe batch: give the monitor a probe "
                        "batch and loss_fn, with a probe size above 0 (MonitorConfig.probe, --monitor-probe)")
    normed = [n for n, p in circuit.populations.items() if p.norm is not None]
    if normed:
        raise UserError(f"populations {normed} have batch norm, which a circuit run in time does not have: "
                        f"build the circuit without norm, or monitor without time_settings")


def _unit_means(syn, signal: torch.Tensor) -> torch.Tensor:
    """A synapse's signal per unit, mean over the batch: per channel (mean over positions as
    well) for a convolution, per flattened unit for a dense synapse."""
    if isinstance(syn.kind, Conv2d):
        return signal.mean(dim=(0, *range(2, signal.dim())))
    return signal.reshape(signal.shape[0], -1).mean(0)


def _units(syn, at) -> tuple[torch.Tensor, torch.Tensor]:
    """The (pre, post) unit of each traced weight, from its index in W (``at``: a tuple of index
    tensors): W's column and row, or for a convolution the input channel (of the output
    channel's group) and the output channel."""
    post, pre = at[0], at[1]
    kind = syn.kind
    if isinstance(kind, Conv2d) and kind.groups > 1:
        per_in, per_out = kind.in_channels // kind.groups, kind.out_channels // kind.groups
        pre = (post // per_out) * per_in + pre
    return pre, post


class TimeTraces:
    """The within-presentation records of a monitor: one presentation per scatter snapshot, held
    on the device as ``[snapshot, synapse, trace, time]`` (NaN until written).

    ``present(slot, circuit, names, trace_at, x, y, loss_fn)`` fills snapshot ``slot``;
    ``arrays(taken)`` gives the first ``taken`` snapshots as NumPy arrays; ``state_dict`` and
    ``load_state_dict`` carry them through a checkpoint. Where the settings have intrinsic noise,
    each presentation draws it from a generator of its own, seeded by ``seed`` and the snapshot."""

    def __init__(self, circuit, settings: TimeSettings, synapses: int, traces: int, snapshots: int, device,
                 seed: int = 0):
        self.settings, self.seed = settings, seed
        self.steps = presentation_steps(circuit, settings)
        shape = (snapshots, synapses, traces)
        self.series = {n: torch.full((*shape, self.steps), math.nan, device=device) for n in SERIES}
        self.start = {n: torch.full(shape, math.nan, device=device) for n in START}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.series.values(), *self.start.values()))

    def times(self) -> np.ndarray:
        """The end of each step of the presentation, ``(n + 1)·dt``, in the unit of ``dt``."""
        return ((np.arange(self.steps, dtype=np.float64) + 1) * self.settings.dt).astype(np.float32)

    def present(self, slot: int, circuit, names, trace_at, x: torch.Tensor, y: torch.Tensor, loss_fn,
                lr: float | None = None) -> None:
        """Present ``x`` in time to a copy of ``circuit`` and keep the traced pairs' signals of the
        synapses ``names`` (``trace_at[i]``: the indices in W of synapse ``i``'s traced weights) in
        snapshot ``slot``. ``loss_fn(output, y)`` is the training loss; ``lr`` the rate at which
        the copy's weights move during the presentation where the plasticity is continuous."""
        s = self.settings
        # The copy leaves the real parameters' gradients behind (they are put back at once).
        params = list(circuit.parameters())
        grads = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            model = copy.deepcopy(circuit)
        finally:
            for p, g in zip(params, grads):
                p.grad = g
        syns = [model.synapses[n] for n in names]
        units = [_units(syn, at) for syn, at in zip(syns, trace_at)]
        learns_b = [syn.feedback is not None and syn.rule.feedback_learns == "engaged" for syn in syns]
        k_w = s.dt / (s.tau_plasticity or s.duration)
        running_b: list[torch.Tensor | None] = [None] * len(syns)
        seen = [0]
        pre_t, err_t, upd_t, updb_t = (self.series[n][slot] for n in SERIES)
        with torch.no_grad():
            for i, (syn, at) in enumerate(zip(syns, trace_at)):
                n = len(at[0])
                self.start["time_w"][slot, i, :n] = syn.weight.detach()[at]
                m = syn.feedback_matrix()
                if m is not None:
                    self.start["time_b"][slot, i, :n] = m.detach()[at]

        @torch.no_grad()
        def keep(step: int, state: dict) -> None:
            if step >= self.steps:
                raise RuntimeError(f"the presentation took more than the {self.steps} steps expected of it")
            fb = state.get("feedback_update")
            for i, (name, syn, at, (pre_u, post_u)) in enumerate(zip(names, syns, trace_at, units)):
                n = len(at[0])
                pre, err = state["pre"][syn.pre], state["drive_error"][syn.post]
                pre_t[i, :n, step] = _unit_means(syn, pre)[pre_u]
                err_t[i, :n, step] = _unit_means(syn, err)[post_u]
                u = state["update"].get(name)
                upd_t[i, :n, step] = 0.0 if u is None else u[at]
                if fb is not None:
                    if fb.get(name) is not None:
                        updb_t[i, :n, step] = fb[name][at]
                elif learns_b[i]:
                    g = syn.ref_updates(pre, err)[2][at]
                    running_b[i] = k_w * g if running_b[i] is None else running_b[i] + k_w * g
                    updb_t[i, :n, step] = running_b[i]
            seen[0] = step + 1

        kwargs = {"lr": lr} if s.plasticity == "continuous" else {}
        if getattr(s, "noise", 0) and "generator" in inspect.signature(time_backward).parameters:
            # Intrinsic noise from the monitor's own stream, seeded per snapshot: the same on a resume.
            kwargs["generator"] = torch.Generator(x.device).manual_seed(noise_seed(self.seed, slot))
        devices = [x.device] if x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # no draw from the run's random streams
            time_backward(model, x, lambda out: loss_fn(out, y), s, trace=keep, **kwargs)
        if seen[0] != self.steps:
            raise RuntimeError(f"the presentation took {seen[0]} steps, not the {self.steps} expected of it")

    # -- host side -----------------------------------------------------------------------------
    def arrays(self, taken: int) -> dict[str, np.ndarray]:
        """``time_steps`` and the first ``taken`` snapshots of every series and start value."""
        out = {"time_steps": self.times()}
        for name, t in (*self.series.items(), *self.start.items()):
            out[name] = t[:taken].cpu().numpy().copy()
        return out

    def state_dict(self) -> dict:
        return {"steps": self.steps, "settings": attrs.asdict(self.settings),
                **{n: t.cpu() for n, t in (*self.series.items(), *self.start.items())}}

    def load_state_dict(self, state: dict | None) -> None:
        """Continue from ``state_dict()``; None (a checkpoint from before these records): every
        snapshot so far has none, NaN."""
        for name, t in (*self.series.items(), *self.start.items()):
            if state is None:
                t.fill_(math.nan)
            else:
                t.copy_(state[name].to(t.device))
