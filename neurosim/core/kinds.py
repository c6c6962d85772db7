"""Synapse kinds: how a dense or convolutional synapse maps abstract signals to tensor ops.

A plasticity rule speaks of four things: the forward drive ``W x``, the feedback drive (a post
error sent back through a feedback matrix ``M``), and the *product* of a post signal with a pre
signal — the Hebbian correlation ``Σ post ⊗ pre`` that every rule's update is made of. Each kind
implements them twice:

* ``fused_backward`` — the compiled path: one call that returns the feedback drive, the product
  and the bias sum together, exactly as PyTorch's own backward forms them (so it costs what
  native autograd costs);
* ``ref_*`` — the literal path used by the reference execution: explicit matrix products
  (``unfold``/``fold`` for convolutions) written independently of the compiled path, so tests
  comparing the two really check something.

Feedback matrices are stored in the layout of ``W`` (``out × in [× kh × kw]``); that stored
tensor is what the design calls ``Bᵀ``: the feedback path sends ``δ_x = Bᵀ-layout applied
transposed``, exactly as autograd applies ``W`` in backprop.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import attrs
import torch
import torch.nn.functional as F


@runtime_checkable
class SynapseKind(Protocol):
    """What a kind of synapse (dense, convolutional, …) provides; ``Synapse`` and the rules
    speak to a kind only through these. A new kind implements them, twice where it says so:
    once fused (the compiled path) and once literally (``ref_*``, the reference path)."""

    def weight_shape(self) -> tuple[int, ...]: ...
    def fan_in(self) -> int: ...
    def fan_out(self) -> int: ...
    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]: ...
    def positions(self, in_shape: tuple[int, ...]) -> int: ...
    def describe(self) -> str: ...
    def forward(self, x, w, b): ...
    def fused_backward(self, grad_y, x, m, need_input: bool, need_product: bool, need_bias: bool): ...
    def product(self, post, pre): ...
    def ref_forward(self, x, w, b): ...
    def ref_feedback(self, post_error, m, pre_shape): ...
    def ref_product(self, post, pre): ...
    def ref_bias_sum(self, post_error): ...


@attrs.frozen
class Dense:
    """A fully connected synapse: ``y = W x (+ b)``; a spatial presynaptic activity is flattened."""

    in_features: int
    out_features: int

    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    def fan_in(self) -> int:
        return self.in_features

    def fan_out(self) -> int:
        return self.out_features

    def describe(self) -> str:
        return f"dense {self.in_features}->{self.out_features}"

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if math.prod(in_shape) != self.in_features:
            raise ValueError(f"dense synapse expects {self.in_features} inputs, population has shape {in_shape}")
        return (self.out_features,)

    def positions(self, in_shape: tuple[int, ...]) -> int:
        """(pre, post) co-activations per weight that one input image gives: one."""
        return 1

    # -- compiled path --------------------------------------------------------------------
    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x.flatten(1), w, b)

    def fused_backward(self, grad_y, x, m, need_input: bool, need_product: bool, need_bias: bool):
        """Feedback drive through ``m``, product ``δ_yᵀ x`` and bias sum, as autograd's addmm does."""
        gx = gw = gb = None
        if need_input:
            gx = grad_y.mm(m).view(x.shape)
        if need_product:
            gw = grad_y.t().mm(x.flatten(1))
        if need_bias:
            gb = grad_y.sum(0)
        return gx, gw, gb

    def product(self, post: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """Hebbian correlation of a post signal with a pre signal, in the layout of ``W``."""
        return post.t().mm(pre.flatten(1))

    # -- reference path -------------------------------------------------------------------
    def ref_forward(self, x, w, b):
        y = x.flatten(1) @ w.t()
        return y if b is None else y + b

    def ref_feedback(self, post_error, m, pre_shape):
        """Error delivered to each presynaptic neuron: ``Σ_j M_ji δ_j``."""
        return (post_error @ m).reshape(pre_shape)

    def ref_product(self, post, pre):
        # Explicit sum over the batch of outer products post_n ⊗ pre_n.
        return torch.einsum("no,ni->oi", post, pre.flatten(1))

    def ref_bias_sum(self, post_error):
        return post_error.sum(0)


@attrs.frozen
class Conv2d:
    """A 2-D convolutional synapse (shared weights over space), with stride, padding and groups."""

    in_channels: int
    out_channels: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    groups: int = 1

    def __attrs_post_init__(self):
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"channels {self.in_channels}->{self.out_channels} not divisible by groups={self.groups}")

    def weight_shape(self) -> tuple[int, ...]:
        k = self.kernel_size
        return (self.out_channels, self.in_channels // self.groups, k, k)

    def fan_in(self) -> int:
        return self.in_channels // self.groups * self.kernel_size**2

    def fan_out(self) -> int:
        return self.out_channels * self.kernel_size**2

    def describe(self) -> str:
        k = self.kernel_size
        return (f"conv{k}x{k} {self.in_channels}->{self.out_channels} stride={self.stride} pad={self.padding}"
                + (f" groups={self.groups}" if self.groups > 1 else ""))

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise ValueError(f"conv synapse expects ({self.in_channels}, H, W) inputs, population has shape {in_shape}")
        k, s, p = self.kernel_size, self.stride, self.padding
        h, w = ((n + 2 * p - k) // s + 1 for n in in_shape[1:])
        if h < 1 or w < 1:
            raise ValueError(f"conv synapse with kernel {k} leaves no output for input {in_shape}")
        return (self.out_channels, h, w)

    def positions(self, in_shape: tuple[int, ...]) -> int:
        """(pre, post) co-activations per weight that one input image gives: its output positions."""
        return math.prod(self.out_shape(tuple(in_shape))[1:])

    # -- compiled path --------------------------------------------------------------------
    def forward(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, 1, self.groups)

    def fused_backward(self, grad_y, x, m, need_input: bool, need_product: bool, need_bias: bool):
        """One ``convolution_backward`` call, as native autograd makes, with ``m`` as the weight."""
        return torch.ops.aten.convolution_backward(
            grad_y, x, m, [m.shape[0]] if need_bias else None,
            [self.stride] * 2, [self.padding] * 2, [1, 1], False, [0, 0], self.groups,
            [need_input, need_product, need_bias],
        )

    def product(self, post, pre):
        shape = list(self.weight_shape())
        return torch.ops.aten.convolution_backward(
            post, pre, _dummy_weight(post, shape), None,
            [self.stride] * 2, [self.padding] * 2, [1, 1], False, [0, 0], self.groups,
            [False, True, False],
        )[1]

    # -- reference path -------------------------------------------------------------------
    def _unfold(self, x):
        # (N, C_in·k·k, L): every receptive field as a column.
        return F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)

    def _grouped(self, t):
        # Split the channel axis of a (N, C·rest, L) tensor into groups: (N, G, C/G·rest, L).
        n, cr, length = t.shape
        return t.view(n, self.groups, cr // self.groups, length)

    def ref_forward(self, x, w, b):
        cols = self._grouped(self._unfold(x))  # N, G, Cin/G·k·k, L
        wg = w.reshape(self.groups, self.out_channels // self.groups, -1)  # G, Cout/G, Cin/G·k·k
        y = torch.einsum("gok,ngkl->ngol", wg, cols).reshape(x.shape[0], self.out_channels, -1)
        oh, ow = self.out_shape(tuple(x.shape[1:]))[1:]
        y = y.reshape(x.shape[0], self.out_channels, oh, ow)
        return y if b is None else y + b.view(1, -1, 1, 1)

    def ref_feedback(self, post_error, m, pre_shape):
        n = post_error.shape[0]
        e = post_error.reshape(n, self.groups, self.out_channels // self.groups, -1)  # N, G, Cout/G, L
        mg = m.reshape(self.groups, self.out_channels // self.groups, -1)
        cols = torch.einsum("gok,ngol->ngkl", mg, e).reshape(n, -1, e.shape[-1])
        return F.fold(cols, pre_shape[-2:], self.kernel_size, padding=self.padding, stride=self.stride)

    def ref_product(self, post, pre):
        n = post.shape[0]
        e = post.reshape(n, self.groups, self.out_channels // self.groups, -1)
        cols = self._grouped(self._unfold(pre))
        return torch.einsum("ngol,ngkl->gok", e, cols).reshape(self.weight_shape())

    def ref_bias_sum(self, post_error):
        return post_error.sum((0, 2, 3))


def _dummy_weight(like: torch.Tensor, shape: list[int]) -> torch.Tensor:
    # convolution_backward only reads the weight's shape when grad_input is not requested.
    return like.new_zeros(()).expand(shape)
