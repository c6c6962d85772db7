"""Callbacks: what a run tells observers at each step, around each sleep and at each checkpoint
(the per-synapse monitor is one; a test or a benchmark can add its own to ``Run.callbacks``)."""

from __future__ import annotations

from pathlib import Path

from neurosim.observe.monitors import Monitor


class Callback:
    """Something a run calls as it goes; every hook does nothing unless overridden."""

    def after_step(self, step: int) -> None:
        """After engaged step ``step`` (and before any sleep it makes due)."""

    def before_sleep(self, step: int) -> None:
        """Before a stretch of sleep, ``step`` engaged steps in."""

    def after_sleep(self, step: int) -> None:
        """After a stretch of sleep."""

    def on_checkpoint(self, run_dir: Path) -> None:
        """Write what belongs to the checkpoint being committed (before ``last.pt``)."""


class MonitorCallback(Callback):
    """A ``Monitor`` as a run's callback: its records are flushed with every checkpoint."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor

    def after_step(self, step: int) -> None:
        self.monitor.after_step(step)

    def before_sleep(self, step: int) -> None:
        self.monitor.before_sleep(step)

    def after_sleep(self, step: int) -> None:
        self.monitor.after_sleep(step)

    def on_checkpoint(self, run_dir: Path) -> None:
        self.monitor.flush(run_dir, create=False)
