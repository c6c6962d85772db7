"""neurosim: circuit-level simulation of neural networks that learn without weight transport."""

from neurosim.circuit import Circuit
from neurosim.errors import DataError, UserError
from neurosim.kinds import Conv2d, Dense, SynapseKind
from neurosim.population import NeuronPopulation
from neurosim.reference import reference_backward
from neurosim.rules import (Backprop, FeedbackAlignment, KolenPollack, LocalSignals, PlasticityRule,
                            SignSymmetry, SleepSchedule, WeightMirror)
from neurosim.synapse import Synapse

__all__ = ["Circuit", "NeuronPopulation", "Synapse", "Dense", "Conv2d", "SynapseKind", "PlasticityRule", "LocalSignals",
           "Backprop", "FeedbackAlignment", "SignSymmetry", "KolenPollack", "WeightMirror", "SleepSchedule",
           "reference_backward", "UserError", "DataError"]
