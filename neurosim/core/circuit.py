"""Circuits: a graph of neuron populations joined by synapses and identity pathways."""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn as nn

from neurosim.core.analysis import angle_deg
from neurosim.core.kinds import Conv2d, Dense, SynapseKind
from neurosim.core.pathways import FeedbackPathway, _DirectFeedback
from neurosim.core.population import NeuronPopulation
from neurosim.core.synapse import Synapse
from neurosim.rules.base import PlasticityRule

MODES = ("engaged", "sleep", "eval")


class _Step(NamedTuple):
    """One population of the lowered circuit: where its drives come from, what can be freed.

    A NamedTuple rather than an attrs class: TorchDynamo traces through it without a break.
    """

    target: int
    population: NeuronPopulation
    incoming: tuple  # ((synapse or None for identity, source index), ...)
    free: tuple  # indices of activities no later step reads
    fresh: bool  # the summed drive is a new tensor that no one else holds
    direct: bool  # a feedback pathway targets this population: keep its activity


class Circuit(nn.Module):
    """A graph of ``NeuronPopulation``s joined by plastic ``Synapse``s and identity pathways,
    with optional ``FeedbackPathway``s that send the output error straight to hidden populations.

    Build it in a few lines::

        c = Circuit(rule=KolenPollack(decay=1e-3))
        c.input("x", 64)
        c.population("h", 100, activation="relu")
        c.population("y", 10)
        c.dense("x", "h"); c.dense("h", "y")

    Calling the circuit runs the *compiled* execution: populations in topological order, each
    synapse a custom autograd function whose backward applies its rule, so ``loss.backward()``
    leaves every local update in ``.grad``. ``reference_backward`` runs the same circuit
    literally instead (see ``neurosim.core.reference``). Modes: ``engaged`` (learning from data),
    ``sleep`` (noise-driven feedback learning), ``eval``.

    Feedback pathways (``feedback_pathway``, ``add_direct_feedback``) deliver ``B e`` — the
    output error ``e`` through a pathway's own weight — to a target population's activity, on
    top of whatever error its consumers send back; direct feedback alignment is built from them.
    """

    def __init__(self, rule: PlasticityRule | None = None, seed: int = 0):
        super().__init__()
        self.rule = rule
        self.populations = nn.ModuleDict()
        self.synapses = nn.ModuleDict()
        self.identities: list[tuple[str, str]] = []
        self.feedback_pathways = nn.ModuleDict()
        self.pathways_enabled = True
        self.input_name: str | None = None
        self.output_name: str | None = None
        self._generator = torch.Generator().manual_seed(seed)
        self._plan_cache = None
        self.mode = "engaged"

    # -- building ---------------------------------------------------------------------------
    def input(self, name: str, shape) -> NeuronPopulation:
        """The population whose activity is the data."""
        if self.input_name is not None:
            raise ValueError(f"circuit already has input population {self.input_name!r}")
        pop = self.population(name, shape)
        self.input_name = name
        return pop

    def population(self, name: str, shape, activation: str = "identity", norm: str | None = None,
                   pool: str = "none", pool_kernel: int | None = None, pool_stride: int | None = None,
                   pool_padding: int = 0) -> NeuronPopulation:
        """Add a population; the last one added is the output unless ``output_name`` is set.

        ``pool`` is ``"none"``, ``"global_avg"`` or ``"max"`` (with ``pool_kernel``,
        ``pool_stride`` and ``pool_padding``); see ``NeuronPopulation``."""
        if name in self.populations:
            raise ValueError(f"population {name!r} already exists")
        if not name or "." in name:
            raise ValueError(f"population name {name!r} must be non-empty and contain no '.'")
        pop = NeuronPopulation(name, shape, activation, norm, pool, pool_kernel, pool_stride, pool_padding)
        self.populations[name] = pop
        self.output_name = name
        self._relower()
        return pop

    def max_pool(self, pre: str, post: str, kernel_size: int, stride: int | None = None,
                 padding: int = 0) -> NeuronPopulation:
        """A max-pooling population ``post`` fed by an identity pathway from ``pre``, its shape the
        one the window makes of ``pre``'s (torchvision's stem: ``max_pool("stem", "stem_pool", 3, 2, 1)``)."""
        src = self._pop(pre)
        if len(src.shape) != 3:
            raise ValueError(f"max pooling needs a (C, H, W) population; {pre!r} has shape {src.shape}")
        stride = kernel_size if stride is None else stride
        if not all(isinstance(v, int) and v >= 1 for v in (kernel_size, stride)):
            raise ValueError(f"max pooling needs a positive whole kernel size and stride, got {kernel_size!r}, {stride!r}")
        shape = (src.shape[0], *((n + 2 * padding - kernel_size) // stride + 1 for n in src.shape[1:]))
        if min(shape[1:]) < 1:
            raise ValueError(f"max pooling {pre!r} of shape {src.shape} with kernel {kernel_size} leaves no output")
        pop = self.population(post, shape, pool="max", pool_kernel=kernel_size, pool_stride=stride,
                              pool_padding=padding)
        self.identity(pre, post)
        return pop

    def connect(self, pre: str, post: str, kind: SynapseKind, rule: PlasticityRule | None = None,
                bias: bool = True, init: str = "default", name: str | None = None) -> Synapse:
        """Add a plastic synapse ``pre → post`` of the given kind under ``rule`` (default: the circuit's)."""
        rule = rule or self.rule
        if rule is None:
            raise ValueError("no plasticity rule: pass rule= to Circuit or to connect")
        if not isinstance(kind, SynapseKind):
            raise TypeError(f"{kind!r} is not a synapse kind: it must provide the methods of "
                            f"neurosim.core.kinds.SynapseKind (Dense and Conv2d do)")
        src, dst = self._pop(pre), self._pop(post)
        dst.check_drive(kind.out_shape(src.shape))
        name = name or f"{pre}->{post}"
        if name in self.synapses:
            raise ValueError(f"synapse {name!r} already exists")
        syn = Synapse(name, pre, post, kind, rule, bias, init, self._generator)
        self.synapses[name] = syn
        self._relower()
        return syn

    def dense(self, pre: str, post: str, **kw) -> Synapse:
        """A fully connected synapse between two populations (a spatial ``pre`` is flattened)."""
        return self.connect(pre, post, Dense(self._pop(pre).size, self._pop(post).size), **kw)

    def conv(self, pre: str, post: str, kernel_size: int, stride: int = 1, padding: int = 0,
             groups: int = 1, **kw) -> Synapse:
        """A 2-D convolutional synapse; channel counts come from the two populations."""
        kind = Conv2d(self._pop(pre).shape[0], self._pop(post).shape[0], kernel_size, stride, padding, groups)
        return self.connect(pre, post, kind, **kw)

    def identity(self, pre: str, post: str) -> None:
        """A non-plastic pathway that adds ``pre``'s activity to ``post``'s drive (residuals, pooling)."""
        self._pop(post).check_drive(self._pop(pre).shape)
        self.identities.append((pre, post))
        self._relower()

    def feedback_pathway(self, source: str, target: str, rule: PlasticityRule | None = None,
                         init: str = "default", name: str | None = None, per_unit: bool = False) -> FeedbackPathway:
        """A feedback pathway from ``source``'s error to ``target``'s activity (``B e``).

        ``source`` must be the output population (its error is the loss's gradient, ``e``);
        ``rule`` is the pathway's own (default ``FeedbackAlignment()``: a fixed random ``B``
        drawn from the circuit's seeded generator); ``per_unit`` gives a spatial target one row
        of ``B`` per unit instead of one per channel; see ``neurosim.core.pathways``."""
        src, dst = self._pop(source), self._pop(target)
        if source != self.output_name:
            raise ValueError(f"a feedback pathway carries the output error: source must be the output "
                             f"population {self.output_name!r}, not {source!r}")
        if target in (source, self.input_name):
            raise ValueError(f"a feedback pathway cannot target the {'input' if target == self.input_name else 'output'} "
                             f"population {target!r}")
        if any(p.target == target for p in self.feedback_pathways.values()):
            raise ValueError(f"population {target!r} already receives a feedback pathway")
        pathway = FeedbackPathway(source, target, src.shape, dst.shape, rule, self._generator, init, name, per_unit)
        like = next((s.weight for s in self.synapses.values()), None)
        if like is not None:  # drawn on the CPU in float32, like every weight; then where the circuit is
            pathway.to(like.device, like.dtype)
        if pathway.name in self.feedback_pathways or "." in pathway.name:
            raise ValueError(f"feedback pathway name {pathway.name!r} is taken or contains '.'")
        self.feedback_pathways[pathway.name] = pathway
        self._relower()
        return pathway

    def add_direct_feedback(self, rule: PlasticityRule | None = None, init: str = "default",
                            per_unit: bool | None = None) -> list[FeedbackPathway]:
        """Direct feedback: a pathway from the output to every hidden population that is the post
        of a plastic synapse (and has no pathway yet), in the order populations were added.

        Populations that no synapse drives (residual sums, pooling) receive no direct error;
        identity pathways still carry whatever error their post population has — under direct
        feedback alignment, whose synapses send nothing back, none. ``per_unit`` (None: as the
        rules of the synapses into the target say, ``DirectFeedbackAlignment(per_unit=True)``)
        gives a spatial target one row of ``B`` per unit instead of one per channel."""
        posts = {}
        for s in self.synapses.values():
            posts[s.post] = posts.get(s.post, False) or bool(getattr(s.rule, "per_unit", False))
        have = {p.target for p in self.feedback_pathways.values()}
        return [self.feedback_pathway(self.output_name, n, rule=rule, init=init,
                                      per_unit=posts[n] if per_unit is None else per_unit) for n in self.populations
                if n in posts and n not in have and n not in (self.input_name, self.output_name)]

    @contextlib.contextmanager
    def feedback_pathways_off(self):
        """Run the circuit (both executions) without its feedback pathways, e.g. to compute the
        errors plain backprop would deliver with every synapse's rule swapped for ``Backprop``."""
        previous, self.pathways_enabled = self.pathways_enabled, False
        try:
            yield self
        finally:
            self.pathways_enabled = previous

    @contextlib.contextmanager
    def backprop_truth(self):
        """Run the circuit as backprop would: every synapse's rule swapped for ``Backprop`` and
        the feedback pathways off; the rules are restored on leaving. What monitors compare the
        errors a rule delivers with."""
        from neurosim.rules.backprop import Backprop

        rules = {name: syn.rule for name, syn in self.synapses.items()}
        truth = Backprop()
        try:
            for syn in self.synapses.values():
                syn.rule = truth
            with self.feedback_pathways_off():
                yield self
        finally:
            for name, syn in self.synapses.items():
                syn.rule = rules[name]

    def _pop(self, name: str) -> NeuronPopulation:
        if name not in self.populations:
            raise ValueError(f"no population {name!r}; have {list(self.populations)}")
        return self.populations[name]

    # -- lowering -----------------------------------------------------------------------------
    def incoming(self, name: str) -> list[tuple[Synapse | None, str]]:
        """The pathways into a population: ``(synapse, pre)`` pairs, ``None`` for identities."""
        ins = [(s, s.pre) for s in self.synapses.values() if s.post == name]
        return ins + [(None, pre) for pre, post in self.identities if post == name]

    def order(self) -> list[str]:
        """Populations in topological order, input first."""
        return [self.input_name] + [self._names[s.target] for s in self._plan()]

    def _relower(self) -> None:
        """Lower the circuit again after a change, as soon as it is complete.

        The plan is made here, while building, not on the first forward: a forward traced by
        ``torch.compile`` would otherwise build it inside the trace, guard on its absence and
        compile everything a second time on the next call."""
        self._plan_cache = None
        try:
            self._plan()
        except ValueError:
            pass  # not complete yet; forward() will name what is missing

    def _plan(self) -> list[_Step]:
        if self._plan_cache is not None:
            return self._plan_cache
        if self.input_name is None:
            raise ValueError("circuit has no input population; add one with circuit.input(name, shape)")
        names = list(self.populations)
        index = {n: i for i, n in enumerate(names)}
        # One pass over the pathways (as incoming() lists them: synapses, then identities); the
        # circuit is lowered after every builder call, so this stays linear in its size.
        ins = {n: [] for n in names}
        for syn in self.synapses.values():
            ins[syn.post].append((syn, syn.pre))
        for pre, post in self.identities:
            ins[post].append((None, pre))
        preds = {n: {pre for _, pre in ins[n]} for n in names}
        for n in names:
            if n != self.input_name and not preds[n]:
                raise ValueError(f"population {n!r} receives no pathway")
        order, done = [], {self.input_name}
        while len(done) < len(names):
            ready = [n for n in names if n not in done and preds[n] <= done]
            if not ready:
                raise ValueError(f"circuit has a cycle among {sorted(set(names) - done)}")
            for n in ready:
                order.append(n)
                done.add(n)
        last_use = {}
        for i, n in enumerate(order):
            for pre in preds[n]:
                last_use[pre] = i
        freed_at = {}
        for pre, i in last_use.items():
            if pre != self.output_name:
                freed_at.setdefault(i, []).append(index[pre])
        for p in self.feedback_pathways.values():
            if p.source != self.output_name:
                raise ValueError(f"feedback pathway {p.name!r} starts at {p.source!r}, which is no longer the "
                                 f"output population {self.output_name!r}")
        targets = {p.target: p for p in self.feedback_pathways.values()}
        steps, direct = [], []
        for i, n in enumerate(order):
            free = tuple(freed_at.get(i, ()))
            incoming = tuple((s, index[pre]) for s, pre in ins[n])
            # A sum of pathways is a tensor nobody else holds. A lone synapse's output is not
            # treated so: forward hooks (monitors) hold it as the synapse's drive.
            fresh = len(incoming) > 1
            steps.append(_Step(index[n], self.populations[n], incoming, free, fresh, n in targets))
            if n in targets:
                direct.append(targets[n])
        self._names = names
        self._ends = (index[self.input_name], index[self.output_name])
        # Feedback pathways in the order their targets' activities are made.
        self._direct = tuple(direct)
        self._direct_shapes = tuple(p.target_shape for p in direct)
        self._plan_cache = steps
        return steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps = self._plan()
        first, last = self._ends
        direct = self._direct if self.pathways_enabled and torch.is_grad_enabled() else ()
        acts = [None] * len(self.populations)
        acts[first] = x
        kept = []  # activities that feedback pathways deliver to, in the order of self._direct
        for step in steps:
            drive = None
            for syn, src in step.incoming:
                d = acts[src] if syn is None else syn(acts[src])
                drive = d if drive is None else drive + d
            acts[step.target] = step.population(drive, step.fresh)
            if direct and step.direct:
                # Kept past its last use (the step's `free` still drops it from `acts`); the
                # backward needs only its place in the graph, which the synapses reading it keep
                # anyway. No later step modifies an activity in place (in-place ReLU acts on a
                # population's own fresh drive, before it becomes the activity).
                kept.append(acts[step.target])
            for f in step.free:
                acts[f] = None
        if direct:
            # The output error e enters every target as B e, through autograd: the returned
            # activity is the output's, and its backward hands B_l e to each kept activity.
            return _DirectFeedback.apply(acts[last], self._direct_shapes, *kept,
                                         *(p.feedback_matrix() for p in direct))
        return acts[last]

    # -- modes and phases ---------------------------------------------------------------------
    def set_mode(self, mode: str) -> "Circuit":
        """``engaged`` and ``sleep`` keep batch norm in training mode; ``eval`` freezes it."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
        self.mode = mode
        super().train(mode != "eval")
        return self

    def train(self, mode: bool = True):
        return self.set_mode("engaged" if mode else "eval")

    def new_batch(self, generator: torch.Generator | None = None) -> None:
        """Start an engaged batch: every synapse whose rule redraws its feedback per batch (brSF)
        draws it anew, in construction order, from ``generator`` (None: the device's default).

        Call it once before each engaged forward (compiled or reference), never between a forward
        and its backward; synapses under other rules are left alone."""
        for syn in self.synapses.values():
            syn.rule.redraw(syn.feedback, syn.init_fn(), generator)  # a no-op for most rules

    def sleeping_synapses(self) -> list[Synapse]:
        return [s for s in self.synapses.values() if s.rule.sleeps]

    @torch.no_grad()
    def activities(self, x: torch.Tensor, names) -> dict[str, torch.Tensor]:
        """The activities of the populations ``names`` when the circuit sees ``x``: one forward
        without gradients and with batch norm frozen (running statistics used, none updated),
        so asking changes nothing in the circuit. The input population's activity is ``x``."""
        names = set(names)
        unknown = names - set(self.populations)
        if unknown:
            raise KeyError(f"no population {sorted(unknown)[0]!r} in the circuit")
        kept = {self.input_name: x} if self.input_name in names else {}
        hooks = [self.populations[n].register_forward_hook(
            lambda module, inputs, out, n=n: kept.__setitem__(n, out)) for n in names if n != self.input_name]
        mode = self.mode
        try:
            self.set_mode("eval")
            self(x)
        finally:
            self.set_mode(mode)
            for h in hooks:
                h.remove()
        return kept

    def sleep(self, batch: int, generator: torch.Generator | None = None, literal: bool = False,
              synapses=None, data: torch.Tensor | None = None) -> None:
        """One mirror batch for every synapse whose rule sleeps (or for the sleeping synapses
        named in ``synapses``): writes feedback ``.grad``.

        No forward pass through the circuit for a rule whose sleep is driven by noise: each
        synapse's presynaptic population fires noise and its feedback weight learns from that
        noise and the response it drives, all as the synapse's own rule says (its
        ``sleep_phase``, ``draw_noise``, ``respond``, ``sleep_update``). Each synapse's mirror
        batch holds its phase's ``batch_size`` noise images, or ``batch`` where that is 0 (and
        more where its ``events`` ask). The noise comes from ``generator`` (``None``: the default
        generator of the circuit's device), synapse by synapse in construction order, and always
        lands on the circuit's device; a generator on that device is fastest. A rule whose phase
        is driven by data (``SleepPhase.drive``) replays instead its presynaptic population's
        activity on the input batch ``data`` (``activities``).
        """
        sleepers = self.sleeping_synapses()
        if synapses is not None:
            wanted = set(synapses)
            sleepers = [s for n, s in self.synapses.items() if n in wanted and s.rule.sleeps]
        replay = {s.pre for s in sleepers if s.rule.sleep_phase.drive == "data"}
        if replay and data is None:
            raise ValueError("a sleep driven by data needs the input batch it replays: pass data=")
        acts = self.activities(data, replay) if replay else {}
        for syn in sleepers:
            size = syn.rule.sleep_phase.batch_size or batch
            g = syn.sleep_update(self.populations[syn.pre].shape, size, generator, literal, acts.get(syn.pre))
            syn.feedback.grad = g if syn.feedback.grad is None else syn.feedback.grad + g

    # -- parameters ---------------------------------------------------------------------------
    def engaged_parameters(self) -> list[nn.Parameter]:
        """Everything an engaged step updates: forward weights, biases, norms, and feedback
        weights whose rule learns them from the task (KP) or in time (PAL)."""
        params = [p for n, p in self.named_parameters() if not n.endswith(".feedback")]
        params += [s.feedback for s in self.synapses.values() if s.rule.feedback_learns in ("engaged", "time")]
        return params

    def sleep_parameters(self) -> list[nn.Parameter]:
        """Feedback weights that learn in sleep (WM)."""
        return [s.feedback for s in self.sleeping_synapses()]

    # -- inspection ---------------------------------------------------------------------------
    def plausibility(self) -> dict[str, str]:
        """What each synapse's feedback path reads from forward weights."""
        return {n: s.rule.transports for n, s in self.synapses.items()}

    def transports_weights(self) -> bool:
        return any(t == "weights" for t in self.plausibility().values())

    @torch.no_grad()
    def alignment_angles(self) -> dict[str, float]:
        """Angle in degrees between each ``W`` and its feedback matrix ``Bᵀ`` (flattened).

        NaN for a synapse whose rule sends nothing back (direct feedback alignment): it has no
        feedback matrix, and the angle is undefined."""
        out = {}
        for n, s in self.synapses.items():
            m = s.feedback_matrix()
            out[n] = math.nan if m is None else float(angle_deg(s.weight, m))
        return out

    def __repr__(self) -> str:
        lines = [f"Circuit(mode={self.mode!r})", "  populations:"]
        try:
            order = self.order()
        except ValueError:
            order = list(self.populations)
        for n in order:
            p = self.populations[n]
            tag = " [input]" if n == self.input_name else " [output]" if n == self.output_name else ""
            lines.append(f"    {p.extra_repr()}{tag}")
        lines.append("  synapses:")
        for s in self.synapses.values():
            label = "" if s.name == f"{s.pre}->{s.post}" else f"{s.name}: "
            lines.append(f"    {label}{s.extra_repr()}, W{tuple(s.weight.shape)}")
        for pre, post in self.identities:
            lines.append(f"    {pre} -> {post}: identity")
        if self.feedback_pathways:
            lines.append("  feedback pathways:")
            for p in self.feedback_pathways.values():
                lines.append(f"    {p.describe()}")
        rules = {s.rule.describe() for s in self.synapses.values()}
        rules |= {p.rule.describe() for p in self.feedback_pathways.values()}
        lines.append(f"  rules: {'; '.join(sorted(rules))}")
        t = sorted(set(self.plausibility().values()))
        lines.append(f"  feedback transports: {', '.join(t) if t else 'nothing'}")
        return "\n".join(lines)
