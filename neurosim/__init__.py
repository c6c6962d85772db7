"""neurosim: circuit-level simulation of neural networks that learn without weight transport."""

from neurosim.circuit import Circuit
from neurosim.convert import ConversionError, convert, copy_weights
from neurosim.errors import DataError, UserError
from neurosim.kinds import Conv2d, Dense, SynapseKind
from neurosim.pathways import FeedbackPathway
from neurosim.population import NeuronPopulation
from neurosim.reference import reference_backward
from neurosim.rules import (RULES, Backprop, FeedbackAlignment, KolenPollack, LocalSignals, PlasticityRule,
                            SignSymmetry, SleepSchedule, WeightMirror, register_rule)
from neurosim.rules.direct_feedback_alignment import DirectFeedbackAlignment
from neurosim.rules.sign_concordant import (BatchRandomSignConcordant, FixedRandomSignConcordant,
                                            UniformSignConcordant)
from neurosim.synapse import Synapse

__all__ = ["Circuit", "NeuronPopulation", "Synapse", "FeedbackPathway", "Dense", "Conv2d", "SynapseKind",
           "PlasticityRule", "LocalSignals", "RULES", "register_rule", "Backprop", "FeedbackAlignment",
           "SignSymmetry", "UniformSignConcordant", "FixedRandomSignConcordant", "BatchRandomSignConcordant",
           "KolenPollack", "WeightMirror", "SleepSchedule", "DirectFeedbackAlignment", "reference_backward",
           "UserError", "DataError", "convert", "copy_weights", "ConversionError"]
