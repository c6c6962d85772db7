"""The plasticity rules, one small module each, all written against ``LocalSignals``."""

from neurosim.rules.backprop import Backprop
from neurosim.rules.base import LocalSignals, PlasticityRule
from neurosim.rules.feedback_alignment import FeedbackAlignment
from neurosim.rules.kolen_pollack import KolenPollack
from neurosim.rules.sign_symmetry import SignSymmetry
from neurosim.rules.weight_mirror import SleepSchedule, WeightMirror

RULES = {r.name: r for r in (Backprop, FeedbackAlignment, SignSymmetry, WeightMirror, KolenPollack)}

__all__ = ["Backprop", "FeedbackAlignment", "SignSymmetry", "KolenPollack", "WeightMirror",
           "SleepSchedule", "LocalSignals", "PlasticityRule", "RULES"]
