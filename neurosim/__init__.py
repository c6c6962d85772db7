"""neurosim: circuit-level simulation of neural networks that learn without weight transport.

The names below are loaded on first use (PEP 562): ``import neurosim`` and the command line's
help and option parsing then run without loading PyTorch, which takes seconds to import.
"""

import importlib
import sys
import types

# public name → the module that defines it
_HOMES = {
    "Circuit": "neurosim.circuit", "NeuronPopulation": "neurosim.population", "Synapse": "neurosim.synapse",
    "FeedbackPathway": "neurosim.pathways", "Dense": "neurosim.kinds", "Conv2d": "neurosim.kinds",
    "SynapseKind": "neurosim.kinds", "PlasticityRule": "neurosim.rules", "LocalSignals": "neurosim.rules",
    "RULES": "neurosim.rules", "register_rule": "neurosim.rules", "Backprop": "neurosim.rules",
    "FeedbackAlignment": "neurosim.rules", "SignSymmetry": "neurosim.rules",
    "UniformSignConcordant": "neurosim.rules.sign_concordant",
    "FixedRandomSignConcordant": "neurosim.rules.sign_concordant",
    "BatchRandomSignConcordant": "neurosim.rules.sign_concordant", "KolenPollack": "neurosim.rules",
    "WeightMirror": "neurosim.rules", "SleepSchedule": "neurosim.rules",
    "DirectFeedbackAlignment": "neurosim.rules.direct_feedback_alignment",
    "reference_backward": "neurosim.reference", "UserError": "neurosim.errors", "DataError": "neurosim.errors",
    "convert": "neurosim.convert", "copy_weights": "neurosim.convert", "ConversionError": "neurosim.convert",
}

__all__ = list(_HOMES)


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'neurosim' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # looked up once
    return value


def __dir__():
    return sorted([*globals(), *_HOMES])


class _Package(types.ModuleType):
    """The package itself. Importing the submodule ``neurosim.convert`` binds it to the package
    under its name, which would hide the function ``neurosim.convert``: the function stays."""

    def __setattr__(self, name, value):
        if name == "convert" and isinstance(value, types.ModuleType):
            value = value.convert
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

