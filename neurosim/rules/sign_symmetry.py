"""Sign symmetry (Liao et al. 2016; Xiao et al. 2018): feedback shares only the signs of W."""

from typing import ClassVar

import attrs

from neurosim.rules.base import register_rule
from neurosim.rules.sign_concordant import UniformSignConcordant


@register_rule
@attrs.frozen
class SignSymmetry(UniformSignConcordant):
    """``B = sign(W)·scale``: the uniform sign-concordant rule (``usf``) under its older name ``ss``.

    Nothing differs but the name, which existing presets, run files and monitor records carry:
    ``scale`` is one constant per synapse fixed at construction, the root-mean-square of the
    initial ``W`` (so ``‖B‖ = ‖W₀‖``), held as the synapse's 0-d feedback state. Only signs travel
    from forward to feedback synapses, never magnitudes. See ``UniformSignConcordant`` for the
    choice of scale and how it compares with BioTorch's.
    """

    name: ClassVar[str] = "ss"
