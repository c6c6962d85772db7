"""Callbacks: what a run tells observers at each step, around each sleep and at each checkpoint
(the per-synapse monitor is one; a test or a benchmark can add its own to ``Run.callbacks``).

``MonitorCallback`` also copies the monitor's records into the run's TensorBoard event files
(``MonitorTensorBoard``) where tensorboard is installed; see docs/monitors.md for the tags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from neurosim.observe.monitors import RECORD_VALUES, SCALARS, SLEEP, Monitor

# Buckets of each TensorBoard histogram (evenly spaced from the tensor's minimum to its maximum).
HISTOGRAM_BINS = 64
# What a histogram row holds before its bucket counts.
_HEAD = ("min", "max", "num", "sum", "sum_squares")


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
    """A ``Monitor`` as a run's callback: its records are flushed with every checkpoint, and,
    given the run's ``log`` (a ``RunLog``) where it writes TensorBoard records, copied into the
    run's TensorBoard event files as well (``MonitorTensorBoard``)."""

    def __init__(self, monitor: Monitor, log=None):
        self.monitor = monitor
        self.tensorboard = MonitorTensorBoard(monitor, log) if log is not None and log.tensorboard_available() \
            else None

    def after_step(self, step: int) -> None:
        rows = len(self.monitor.steps)
        self.monitor.after_step(step)
        if self.tensorboard is not None and len(self.monitor.steps) > rows:
            self.tensorboard.recorded(step)

    def before_sleep(self, step: int) -> None:
        self.monitor.before_sleep(step)
        if self.tensorboard is not None:
            self.tensorboard.slept(step, "before")

    def after_sleep(self, step: int) -> None:
        self.monitor.after_sleep(step)
        if self.tensorboard is not None:
            self.tensorboard.slept(step, "after")

    def on_checkpoint(self, run_dir: Path) -> None:
        arrays = self.monitor.flush(run_dir, create=False)
        if self.tensorboard is not None:
            self.tensorboard.write(arrays)


@torch.no_grad()
def device_histogram(t: torch.Tensor, bins: int = HISTOGRAM_BINS) -> torch.Tensor:
    """``[min, max, num, sum, sum of squares, count of each of bins buckets]`` of ``t`` as a float64
    vector on its device, buckets evenly spaced from its minimum to its maximum (a value on an
    inner edge counts in the bucket above it); no host sync."""
    # Counted from the sorted values (how many lie below each inner edge): deterministic, unlike
    # atomic adds, so a run in deterministic mode may take it.
    x = t.detach().reshape(-1).to(torch.float64).sort().values
    lo, hi = x[0], x[-1]
    inner = lo + (hi - lo) / bins * torch.arange(1, bins, dtype=torch.float64, device=x.device)
    below = torch.searchsorted(x, inner)
    n = x.new_tensor(float(x.numel()))
    counts = torch.diff(torch.cat([below.new_zeros(1), below, below.new_full((1,), x.numel())])).to(torch.float64)
    head = torch.stack([lo, hi, n, x.sum(), x.square().sum()])
    return torch.cat([head, counts])


class MonitorTensorBoard:
    """The monitor's records in the run's TensorBoard event files, written at each checkpoint.

    Per monitored synapse ``<name>``, at the engaged step of each record: the scalars
    ``synapse/<name>/<quantity>`` for the per-synapse quantities of ``monitor.npz`` that hold a
    value there (``angle``, ``norm_ratio``, ``delta_angle``, ``grad_angle`` and, around WM's
    sleeps, ``sleep_angle_before``/``_after`` and ``sleep_norm_ratio_before``/``_after``), and the
    histograms ``hist/<name>/W``, ``hist/<name>/B`` (the feedback matrix, in W's layout) and
    ``hist/<name>/W-B`` (W − Bᵀ; the last two only where the synapse has a feedback matrix).

    The histograms are taken on the device when the monitor records a row (no host sync), copied
    to (pinned) host memory without waiting, and written with the scalars at the checkpoint,
    where the monitor synchronises anyway. Each point is written once: rows that a resumed run
    restored from its checkpoint were written before that checkpoint was committed (only the
    end of a sleep the stop interrupted is still to come)."""

    def __init__(self, monitor: Monitor, log, bins: int = HISTOGRAM_BINS):
        self.monitor, self.log, self.bins = monitor, log, bins
        self.feedback = [syn.feedback_matrix() is not None for syn in monitor.synapses]
        self._hists: list[tuple[int, torch.Tensor]] = []  # (step, [synapse, W/B/W-B, head+bins]) unwritten
        self._done = 0  # rows before this one are written whole
        self._partial: set[str] = set()  # quantities written of row ``_done`` (a sleep may add to it)
        self._seen: set[tuple[int, str]] = set()  # (step, "before"/"after"): sleeps this process saw
        self._restore_seen = False
        if monitor.steps == [0]:
            self.recorded(0)  # the row the monitor recorded as it was built

    @property
    def active(self) -> bool:
        return self.log.tensorboard_available()

    def recorded(self, step: int) -> None:
        """The monitor recorded a row at ``step``: take the histograms of the weights as they are."""
        if not self.active:
            return
        rows = []
        for syn, feedback in zip(self.monitor.synapses, self.feedback):
            w = syn.weight.detach()
            hw = device_histogram(w, self.bins)
            if feedback:  # else only W's is written: its row stands in for the other two
                b = syn.feedback_matrix().detach()
                rows.append(torch.stack([hw, device_histogram(b, self.bins), device_histogram(w - b, self.bins)]))
            else:
                rows.append(torch.stack([hw, hw, hw]))
        rows = torch.stack(rows)
        if rows.device.type == "cuda":
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            rows = host
        self._hists.append((step, rows))

    def slept(self, step: int, when: str) -> None:
        if self.monitor.restored_rows and not self._restore_seen:  # only a resumed run's first ones matter
            self._seen.add((step, when))

    def _restored(self, steps) -> None:
        """A resumed run: the rows restored from the checkpoint were written by the process that
        made it, except what this process added to its last row (the end of an interrupted sleep)."""
        self._restore_seen = True
        n = self.monitor.restored_rows
        last = int(steps[n - 1])
        self._hists = [(s, h) for s, h in self._hists if s > last]
        self._done = n - 1
        self._partial = {q for q in (*SCALARS, *SLEEP, *RECORD_VALUES) if (last, q.rsplit("_", 1)[-1]) not in self._seen
                         or not q.startswith("sleep_")}

    def write(self, arrays: dict[str, np.ndarray]) -> None:
        """Write what was recorded since the last call (``arrays``: the monitor's, as just flushed)."""
        if not self.active:
            self._hists = []
            return
        steps = arrays["steps"]
        if self.monitor.restored_rows and not self._restore_seen:
            self._restored(steps)
        if self._hists and self._hists[-1][1].is_pinned():
            torch.cuda.synchronize()  # the copies to the host have landed
        hists, self._hists = self._hists, []
        quantities = [q for q in (*SCALARS, *SLEEP) if arrays.get(q) is not None]
        names = self.monitor.names
        written: set[str] = set()

        def scalars_and_histograms(writer):
            for r in range(self._done, len(steps)):
                step = int(steps[r])
                for q in quantities:
                    if r == self._done and q in self._partial:
                        continue
                    values = arrays[q][r]
                    for name, v in zip(names, values):
                        if np.isfinite(v):
                            writer.add_scalar(f"synapse/{name}/{q}", float(v), step)
                    if r == len(steps) - 1 and np.isfinite(values).any():
                        written.add(q)
                for q in RECORD_VALUES:  # the probe batch's loss and top-1: probe/loss, probe/top1
                    v = arrays.get(q)
                    if v is None or (r == self._done and q in self._partial) or not np.isfinite(v[r]):
                        continue
                    writer.add_scalar(f"probe/{q.removeprefix('probe_')}", float(v[r]), step)
                    if r == len(steps) - 1:
                        written.add(q)
            for step, rows in hists:
                for name, feedback, row in zip(names, self.feedback, rows.numpy()):
                    for what, h in zip(("W", "B", "W-B"), row):
                        if what == "W" or feedback:
                            _add_histogram(writer, f"hist/{name}/{what}", h, step)

        self.log.to_tensorboard(scalars_and_histograms)
        last = len(steps) - 1
        self._partial = (self._partial | written) if last == self._done else written
        self._done = last


def _add_histogram(writer, tag: str, h: np.ndarray, step: int) -> None:
    lo, hi, num, total, squares = (float(v) for v in h[:len(_HEAD)])
    counts = h[len(_HEAD):]
    limits = np.linspace(lo, hi, len(counts) + 1)[1:]
    writer.add_histogram_raw(tag, lo, hi, num, total, squares, limits.tolist(), counts.tolist(), step)
