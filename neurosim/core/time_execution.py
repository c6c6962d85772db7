"""The batched execution of a circuit in time: what ``neurosim.core.dynamics.time_backward`` does,
as tensor ops that training can afford.

``time_backward`` is the literal execution (dicts of signals, a Python list of past steps,
``autograd.grad`` per population, the kinds' ``ref_*`` products). ``TimeExecution`` runs the same
dynamics with the compiled tensor ops of the kinds:

- a *plan* made once, at construction: the populations in order and the pathways into each, which
  populations receive errors from their consumers, the direct pathways, the pooling, the lag of a
  feedback hop, the number of steps; a plan is made again only if the circuit's rules or its
  feedback pathways' switch change;
- the *state* is tensors: activities, errors and eligibility traces, the accumulated updates, the
  step counter (a 0-d tensor), and for delayed feedback fixed-size *ring buffers* indexed by the
  step modulo the lag (``lag`` slots: what is sent at step ``t`` is read back at ``t + lag``);
- one time step is one function ``step(state, x, weights, loss_fn) -> state``; the Python loop over
  steps only calls it. With ``compile=True`` it goes through ``torch.compile(fullgraph=True)``:
  one graph, traced at the first step and reused by every later one (the step counter is a tensor,
  so nothing about the step is a Python constant; being on or off is ``t < T_on`` inside the graph);
- for each synapse, the error sent back through its feedback matrix, the Hebbian product and the
  bias sum come from *one* ``kind.fused_backward`` call on the error at its post population's
  drive and the (traced) presynaptic activity, and the rule's ``forward_update`` /
  ``feedback_update`` receive ``LocalSignals(..., formed=product)`` as in the compiled discrete
  execution. With a delay the sent error waits in its target's ring buffer, summed over all the
  consumers of that population (every hop takes the same lag);
- a population's derivative is in closed form (identity, ReLU, sigmoid, tanh), pooling as
  ``neurosim.core.reference`` walks it; the output error is ``torch.func.grad_and_value`` of the
  loss.

Intrinsic noise (``TimeSettings.noise``, ``tau_noise``) is drawn outside the step, one standard
normal tensor per population and step in the circuit's order from ``backward``'s ``generator``,
the draws ``time_backward`` makes, and passed in (dynamo does not trace a generator); the
Ornstein–Uhlenbeck recursion runs inside. A rule whose feedback weight learns in time (PAL,
``feedback_learns = "time"``) gets the high-passed postsynaptic activity and the presynaptic
noise, their product formed by the kind, as ``time_backward`` gives them.

Nothing inside reads a tensor's value on the host: ``backward`` returns the loss and the output
at the stimulus's last step as device tensors.

With ``plasticity="presentation"`` the weights do not change during a presentation (updates
accumulate, as in ``time_backward``), so the feedback matrices (``sign(W)·s`` for sign
concordance, …) are formed once per presentation. With ``"continuous"`` each step's
accumulators start at zero, so the step returns that step's update, which ``backward`` subtracts,
times the learning rate, from the parameters in place between steps (outside the graph, which
reads the parameters' storage) before forming the feedback matrices again. Batch norm is refused,
as in the literal execution.

One deliberate difference: an eligibility trace is a population's, leaked once per step. The
literal execution leaks a presynaptic population's trace once per outgoing synapse, so a
population with two outgoing synapses (a skip connection) has its trace advanced twice per step;
with a trace and such a circuit the two differ (``tests/test_time_execution.py`` shows it).
"""

from __future__ import annotations

import math

import attrs
import torch

from neurosim.core.dynamics import TimeSettings, _leak, check_circuit, feedback_hops
from neurosim.core.pathways import deliver
from neurosim.core.reference import _pool, _unpool
from neurosim.rules.base import LocalSignals


def _check(circuit, settings) -> None:
    check_circuit(circuit, settings)  # batch norm, a high-pass shorter than dt: as time_backward says it
    # A rule whose feedback learns some other way than these is one this execution does not know:
    # refused rather than silently left out.
    unknown = [n for n, s in circuit.synapses.items()
               if s.rule.feedback_learns not in (None, "engaged", "sleep", "time")]
    if unknown:
        raise ValueError(f"synapses {unknown} learn their feedback weight when "
                         f"{circuit.synapses[unknown[0]].rule.feedback_learns!r}, which the batched execution "
                         f"in time does not run: use neurosim.core.dynamics.time_backward")


def _derivative(activation: str, u, y, err):
    """``f'(u) ⊙ err`` for the population's nonlinearity, ``y = f(u)``, as autograd forms it."""
    if activation == "identity":
        return err
    if activation == "relu":
        return torch.ops.aten.threshold_backward(err, u, 0)
    if activation == "sigmoid":
        return err * (1 - y) * y
    if activation == "tanh":
        return err * (1 - y * y)
    raise ValueError(f"no derivative for activation {activation!r}")


def _teaching(loss_fn, out):
    """``(∂L/∂out, L)``: ``torch.func`` where dynamo traces (one graph), plain autograd in eager
    mode (a functorch transform costs more per call there)."""
    if torch.compiler.is_compiling():
        return torch.func.grad_and_value(loss_fn)(out)
    with torch.enable_grad():
        a = out.detach().requires_grad_(True)
        loss = loss_fn(a)
        return torch.autograd.grad(loss, a)[0], loss.detach()


@attrs.frozen
class _Plan:
    """What one time step does, fixed for a circuit and its settings."""

    order: tuple  # population names, input first
    inp: str
    out: str
    forward: tuple  # (name, population, ((synapse name or None, pre), ...)) in order
    backward: tuple  # (name, population, ((synapse name or None, pre, sends), ...)) reversed
    receivers: tuple  # populations that receive errors from their consumers
    pathways: tuple  # (pathway name, target, target shape)
    traced: tuple  # populations whose eligibility trace is kept
    synapses: tuple  # (name, synapse, has bias, feedback update formed)
    lag: int
    t_on: int
    total: int
    ordered: bool
    k_act: float
    k_err: float
    k_tr: float
    k_w: float
    k_decay: float  # dt/τ_decay (0: no decay)
    noise: float  # the intrinsic noise's standard deviation (0: none, nothing drawn)
    a_noise: float  # its Ornstein–Uhlenbeck factor exp(−dt/τ_ξ) (0: white)
    learners: tuple  # (synapse name, pre, post, 1 − dt/τ_hp) of feedback that learns in time


def _plan(circuit, s: TimeSettings) -> _Plan:
    order = tuple(circuit.order())
    inp, out = circuit.input_name, circuit.output_name
    lag = s.steps(s.delay) + (s.update == "synchronous")
    t_on = s.steps(s.duration)
    total = t_on + (s.steps(s.settle) if s.settle is not None else lag * feedback_hops(circuit))
    names = {id(syn): n for n, syn in circuit.synapses.items()}
    ins = {n: [(names[id(syn)] if syn is not None else None, pre) for syn, pre in circuit.incoming(n)]
           for n in order[1:]}
    # As the literal execution: a population receives what its consumers send back unless it is the
    # input or the output; a synapse sends only where its rule has a feedback matrix.
    sends = {n: syn.feedback_matrix() is not None for n, syn in circuit.synapses.items()}
    receivers = []
    for n in order[1:]:
        if n == out:
            continue
        if any(pre == n and (sname is None or sends[sname]) for post in order[1:] for sname, pre in ins[post]):
            receivers.append(n)
    backward = tuple((n, circuit.populations[n],
                      tuple((sname, pre, pre in receivers) for sname, pre in ins[n]))
                     for n in reversed(order[1:]))
    pathways = tuple((pname, p.target, p.target_shape) for pname, p in circuit.feedback_pathways.items()) \
        if circuit.pathways_enabled else ()
    k_tr = s.rate(s.tau_eligibility)
    traced = tuple(dict.fromkeys(syn.pre for syn in circuit.synapses.values())) if k_tr != 1.0 else ()
    synapses = tuple((n, syn, syn.bias is not None, syn.rule.feedback_learns in ("engaged", "time"))
                     for n, syn in circuit.synapses.items())
    learners = tuple((n, syn.pre, syn.post, 1 - s.dt / syn.rule.tau_hp) for n, syn in circuit.synapses.items()
                     if syn.rule.feedback_learns == "time")
    return _Plan(order, inp, out, tuple((n, circuit.populations[n], tuple(ins[n])) for n in order[1:]), backward,
                 tuple(receivers), pathways, traced, synapses, lag, t_on, total, s.update == "ordered",
                 s.rate(s.tau), s.rate(s.tau), k_tr, s.dt / (s.tau_plasticity or s.duration),
                 0.0 if s.tau_decay is None else s.dt / s.tau_decay, s.noise,
                 0.0 if s.tau_noise is None else math.exp(-s.dt / s.tau_noise), learners)


class TimeExecution:
    """A circuit run in time (``TimeSettings``), batched: ``backward(x, loss_fn)`` presents ``x``
    as ``time_backward`` does and accumulates the same ``.grad`` on every parameter.

    ``compile``: run each time step through ``torch.compile`` (``backend``, default inductor) with
    ``fullgraph=True``: the whole step — forward through every population, the loss's derivative
    (``torch.func``), every synapse's fused backward and its rule's updates, the ring buffers'
    writes — is one graph, compiled at the first step and reused by every later step and later
    presentation of the same shapes. A new ``loss_fn`` object per presentation (a closure over new
    labels) recompiles only if its code differs; dynamo guards the closure's tensors by shape.
    """

    def __init__(self, circuit, settings: TimeSettings, compile: bool = False, backend: str = "inductor"):
        if not isinstance(settings, TimeSettings):
            raise ValueError(f"settings must be a TimeSettings, got {type(settings).__name__}")
        _check(circuit, settings)
        self.circuit, self.settings = circuit, settings
        self.compiled, self.backend = compile, backend
        self._replan()

    def _key(self):
        c = self.circuit
        return (tuple((n, id(s.rule)) for n, s in c.synapses.items()), c.pathways_enabled,
                tuple(c.feedback_pathways), tuple(c.populations))

    def _replan(self) -> None:
        self._made_for = self._key()
        self.plan = _plan(self.circuit, self.settings)
        self._step = torch.compile(self.step, fullgraph=True, backend=self.backend) if self.compiled else self.step

    # -- state -----------------------------------------------------------------------------
    def _weights(self) -> dict:
        """The tensors a presentation reads and never changes: per synapse ``W``, ``b``, the
        feedback state and the feedback matrix the rule uses now; per pathway its ``B``."""
        c = self.circuit
        with torch.no_grad():
            w = {n: s.weight.detach() for n, s in c.synapses.items()}
            weights = {"w": w, "b": {}, "fb": {}, "m": {}, "B": {}}
            for n, s in c.synapses.items():
                if s.bias is not None:
                    weights["b"][n] = s.bias.detach()
                if s.feedback is not None:
                    weights["fb"][n] = s.feedback.detach()
                m = s.rule.feedback_matrix(w[n], weights["fb"].get(n))
                if m is not None:
                    weights["m"][n] = m
            for pname, _, _ in self.plan.pathways:
                weights["B"][pname] = c.feedback_pathways[pname].feedback_matrix().detach()
        return weights

    def initial_state(self, x: torch.Tensor) -> dict:
        """Everything at rest: zero activities, errors, traces, ring buffers and updates, step 0."""
        p, c = self.plan, self.circuit
        n = x.shape[0]

        def zeros(shape):
            return torch.zeros((n, *shape), dtype=x.dtype, device=x.device)

        state = {"t": torch.zeros((), dtype=torch.long, device=x.device),
                 "loss": torch.zeros((), dtype=x.dtype, device=x.device),
                 "act": {name: zeros(c.populations[name].shape) for name in p.order},
                 "err": {name: zeros(c.populations[name].shape) for name in p.order[1:]} if p.k_err != 1.0 else {},
                 "trace": {name: zeros(c.populations[name].shape) for name in p.traced},
                 "noise": {name: zeros(c.populations[name].shape) for name in p.order[1:]} if p.a_noise else {},
                 "high": {name: zeros(c.populations[post].shape) for name, _, post, _ in p.learners},
                 "ring": {}, "gw": {}, "gb": {}, "gfb": {}}
        if p.lag:
            # Slot-major: ``ring[t mod lag]`` is one step's signal, contiguous.
            state["ring"] = {name: torch.zeros((p.lag, n, *c.populations[name].shape), dtype=x.dtype, device=x.device)
                             for name in p.receivers}
            if p.pathways:
                state["ring"][":out"] = torch.zeros((p.lag, n, *c.populations[p.out].shape), dtype=x.dtype,
                                                    device=x.device)
        for name, syn, has_bias, learns in p.synapses:
            state["gw"][name] = torch.zeros_like(syn.weight, dtype=x.dtype)
            if has_bias:
                state["gb"][name] = torch.zeros_like(syn.bias, dtype=x.dtype)
            if learns:
                state["gfb"][name] = torch.zeros_like(syn.feedback, dtype=x.dtype)
        return state

    # -- one time step -----------------------------------------------------------------------
    def step(self, state: dict, x: torch.Tensor, weights: dict, loss_fn, draws: dict | None = None) -> dict:
        """Advance ``state`` by one step of ``dt``: activities, the teaching signal while the
        stimulus is on, errors from the output down, and every synapse's update on the signals
        present at it now. ``draws``: this step's standard normal draws of the intrinsic noise, per
        population (``settings.noise`` > 0). Returns the new state (new ring buffers and
        accumulators: nothing is changed in place)."""
        p, c = self.plan, self.circuit
        t = state["t"]
        # 1 while the stimulus is on, 0 after: a factor, not a branch (one graph for every step).
        on = (t < p.t_on).to(x.dtype)
        prev = state["act"]
        new = {p.inp: x * on}
        drives, responses, winners, noise = {}, {}, {}, {}
        for name, pop, incoming in p.forward:
            drive = None
            for sname, pre in incoming:
                a = new[pre] if p.ordered else prev[pre]
                d = a if sname is None else c.synapses[sname].kind.forward(a, weights["w"][sname],
                                                                           weights["b"].get(sname))
                drive = d if drive is None else drive + d
            drives[name], winners[name] = _pool(pop, drive)
            if p.noise:  # the literal's _noise_step: σ·w, or a·ξ + σ√(1−a²)·w after the first step
                w = draws[name]
                if p.a_noise:
                    ou = p.a_noise * state["noise"][name] + (p.noise * math.sqrt(1.0 - p.a_noise * p.a_noise)) * w
                    noise[name] = torch.where(t == 0, p.noise * w, ou)
                else:
                    noise[name] = p.noise * w
                drives[name] = drives[name] + noise[name]
            responses[name] = pop.respond(drives[name])
            new[name] = _leak(prev[name], responses[name], p.k_act)
        grad, loss = _teaching(loss_fn, new[p.out])
        e_out = grad * on
        trace = {name: _leak(state["trace"][name], new[name], p.k_tr) for name in p.traced} if p.traced else new

        # Errors, from the output down. With a lag, what the consumers sent ``lag`` steps ago
        # waits in slot ``t mod lag`` of each ring; it is read before this step's errors overwrite it.
        if p.lag:
            slot = (t % p.lag).view(1)
            arrived = {name: ring.index_select(0, slot).squeeze(0) for name, ring in state["ring"].items()}
            e_source = arrived.get(":out")
        else:
            arrived, e_source = None, e_out
        sent: dict[str, torch.Tensor] = {}
        errs = {}
        # New accumulators, not in-place additions: inductor mis-compiles a step graph whose
        # inputs are added to in place and returned (the updates came out wrong after 3 steps).
        acc = {"gw": dict(state["gw"]), "gb": dict(state["gb"]), "gfb": dict(state["gfb"])}
        for name, pop, incoming in p.backward:
            target = e_out if name == p.out else None
            for pname, ptarget, shape in p.pathways:
                if ptarget == name:
                    d = deliver(e_source.flatten(1), weights["B"][pname], shape, e_source.dtype)
                    target = d if target is None else target + d
            if name in p.receivers:
                back = arrived[name] if p.lag else sent.get(name)
                if back is not None:
                    target = back if target is None else target + back
            if target is None:
                target = torch.zeros_like(new[name])
            err = _leak(state["err"][name], target, p.k_err) if p.k_err != 1.0 else target
            errs[name] = err
            delta = _unpool(pop, _derivative(pop.activation, drives[name], responses[name], err), winners[name])
            for sname, pre, receives in incoming:
                if sname is None:
                    if receives:
                        sent[pre] = delta if pre not in sent else sent[pre] + delta
                    continue
                gx = self._synapse(acc, weights, sname, trace[pre], delta, receives)
                if gx is not None:
                    sent[pre] = gx if pre not in sent else sent[pre] + gx
        rings = {}
        if p.lag:
            for name, ring in state["ring"].items():
                value = e_out if name == ":out" else sent[name]
                rings[name] = ring.index_copy(0, slot, value.unsqueeze(0))
        if p.k_decay:
            for name, _, _, _ in p.synapses:
                acc["gw"][name] = acc["gw"][name] + p.k_decay * weights["w"][name]
        high = self._in_time(acc, weights, state["high"], prev, new, noise, t) if p.learners else {}
        return {**state, **acc, "t": t + 1, "loss": loss, "act": new, "err": errs if p.k_err != 1.0 else {},
                "trace": trace if p.traced else {}, "ring": rings, "noise": noise if p.a_noise else {},
                "high": high}

    def _in_time(self, acc, weights, high, prev, new, noise, t) -> dict:
        """Feedback weights that learn in time (PAL): the postsynaptic activity high-passed
        (``r̂ ← (1 − dt/τ_hp)·r̂ + a_t − a_{t−1}``, 0 at the first step), and the rule's update from
        it and the presynaptic noise (none at the input), its product formed by the kind."""
        p = self.plan
        later = (t > 0).to(new[p.inp].dtype)  # the first step's change is 0: nothing came before
        out = {}
        for sname, pre, post, k_hp in p.learners:
            syn = self.circuit.synapses[sname]
            out[sname] = k_hp * high[sname] + (new[post] - prev[post]) * later
            w = weights["w"][sname]
            xi = noise.get(pre)
            if xi is None:
                xi, product = torch.zeros_like(new[pre]), torch.zeros_like(w)
            else:
                product = syn.kind.product(out[sname], xi)
            g = syn.rule.time_feedback_update(LocalSignals(syn.kind, xi, out[sname], weights["fb"][sname], product),
                                              p.noise)
            acc["gfb"][sname] = acc["gfb"][sname] + p.k_w * g
        return out

    def _synapse(self, acc, weights, sname, pre, delta, sends):
        """One fused call: the error ``delta`` sends back (if ``sends``), the product and bias sum;
        the rule's updates accumulated, scaled by ``dt/τ_w``. Returns the error sent back."""
        syn = self.circuit.synapses[sname]
        kind, rule, k = syn.kind, syn.rule, self.plan.k_w
        w, fb = weights["w"][sname], weights["fb"].get(sname)
        m = weights["m"].get(sname)
        sends = sends and m is not None
        gx, product, gb = kind.fused_backward(delta, pre, m if m is not None else w, sends, True, sname in acc["gb"])
        acc["gw"][sname] = acc["gw"][sname] + k * rule.forward_update(LocalSignals(kind, pre, delta, w, product))
        if gb is not None:
            acc["gb"][sname] = acc["gb"][sname] + k * gb
        if sname in acc["gfb"]:
            reads = rule.feedback_reads
            drive = kind.forward(pre, w, None) if "drive" in reads else None
            gfb = rule.feedback_update(LocalSignals(kind, pre, delta, fb, product, drive,
                                                    w if "weight" in reads else None))
            if gfb is not None:
                acc["gfb"][sname] = acc["gfb"][sname] + k * gfb
        return gx if sends else None

    # -- a presentation ----------------------------------------------------------------------
    def backward(self, x: torch.Tensor, loss_fn, generator: torch.Generator | None = None,
                 lr: float | None = None):
        """Present ``x`` for the settings' duration (then nothing, while errors settle) and
        accumulate every synapse's integrated update into ``.grad``, as ``time_backward`` does.

        ``loss_fn(output_activity) -> scalar`` is the teaching signal while the stimulus is on.
        ``generator`` draws the intrinsic noise (``settings.noise``; None: the default generator of
        ``x``'s device), step by step and population by population in the circuit's order, the
        draws ``time_backward`` makes: the same generator state gives the same noise. Returns
        ``(loss, output)``: the loss and the output population's activity at the stimulus's last
        step, detached, on ``x``'s device (nothing is read back to the host).

        ``settings.plasticity == "continuous"``: the parameters move by ``−lr`` times each step's
        update, in place, and no ``.grad`` is written, as ``time_backward`` does."""
        moving = self.settings.plasticity == "continuous"
        if moving and (lr is None or not lr > 0):
            raise ValueError(f"continuous plasticity moves the weights during the presentation: give lr > 0, got {lr}")
        if self._key() != self._made_for:
            _check(self.circuit, self.settings)
            self._replan()
        p = self.plan
        x = x.detach()
        weights = self._weights()
        state = self.initial_state(x)
        loss = output = None
        shapes = [(name, (x.shape[0], *self.circuit.populations[name].shape)) for name in p.order[1:]]
        where = x.device if generator is None else generator.device
        draws = None
        if moving:
            params = [(kind, name, param) for name, syn, _, _ in p.synapses
                      for kind, param in (("gw", syn.weight), ("gb", syn.bias), ("gfb", syn.feedback))
                      if param is not None and param.requires_grad and name in state[kind]]
            zero = {kind: dict(state[kind]) for kind in ("gw", "gb", "gfb")}
        with torch.no_grad():
            for t in range(p.total):
                if p.noise:  # drawn here, outside the step's graph: dynamo does not trace a generator
                    draws = {name: torch.randn(shape, generator=generator, dtype=x.dtype, device=where).to(x.device)
                             for name, shape in shapes}
                state = self._step(state, x, weights, loss_fn, draws)
                if t == p.t_on - 1:
                    loss, output = state["loss"], state["act"][p.out]
                if moving:  # this step's update into the parameters; the next step starts from zero
                    torch._foreach_add_([param for _, _, param in params],
                                        [state[kind][name].to(param.dtype) for kind, name, param in params], alpha=-lr)
                    state = {**state, **zero}
                    weights = self._weights()  # the feedback matrices of the moved weights
        if moving:
            return loss.detach(), output.detach()
        for name, syn, _, _ in p.synapses:
            for param, g in ((syn.weight, state["gw"].get(name)), (syn.bias, state["gb"].get(name)),
                             (syn.feedback, state["gfb"].get(name))):
                if param is None or g is None or not param.requires_grad:
                    continue
                param.grad = g if param.grad is None else param.grad + g
        return loss.detach(), output.detach()
