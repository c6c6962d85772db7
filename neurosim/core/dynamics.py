"""Circuits in time: activities, errors and weights as coupled first-order dynamics.

The discrete executions make one step of a circuit instantaneous: a forward pass, an error, an
update. Here the same circuit objects run in time, in steps of ``dt`` (``TimeSettings``):

- a stimulus ``x`` is presented to the input population for ``duration`` (then it is 0);
- every population's activity relaxes toward its response to its summed drive,
  ``τ da/dt = −a + f(Σ W a_pre)`` (pooling included; ``τ = dt``: it follows at once);
- while the stimulus is on, the output's error ``e = ∂L/∂a_out`` is the teaching signal; it
  travels back through each synapse's feedback matrix (the rule's: ``Wᵀ`` for backprop, ``B`` for
  the others) or through the circuit's direct pathways, every hop taking ``delay`` (an error is
  formed by the feedback matrix as it is sent, then travels); the error at a
  population relaxes like its activity, ``τ dε/dt = −ε + (what arrives)``, and a population's
  local derivative turns it into the error at its drive, ``δ = f'(u) ⊙ ε``, at the present time;
- every synapse's plasticity integrates the update its rule forms from the signals present at it
  at that time, ``τ_w dW/dt = −ΔW(x̄_pre(t), δ_post(t))`` (the rule's ``ref_updates``: KP's
  feedback weight learns alike), optionally with ``x̄`` a presynaptic eligibility trace
  (``τ_e dx̄/dt = −x̄ + x``) and a decay ``−W/τ_decay``.

Where the weights move (``plasticity``): ``"presentation"`` integrates every synapse's update over
the presentation and hands the total to the optimizer, which applies it at the end (the weights
hold still while the stimulus is on; the discrete rules' limit); ``"continuous"`` moves every
weight at every step by its Euler step ``−η·(dt/τ_w)·ΔW(t)`` (``η`` the learning rate), so the
activities and errors of the rest of the presentation see the moved weights, as in a synapse
whose plasticity runs while the stimulus does. The feedback weights that learn (KP's, PAL's) move
alike; the weight mirror's sleep keeps its own optimizer.

Within a step the populations are updated in topological order from this step's new values
(``update="ordered"``: propagation faster than ``dt``, the limit in which the discrete rules are
recovered) or all from the previous step's (``"synchronous"``: every synaptic hop takes one
``dt``, so delays accumulate with depth).

Intrinsic noise (``noise``, ``tau_noise``): every population but the input adds to its drive,
at every step of the presentation and the settle, a noise ``ξ`` of standard deviation ``noise``,
white or, with ``tau_noise``, an Ornstein–Uhlenbeck process (its exact discretisation:
``ξ_t = a ξ_{t−1} + noise·√(1−a²)·w_t``, ``a = exp(−dt/τ_ξ)``, ``ξ_0 = noise·w_0``, so it is
stationary from the first step), with ``w`` standard normal draws from ``time_backward``'s
``generator`` (one tensor per population and step, in the circuit's order). The activity is
``f(u + ξ)`` and the local derivative ``f'`` is taken there too. A rule whose feedback weight
learns in time (``feedback_learns = "time"``, phaseless alignment learning) reads that noise at
the presynaptic population and a high-pass of the postsynaptic activity (``_feedback_in_time``).
With ``noise = 0`` nothing is drawn and every result is the noiseless one, bit for bit.

The limit, exactly: with ``τ = dt``, ordered updates, no delay and ``τ_w = duration``, every step
sees the discrete step's signals and the integrated update is the discrete one, for every rule
(``tests/test_dynamics.py``, float64, dense and conv). The weight mirror's sleep in time
(``sleep_in_time``) likewise gives its discrete sleep update.

This is the literal execution (synapse by synapse, like ``neurosim.core.reference``); batch norm
has no meaning in time here and is refused.
"""

from __future__ import annotations

import math

import attrs
import torch

from neurosim.core.reference import _pool, _unpool
from neurosim.rules.base import LocalSignals

UPDATES = ("ordered", "synchronous")
PLASTICITY = ("presentation", "continuous")


def _positive_or_none(inst, att, value):
    if value is not None and not value > 0:
        raise ValueError(f"{att.name} must be positive or None, got {value}")


def _finite(inst, att, value):
    if not math.isfinite(value):
        raise ValueError(f"{att.name} must be a finite number, got {value}")


@attrs.frozen
class TimeSettings:
    """Time constants of a circuit run in time (all in the same unit as ``dt``).

    ``tau``: the populations' time constant for activities and errors (None: ``dt``, they follow
    their drive at once); ``tau_plasticity``: the synapses' (None: ``duration``, so that in the
    limit one presentation gives the discrete update); ``tau_decay``: weight decay (None: none);
    ``tau_eligibility``: the presynaptic trace's (None: no trace, the activity itself);
    ``delay``: the transmission delay of every feedback hop (a multiple of ``dt``); ``settle``:
    time simulated after the stimulus ends (None: as long as the error from the stimulus's last
    step takes to reach the population the most hops away; 0 with no delay and ordered updates).

    ``noise``: the standard deviation of the intrinsic noise every non-input population adds to
    its drive at every step (0: none, nothing drawn); ``tau_noise``: its correlation time, an
    Ornstein–Uhlenbeck process (None: white, independent at every step).

    ``plasticity``: "presentation" (the update integrated over a presentation, applied at its
    end) or "continuous" (the weights move at every step; see the module docstring)."""

    dt: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    duration: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    tau: float | None = attrs.field(default=None, validator=_positive_or_none)
    tau_plasticity: float | None = attrs.field(default=None, validator=_positive_or_none)
    tau_decay: float | None = attrs.field(default=None, validator=_positive_or_none)
    tau_eligibility: float | None = attrs.field(default=None, validator=_positive_or_none)
    delay: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    settle: float | None = attrs.field(default=None)
    update: str = attrs.field(default="ordered", validator=attrs.validators.in_(UPDATES))
    noise: float = attrs.field(default=0.0, validator=[attrs.validators.ge(0.0), _finite])
    tau_noise: float | None = attrs.field(default=None, validator=_positive_or_none)
    plasticity: str = attrs.field(default="presentation", validator=attrs.validators.in_(PLASTICITY))

    def __attrs_post_init__(self):
        for name in ("duration", "delay"):
            steps = getattr(self, name) / self.dt
            if abs(steps - round(steps)) > 1e-9:
                raise ValueError(f"{name} {getattr(self, name)} is not a whole number of steps of dt {self.dt}")
        if self.tau is not None and self.tau < self.dt:
            raise ValueError(f"tau {self.tau} is shorter than dt {self.dt}: the Euler step would overshoot")

    def steps(self, what: float) -> int:
        return round(what / self.dt)

    def rate(self, tau: float | None) -> float:
        """The Euler factor ``dt/τ`` of a leaky variable (1: it follows its target at once)."""
        return 1.0 if tau is None else self.dt / tau


def feedback_hops(circuit) -> int:
    """The most feedback hops an error takes from the output to any population (a direct
    pathway is one hop), which with ``delay`` sets how long an error needs to arrive."""
    hops = {circuit.output_name: 0}
    for name in reversed(circuit.order()):
        if name not in hops:
            continue
        for syn, pre in circuit.incoming(name):
            hops[pre] = max(hops.get(pre, 0), hops[name] + 1)
    for p in circuit.feedback_pathways.values():
        hops[p.target] = max(hops.get(p.target, 0), 1)
    return max(hops.values())


def check_circuit(circuit, settings: TimeSettings) -> None:
    """What a circuit run in time refuses, in either execution: batch norm, and a high-pass of a
    rule that learns in time shorter than ``dt`` (its Euler step would overshoot)."""
    normed = [n for n, p in circuit.populations.items() if p.norm is not None]
    if normed:
        raise ValueError(f"populations {normed} have batch norm, which a circuit run in time does not have: "
                         f"build the circuit without norm")
    for n, sy in circuit.synapses.items():
        if sy.rule.feedback_learns == "time" and sy.rule.tau_hp < settings.dt:
            raise ValueError(f"synapse {n}: its rule's high-pass time constant {sy.rule.tau_hp} is shorter than "
                             f"dt {settings.dt}: the Euler step would overshoot; give --{sy.rule.name}-tau-hp ≥ dt")


class _History:
    """The last values of a per-population signal, one dict per step, so a hop that takes
    ``lag`` steps reads what was sent that many steps before (None before anything was)."""

    def __init__(self, keep: int):
        self.keep, self.past = keep, []

    def push(self, value: dict) -> None:
        self.past.append(value)
        if len(self.past) > self.keep:
            self.past.pop(0)

    def ago(self, name: str, steps: int):
        """The value pushed ``steps`` pushes before the last one (0: the last)."""
        return self.past[-1 - steps].get(name) if len(self.past) > steps else None


def _leak(old, target, k: float):
    """One Euler step of ``τ dv/dt = −v + target`` with ``k = dt/τ``, from rest (0) when ``old`` is None."""
    if k == 1.0:
        return target
    return target * k if old is None else old + k * (target - old)


def _add(into: dict, name: str, value) -> None:
    if value is not None:
        into[name] = value if name not in into else into[name] + value


def time_backward(circuit, x: torch.Tensor, loss_fn, settings: TimeSettings, trace=None,
                  generator: torch.Generator | None = None, lr: float | None = None) -> torch.Tensor:
    """Present ``x`` to ``circuit`` in time and write every synapse's integrated update into ``.grad``.

    ``loss_fn(output_activity) -> scalar`` gives the teaching signal while the stimulus is on.
    ``trace(step, state)``, if given, is called after every step with the step's signals
    (``state["pre"]``, ``["drive_error"]``, ``["activity"]``, ``["error"]``, ``["noise"]`` per
    population, the running ``["update"]`` of ``W`` and ``["feedback_update"]`` of the feedback
    weight per synapse, and ``["high_pass"]``, the high-passed postsynaptic activity, per synapse
    whose feedback learns in time). Returns the loss at the stimulus's last step (detached).
    Gradients accumulate as ``reference_backward``'s do, so the same optimizer applies them.

    ``generator`` draws the intrinsic noise (``settings.noise``; None: the default generator of
    ``x``'s device); with ``noise = 0`` nothing is drawn. A synapse whose rule's feedback weight
    learns in time (``feedback_learns == "time"``) integrates that update into its feedback
    ``.grad`` with ``k_w`` like ``W``'s (``_feedback_in_time``).

    ``settings.plasticity == "continuous"``: every parameter that requires a gradient moves at
    every step by ``−lr`` times that step's update, in place, and no ``.grad`` is written (the
    trace's running updates are the sums of the steps' updates, as without).
    """
    check_circuit(circuit, settings)
    s = settings
    moving = s.plasticity == "continuous"
    if moving and (lr is None or not lr > 0):
        raise ValueError(f"continuous plasticity moves the weights during the presentation: give lr > 0, got {lr}")
    learners = {n: sy for n, sy in circuit.synapses.items() if sy.rule.feedback_learns == "time"}
    a_noise = 0.0 if s.tau_noise is None else math.exp(-s.dt / s.tau_noise)
    noise: dict[str, torch.Tensor] = {}
    high: dict[str, torch.Tensor] = {}  # per learning synapse: its postsynaptic activity, high-passed
    order = circuit.order()
    inp, out = circuit.input_name, circuit.output_name
    t_on = s.steps(s.duration)
    # A feedback hop takes ``delay``, and under synchronous updates one step more.
    lag = s.steps(s.delay) + (s.update == "synchronous")
    total = t_on + (s.steps(s.settle) if s.settle is not None else lag * feedback_hops(circuit))
    k_act, k_err, k_w = s.rate(s.tau), s.rate(s.tau), s.dt / (s.tau_plasticity or s.duration)
    k_tr = s.rate(s.tau_eligibility)
    acts = {n: None for n in order}
    errs: dict[str, torch.Tensor] = {}
    traces: dict[str, torch.Tensor] = {}
    sent = _History(lag + 1)  # per population: the error at its drive, as sent back at each step
    sent_out = _History(lag + 1)  # the output error, as the direct pathways send it
    grads: dict[int, list] = {}
    last_loss = None
    for step in range(total):
        on = step < t_on
        new = {inp: x.detach() if on else torch.zeros_like(x)}
        drives, winners = {}, {}
        with torch.no_grad():
            for name in order[1:]:
                pop = circuit.populations[name]
                drive = None
                for syn, pre in circuit.incoming(name):
                    # ``acts`` still holds the last step's activities; ``new`` this step's so far.
                    a = new[pre] if s.update == "ordered" and pre in new else acts[pre]
                    if a is None:
                        a = x.new_zeros((x.shape[0], *circuit.populations[pre].shape))
                    d = a if syn is None else syn.ref_forward(a)
                    drive = d if drive is None else drive + d
                pooled, winners[name] = _pool(pop, drive)
                if s.noise:
                    noise[name] = _noise_step(noise.get(name), pooled, s.noise, a_noise, generator)
                    pooled = pooled + noise[name]
                drives[name] = pooled
                new[name] = _leak(acts[name], pop.respond(pooled), k_act)
        before = dict(acts)
        acts.update(new)
        # The teaching signal, while the stimulus is on.
        with torch.enable_grad():
            a = acts[out].detach().requires_grad_(True)
            loss = loss_fn(a)
            e_out = torch.autograd.grad(loss, a)[0] if on else torch.zeros_like(a)
        if on:
            last_loss = loss.detach()
        sent_out.push({out: e_out})
        # Errors, from the output down.
        arriving: dict[str, torch.Tensor] = {out: e_out}
        if circuit.pathways_enabled:
            e_late = sent_out.ago(out, lag)
            for p in circuit.feedback_pathways.values():
                if e_late is not None:
                    with torch.no_grad():
                        _add(arriving, p.target, p.ref_feedback(e_late))
        drive_errors: dict[str, torch.Tensor] = {}
        for name in reversed(order[1:]):
            pop = circuit.populations[name]
            if name != out:
                # What the consumers of ``name`` send back, ``delay`` steps late (synchronous: one
                # more), formed when it was sent; without a lag, this step's, formed now.
                if lag:
                    _add(arriving, name, sent.ago(name, lag - 1))
                else:
                    _add(arriving, name, _sent_back(circuit, name, drive_errors, (x.shape[0], *pop.shape)))
            target = arriving.get(name)
            if target is None:
                target = torch.zeros_like(acts[name])
            errs[name] = _leak(errs.get(name), target, k_err)
            u = drives[name].detach().requires_grad_(True)
            with torch.enable_grad():
                (g_u,) = torch.autograd.grad(pop.respond(u), u, errs[name])
            with torch.no_grad():
                drive_errors[name] = _unpool(pop, g_u, winners[name])
        if lag:  # each population's error, sent back through the feedback matrices of this step
            sent.push({name: _sent_back(circuit, name, drive_errors, (x.shape[0], *circuit.populations[name].shape))
                       for name in order[1:] if name != out})
        # Plasticity: each synapse's rule on the signals present at it now.
        with torch.no_grad():
            # A presynaptic trace is its population's: it advances once per step, however
            # many synapses leave that population (every activity is set by now).
            for pre in dict.fromkeys(syn.pre for syn in circuit.synapses.values()):
                traces[pre] = _leak(traces.get(pre), acts[pre], k_tr)
            now: dict[int, list] = {}  # this step's update per synapse: [syn, ΔW, Δb, ΔB]
            for syn in circuit.synapses.values():
                gw, gb, gfb = syn.ref_updates(traces[syn.pre], drive_errors[syn.post])
                inc = now[id(syn)] = [syn] + [None if g is None else k_w * g for g in (gw, gb, gfb)]
                if s.tau_decay is not None:
                    inc[1] = inc[1] + (s.dt / s.tau_decay) * syn.weight
            for n, syn in learners.items():
                post, last = acts[syn.post], before[syn.post]
                change = torch.zeros_like(post) if last is None else post - last
                high[n] = change if n not in high else (1 - s.dt / syn.rule.tau_hp) * high[n] + change
                g = _feedback_in_time(syn, noise.get(syn.pre), acts[syn.pre], high[n], s.noise)
                inc = now[id(syn)]
                inc[3] = k_w * g if inc[3] is None else inc[3] + k_w * g
            for key, inc in now.items():
                acc = grads.setdefault(key, [inc[0], None, None, None])
                for i in (1, 2, 3):
                    if inc[i] is not None:
                        acc[i] = inc[i] if acc[i] is None else acc[i] + inc[i]
            if moving:  # every step's update into the weights at once, after all are formed
                for syn, *incs in now.values():
                    for param, inc in zip((syn.weight, syn.bias, syn.feedback), incs):
                        if param is not None and inc is not None and param.requires_grad:
                            param.sub_(lr * inc)
        if trace is not None:
            trace(step, {"pre": traces, "drive_error": drive_errors, "activity": acts, "error": errs,
                         "noise": noise, "high_pass": high,
                         "update": {n: grads.get(id(sy), [None, None])[1] for n, sy in circuit.synapses.items()},
                         "feedback_update": {n: grads.get(id(sy), [None] * 4)[3]
                                             for n, sy in circuit.synapses.items()}})
    if moving:  # the weights took every step's update already
        return last_loss if last_loss is not None else torch.tensor(math.nan)
    for syn, gw, gb, gfb in grads.values():
        for p, g in ((syn.weight, gw), (syn.bias, gb), (syn.feedback, gfb)):
            if p is None or g is None or not p.requires_grad:
                continue
            p.grad = g.detach().clone() if p.grad is None else p.grad + g
    return last_loss if last_loss is not None else torch.tensor(math.nan)


def _sent_back(circuit, name: str, drive_errors: dict, shape) -> torch.Tensor | None:
    """The error population ``name`` receives from its consumers: each synapse's feedback matrix
    on the error at its postsynaptic drive, an identity's error as it is (None: none sends)."""
    parts = []
    with torch.no_grad():
        for syn in circuit.synapses.values():
            g = drive_errors.get(syn.post)
            if syn.pre == name and g is not None and syn.feedback_matrix() is not None:
                parts.append(syn.ref_feedback(g, shape))
    parts += [drive_errors[post] for pre, post in circuit.identities if pre == name and post in drive_errors]
    return sum(parts[1:], parts[0]) if parts else None


def _noise_step(old, like: torch.Tensor, std: float, a: float, generator) -> torch.Tensor:
    """The next value of a population's intrinsic noise, shaped like its drive ``like``: white
    (``a = 0``) or the Ornstein–Uhlenbeck step ``a·old + std·√(1−a²)·w``, from ``std·w`` at the
    first step. ``w`` is drawn where ``generator`` lives, in ``like``'s dtype, then moved."""
    where = like.device if generator is None else generator.device
    w = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=where).to(like.device)
    if old is None or a == 0.0:
        return std * w
    return a * old + (std * math.sqrt(1.0 - a * a)) * w


def _feedback_in_time(syn, noise_pre, act_pre, high_post, std: float) -> torch.Tensor:
    """The feedback weight's update of a rule that learns it in time, from the signals at the
    feedback synapse now: the intrinsic noise of the population it returns errors to (the
    forward synapse's presynaptic one; zero where that population has none, as the input) and
    the high-passed activity of the population its errors come from (the postsynaptic one)."""
    xi = torch.zeros_like(act_pre) if noise_pre is None else noise_pre
    signals = LocalSignals(syn.kind, xi, high_post, syn.feedback.detach(), literal=True)
    return syn.rule.time_feedback_update(signals, std)


def sleep_in_time(circuit, noise: dict, settings: TimeSettings) -> None:
    """The weight mirror's sleep in time: each sleeping synapse's presynaptic population holds
    the noise ``noise[synapse name]`` for ``duration``; its postsynaptic response relaxes toward
    ``respond(Wξ)`` (``τ``) and its feedback weight integrates the rule's sleep update on the
    signals present (``τ_w``). Writes feedback ``.grad``; in the limit (``τ = dt``,
    ``τ_w = duration``) the discrete sleep update."""
    s = settings
    k_act, k_w = s.rate(s.tau), s.dt / (s.tau_plasticity or s.duration)
    with torch.no_grad():
        for name, syn in circuit.synapses.items():
            if not syn.rule.sleeps or name not in noise:
                continue
            xi, w, r, acc = noise[name], syn.weight.detach(), None, None
            target = syn.rule.respond(syn.kind.ref_forward(xi, w, None))
            for _ in range(s.steps(s.duration)):
                r = _leak(r, target, k_act)
                g = syn.rule.sleep_update(LocalSignals(syn.kind, xi, r, syn.feedback.detach(), literal=True))
                acc = k_w * g if acc is None else acc + k_w * g
            syn.feedback.grad = acc if syn.feedback.grad is None else syn.feedback.grad + acc
