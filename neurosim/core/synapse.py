"""Synapses: plastic pathways from one population to another, and their compiled execution."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from neurosim.core.kinds import SynapseKind
from neurosim.rules.base import LocalSignals, PlasticityRule

INITS = ("default", "kaiming_normal", "xavier_sum")


def weight_init(name: str, fan_in: int, fan_out: int):
    """An in-place initialiser ``init(tensor, generator)`` for forward and feedback weights.

    ``default``: PyTorch's ``nn.Linear``/``nn.Conv2d`` draw, U(±1/√fan_in);
    ``kaiming_normal``: N(0, 2/fan_out), torchvision's ResNet convolutions;
    ``xavier_sum``: N(0, 1/(fan_in+fan_out)), the weight-mirror authors' MLP.
    """
    if name == "default":
        bound = 1 / math.sqrt(fan_in)
    elif name == "kaiming_normal":
        std = math.sqrt(2 / fan_out)
    elif name == "xavier_sum":
        std = math.sqrt(1 / (fan_in + fan_out))
    else:
        raise ValueError(f"unknown init {name!r}; choose from {INITS}")

    def init(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            if name == "default":
                return t.uniform_(-bound, bound, generator=generator)
            return t.normal_(0.0, std, generator=generator)

    return init


class _SynapseFunction(torch.autograd.Function):
    """Compiled synapse: forward ``W x + b``; backward sends the post error through the rule's
    feedback matrix and writes the rule's local updates of ``W`` (and ``B``) as gradients.

    One fused backward call forms the feedback drive, the product ``δ_y ⊗ x`` and the bias sum,
    exactly the work native autograd does for the layer; every update that needs the product
    shares that one tensor (KP's ``ΔB`` is not recomputed).
    """

    @staticmethod
    def forward(ctx, x, w, b, feedback, kind, rule, keep_w):
        # ``keep_w`` False: ``w`` is a cast copy (autocast) that the rule's backward never reads.
        ctx.save_for_backward(x, w if keep_w else None, feedback)
        ctx.kind, ctx.rule, ctx.weight_shape = kind, rule, w.shape
        ctx.set_materialize_grads(False)
        return kind.forward(x, w, b)

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:  # no error reached the post population (DFA without a pathway to it)
            return None, None, None, None, None, None, None
        x, w, feedback = ctx.saved_tensors
        kind, rule = ctx.kind, ctx.rule
        need_x, need_w, need_b, need_fb = ctx.needs_input_grad[:4]
        need_fb = need_fb and rule.feedback_learns == "engaged"
        m = rule.feedback_matrix(w, feedback) if need_x else None
        if m is None:  # no error goes back (none asked for, or direct feedback alignment)
            # The kinds then read only the weight's shape; a rule that does not read W kept none.
            need_x, m = False, w if w is not None else grad_y.new_zeros(()).expand(ctx.weight_shape)
        gx, product, gb = kind.fused_backward(grad_y, x, m, need_x, need_w or need_fb, need_b)
        gw = rule.forward_update(LocalSignals(kind, x, grad_y, w, product)) if need_w else None
        gfb = None
        if need_fb:
            reads = rule.feedback_reads
            drive = kind.forward(x, w, None) if "drive" in reads else None
            gfb = rule.feedback_update(LocalSignals(kind, x, grad_y, feedback, product, drive,
                                                    w if "weight" in reads else None))
        if gfb is not None and gfb is gw:
            # Two parameters must not share one gradient tensor: accumulation would double up.
            gfb = gfb.clone()
        return gx, gw, gb, gfb, None, None, None


def _autocast_dtype(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class Synapse(nn.Module):
    """A plastic pathway ``pre → post`` with forward weight ``W`` and, where the rule keeps one,
    a feedback weight (stored in ``W``'s layout, i.e. the design's ``Bᵀ``).

    ``feedback`` is a parameter when the rule learns it (KP in engaged steps, WM in sleep), a
    buffer when it is fixed (FA's random matrix, SS's scale) and absent for backprop.
    """

    # Set by ``distributed.wrap`` where the rule derives the engaged feedback update from the
    # forward one: autograd then forms none, and ``distributed.derive_feedback_updates`` does.
    feedback_derived = False

    def __init__(self, name: str, pre: str, post: str, kind: SynapseKind, rule: PlasticityRule,
                 bias: bool = True, init: str = "default", generator: torch.Generator | None = None):
        super().__init__()
        self.name, self.pre, self.post, self.kind, self.rule = name, pre, post, kind, rule
        self.init_name = init
        shape = kind.weight_shape()
        init_fn = self.init_fn()
        generator = generator or torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(init_fn(torch.empty(shape), generator))
        if bias:
            b = torch.zeros(shape[0])
            if init != "kaiming_normal":  # torchvision's ResNet has no conv biases to copy
                init_fn(b, generator)
            self.bias = nn.Parameter(b)
        else:
            self.register_parameter("bias", None)
        fb = rule.init_feedback(self.weight.detach(), init_fn, generator)
        if fb is None:
            self.register_buffer("feedback", None)
        elif rule.feedback_learns is not None:
            self.feedback = nn.Parameter(fb)
        else:
            self.register_buffer("feedback", fb)

    def init_fn(self):
        """The in-place initialiser ``init(tensor, generator)`` this synapse's weights are drawn
        with; a rule that redraws its feedback every batch (brSF) draws from it too."""
        return weight_init(self.init_name, self.kind.fan_in(), self.kind.fan_out())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b, fb = self.weight, self.bias, self.feedback
        if self.rule.native_backward:
            # Backprop's updates are autograd's own gradients: the kind's forward under native
            # autograd (and native autocast) does the same work without a Python backward.
            return self.kind.forward(x, w, b)
        dtype = _autocast_dtype(x.device.type)
        if dtype is None:
            return _SynapseFunction.apply(x, w, b, fb, self.kind, self.rule, True)  # W itself: free to keep
        # Cast as native autocast would (the casts are ordinary autograd ops), then run the
        # synapse in that precision; gradients flow back to the float32 master weights.
        with torch.autocast(x.device.type, enabled=False):
            def cast(t):  # a 0-d gain (sign symmetry's scale) keeps its precision
                return t if t is None or t.dim() == 0 else t.to(dtype)
            return _SynapseFunction.apply(cast(x), cast(w), cast(b), cast(fb), self.kind, self.rule,
                                          self.rule.backward_reads_weight)

    def feedback_matrix(self) -> torch.Tensor:
        """The matrix the feedback path uses now, in ``W``'s layout."""
        return self.rule.feedback_matrix(self.weight, self.feedback)

    # -- reference execution: literal, synapse by synapse --------------------------------
    def ref_forward(self, x):
        return self.kind.ref_forward(x, self.weight, self.bias)

    def ref_feedback(self, post_error, pre_shape):
        return self.kind.ref_feedback(post_error, self.feedback_matrix(), pre_shape)

    def ref_updates(self, pre, post_error):
        """The local updates ``(ΔW, Δb, ΔB)`` from this synapse's own signals, formed literally."""
        gw = self.rule.forward_update(LocalSignals(self.kind, pre, post_error, self.weight))
        gb = None
        if self.bias is not None:
            gb = self.kind.ref_bias_sum(post_error)
        gfb = None
        if self.rule.feedback_learns == "engaged":
            reads, w = self.rule.feedback_reads, self.weight.detach()
            drive = self.kind.ref_forward(pre, w, None) if "drive" in reads else None
            gfb = self.rule.feedback_update(LocalSignals(self.kind, pre, post_error, self.feedback, None, drive,
                                                         w if "weight" in reads else None, literal=True))
        return gw, gb, gfb

    # -- sleep -------------------------------------------------------------------------------
    def sleep_update(self, pre_shape, batch: int, generator: torch.Generator, literal: bool = False,
                     activity: torch.Tensor | None = None):
        """One mirror batch: noise at the presynaptic side (or, for a sleep driven by data, the
        presynaptic ``activity`` replayed), the response it drives, and the feedback weight's
        Hebbian update from those two signals alone."""
        w = self.weight.detach()
        # Noise in the weights' layout (channels_last circuits), so the update arrives in it too.
        channels_last = w.dim() == 4 and not w.is_contiguous() and w.is_contiguous(memory_format=torch.channels_last)
        if activity is not None:
            xi = activity.detach().to(w.dtype)
        else:
            batch = self.rule.mirror_batch(batch, self.kind.positions(pre_shape))
            xi = self.rule.draw_noise((batch, *pre_shape), generator, w.device, w.dtype,
                                      torch.channels_last if channels_last else torch.contiguous_format)
        if literal:
            r = self.rule.respond(self.kind.ref_forward(xi, w, None))
            return self.rule.sleep_update(LocalSignals(self.kind, xi, r, self.feedback.detach(), literal=True))
        r = self.rule.respond(self.kind.forward(xi, w, None))
        return self.rule.sleep_update(LocalSignals(self.kind, xi, r, self.feedback.detach(), self.kind.product(r, xi)))

    def extra_repr(self) -> str:
        return f"{self.pre} -> {self.post}, {self.kind.describe()}, bias={self.bias is not None}, rule={self.rule.name}"
