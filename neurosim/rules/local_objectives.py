"""Kunin et al.'s alignment family: feedback learning as a weighted sum of five layer-wise objectives.

Kunin, Nayebi, Sagastuy-Brena, Ganguli, Bloom & Yamins, "Two Routes to Scalable Credit
Assignment without Weight Symmetry" (ICML 2020), write every feedback-learning rule as gradient
descent of the feedback weight on a regulariser ``R = Σ_k c_k R_k`` of one layer. With ``x`` the
layer's input (a batch of ``N``), ``W`` the forward and ``B`` the feedback kernel (stored here
in ``W``'s layout, the design's ``Bᵀ``), ``Wx`` the forward projection, ``Bx`` the feedback
kernel's projection of the same input (a convolution: the same convolution with ``B``), and
``Bᵀ(Wx)``, ``Wᵀ(Bx)`` the reconstructions (the transposed operations), the primitives are

- ``decay  = ‖W‖² + ‖B‖²``                          → ``∂/∂B = 2B``
- ``self   = −Σ W⊙B`` (their ``−tr(BW)``)           → ``∂/∂B = −W``
- ``amp    = −(1/N) Σ_n ⟨Bx_n, Wx_n⟩``              → ``∂/∂B = −(1/N) Σ_n Wx_n ⊗ x_n``
- ``sparse = (1/N) Σ_n ‖Wx_n‖² + ‖Bx_n‖²``          → ``∂/∂B = (2/N) Σ_n Bx_n ⊗ x_n``
- ``null   = (1/N) Σ_n ‖Bᵀ Wx_n‖² + ‖Wᵀ Bx_n‖²``     → ``∂/∂B = (2/N) Σ_n Wx_n ⊗ Bᵀ Wx_n + W(Wᵀ Bx_n) ⊗ x_n``

each a batch mean summed over features and positions, as in the authors' code
(``neuroailab/Neural-Alignment``, ``Alignments/primitives.py``); with ``per_position`` the data
terms are means over the batch's co-activations instead (divided by ``N·P``, ``P`` a
convolution's output positions, 1 for a dense synapse), as the weight mirror's update is: a
convolution's update then has a dense synapse's scale, and one coefficient serves layers of
every image size (summed, the first layer of a CIFAR ResNet weighs its 1,024 positions and
diverged within 10 steps at the authors' coefficients). ``⊗`` is the Hebbian product in
``W``'s layout (``SynapseKind.product``: for a convolution, summed over positions too).
``objective`` gives each value, ``gradient`` each closed form; ``tests/test_local_objectives.py``
checks every closed form against autograd of its objective (dense, and convolutions of stride 1
and 2) and composes the weight mirror and Kolen-Pollack from them.

Which signals each reads, at the feedback synapse (it carries errors from the post neurons back
to the pre neurons): ``x`` (the activity of the neurons it ends at), ``Wx`` (the forward drive of
the neurons it starts at — ``LocalSignals.drive``) and its own ``B`` are present there; ``amp``,
``null``'s first term and ``decay`` use nothing else and are local. ``self`` reads ``W`` itself
(weight transport, ``LocalSignals.weight``); ``sparse`` needs ``Bx``, the feedback synapse run
forward on the input it does not receive; and ``null``'s second term sends ``Bx`` back through
``Wᵀ``: those three are not local. The rules built on them say so.

In the compiled execution the products that share a presynaptic signal are summed before one
product is formed (``SynapseKind.product``: one ``convolution_backward``), and no second
autograd graph is built; in the reference execution each product is formed literally
(``ref_product``), term by term.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import attrs

from neurosim.rules.base import LocalSignals, PlasticityRule, random_feedback, register_rule

if TYPE_CHECKING:
    import torch

PRIMITIVES = ("decay", "self", "amp", "sparse", "null")


def _ops(kind, literal: bool):
    """``(forward, back, product)`` of a kind, compiled or literal: ``forward(x, m) = m·x``,
    ``back(r, m, x) = mᵀ·r`` in ``x``'s shape, ``product(post, pre) = Σ post ⊗ pre``."""
    if literal:
        return (lambda x, m: kind.ref_forward(x, m, None),
                lambda r, m, x: kind.ref_feedback(r, m, x.shape),
                kind.ref_product)
    return (lambda x, m: kind.forward(x, m, None),
            lambda r, m, x: kind.fused_backward(r, x, m, True, False, False)[0],
            kind.product)


def _events(kind, x, per_position: bool) -> int:
    """What a data term is averaged over: the batch, or its co-activations per weight."""
    return x.shape[0] * (kind.positions(tuple(x.shape[1:])) if per_position else 1)


def objective(name: str, kind, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, null_terms=(True, True),
              per_position: bool = False):
    """The value of primitive ``name`` for input ``x`` (a batch), forward weight ``w`` and feedback
    weight ``b`` (``w``'s layout), written with the kind's compiled ops so autograd can
    differentiate it. ``null_terms``: which of null's two reconstructions count;
    ``per_position``: data terms averaged over co-activations, not summed over positions."""
    forward, back, _ = _ops(kind, False)
    n = _events(kind, x, per_position)
    if name == "decay":
        return w.square().sum() + b.square().sum()
    if name == "self":
        return -(w * b).sum()
    wx, bx = forward(x, w), forward(x, b)
    if name == "amp":
        return -(bx * wx).sum() / n
    if name == "sparse":
        return (wx.square().sum() + bx.square().sum()) / n
    if name == "null":
        first = back(wx, b, x).square().sum() if null_terms[0] else 0
        second = back(bx, w, x).square().sum() if null_terms[1] else 0
        return (first + second) / n
    raise ValueError(f"unknown primitive {name!r}; choose from {', '.join(PRIMITIVES)}")


def gradient(terms: dict, s: LocalSignals, null_terms=(True, True), per_position: bool = False) -> torch.Tensor:
    """``∂/∂B Σ_k terms[k]·R_k`` in closed form from the signals at the feedback synapse: ``s.pre``
    (``x``), ``s.own`` (``B``), ``s.drive`` (``Wx``, where a term needs it), ``s.weight`` (``W``,
    where a term needs it). Compiled (``s.literal`` False): products sharing a presynaptic signal
    are formed once; literal: every product on its own. ``per_position``: as in ``objective``."""
    forward, back, product = _ops(s.kind, s.literal)
    x, b, n = s.pre, s.own, _events(s.kind, s.pre, per_position)
    direct = []  # (coefficient, tensor in B's layout)
    hebb = []  # (coefficient, post, pre): coefficient · Σ post ⊗ pre
    unknown = set(terms) - set(PRIMITIVES)
    if unknown:
        raise ValueError(f"unknown primitive {sorted(unknown)[0]!r}; choose from {', '.join(PRIMITIVES)}")
    c = {k: v for k, v in terms.items() if v}
    wx = s.drive if {"amp", "null"} & set(c) else None
    bx = forward(x, b) if "sparse" in c or ("null" in c and null_terms[1]) else None
    if "decay" in c:
        direct.append((2 * c["decay"], b))
    if "self" in c:
        direct.append((-c["self"], s.weight))
    if "amp" in c:
        hebb.append((-c["amp"] / n, wx, x))
    if "sparse" in c:
        hebb.append((2 * c["sparse"] / n, bx, x))
    if "null" in c:
        if null_terms[0]:
            hebb.append((2 * c["null"] / n, wx, back(wx, b, x)))
        if null_terms[1]:
            hebb.append((2 * c["null"] / n, forward(back(bx, s.weight, x), s.weight), x))
    out = None
    if s.literal:
        parts = [k * product(post, pre) for k, post, pre in hebb]
    else:
        by_pre: list[list] = []  # [pre, Σ k·post]; matched by identity (not id(): torch.compile traces this)
        for k, post, pre in hebb:
            for acc in by_pre:
                if acc[0] is pre:
                    acc[1] = acc[1].add(post, alpha=k)
                    break
            else:
                by_pre.append([pre, post * k])
        parts = [product(post, pre) for pre, post in by_pre]
    for part in parts:
        out = part if out is None else out.add_(part)
    for k, t in direct:
        out = t * k if out is None else out.add(t, alpha=k)
    if out is None:
        out = b.new_zeros(b.shape)
    return out


class LocalObjectives(PlasticityRule):
    """Base of the rules of Kunin et al.'s family: errors return through ``B``; ``W`` learns by
    ``δ_y ⊗ x`` as under feedback alignment; ``B`` learns in every engaged step by gradient
    descent on the layer's regulariser ``Σ c_k R_k`` (``terms``) at the layer's input from the
    data, through the same optimizer as ``W`` (the authors add the regulariser to the loss).
    An optimizer's weight decay, where it reaches ``B``, adds to the ``decay`` term."""

    feedback_learns: ClassVar[str] = "engaged"
    # Reconstruction terms of null: (Bᵀ·Wx, Wᵀ·Bx).
    null_terms: ClassVar[tuple[bool, bool]] = (True, True)
    # Data terms averaged over a convolution's positions (a field of the rules that have data terms).
    per_position = False

    def terms(self) -> dict[str, float]:
        """The weight of each objective (``PRIMITIVES``) in this rule's regulariser; a rule of the
        family names its own, the base has none to offer."""
        raise TypeError(f"{type(self).__name__} does not say which objectives its feedback descends")

    def init_feedback(self, w, init, generator):
        return random_feedback(w, init, generator)

    def feedback_matrix(self, w, feedback):
        return feedback

    def feedback_update(self, s):
        return gradient(self.terms(), s, self.null_terms, self.per_position)


# Settings of the authors' code (neuroailab/Neural-Alignment, params.py: the default coefficient
# of each objective for their ImageNet ResNets, the regulariser added at rate 1 to the loss and
# minimised by the same optimizer as W). The CIFAR and ImageNet ResNet presets keep them.
_AUTHORS = {"sa": (1e-3, 2e-3), "aa": (1e-3, 2e-3), "ia": (2e-3, 1e-3, 1e-3)}

# The digits MLP: its inputs are not batch-normalised (a hidden layer's second moment is far
# above 1) and it trains for 1,350 steps, so the coefficients are set per rule, and without
# momentum: with the recipe's momentum 0.9 all three diverged there within 2 to 6 epochs
# (docs/results.md has the runs). The authors' own MLP keeps their coefficients.
_DIGITS = {"momentum": 0.0}

def _coefficient(default: float, what: str):
    return attrs.field(default=default, validator=attrs.validators.ge(0.0), metadata={"help": what})


def _per_position():
    return attrs.field(default=True, validator=attrs.validators.instance_of(bool), metadata={
        "help": "average the data objectives over a convolution's positions (neurosim) instead of summing them "
                "(the authors' code)"})


@register_rule
@attrs.frozen
class SymmetricAlignment(LocalObjectives):
    """Symmetric alignment: ``R = α·decay + β·self``, so ``ΔB = −η (2αB − βW)``.

    Not local: ``self`` reads ``W`` at the feedback synapse (``feedback_reads = ("weight",)``),
    which is weight transport to the feedback synapse; Kunin et al. propose it as a slow "weight
    estimation" rather than an instantaneous copy: ``B`` relaxes toward ``(β/2α)·W`` (toward ``W``
    itself at the authors' β = 2α) at the rate ``2αη``, never reading ``W`` on the error path. The
    error path reads ``B`` alone. Nothing of the data enters ``ΔB``."""

    name: ClassVar[str] = "sa"
    transports: ClassVar[str] = "nothing"
    feedback_reads: ClassVar[tuple[str, ...]] = ("weight",)
    alpha: float = _coefficient(_AUTHORS["sa"][0], "weight α of the decay objective ‖W‖²+‖B‖²")
    beta: float = _coefficient(_AUTHORS["sa"][1], "weight β of the self objective −Σ W⊙B (reads W: not local)")
    presets: ClassVar[dict] = {
        "mlp_digits": {**_DIGITS, "sa_alpha": 0.5, "sa_beta": 1.0},
        "mlp_original": {"lr": 0.05},
        "resnet": {},
    }

    @classmethod
    def example(cls):
        return cls(alpha=0.3, beta=0.7)

    def terms(self):
        return {"decay": self.alpha, "self": self.beta}


@register_rule
@attrs.frozen
class ActivationAlignment(LocalObjectives):
    """Activation alignment: ``R = α·sparse + β·amp``, so
    ``ΔB = −η (1/N) Σ_n (2α·Bx_n − β·Wx_n) ⊗ x_n``.

    Not local: ``amp`` is (``x`` and the forward drive ``Wx``), but ``sparse`` needs ``Bx``, the
    feedback synapse run forward on the layer's input. At the fixed point ``B·Σ = (β/2α)·W·Σ``
    (``Σ`` the inputs' second moment): ``B`` matches ``W`` on the inputs the layer sees, and stays
    as drawn in directions no input takes (on digits, the pixels that are always blank)."""

    name: ClassVar[str] = "aa"
    feedback_reads: ClassVar[tuple[str, ...]] = ("drive",)
    alpha: float = _coefficient(_AUTHORS["aa"][0], "weight α of the sparse objective ‖Wx‖²+‖Bx‖² (not local)")
    beta: float = _coefficient(_AUTHORS["aa"][1], "weight β of the amp objective −⟨Bx, Wx⟩")
    per_position: bool = _per_position()
    presets: ClassVar[dict] = {
        "mlp_digits": {**_DIGITS, "aa_alpha": 0.01, "aa_beta": 0.02},
        "mlp_original": {"lr": 0.05},
        "resnet": {},
    }

    @classmethod
    def example(cls):
        return cls(alpha=0.3, beta=0.7, per_position=False)

    def terms(self):
        return {"sparse": self.alpha, "amp": self.beta}


@register_rule
@attrs.frozen
class InformationAlignment(LocalObjectives):
    """Information alignment: ``R = α·amp + β·null + γ·decay`` with null's forward reconstruction
    only (``‖BᵀWx‖²``, as the authors' code computes it by default), so
    ``ΔB = −η ((1/N) Σ_n (−α·Wx_n ⊗ x_n + 2β·Wx_n ⊗ BᵀWx_n) + 2γB)``.

    Local: every signal is present at the feedback synapse — the input ``x`` of the neurons it
    ends at, the drive ``Wx`` of those it starts at, and its own output ``Bᵀ(Wx)`` when that drive
    is sent through it. Kunin et al. find it robust to its settings across ResNet depths.

    Its fixed point at a dense synapse is ``B* = α(2βWΣWᵀ + 2γ)⁻¹WΣ`` (``Σ`` the inputs' second
    moment), ``W``'s direction only for white inputs without the null term: for ``Σ = cI`` it gives
    a singular direction of ``W`` (value ``s``) the gain ``αcs/(2βcs² + 2γ)``, not one proportional
    to ``s``, and a ``Σ`` far from white bends the target toward ``WΣ``. On the width-0.125
    CIFAR-100 ResNet-18 the classifier's ``B`` ends within 7° of ``B*`` and 47–49° from ``W``, and
    the rule trails KP, WM and SA by 36–43 points (docs/results.md)."""

    name: ClassVar[str] = "ia"
    feedback_reads: ClassVar[tuple[str, ...]] = ("drive",)
    null_terms: ClassVar[tuple[bool, bool]] = (True, False)
    alpha: float = _coefficient(_AUTHORS["ia"][0], "weight α of the amp objective −⟨Bx, Wx⟩")
    beta: float = _coefficient(_AUTHORS["ia"][1], "weight β of the null objective ‖BᵀWx‖²")
    gamma: float = _coefficient(_AUTHORS["ia"][2], "weight γ of the decay objective ‖W‖²+‖B‖²")
    per_position: bool = _per_position()
    presets: ClassVar[dict] = {
        "mlp_digits": {**_DIGITS, "lr": 0.2, "ia_alpha": 0.005, "ia_beta": 0.001, "ia_gamma": 0.001},
        "mlp_original": {"lr": 0.05},
        "resnet": {},
    }

    @classmethod
    def example(cls):
        return cls(alpha=0.8, beta=0.3, gamma=0.2)

    def terms(self):
        return {"amp": self.alpha, "null": self.beta, "decay": self.gamma}
