"""The plasticity rules, one small module each, all written against ``LocalSignals``.

Every module of this package is imported here, and each rule in it registers itself with
``@register_rule``: adding a rule is adding its file. ``RULES`` maps names to rule classes; a
rule may answer to aliases as well (``ss`` is ``usf``), which lookups accept and listings leave
out (``neurosim.rules.registry``).

A rule module imports torch inside the methods that compute, not at its top: the registry is
what the command line reads to build its options, presets and ``--help``, and that should answer
at once, without the seconds PyTorch takes to load (``tests/test_cli_options.py`` checks it).

May import ``neurosim.common`` only: a rule sees the signals at one synapse and nothing of the
circuit around it.
"""

import importlib
import pkgutil

# The order of these imports is the order the rules register, and so the order of --help, the
# presets table and a study's default rules.
from neurosim.rules.base import RULES, LocalSignals, PlasticityRule, SleepPhase, register_rule  # isort: skip
from neurosim.rules.backprop import Backprop  # isort: skip
from neurosim.rules.feedback_alignment import FeedbackAlignment  # isort: skip
from neurosim.rules.sign_concordant import SignSymmetry, UniformSignConcordant  # isort: skip
from neurosim.rules.weight_mirror import SleepSchedule, WeightMirror  # isort: skip
from neurosim.rules.kolen_pollack import KolenPollack  # isort: skip

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Backprop", "FeedbackAlignment", "SignSymmetry", "UniformSignConcordant", "KolenPollack", "WeightMirror",
           "SleepSchedule", "SleepPhase", "LocalSignals", "PlasticityRule", "RULES", "register_rule"]
