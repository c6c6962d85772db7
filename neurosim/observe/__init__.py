"""Observation of a circuit as it learns: the per-synapse monitor (``monitors``), the probe that
compares the feedback signal with the true gradient (``probe``), and the monitor's files
(``monitor_files``).

May import ``neurosim.common``, ``neurosim.rules`` and ``neurosim.core``; the training loop
drives it, never the other way round.
"""
