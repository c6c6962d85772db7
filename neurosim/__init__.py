"""neurosim: circuit-level simulation of neural networks that learn without weight transport.

The names below are loaded on first use (PEP 562): ``import neurosim`` and the command line's
help and option parsing then run without loading PyTorch, which takes seconds to import.
"""

import importlib

# public name → the module that defines it
_HOMES = {
    "Circuit": "neurosim.core.circuit", "NeuronPopulation": "neurosim.core.population", "Synapse": "neurosim.core.synapse",
    "FeedbackPathway": "neurosim.core.pathways", "Dense": "neurosim.core.kinds", "Conv2d": "neurosim.core.kinds",
    "SynapseKind": "neurosim.core.kinds", "PlasticityRule": "neurosim.rules", "LocalSignals": "neurosim.rules",
    "RULES": "neurosim.rules", "register_rule": "neurosim.rules", "Backprop": "neurosim.rules",
    "FeedbackAlignment": "neurosim.rules", "SignSymmetry": "neurosim.rules",
    "UniformSignConcordant": "neurosim.rules.sign_concordant",
    "FixedRandomSignConcordant": "neurosim.rules.sign_concordant",
    "BatchRandomSignConcordant": "neurosim.rules.sign_concordant", "KolenPollack": "neurosim.rules",
    "WeightMirror": "neurosim.rules", "SleepSchedule": "neurosim.rules", "SleepPhase": "neurosim.rules",
    "DirectFeedbackAlignment": "neurosim.rules.direct_feedback_alignment",
    "reference_backward": "neurosim.core.reference", "UserError": "neurosim.common.errors", "DataError": "neurosim.common.errors",
    "convert": "neurosim.models.convert", "copy_weights": "neurosim.models.convert", "export_weights": "neurosim.models.convert", "ConversionError": "neurosim.models.convert",
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
