"""Feedback pathways: errors sent from one population straight to another, as objects.

A synapse's feedback reaches only its own presynaptic population. A ``FeedbackPathway`` is a
feedback connection of its own: it carries the *error* of a source population (the output, of
size ``K``) through its own feedback weight ``B`` to a target population anywhere upstream —
the wiring of direct feedback alignment (Nøkland 2016), where every hidden population receives
``B_l e`` from the output error ``e`` and multiplies it by its own derivative.

Shapes. The error delivered to the target's *activity* is ``B e``:

* target ``(n,)``: ``B`` is ``(n, K)`` (dense);
* target ``(C, H, W)``, per channel (the default): ``B`` is ``(C, K)``, one row per channel, and
  ``B e`` is broadcast over space: every position of channel ``c`` receives ``(B e)_c``, so ``B``
  stays ``C×K``;
* target ``(C, H, W)``, per unit (``per_unit=True``): ``B`` is ``(C·H·W, K)``, one row per unit,
  row ``(c·H + h)·W + w`` for the unit at channel ``c``, position ``(h, w)``, and ``B e``
  reshaped to ``(C, H, W)`` is the error: every unit receives its own ``Σ_k B_ik e_k``. A target
  of one position per channel (``H = W = 1``) has the same ``B`` and error either way.

  Per channel is neurosim's design, not that of the references; per unit is theirs. Nøkland's
  own code (``ErrorFeedback`` in Torch) gives every unit its own random weight: ``B`` is
  ``(C·H·W, K)``, as with ``per_unit=True``. Per unit costs ``H·W`` times the floats: for
  ResNet-18 (width 1) on CIFAR-100 the 20 pathways of direct feedback alignment hold 614,400
  target units × 100 classes = 61,440,000 floats (246 MB in float32) against 4,800 × 100 =
  480,000 floats (1.9 MB) per channel, beside the circuit's 11.2 million parameters. BioTorch does so
  for dense layers; for a convolution it keeps a kernel ``(K, C, k, k)`` and delivers the error
  by a transposed convolution of the output error tiled over the layer's output positions, so
  what a unit receives depends on its channel and, through the kernel taps that reach it, on
  its position: the same everywhere away from the borders only at stride 1 — at stride 2 the
  taps that reach a position alternate with its parity, giving four different errors per
  channel in the interior — and different near the borders. Here no position differs from
  another.

The population's own autograd (nonlinearity, batch norm, pooling) turns the error at its
activity into the error at its drive, i.e. multiplies it by its own derivative; the synapses
into the target then form their usual local products from that error.

Initialisation. ``B`` is drawn like feedback alignment's random feedback, from the circuit's
seeded generator: by default PyTorch's default draw U(±1/√K) with fan-in ``K`` (the number of
errors each target neuron sums), so each delivered error has variance ``Var(e)/3`` whatever
``K`` and the target's size (``init`` takes the synapse initialisers' names,
``neurosim.core.synapse.INITS``).

Rules. A pathway has its own rule object; it decides the pathway's weight and what the feedback
path uses. Only rules with a fixed feedback weight that read nothing from forward weights are
accepted (``FeedbackAlignment``, the default: a fixed random ``B``, stored as a buffer): a
pathway has no forward weight to transport, and no learning law for ``B`` is defined for it.

Executions. Compiled: ``_DirectFeedback`` (used by ``Circuit.forward``) is an autograd function
whose forward returns the source activity unchanged and whose backward receives ``e`` and
returns ``B_l e`` as the gradient of each target activity, so the errors are injected through
autograd itself, with no shared mutable state (``torch.compile`` traces it). Reference:
``FeedbackPathway.ref_feedback(e)`` forms ``B e`` literally, for ``neurosim.core.reference``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from neurosim.core.synapse import weight_init
from neurosim.rules.base import PlasticityRule
from neurosim.rules.feedback_alignment import FeedbackAlignment


def deliver(e: torch.Tensor, b: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Compiled delivery: ``B e`` as an error at a target activity of per-sample ``shape``.

    ``e`` is ``(N, K)``, ``b`` is ``(n, K)``, ``(C, K)`` (per channel) or ``(C·H·W, K)`` (per
    unit). One matrix product; per channel a spatial target gets a broadcast view (no copy per
    position), per unit the product viewed as ``(N, C, H, W)``. The result has the target's
    ``dtype`` (under autocast ``e`` may be bf16 while ``B`` is a float32 buffer)."""
    d = e.mm(b.t().to(e.dtype)).to(dtype)
    if len(shape) == 3:
        if b.shape[0] == shape[0]:  # per channel (or per unit with one position: the same)
            d = d[:, :, None, None].expand(e.shape[0], *shape)
        else:
            d = d.view(e.shape[0], *shape)
    return d


class _DirectFeedback(torch.autograd.Function):
    """Forward: the source activity, unchanged. Backward: ``e`` (the gradient of the source
    activity) passes through, and each target activity receives ``B_l e``.

    Called as ``apply(source, shapes, *targets, *feedback_matrices)``: the target activities
    are inputs only so that autograd routes their gradients; they are not saved.
    """

    @staticmethod
    def forward(ctx, source, shapes, *tensors):
        n = len(shapes)
        ctx.shapes = shapes
        ctx.dtypes = tuple(a.dtype for a in tensors[:n])
        ctx.save_for_backward(*tensors[n:])
        return source.view_as(source)

    @staticmethod
    def backward(ctx, e):
        bs = ctx.saved_tensors
        n = len(bs)
        needs = ctx.needs_input_grad[2:2 + n]
        e2 = e.flatten(1)
        errors = [deliver(e2, b, shape, dtype) if need else None
                  for b, shape, dtype, need in zip(bs, ctx.shapes, ctx.dtypes, needs)]
        return (e, None, *errors, *([None] * n))


class FeedbackPathway(nn.Module):
    """A feedback pathway from a source population's *error* to a target population.

    ``feedback`` is its weight ``B`` (``(n, K)``; for a spatial target ``(C, K)``, or with
    ``per_unit`` ``(C·H·W, K)``; see the module docstring), a buffer since the accepted rules
    keep it fixed; ``rule`` is the pathway's own rule object. The error it delivers to the
    target's activity is ``B e``.
    """

    def __init__(self, source: str, target: str, source_shape, target_shape, rule: PlasticityRule | None = None,
                 generator: torch.Generator | None = None, init: str = "default", name: str | None = None,
                 per_unit: bool = False):
        super().__init__()
        rule = FeedbackAlignment() if rule is None else rule
        source_shape, target_shape = tuple(source_shape), tuple(target_shape)
        if len(source_shape) != 1:
            raise ValueError(f"a feedback pathway's source must be a flat population (K,), "
                             f"{source!r} has shape {source_shape}")
        if len(target_shape) not in (1, 3):
            raise ValueError(f"a feedback pathway's target must have shape (n,) or (C, H, W), "
                             f"{target!r} has shape {target_shape}")
        if rule.transports != "nothing":
            raise ValueError(f"rule {rule.name!r} reads {rule.transports} of forward weights; a feedback "
                             f"pathway has no forward weight (use a fixed random rule such as FeedbackAlignment)")
        if rule.feedback_learns is not None:
            raise ValueError(f"rule {rule.name!r} learns its feedback weight; feedback pathways support fixed "
                             f"feedback weights only (e.g. FeedbackAlignment)")
        k = source_shape[0]
        per_unit = bool(per_unit) and len(target_shape) == 3
        shape = (math.prod(target_shape) if per_unit else target_shape[0], k)
        generator = generator or torch.Generator().manual_seed(0)
        b = rule.init_feedback(torch.empty(shape), weight_init(init, k, shape[0]), generator)
        if b is None:
            raise ValueError(f"rule {rule.name!r} keeps no feedback weight; a feedback pathway needs one "
                             f"(e.g. FeedbackAlignment)")
        self.name = name or f"{source}=>{target}"
        self.source, self.target, self.rule, self.init_name = source, target, rule, init
        self.source_shape, self.target_shape, self.per_unit = source_shape, target_shape, per_unit
        self.register_buffer("feedback", b)

    def feedback_matrix(self) -> torch.Tensor:
        """The matrix ``B`` the pathway uses now (``(n, K)``, ``(C, K)`` or ``(C·H·W, K)``)."""
        return self.rule.feedback_matrix(None, self.feedback)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """Compiled delivery of ``B e`` for a source error ``e`` of shape ``(N, K)``."""
        return deliver(e.flatten(1), self.feedback_matrix(), self.target_shape, e.dtype)

    def ref_feedback(self, e: torch.Tensor) -> torch.Tensor:
        """Literal delivery: target neuron (or channel) ``i`` receives ``Σ_k B_ik e_k``; per
        channel a spatial target receives its channel's sum at every position, per unit the unit
        at ``(c, h, w)`` receives its own row's sum."""
        b = self.feedback_matrix().to(e.dtype)
        e = e.reshape(e.shape[0], -1)
        if self.per_unit:
            return torch.einsum("chwk,nk->nchw", b.reshape(*self.target_shape, b.shape[1]), e)
        d = torch.einsum("ik,nk->ni", b, e)
        if len(self.target_shape) == 1:
            return d
        ones = torch.ones(self.target_shape[1:], dtype=d.dtype, device=d.device)
        return torch.einsum("nc,hw->nchw", d, ones)

    def describe(self) -> str:
        b = tuple(self.feedback.shape)
        what = "fixed random" if isinstance(self.rule, FeedbackAlignment) else "fixed"
        where = ""
        if len(self.target_shape) == 3:
            where = (f" per unit, {self.target_shape[1]}x{self.target_shape[2]} positions" if self.per_unit else
                     f" per channel, broadcast over {self.target_shape[1]}x{self.target_shape[2]}")
        label = "" if self.name == f"{self.source}=>{self.target}" else f"{self.name}: "
        return (f"{label}{self.source} => {self.target} (direct, {what} {b[1]}->{b[0]}, B{b}{where}, "
                f"rule={self.rule.name})")

    def extra_repr(self) -> str:
        return self.describe()
