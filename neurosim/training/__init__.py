"""Training: the run configuration and presets (``config``), the run and its loop (``run``), one
engaged or sleep step (``step``), checkpoints (``checkpoint``), scores clean (``evaluation``) and
under attack (``attack``: FGSM and PGD with backprop's input gradients, ``robustness.json``),
what a run prints and records (``run_log``, ``run_record``) and runs over several processes
(``distributed``).

May import every part below it (common, rules, core, models, data, observe); the tools use it.
"""
