"""Monitors: how each synapse's forward and feedback weights evolve during training.

What is recorded
================

A ``Monitor`` watches the synapses of a ``Circuit`` whose names match ``MonitorConfig.synapses``
(comma-separated fnmatch patterns, default ``*``: all). Every ``every`` engaged optimizer steps —
and once before training, at step 0 — it records a row of values for every monitored synapse
(W–Bᵀ angle and norm ratio, delta and update angles on a probe batch, traced weight pairs, and
for circuits that sleep the same just before and after each sleep), and ``snapshots`` times
over the run sampled (W, Bᵀ) pairs for a scatter plot. What each array is — its name, axes,
unit, meaning, the figure that draws it and whether every file has it — is declared once, in
``neurosim.observe.monitor_files.QUANTITIES``; docs/monitors.md shows that table.

The probe (delta and update angles, ``neurosim.observe.probe.probe_angles``) runs the probe batch forward
and backward twice on the circuit as it is — once with its rules, once as backprop
(``Circuit.backprop_truth``: every rule swapped for ``Backprop``, feedback pathways off) — with
``torch.autograd.grad``, so no ``.grad`` is touched, and batch-norm running statistics are
restored afterwards: recording does not change training. Both passes run in the training
precision (bf16 autocast where training uses it), so the angles describe the errors training
really delivers. It costs about two training steps of the probe's batch size per record. ``probe=0`` turns it off (those arrays are then NaN).

Within a presentation
=====================

A circuit run in time (``neurosim.core.dynamics``) learns from signals that rise, overlap and
fade within each presentation. ``Monitor(..., time_settings=TimeSettings(...))`` presents its
probe batch once in time at every scatter snapshot, to a copy of the circuit, and keeps the
traced pairs' presynaptic signal, local error and running ΔW (ΔB where the rule learns B while
engaged) at every time step (``neurosim.observe.time_traces``; the ``time_*`` arrays). Ordinary
runs (``time_settings=None``) write none of them.

Cost and size
=============

Recording happens on the device into preallocated buffers with no host synchronisation: no
``.item()``, no Python branch on a tensor value. A buffer holds a chunk of rows; when it is full
the chunk is copied to (pinned) host memory in one non-blocking transfer. ``flush(run_dir)`` —
at each epoch end — synchronises once and writes the files. The whole run's recorded size is
known in advance (``estimate_nbytes``)::

    rows  = 1 + total_steps // every
    bytes ≈ rows · S · (4 + 4·[sleeps] + 2·traces) · 4  +  snapshots · S · scatter · 2 · 4
            + snapshots · S · traces · (4·T + 2) · 4  +  4·T        (in time: T steps a presentation)

with ``S`` monitored synapses: a few megabytes for a 200-epoch CIFAR ResNet-18 at the defaults
(docs/monitors.md gives the figure and the command that computes it). The device holds one
chunk of at most ``CHUNK_ROWS`` rows plus the snapshots. A configuration whose size exceeds
``max_bytes`` (256 MiB) is refused before training starts, with the size and the knob to change
(e.g. every=1 with every weight traced).

Files
=====

In the run directory, rewritten atomically (temporary file, then rename) at every flush, by
``neurosim.observe.monitor_files``:

``monitor.npz``   the arrays of ``QUANTITIES``, with the axes it declares. Indices are flat
                  positions in ``W``; ``-1`` pads synapses with fewer weights than ``k`` (their
                  values are NaN).
``monitor.json``  the index: synapse names in record order (their column in every array), their
                  weight shapes and rules, each array's shape, unit and meaning, the traced
                  positions, and the monitor configuration.

Reading
=======

::

    from neurosim.observe.monitors import load_monitor
    rec = load_monitor("runs/kp_resnet18-…")
    steps, angle = rec.series("angle", "layer3_0_conv1")       # degrees per recorded step
    steps, w, b = rec.trace("fc", 0)                           # one traced pair over time
    rec.angle.shape                                            # (records, synapses)

``neurosim.tools.figures.plot_run`` draws the standard figures from these files.
"""


from __future__ import annotations

import fnmatch
import math

import attrs
import numpy as np
import torch

from neurosim.common.errors import UserError
from neurosim.core.analysis import angle_deg
from neurosim.observe.monitor_files import (
    ARRAYS,
    FORMAT,
    QUANTITIES,
    RECORD_VALUES,
    SCALARS,
    SLEEP,
    MonitorRecord,
    load_monitor,
    monitor_index,
    write_monitor,
)
from neurosim.observe.probe import probe_angles, probe_batch
from neurosim.observe.time_traces import SERIES, START, TimeTraces, check_time_settings, presentation_steps

__all__ = ["ARRAYS", "FORMAT", "QUANTITIES", "RECORD_VALUES", "SCALARS", "SLEEP", "Monitor", "MonitorConfig", "MonitorRecord",
           "RecordBuffer", "estimate_nbytes", "load_monitor", "probe_angles", "probe_batch", "record_rows", "snapshot_plan"]

MIB = 2**20
# A device buffer holds at most this many rows and bytes; a full one moves to the host at once.
CHUNK_ROWS = 256
CHUNK_BYTES = 16 * MIB
TRACES = ("traces_w", "traces_b")

_v = attrs.validators


@attrs.frozen
class MonitorConfig:
    """What to record on which synapses, and how often.

    ``every``: record every N engaged steps (and at step 0). ``synapses``: comma-separated
    fnmatch patterns over synapse names. ``traces``: individual weight pairs followed per
    synapse. ``probe``: probe batch size for the delta and update angles (0: off). ``scatter``:
    pairs per synapse in each W-vs-Bᵀ snapshot; ``snapshots``: how many over the run.
    ``max_bytes``: refuse a configuration whose records over the whole run would exceed this.
    """

    every: int = attrs.field(default=200, validator=_v.ge(1))
    synapses: str = "*"
    traces: int = attrs.field(default=16, validator=_v.ge(0))
    probe: int = attrs.field(default=128, validator=_v.ge(0))
    scatter: int = attrs.field(default=512, validator=_v.ge(0))
    snapshots: int = attrs.field(default=5, validator=_v.ge(0))
    max_bytes: int = attrs.field(default=256 * MIB, validator=_v.ge(1))

    def select(self, names) -> list[str]:
        """The synapse names (in circuit order) that the patterns match; refuses an empty match."""
        names = list(names)
        patterns = [p.strip() for p in self.synapses.split(",") if p.strip()]
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not chosen:
            raise UserError(f"monitor pattern {self.synapses!r} matches no synapse; the circuit has "
                            f"{', '.join(names)}")
        return chosen


def record_rows(every: int, total_steps: int) -> int:
    """Rows a run of ``total_steps`` engaged steps records: step 0 and every ``every``-th step."""
    return 1 + max(total_steps, 0) // every


def estimate_nbytes(cfg: MonitorConfig, numels, total_steps: int, sleeps: bool, time_steps: int = 0) -> int:
    """Bytes the monitor records over a whole run, for synapses with ``numels`` weights each.

    Rows of float32 per-synapse scalars (4, or 8 with sleep columns) and ``2·traces`` traced
    values, one int64 step per row, the scatter snapshots and the sample indices; with
    ``time_steps`` (the steps of one presentation in time, 0: none), per snapshot and traced
    pair four float32 series of that many steps and two start values, and the step times. The
    files and the host copy are this size; the device holds only one chunk
    (``Monitor.buffer_nbytes``) plus the snapshots.
    """
    numels = list(numels)
    s = len(numels)
    k = min(cfg.traces, max(numels, default=0))
    n = min(cfg.scatter, max(numels, default=0)) if cfg.snapshots else 0
    per_row = 4 * s * (len(SCALARS) + len(SLEEP) * bool(sleeps) + 2 * k) + 4 * len(RECORD_VALUES) + 8
    snaps = cfg.snapshots * (4 * s * 2 * n + 8)
    timed = cfg.snapshots * 4 * s * k * (len(SERIES) * time_steps + len(START)) + 4 * time_steps if time_steps else 0
    return record_rows(cfg.every, total_steps) * per_row + snaps + 8 * s * (k + n) + timed


def snapshot_plan(snapshots: int, total_steps: int) -> list[int]:
    """Engaged steps for the scatter snapshots: evenly spaced from 0 to ``total_steps``."""
    if snapshots <= 0:
        return []
    if snapshots == 1:
        return [total_steps]
    return sorted({round(i * total_steps / (snapshots - 1)) for i in range(snapshots)})


def _sample(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` sorted distinct flat positions (padded with -1 when the synapse has fewer weights)."""
    take = min(k, numel)
    idx = torch.randperm(numel, generator=generator)[:take].sort().values
    return torch.cat([idx, torch.full((k - take,), -1, dtype=torch.int64)])


def _feedback(syn) -> torch.Tensor:
    """A synapse's feedback matrix, or NaN where its rule sends nothing back (DFA): the W–Bᵀ
    measures are undefined there, the delta angles are not."""
    m = syn.feedback_matrix()
    return torch.full_like(syn.weight.detach(), math.nan) if m is None else m.detach()


class RecordBuffer:
    """The records on the device: one row per record in a fixed column layout, and the scatter
    snapshots, moved to the host chunk by chunk.

    A row holds ``synapses`` values for each scalar field (``SCALARS``, then ``SLEEP`` when
    ``sleep``) and ``synapses·traces`` for each of ``traces_w`` and ``traces_b`` (synapse-major).
    The device holds one chunk of ``chunk_rows`` rows, NaN until written; when it is full,
    ``next_row`` copies it to (pinned) host memory in one non-blocking transfer and starts a new
    one. Nothing here reads a value on the host before ``rows``, ``row_arrays``,
    ``snapshot_arrays`` or ``state_dict``, which synchronise once.
    """

    def __init__(self, synapses: int, traces: int, scatter: int, snapshots: int, sleep: bool,
                 total_rows: int, device):
        self.s, self.k, self.n_scatter = synapses, traces, scatter
        self.fields = SCALARS + (SLEEP if sleep else ())
        self.columns, off = {}, 0
        for name in self.fields:
            self.columns[name] = (off, off + synapses)
            off += synapses
        for name in TRACES:
            self.columns[name] = (off, off + synapses * traces)
            off += synapses * traces
        for name in RECORD_VALUES:  # last, so that older checkpoints' rows are a prefix of these
            self.columns[name] = (off, off + 1)
            off += 1
        self.width = off
        self.chunk_rows = max(1, min(CHUNK_ROWS, total_rows, CHUNK_BYTES // (4 * max(self.width, 1))))
        self._buf = torch.full((self.chunk_rows, self.width), math.nan, device=device)
        self._snap = torch.full((snapshots, synapses, 2, scatter), math.nan, device=device)
        self._host: list[torch.Tensor] = []  # full chunks already sent to the host, in order
        self._chunk_start = 0  # row number of the device buffer's first row
        self.steps: list[int] = []
        self.snapshot_steps: list[int] = []

    def nbytes(self) -> int:
        """Bytes held on the device: fixed at construction."""
        return self._buf.numel() * self._buf.element_size() + self._snap.numel() * self._snap.element_size()

    # -- writing (device only, no host sync) ---------------------------------------------------
    def next_row(self) -> torch.Tensor:
        """The device row the next record fills (NaN until written); ``commit_row`` counts it."""
        pos = len(self.steps) - self._chunk_start
        if pos == self.chunk_rows:
            cuda = self._buf.device.type == "cuda"
            host = torch.empty(self._buf.shape, dtype=self._buf.dtype, pin_memory=cuda)
            # Ordered on the stream before the refill below, so no host wait is needed here.
            host.copy_(self._buf, non_blocking=cuda)
            self._host.append(host)
            self._chunk_start += self.chunk_rows
            self._buf.fill_(math.nan)
            pos = 0
        return self._buf[pos]

    def commit_row(self, step: int) -> None:
        """The row from ``next_row`` holds the record of ``step``."""
        self.steps.append(step)

    def field(self, row: torch.Tensor, name: str) -> torch.Tensor:
        """The columns of field ``name`` in ``row``, as a view to write into (``S`` values for a
        scalar field, ``S·k`` for a trace field)."""
        return row[slice(*self.columns[name])]

    def last_row(self, step: int) -> torch.Tensor | None:
        """The device row of the newest record if it is the record of ``step``, else None."""
        if not self.steps or self.steps[-1] != step:
            return None
        return self._buf[len(self.steps) - 1 - self._chunk_start]

    def next_snapshot(self) -> torch.Tensor:
        """The ``(S, 2, n)`` device slot the next scatter snapshot fills; ``commit_snapshot``
        counts it."""
        return self._snap[len(self.snapshot_steps)]

    def commit_snapshot(self, step: int) -> None:
        self.snapshot_steps.append(step)

    # -- host side -----------------------------------------------------------------------------
    def rows(self) -> torch.Tensor:
        """Every row recorded so far, on the host (synchronises with the device once)."""
        if self._buf.device.type == "cuda":
            torch.cuda.current_stream(self._buf.device).synchronize()
        live = self._buf[: len(self.steps) - self._chunk_start].cpu()
        return torch.cat([*self._host, live]) if self._host else live

    def row_arrays(self) -> dict[str, np.ndarray]:
        """``steps``, the scalar fields ``[record, synapse]`` and the traces ``[record, synapse, k]``."""
        rows = self.rows().numpy()
        r = len(self.steps)
        out = {"steps": np.asarray(self.steps, dtype=np.int64)}
        for name in self.fields:
            a, b = self.columns[name]
            out[name] = rows[:, a:b].copy()
        for name in TRACES:
            a, b = self.columns[name]
            out[name] = rows[:, a:b].reshape(r, self.s, self.k).copy()
        for name in RECORD_VALUES:
            out[name] = rows[:, self.columns[name][0]].copy()
        return out

    def snapshot_arrays(self) -> dict[str, np.ndarray]:
        """``scatter_steps`` and the snapshots ``scatter_w``, ``scatter_b`` ``[snapshot, synapse, n]``."""
        snap = self._snap[:len(self.snapshot_steps)].cpu().numpy()
        return {"scatter_steps": np.asarray(self.snapshot_steps, dtype=np.int64),
                "scatter_w": snap[:, :, 0].copy(), "scatter_b": snap[:, :, 1].copy()}

    # -- resuming ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "chunk_start": self._chunk_start, "rows": self.rows(),
                "snapshot_steps": list(self.snapshot_steps), "snapshots": self._snap.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` of a buffer with the same layout."""
        rows, steps = state["rows"], list(state["steps"])
        if rows.shape[1] < self.width:  # saved before the per-record values: they load as NaN
            rows = torch.cat([rows, rows.new_full((rows.shape[0], self.width - rows.shape[1]), math.nan)], 1)
        # The newest rows go back to the device (a sleep may still add to the last one).
        live = min(len(steps) - state["chunk_start"], self.chunk_rows) if steps else 0
        live = max(live, min(len(steps), 1))
        self._chunk_start = len(steps) - live
        self._host = [rows[: self._chunk_start].clone()] if self._chunk_start else []
        self._buf.fill_(math.nan)
        self._buf[:live] = rows[self._chunk_start:].to(self._buf.device)
        self.steps = steps
        self.snapshot_steps = list(state["snapshot_steps"])
        self._snap.copy_(state["snapshots"].to(self._snap.device))


class Monitor:
    """Per-synapse records of a circuit during training, on the device, flushed to disk.

    ``Monitor(circuit, cfg, total_steps, probe, loss_fn, seed, time_settings=None)``: build it once
    the circuit is on its device; it records step 0 (the circuit as it is now) at once. ``probe`` is a fixed batch
    ``(x, y)`` as the circuit sees it (normalised, on the device; see ``probe_batch``) of which
    the first ``cfg.probe`` samples are used; ``loss_fn(logits, y)`` is the training loss.
    ``time_settings`` (a ``TimeSettings``, for a run in time): at every scatter snapshot the probe
    batch is also presented once in time, and the traced pairs' signals kept at every time step
    (``neurosim.observe.time_traces``); it needs a probe batch.

    The training loop calls ``after_step(step)`` after every engaged optimizer step,
    ``before_sleep(step)`` / ``after_sleep(step)`` around the sleep batches that follow step
    ``step`` (step 0: the sleep before training), ``flush(run_dir)`` at each epoch end, and saves
    ``state_dict()`` in its checkpoint. See the module docstring for what is recorded.

    It decides what to measure and when; the rows live in a ``RecordBuffer`` (``records``), the
    delta and update angles come from ``neurosim.observe.probe.probe_angles`` and the files are written
    by ``neurosim.observe.monitor_files``.
    """

    def __init__(self, circuit, cfg: MonitorConfig, total_steps: int,
                 probe: tuple[torch.Tensor, torch.Tensor] | None = None, loss_fn=None, seed: int = 0,
                 autocast_dtype: torch.dtype | None = None, time_settings=None, learning_rate=None):
        self.circuit, self.cfg, self.total_steps = circuit, cfg, int(total_steps)
        # ``learning_rate()``: the rate the weights move at now, for a presentation in time whose
        # plasticity is continuous (its copy's weights move during the presentation, as the run's do).
        self.learning_rate = learning_rate
        # The probe runs in the training precision: its angles describe the errors training
        # really delivers (bf16 rounding included), and both of its passes share that precision.
        self.autocast_dtype = autocast_dtype
        self.names = cfg.select(circuit.synapses.keys())
        self.synapses = [circuit.synapses[n] for n in self.names]
        numels = [syn.weight.numel() for syn in self.synapses]
        sleeping = [i for i, syn in enumerate(self.synapses) if syn.rule.sleeps]
        self.has_sleep = bool(sleeping)
        if time_settings is not None:
            check_time_settings(circuit, time_settings, bool(cfg.probe and probe is not None and loss_fn is not None))
            if time_settings.plasticity == "continuous" and learning_rate is None:
                raise ValueError("continuous plasticity moves the presented copy's weights at the run's rate: "
                                 "give learning_rate (a callable returning it)")
        self.time_steps = 0 if time_settings is None or not cfg.snapshots else presentation_steps(circuit, time_settings)
        size = estimate_nbytes(cfg, numels, total_steps, self.has_sleep, self.time_steps)
        if size > cfg.max_bytes:
            raise UserError(self._oversize_message(size, numels))

        self.device = self.synapses[0].weight.device
        self.probe = None
        if cfg.probe and probe is not None:
            if loss_fn is None:
                raise ValueError("a probe batch needs loss_fn to form the errors")
            self.probe = (probe[0][:cfg.probe].detach(), probe[1][:cfg.probe].detach())
        self.loss_fn = loss_fn

        self.k = min(cfg.traces, max(numels))
        self.n_scatter = min(cfg.scatter, max(numels)) if cfg.snapshots else 0
        g = torch.Generator().manual_seed(seed)
        self._set_indices(torch.stack([_sample(n, self.k, g) for n in numels]),
                          torch.stack([_sample(n, self.n_scatter, g) for n in numels]))
        self._sleepers = [self.synapses[i] for i in sleeping]
        self._sleeping = torch.tensor(sleeping, dtype=torch.int64, device=self.device)

        self.records = RecordBuffer(len(self.names), self.k, self.n_scatter, cfg.snapshots, self.has_sleep,
                                    record_rows(cfg.every, total_steps), self.device)
        self.time = (TimeTraces(circuit, time_settings, len(self.names), self.k, cfg.snapshots, self.device, seed)
                     if self.time_steps else None)
        self._plan = snapshot_plan(cfg.snapshots, self.total_steps)
        self.restored_rows = 0
        self.after_step(0)

    def _set_indices(self, trace_index: torch.Tensor, scatter_index: torch.Tensor) -> None:
        self.trace_index, self.scatter_index = trace_index, scatter_index
        self._trace_at = [self._positions(syn, row) for syn, row in zip(self.synapses, trace_index)]
        self._scatter_at = [self._positions(syn, row) for syn, row in zip(self.synapses, scatter_index)]

    @property
    def steps(self) -> list[int]:
        """The engaged steps recorded so far, one per row."""
        return self.records.steps

    @property
    def snapshot_steps(self) -> list[int]:
        return self.records.snapshot_steps

    @property
    def width(self) -> int:
        return self.records.width

    @property
    def chunk_rows(self) -> int:
        return self.records.chunk_rows

    # -- sizes ---------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Estimated bytes recorded over the whole run (files and host copy); see ``estimate_nbytes``."""
        return estimate_nbytes(self.cfg, [s.weight.numel() for s in self.synapses], self.total_steps,
                               self.has_sleep, self.time_steps)

    def buffer_nbytes(self) -> int:
        """Bytes the monitor holds on the device: fixed at construction, whatever the run's length."""
        return self.records.nbytes() + (self.time.nbytes() if self.time is not None else 0)

    def _oversize_message(self, size: int, numels) -> str:
        cfg = self.cfg
        rows = record_rows(cfg.every, self.total_steps)
        k = min(cfg.traces, max(numels))
        traced = rows * 4 * len(numels) * 2 * k
        scatter = cfg.snapshots * 4 * len(numels) * 2 * min(cfg.scatter, max(numels))
        timed = cfg.snapshots * 4 * len(numels) * k * len(SERIES) * self.time_steps
        if timed >= size / 2:
            knob = (f"shorten the presentations in time ({self.time_steps} steps each: duration, settle), trace "
                    f"fewer weights (traces, --monitor-traces, now {cfg.traces}) or take fewer snapshots (now "
                    f"{cfg.snapshots})")
        elif traced >= size / 2:
            knob = (f"trace fewer weights (traces, --monitor-traces, now {cfg.traces}) or record less "
                    f"often (every, --monitor-every, now {cfg.every})")
        elif scatter >= size / 2:
            knob = f"take fewer scatter pairs (scatter, now {cfg.scatter}) or snapshots (now {cfg.snapshots})"
        else:
            knob = f"record less often (every, --monitor-every, now {cfg.every})"
        return (f"the monitor would record {size / 1e6:.1f} MB over this run ({rows} records of "
                f"{len(numels)} synapses, {k} traced weights each), more than its limit of "
                f"{cfg.max_bytes / 1e6:.1f} MB: {knob}, monitor fewer synapses (synapses, "
                f"--monitor-synapses, now {cfg.synapses!r}), or raise the limit (max_bytes)")

    # -- recording (device only, no host sync) -------------------------------------------------
    @staticmethod
    def _positions(syn, flat: torch.Tensor):
        """Multi-dimensional indices of the real (non-pad) flat positions: gathers without
        flattening, so a channels_last weight is not copied."""
        real = flat[flat >= 0]
        return tuple(t.to(syn.weight.device) for t in torch.unravel_index(real, syn.weight.shape))

    def after_step(self, step: int) -> None:
        """Record if ``step`` (engaged steps completed, from 1) is a multiple of ``every``, and take
        a scatter snapshot if one is planned for this step."""
        if self._snapshot_due(step):
            self._snapshot(step)
        if step % self.cfg.every == 0:
            self._record(step)

    def _snapshot_due(self, step: int) -> bool:
        taken = self.snapshot_steps
        return step in self._plan and len(taken) < self.cfg.snapshots and (not taken or step > taken[-1])

    @torch.no_grad()
    def _snapshot(self, step: int) -> None:
        snap = self.records.next_snapshot()
        for i, (syn, at) in enumerate(zip(self.synapses, self._scatter_at)):
            n = len(at[0])
            snap[i, 0, :n] = syn.weight.detach()[at]
            snap[i, 1, :n] = _feedback(syn)[at]
        if self.time is not None:
            self.time.present(len(self.snapshot_steps), self.circuit, self.names, self._trace_at, *self.probe,
                              self.loss_fn, lr=None if self.learning_rate is None else self.learning_rate())
        self.records.commit_snapshot(step)

    def _alignment(self, synapses):
        """W–Bᵀ angles (degrees) and ‖Bᵀ‖/‖W‖ of ``synapses``, as two device vectors."""
        angles, ratios = [], []
        for syn in synapses:
            w, bt = syn.weight.detach(), _feedback(syn)
            angles.append(angle_deg(w, bt))
            ratios.append(torch.linalg.vector_norm(bt, dtype=torch.float64)
                          / torch.linalg.vector_norm(w, dtype=torch.float64))
        return torch.stack(angles), torch.stack(ratios)

    @torch.no_grad()
    def _record(self, step: int) -> None:
        rec = self.records
        row = rec.next_row()
        angles, ratios = self._alignment(self.synapses)
        rec.field(row, "angle")[:] = angles
        rec.field(row, "norm_ratio")[:] = ratios
        if self.probe is not None:
            stats = []
            delta, grad = probe_angles(self.circuit, *self.probe, self.loss_fn, self.synapses,
                                       self.autocast_dtype, stats)
            rec.field(row, "delta_angle")[:] = delta
            rec.field(row, "grad_angle")[:] = grad
            rec.field(row, "probe_loss")[:] = stats[0]
            rec.field(row, "probe_top1")[:] = stats[1]
        traces_w = rec.field(row, "traces_w").view(len(self.synapses), self.k)
        traces_b = rec.field(row, "traces_b").view(len(self.synapses), self.k)
        for i, (syn, at) in enumerate(zip(self.synapses, self._trace_at)):
            n = len(at[0])
            traces_w[i, :n] = syn.weight.detach()[at]
            traces_b[i, :n] = _feedback(syn)[at]
        rec.commit_row(step)

    def before_sleep(self, step: int) -> None:
        """Angle and norm ratio of the sleeping synapses before the sleep after step ``step``."""
        self._sleep_stats(step, "before")

    def after_sleep(self, step: int) -> None:
        """The same, after that sleep."""
        self._sleep_stats(step, "after")

    @torch.no_grad()
    def _sleep_stats(self, step: int, when: str) -> None:
        row = self.records.last_row(step) if self.has_sleep else None
        if row is None:
            return
        angles, ratios = self._alignment(self._sleepers)
        self.records.field(row, f"sleep_angle_{when}").index_copy_(0, self._sleeping, angles.float())
        self.records.field(row, f"sleep_norm_ratio_{when}").index_copy_(0, self._sleeping, ratios.float())

    # -- host side -----------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """The records so far as named NumPy arrays (the contents of ``monitor.npz``)."""
        timed = self.time.arrays(len(self.snapshot_steps)) if self.time is not None else {}
        return {**self.records.row_arrays(), "trace_index": self.trace_index.numpy().copy(),
                **self.records.snapshot_arrays(), "scatter_index": self.scatter_index.numpy().copy(), **timed}

    def index(self, arrays: dict[str, np.ndarray]) -> dict:
        """The contents of ``monitor.json``: what every array and column is."""
        return monitor_index(
            arrays, synapses=self.names,
            weight_shapes={n: list(s.weight.shape) for n, s in zip(self.names, self.synapses)},
            rules={n: s.rule.name for n, s in zip(self.names, self.synapses)},
            total_steps=self.total_steps, config=attrs.asdict(self.cfg),
            probe_size=0 if self.probe is None else int(self.probe[1].shape[0]),
            trace_index={n: [int(i) for i in row if i >= 0]
                         for n, row in zip(self.names, self.trace_index.tolist())},
            time_settings=attrs.asdict(self.time.settings) if self.time is not None else None)

    def flush(self, run_dir, create: bool = True) -> dict[str, np.ndarray]:
        """Write ``monitor.npz`` and ``monitor.json`` into ``run_dir``, each atomically; returns
        the arrays written.

        ``create``: make ``run_dir`` if it is missing. A run passes False: its directory exists,
        and one that vanished must not come back holding the monitor files alone."""
        arrays = self.arrays()
        write_monitor(run_dir, arrays, self.index(arrays), create=create)
        return arrays

    # -- resuming ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue the records exactly (tensors and plain data)."""
        return {
            "format": FORMAT, "synapses": list(self.names), "width": self.width, "k": self.k,
            "n_scatter": self.n_scatter, "config": attrs.asdict(self.cfg), **self.records.state_dict(),
            "trace_index": self.trace_index.clone(), "scatter_index": self.scatter_index.clone(),
            **({"time": self.time.state_dict()} if self.time is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` of a monitor with the same synapses and sample sizes."""
        cfg = state.get("config", {})
        width = state.get("width")
        if width == self.width - len(RECORD_VALUES):  # saved before the per-record values
            width = self.width
        checks = (("format", state.get("format"), FORMAT),
                  ("synapses", list(state.get("synapses") or []), list(self.names)),
                  ("row width", width, self.width), ("traces per synapse", state.get("k"), self.k),
                  ("scatter sample", state.get("n_scatter"), self.n_scatter),
                  ("snapshots", cfg.get("snapshots"), self.cfg.snapshots))
        timed = state.get("time")
        if timed is not None:
            # A checkpoint written before these records may lack them (its snapshots' then stay NaN
            # here); one that has them must have been made as this monitor would make them.
            mine = self.time
            checks += (("time settings", timed["settings"], attrs.asdict(mine.settings) if mine else None),
                       ("time steps per presentation", timed["steps"], mine.steps if mine else None))
        differ = [f"{what} {theirs!r} (this configuration: {mine!r})"
                  for what, theirs, mine in checks if theirs != mine]
        if differ:
            raise UserError("the checkpoint's monitor records differently from this configuration: "
                            + "; ".join(differ) + "; resume with the run's own monitor settings")
        self.records.load_state_dict(state)
        if self.time is not None:  # a checkpoint without them: its snapshots have none (NaN)
            self.time.load_state_dict(state.get("time"))
        self.restored_rows = len(self.steps)  # rows recorded before the checkpoint, by an earlier process
        self._set_indices(state["trace_index"].clone(), state["scatter_index"].clone())
