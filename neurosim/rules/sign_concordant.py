"""Sign-concordant feedback (Liao, Leibo & Poggio 2016; Moskovitz et al. 2018).

The feedback matrix has the signs of the current ``W`` and magnitudes of its own:
``B = sign(W) ∘ magnitude``. Only signs travel from forward to feedback synapses. The three
variants differ in where the magnitude comes from; their names are those of BioTorch:

* ``usf`` — uniform: one constant per synapse (``UniformSignConcordant``; sign symmetry, alias ``ss``);
* ``frsf`` — fixed random: ``|M|`` drawn once at construction (``FixedRandomSignConcordant``);
* ``brsf`` — batchwise random: ``|M|`` drawn anew for every engaged batch
  (``BatchRandomSignConcordant``; see ``new_batch``).

The magnitudes are ``|M|``, as in BioTorch (which draws ``M`` with its initialiser and takes
``|M|``), so ``B`` is sign-concordant with ``W`` everywhere (``sign(B) = sign(W)``; where
``W = 0``, ``B = 0``): feedback with random magnitudes and 100 % concordant signs, in the words
of Liao et al.'s abstract. ``M`` is drawn from the synapse's own initial distribution (as
feedback alignment's ``B`` is), so under every rule of the family ``‖B‖ ≈ ‖W₀‖``: the error
reaching each layer keeps the scale backprop's would have at initialisation, whichever init the
circuit uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import attrs

if TYPE_CHECKING:  # rule modules load torch only where they compute (see neurosim.rules)
    import torch

from neurosim.rules.base import PlasticityRule, random_feedback, register_rule


@register_rule(aliases=("ss",))
@attrs.frozen
class UniformSignConcordant(PlasticityRule):
    """uSF: ``B = sign(W)·s``, formed from the current ``W`` whenever an error is sent back.

    ``s`` is one constant per synapse fixed at construction: the root-mean-square of the initial
    ``W``, so ``‖B‖ = ‖W₀‖``. The synapse's feedback state is that 0-d scale; it never changes.
    This is the rule the project has called sign symmetry (Liao et al. 2016; Xiao et al. 2018):
    ``ss`` is an alias of ``usf`` (presets ``ss_*``, ``--rules ss``, configurations saved with
    ``"rule": "ss"``) and ``SignSymmetry`` another name of this class.

    The scale. BioTorch multiplies ``sign(W)`` by its initialiser's standard deviation, always:
    ``√(2/(fan_in+fan_out))`` for its Xavier init, ``1/√(3·fan_in)`` for PyTorch's default (its
    configuration schema declares a boolean option ``scaling_factor``, but no layer reads it).
    Here ``s`` is the RMS of the weights actually drawn: it equals the init's standard deviation
    in expectation, for *any* init — ``default`` U(±1/√fan_in), ``xavier_sum`` and
    ``kaiming_normal`` N(0, 2/fan_out) alike, where ``√(2/(fan_in+fan_out))`` would be off (by √2
    for a 3×3 convolution with as many input as output channels). The one difference from
    BioTorch: ``s`` is measured from this synapse's ``W₀`` (within sampling noise of the init's
    std, and exact for the draw the synapse got), not computed from fan-in and fan-out. A
    constant scale, not the current ``‖W‖``: a current norm would transport a magnitude every
    step. When ``W`` is replaced wholesale (``neurosim.convert(..., copy_weights=True)`` copies a
    trained model in), ``s`` is measured again from the copied ``W`` (``weight_replaced``), not
    kept from the draw the copy discarded.
    """

    name: ClassVar[str] = "usf"
    presets: ClassVar[dict] = {"mlp_original": {"lr": 0.2}}  # the weight-mirror authors' rate
    transports: ClassVar[str] = "signs"

    def init_feedback(self, w, init, generator):
        return w.detach().pow(2).mean().sqrt()

    def weight_replaced(self, w, feedback):
        # A copied (trained) W replaces the draw the scale was measured from.
        feedback.copy_(w.detach().pow(2).mean().sqrt())

    def feedback_matrix(self, w, feedback):
        return w.sign().mul_(feedback)


# Sign symmetry's older class name: the same rule, not a subclass (``SignSymmetry() == UniformSignConcordant()``).
SignSymmetry = UniformSignConcordant


@attrs.frozen
class _RandomMagnitudeSignConcordant(PlasticityRule):
    """``B = sign(W) ∘ |M|``; the synapse's feedback state is ``|M|`` (a buffer, in ``W``'s layout),
    drawn at construction from the synapse's own init distribution."""

    transports: ClassVar[str] = "signs"
    presets: ClassVar[dict] = {"mlp_original": {"lr": 0.2}}  # the weight-mirror authors' rate

    def init_feedback(self, w, init, generator):
        return random_feedback(w, init, generator).abs_()

    def feedback_matrix(self, w, feedback):
        return w.sign().mul_(feedback)


@register_rule
@attrs.frozen
class FixedRandomSignConcordant(_RandomMagnitudeSignConcordant):
    """frSF: ``B = sign(W) ∘ |M|`` with ``M`` drawn once, at construction, and fixed.

    ``M`` is the draw feedback alignment would make for the same synapse and seed (from the
    synapse's init distribution; BioTorch draws it with its own init, Xavier-uniform by default).
    Its magnitudes never change; its signs are ``W``'s at the moment each error is sent back.
    """

    name: ClassVar[str] = "frsf"


@register_rule
@attrs.frozen
class BatchRandomSignConcordant(_RandomMagnitudeSignConcordant):
    """brSF: ``B = sign(W) ∘ |M|`` with ``M`` redrawn for every engaged batch.

    The draw is explicit and outside the autograd graph: the synapse's feedback buffer holds the
    current ``|M|``, and ``redraw`` refills it in place, from a generator the caller passes, before
    the batch's forward pass (``new_batch(circuit, generator)`` does it for a whole circuit). Both
    executions of a step (compiled and reference) read the same buffer, so they deliver the same
    errors; under ``torch.compile`` the buffer is an input like any other and nothing recompiles.
    Redrawing between a forward and its backward is refused by autograd (the buffer was saved for
    the backward). A circuit whose batches never call ``new_batch`` keeps its construction draw and
    behaves as frSF. BioTorch redraws ``M`` (Xavier-uniform by default) in every forward call.
    """

    name: ClassVar[str] = "brsf"

    def redraw(self, feedback: torch.Tensor, init, generator: torch.Generator | None = None) -> None:
        """Refill ``feedback`` in place with a fresh ``|M|``, ``M`` drawn by ``init(tensor, generator)``
        (the synapse's initialiser). ``generator`` ``None``: the default generator of the buffer's
        device; a generator on another device draws there and the result is copied over."""
        import torch

        with torch.no_grad():
            if generator is not None and not same_device(generator.device, feedback.device):
                m = torch.empty(feedback.shape, dtype=feedback.dtype, device=generator.device)
                feedback.copy_(init(m, generator).abs_())
            else:
                init(feedback, generator).abs_()


def same_device(a: torch.device, b: torch.device) -> bool:
    """Whether two device names mean the same device: ``torch.Generator("cuda")`` reports
    ``cuda`` without an index, which means the current GPU (``cuda:0`` in a lone process)."""
    import torch

    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        default = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (default if a.index is None else a.index) == (default if b.index is None else b.index)
    return a.index == b.index
