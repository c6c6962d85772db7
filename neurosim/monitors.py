"""Monitors: how each synapse's forward and feedback weights evolve during training.

What is recorded
================

A ``Monitor`` watches the synapses of a ``Circuit`` whose names match ``MonitorConfig.synapses``
(comma-separated fnmatch patterns, default ``*``: all). Every ``every`` engaged optimizer steps —
and once before training, at step 0 — it records, for every monitored synapse:

``angle``           angle (degrees) between ``W`` and the feedback matrix ``Bᵀ`` (stored in ``W``'s
                    layout), both flattened. 0° means the feedback path carries exactly the
                    direction backprop would; FA stays near 90°; KP and WM should fall.
``norm_ratio``      ``‖Bᵀ‖ / ‖W‖``: whether feedback keeps the scale of the forward weights.
``delta_angle``     the paper's *delta angle*: on a fixed probe batch, the angle (degrees) between the
                    error the circuit delivers to the synapse's postsynaptic neurons (the gradient
                    with respect to the synapse's output) and the error backprop would deliver.
                    The synapse feeding the output population always has 0°: its error comes from
                    the loss, not through any feedback matrix.
``grad_angle``      on the same probe batch, the angle (degrees) between the rule's update ``ΔW``
                    and the true gradient of the loss with respect to ``W``.
``traces_w``        ``traces`` individual weights ``W.flatten()[i]`` at fixed, seeded random
``traces_b``        positions ``i`` (``trace_index``), and the feedback weights at the same positions
                    of ``Bᵀ`` — the pairs ``W_ji`` and ``B_ij`` that KP and WM should bring together.
``sleep_*``         for circuits whose rule sleeps (WM), at recorded steps: angle and norm ratio just
                    before and just after the sleep (mirror) batches that follow the step. Rows
                    with no sleep, and synapses that do not sleep, hold NaN.
``scatter_*``       ``snapshots`` times over the run (evenly spaced, the first at step 0), ``scatter``
                    sampled pairs ``(W_ji, Bᵀ_ji)`` per synapse for a W-vs-Bᵀ scatter plot.

The probe (delta and update angles) runs the probe batch forward and backward twice on the
circuit as it is — once with its rules, once as backprop (``Circuit.backprop_truth``: every rule
swapped for ``Backprop``, feedback pathways off) —
with ``torch.autograd.grad``, so no ``.grad`` is touched, and batch-norm running statistics are
restored afterwards: recording does not change training. Both passes run in the training
precision (bf16 autocast where training uses it), so the angles describe the errors training
really delivers. It costs about two training steps of the probe's batch size per record. ``probe=0`` turns it off (those arrays are then NaN).

Cost and size
=============

Recording happens on the device into preallocated buffers with no host synchronisation: no
``.item()``, no Python branch on a tensor value. A buffer holds a chunk of rows; when it is full
the chunk is copied to (pinned) host memory in one non-blocking transfer. ``flush(run_dir)`` —
at each epoch end — synchronises once and writes the files. The whole run's recorded size is
known in advance (``estimate_nbytes``)::

    rows  = 1 + total_steps // every
    bytes ≈ rows · S · (4 + 4·[sleeps] + 2·traces) · 4  +  snapshots · S · scatter · 2 · 4

with ``S`` monitored synapses. ResNet-18 on CIFAR (21 synapses), 200 epochs × 391 steps,
every=200, traces=16, scatter=512, snapshots=5: 392 rows, 1.2 MB of records, 0.4 MB of scatter
snapshots and 0.1 MB of sample indices: **1.7 MB** (1.8 MB for WM with its sleep columns). The
device holds one chunk of at most 256 rows (0.9 MB here) plus the snapshots. A configuration
whose size exceeds ``max_bytes`` (256 MiB) is refused before training starts, with the size and
the knob to change (e.g. every=1 with every weight traced).

Files
=====

In the run directory, rewritten atomically (temporary file, then rename) at every flush:

``monitor.npz``   the arrays above (``steps[record]``, ``angle[record, synapse]``, …,
                  ``traces_w[record, synapse, k]``, ``scatter_w[snapshot, synapse, n]``,
                  ``trace_index[synapse, k]``, ``scatter_index[synapse, n]``). Indices are flat
                  positions in ``W``; ``-1`` pads synapses with fewer weights than ``k`` (their
                  values are NaN).
``monitor.json``  the index: synapse names in record order (their column in every array), their
                  weight shapes and rules, each array's shape, unit and meaning, the traced
                  positions, and the monitor configuration.

Reading
=======

::

    from neurosim.monitors import load_monitor
    rec = load_monitor("runs/kp_resnet18-…")
    steps, angle = rec.series("angle", "layer3_0_conv1")       # degrees per recorded step
    steps, w, b = rec.trace("fc", 0)                           # one traced pair over time
    rec.angle.shape                                            # (records, synapses)

``neurosim.plots.plot_run`` draws the standard figures from these files.
"""

from __future__ import annotations

import fnmatch
import io
import json
import math
from pathlib import Path

import attrs
import numpy as np
import torch

from neurosim.analysis import angle_deg
from neurosim.errors import UserError
from neurosim.files import write_atomic

FORMAT = 1
MIB = 2**20
# A device buffer holds at most this many rows and bytes; a full one moves to the host at once.
CHUNK_ROWS = 256
CHUNK_BYTES = 16 * MIB

SCALARS = ("angle", "norm_ratio", "delta_angle", "grad_angle")
SLEEP = ("sleep_angle_before", "sleep_angle_after", "sleep_norm_ratio_before", "sleep_norm_ratio_after")

# name: (unit, meaning) — written into monitor.json beside each array's shape.
ARRAYS = {
    "steps": ("steps", "engaged optimizer steps completed when the row was recorded (0: before training)"),
    "angle": ("degrees", "angle between W and the feedback matrix Bᵀ (flattened)"),
    "norm_ratio": ("ratio", "‖Bᵀ‖ / ‖W‖"),
    "delta_angle": ("degrees", "angle between the error reaching the synapse's output and backprop's error, "
                               "on the probe batch (NaN: no probe)"),
    "grad_angle": ("degrees", "angle between the rule's ΔW and the true gradient, on the probe batch "
                              "(NaN: no probe)"),
    "sleep_angle_before": ("degrees", "W–Bᵀ angle just before the sleep that follows the step (NaN: no sleep)"),
    "sleep_angle_after": ("degrees", "W–Bᵀ angle just after that sleep"),
    "sleep_norm_ratio_before": ("ratio", "‖Bᵀ‖/‖W‖ just before that sleep"),
    "sleep_norm_ratio_after": ("ratio", "‖Bᵀ‖/‖W‖ just after that sleep"),
    "traces_w": ("weight", "W.flatten()[trace_index] (NaN where trace_index is -1)"),
    "traces_b": ("weight", "Bᵀ.flatten()[trace_index]: the feedback weight B_ij paired with W_ji"),
    "trace_index": ("index", "flat position in W of each traced pair; -1 pads"),
    "scatter_steps": ("steps", "engaged steps at which scatter snapshots were taken"),
    "scatter_w": ("weight", "W.flatten()[scatter_index] at each snapshot"),
    "scatter_b": ("weight", "Bᵀ.flatten()[scatter_index] at each snapshot"),
    "scatter_index": ("index", "flat position in W of each scatter pair; -1 pads"),
}

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


def estimate_nbytes(cfg: MonitorConfig, numels, total_steps: int, sleeps: bool) -> int:
    """Bytes the monitor records over a whole run, for synapses with ``numels`` weights each.

    Rows of float32 per-synapse scalars (4, or 8 with sleep columns) and ``2·traces`` traced
    values, one int64 step per row, the scatter snapshots and the sample indices. The files and
    the host copy are this size; the device holds only one chunk (``Monitor.buffer_nbytes``).
    """
    numels = list(numels)
    s = len(numels)
    k = min(cfg.traces, max(numels, default=0))
    n = min(cfg.scatter, max(numels, default=0)) if cfg.snapshots else 0
    per_row = 4 * s * (len(SCALARS) + len(SLEEP) * bool(sleeps) + 2 * k) + 8
    snaps = cfg.snapshots * (4 * s * 2 * n + 8)
    return record_rows(cfg.every, total_steps) * per_row + snaps + 8 * s * (k + n)


def snapshot_plan(snapshots: int, total_steps: int) -> list[int]:
    """Engaged steps for the scatter snapshots: evenly spaced from 0 to ``total_steps``."""
    if snapshots <= 0:
        return []
    if snapshots == 1:
        return [total_steps]
    return sorted({round(i * total_steps / (snapshots - 1)) for i in range(snapshots)})


def probe_batch(stream, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` samples of a ``BatchStream``'s epoch 0: a fixed probe batch that is a pure
    function of the stream's seed, so a resumed run probes with the same one."""
    xs, ys, have = [], [], 0
    for x, y in stream.epoch(0):
        xs.append(x)
        ys.append(y)
        have += len(y)
        if have >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def _sample(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` sorted distinct flat positions (padded with -1 when the synapse has fewer weights)."""
    take = min(k, numel)
    idx = torch.randperm(numel, generator=generator)[:take].sort().values
    return torch.cat([idx, torch.full((k - take,), -1, dtype=torch.int64)])


class Monitor:
    """Per-synapse records of a circuit during training, on the device, flushed to disk.

    ``Monitor(circuit, cfg, total_steps, probe, loss_fn, seed)``: build it once the circuit is on
    its device; it records step 0 (the circuit as it is now) at once. ``probe`` is a fixed batch
    ``(x, y)`` as the circuit sees it (normalised, on the device; see ``probe_batch``) of which
    the first ``cfg.probe`` samples are used; ``loss_fn(logits, y)`` is the training loss.

    The training loop calls ``after_step(step)`` after every engaged optimizer step,
    ``before_sleep(step)`` / ``after_sleep(step)`` around the sleep batches that follow step
    ``step`` (step 0: the sleep before training), ``flush(run_dir)`` at each epoch end, and saves
    ``state_dict()`` in its checkpoint. See the module docstring for what is recorded.
    """

    def __init__(self, circuit, cfg: MonitorConfig, total_steps: int,
                 probe: tuple[torch.Tensor, torch.Tensor] | None = None, loss_fn=None, seed: int = 0,
                 autocast_dtype: torch.dtype | None = None):
        self.circuit, self.cfg, self.total_steps = circuit, cfg, int(total_steps)
        # The probe runs in the training precision: its angles describe the errors training
        # really delivers (bf16 rounding included), and both of its passes share that precision.
        self.autocast_dtype = autocast_dtype
        self.names = cfg.select(circuit.synapses.keys())
        self.synapses = [circuit.synapses[n] for n in self.names]
        s = len(self.names)
        numels = [syn.weight.numel() for syn in self.synapses]
        sleeping = [i for i, syn in enumerate(self.synapses) if syn.rule.sleeps]
        self.has_sleep = bool(sleeping)
        size = estimate_nbytes(cfg, numels, total_steps, self.has_sleep)
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
        self.trace_index = torch.stack([_sample(n, self.k, g) for n in numels])
        self.scatter_index = torch.stack([_sample(n, self.n_scatter, g) for n in numels])
        self._trace_at = [self._positions(syn, row) for syn, row in zip(self.synapses, self.trace_index)]
        self._scatter_at = [self._positions(syn, row) for syn, row in zip(self.synapses, self.scatter_index)]
        self._sleepers = [self.synapses[i] for i in sleeping]
        self._nan = torch.tensor(math.nan, dtype=torch.float64, device=self.device)  # made once: no copy per step
        self._sleeping = torch.tensor(sleeping, dtype=torch.int64, device=self.device)

        # Column layout of one record row: S values per scalar field, S·k per trace field.
        self._cols, off = {}, 0
        for name in SCALARS + (SLEEP if self.has_sleep else ()):
            self._cols[name] = (off, off + s)
            off += s
        for name in ("traces_w", "traces_b"):
            self._cols[name] = (off, off + s * self.k)
            off += s * self.k
        self.width = off
        self.chunk_rows = max(1, min(CHUNK_ROWS, record_rows(cfg.every, total_steps),
                                     CHUNK_BYTES // (4 * max(self.width, 1))))
        self._buf = torch.full((self.chunk_rows, self.width), math.nan, device=self.device)
        self._snap = torch.full((cfg.snapshots, s, 2, self.n_scatter), math.nan, device=self.device)
        self._plan = snapshot_plan(cfg.snapshots, self.total_steps)
        self._host: list[torch.Tensor] = []  # full chunks already sent to the host, in order
        self._chunk_start = 0  # row number of the device buffer's first row
        self.steps: list[int] = []
        self.snapshot_steps: list[int] = []
        self.after_step(0)

    # -- sizes ---------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Estimated bytes recorded over the whole run (files and host copy); see ``estimate_nbytes``."""
        return estimate_nbytes(self.cfg, [s.weight.numel() for s in self.synapses], self.total_steps,
                               self.has_sleep)

    def buffer_nbytes(self) -> int:
        """Bytes the monitor holds on the device: fixed at construction, whatever the run's length."""
        return self._buf.numel() * self._buf.element_size() + self._snap.numel() * self._snap.element_size()

    def _oversize_message(self, size: int, numels) -> str:
        cfg = self.cfg
        rows = record_rows(cfg.every, self.total_steps)
        k = min(cfg.traces, max(numels))
        traced = rows * 4 * len(numels) * 2 * k
        scatter = cfg.snapshots * 4 * len(numels) * 2 * min(cfg.scatter, max(numels))
        if traced >= size / 2:
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
        return (step in self._plan and len(self.snapshot_steps) < self.cfg.snapshots
                and (not self.snapshot_steps or step > self.snapshot_steps[-1]))

    @torch.no_grad()
    def _snapshot(self, step: int) -> None:
        p = len(self.snapshot_steps)
        for i, (syn, at) in enumerate(zip(self.synapses, self._scatter_at)):
            n = len(at[0])
            self._snap[p, i, 0, :n] = syn.weight.detach()[at]
            self._snap[p, i, 1, :n] = _feedback(syn)[at]
        self.snapshot_steps.append(step)

    def _next_row(self) -> int:
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
        return pos

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
        pos = self._next_row()
        row = self._buf[pos]
        angles, ratios = self._alignment(self.synapses)
        row[slice(*self._cols["angle"])] = angles
        row[slice(*self._cols["norm_ratio"])] = ratios
        if self.probe is not None:
            delta, grad = self._probe_angles()
            row[slice(*self._cols["delta_angle"])] = delta
            row[slice(*self._cols["grad_angle"])] = grad
        tw, tb = self._cols["traces_w"][0], self._cols["traces_b"][0]
        for i, (syn, at) in enumerate(zip(self.synapses, self._trace_at)):
            n, j = len(at[0]), i * self.k
            row[tw + j: tw + j + n] = syn.weight.detach()[at]
            row[tb + j: tb + j + n] = _feedback(syn)[at]
        self.steps.append(step)

    def _probe_angles(self):
        """Delta angles and update angles of every monitored synapse on the probe batch."""
        populations = self.circuit.populations.values()
        buffers = [b for pop in populations for b in pop.buffers()]
        saved = [b.clone() for b in buffers]
        try:
            err, dw = self._probe_pass()
            with self.circuit.backprop_truth():
                true_err, true_dw = self._probe_pass()
        finally:
            with torch.no_grad():
                for b, v in zip(buffers, saved):
                    b.copy_(v)
        return self._angles(err, true_err), self._angles(dw, true_dw)

    def _angles(self, a, b) -> torch.Tensor:
        # A synapse whose output does not reach the loss has no error: NaN, not an exception.
        return torch.stack([self._nan if x is None or y is None else angle_deg(x, y) for x, y in zip(a, b)])

    def _probe_pass(self):
        """Errors at each monitored synapse's output and its weight update, via autograd.grad."""
        x, y = self.probe
        outputs = [None] * len(self.synapses)

        def keep(i):
            def hook(module, inputs, output):
                outputs[i] = output
            return hook

        handles = [syn.register_forward_hook(keep(i)) for i, syn in enumerate(self.synapses)]
        try:
            with torch.enable_grad(), torch.autocast(x.device.type, self.autocast_dtype,
                                                     enabled=self.autocast_dtype is not None):
                loss = self.loss_fn(self.circuit(x).float(), y)
                grads = torch.autograd.grad(loss, outputs + [syn.weight for syn in self.synapses],
                                            allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        s = len(self.synapses)
        return list(grads[:s]), list(grads[s:])

    def before_sleep(self, step: int) -> None:
        """Angle and norm ratio of the sleeping synapses before the sleep after step ``step``."""
        self._sleep_stats(step, "before")

    def after_sleep(self, step: int) -> None:
        """The same, after that sleep."""
        self._sleep_stats(step, "after")

    @torch.no_grad()
    def _sleep_stats(self, step: int, when: str) -> None:
        if not self.has_sleep or not self.steps or self.steps[-1] != step:
            return
        row = self._buf[len(self.steps) - 1 - self._chunk_start]
        angles, ratios = self._alignment(self._sleepers)
        row[slice(*self._cols[f"sleep_angle_{when}"])].index_copy_(0, self._sleeping, angles.float())
        row[slice(*self._cols[f"sleep_norm_ratio_{when}"])].index_copy_(0, self._sleeping, ratios.float())

    # -- host side -----------------------------------------------------------------------------
    def _rows(self) -> torch.Tensor:
        """Every row recorded so far, on the host (synchronises with the device once)."""
        if self._buf.device.type == "cuda":
            torch.cuda.current_stream(self._buf.device).synchronize()
        live = self._buf[: len(self.steps) - self._chunk_start].cpu()
        return torch.cat([*self._host, live]) if self._host else live

    def arrays(self) -> dict[str, np.ndarray]:
        """The records so far as named NumPy arrays (the contents of ``monitor.npz``)."""
        rows = self._rows().numpy()
        r, s = len(self.steps), len(self.names)
        out = {"steps": np.asarray(self.steps, dtype=np.int64)}
        for name in SCALARS + (SLEEP if self.has_sleep else ()):
            a, b = self._cols[name]
            out[name] = rows[:, a:b].copy()
        for name in ("traces_w", "traces_b"):
            a, b = self._cols[name]
            out[name] = rows[:, a:b].reshape(r, s, self.k).copy()
        out["trace_index"] = self.trace_index.numpy().copy()
        p = len(self.snapshot_steps)
        snap = self._snap[:p].cpu().numpy()
        out["scatter_steps"] = np.asarray(self.snapshot_steps, dtype=np.int64)
        out["scatter_w"] = snap[:, :, 0].copy()
        out["scatter_b"] = snap[:, :, 1].copy()
        out["scatter_index"] = self.scatter_index.numpy().copy()
        return out

    def index(self, arrays: dict[str, np.ndarray]) -> dict:
        """The contents of ``monitor.json``: what every array and column is."""
        return {
            "format": FORMAT,
            "synapses": self.names,
            "weight_shapes": {n: list(s.weight.shape) for n, s in zip(self.names, self.synapses)},
            "rules": {n: s.rule.name for n, s in zip(self.names, self.synapses)},
            "total_steps": self.total_steps,
            "config": attrs.asdict(self.cfg),
            "probe_size": 0 if self.probe is None else int(self.probe[1].shape[0]),
            "arrays": {name: {"shape": list(a.shape), "unit": ARRAYS[name][0], "meaning": ARRAYS[name][1]}
                       for name, a in arrays.items()},
            "trace_index": {n: [int(i) for i in row if i >= 0] for n, row in zip(self.names, self.trace_index.tolist())},
        }

    def flush(self, run_dir) -> None:
        """Write ``monitor.npz`` and ``monitor.json`` into ``run_dir``, each atomically."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        arrays = self.arrays()
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_atomic(run_dir / "monitor.npz", buf.getvalue(), what="monitor records")
        write_atomic(run_dir / "monitor.json", (json.dumps(self.index(arrays), indent=1) + "\n").encode(),
                     what="monitor index")

    # -- resuming ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue the records exactly (tensors and plain data)."""
        return {
            "format": FORMAT, "synapses": list(self.names), "width": self.width, "k": self.k,
            "n_scatter": self.n_scatter, "config": attrs.asdict(self.cfg), "steps": list(self.steps),
            "chunk_start": self._chunk_start, "rows": self._rows(),
            "snapshot_steps": list(self.snapshot_steps), "snapshots": self._snap.cpu(),
            "trace_index": self.trace_index.clone(), "scatter_index": self.scatter_index.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` of a monitor with the same synapses and sample sizes."""
        mine = (self.names, self.width, self.k, self.n_scatter, self.cfg.snapshots)
        theirs = (state.get("synapses"), state.get("width"), state.get("k"), state.get("n_scatter"),
                  state.get("config", {}).get("snapshots"))
        if state.get("format") != FORMAT or list(mine[0]) != list(theirs[0]) or mine[1:] != theirs[1:]:
            raise UserError("the checkpoint's monitor records other synapses or sample sizes "
                            f"({theirs[0]}, {theirs[2]} traces) than this configuration "
                            f"({mine[0]}, {mine[2]} traces); resume with the run's own monitor settings")
        rows, steps = state["rows"], list(state["steps"])
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
        self.trace_index = state["trace_index"].clone()
        self.scatter_index = state["scatter_index"].clone()
        self._trace_at = [self._positions(syn, row) for syn, row in zip(self.synapses, self.trace_index)]
        self._scatter_at = [self._positions(syn, row) for syn, row in zip(self.synapses, self.scatter_index)]


def _feedback(syn) -> torch.Tensor:
    """A synapse's feedback matrix, or NaN where its rule sends nothing back (DFA): the W–Bᵀ
    measures are undefined there, the delta angles are not."""
    m = syn.feedback_matrix()
    return torch.full_like(syn.weight.detach(), math.nan) if m is None else m.detach()


# -- reading -------------------------------------------------------------------------------------

@attrs.frozen(eq=False)
class MonitorRecord:
    """A run's monitor files, loaded: arrays indexed ``[record, synapse, …]`` and the names.

    ``synapses[i]`` names column ``i`` of every per-synapse array. Arrays a run did not record
    (the sleep columns of a rule that does not sleep) are ``None``.
    """

    synapses: tuple[str, ...]
    steps: np.ndarray
    angle: np.ndarray
    norm_ratio: np.ndarray
    delta_angle: np.ndarray
    grad_angle: np.ndarray
    traces_w: np.ndarray
    traces_b: np.ndarray
    trace_index: np.ndarray
    scatter_steps: np.ndarray
    scatter_w: np.ndarray
    scatter_b: np.ndarray
    scatter_index: np.ndarray
    sleep_angle_before: np.ndarray | None
    sleep_angle_after: np.ndarray | None
    sleep_norm_ratio_before: np.ndarray | None
    sleep_norm_ratio_after: np.ndarray | None
    weight_shapes: dict
    rules: dict
    total_steps: int
    config: dict
    units: dict

    def column(self, synapse: str) -> int:
        """Where ``synapse``'s values sit along the synapse axis."""
        try:
            return self.synapses.index(synapse)
        except ValueError:
            raise KeyError(f"synapse {synapse!r} was not monitored; monitored: {', '.join(self.synapses)}") from None

    def series(self, name: str, synapse: str, dropna: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of a per-synapse scalar array (``angle``, ``delta_angle``, …) for one
        synapse; rows that hold NaN (not recorded) are dropped unless ``dropna=False``."""
        a = getattr(self, name, None)
        if a is None or name not in self.units or a.ndim != 2:
            raise KeyError(f"no per-synapse series {name!r} in this record")
        v = a[:, self.column(synapse)]
        if dropna:
            keep = ~np.isnan(v)
            return self.steps[keep], v[keep]
        return self.steps, v

    def trace(self, synapse: str, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(steps, W_ji, B_ij)`` over time for the ``j``-th traced pair of ``synapse``."""
        i = self.column(synapse)
        return self.steps, self.traces_w[:, i, j], self.traces_b[:, i, j]

    def traced_position(self, synapse: str, j: int) -> tuple[int, ...]:
        """The index in ``W`` (e.g. ``(out, in)`` or ``(out, in, kh, kw)``) of a traced pair."""
        flat = int(self.trace_index[self.column(synapse), j])
        return tuple(int(v) for v in np.unravel_index(flat, self.weight_shapes[synapse]))

    @property
    def has_probe(self) -> bool:
        return bool(np.isfinite(self.delta_angle).any())

    @property
    def has_sleep(self) -> bool:
        return self.sleep_angle_before is not None and bool(np.isfinite(self.sleep_angle_before).any())


def load_monitor(run_dir) -> MonitorRecord:
    """The monitor records of a run directory (``monitor.npz`` + ``monitor.json``).

    Files that cannot be read, or whose arrays are missing or do not fit together, give a
    ``UserError`` naming the file (a run rewrites both after every epoch)."""
    run_dir = Path(run_dir)
    npz, index = run_dir / "monitor.npz", run_dir / "monitor.json"
    if not npz.exists() and not index.exists():
        raise UserError(f"{run_dir} has no monitor files (monitor.npz, monitor.json); the run was made "
                        f"without a monitor or has not finished an epoch")
    if not npz.exists() or not index.exists():
        there, missing = (npz, index) if npz.exists() else (index, npz)
        raise UserError(f"{run_dir} has {there.name} but not {missing.name}; {_MONITOR_FIX.format(run_dir=run_dir)}")
    try:
        meta = json.loads(index.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {index}: {e.strerror or e}") from None
    except ValueError as e:  # not JSON, or not text
        raise UserError(f"{index} is damaged: it is not JSON ({_first_line(e)}); "
                        f"{_MONITOR_FIX.format(run_dir=run_dir)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"{index} has format {found!r}; this version reads format {FORMAT}")
    try:
        with np.load(npz, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except OSError as e:
        if e.errno is not None:  # the file system refused (permissions, I/O), not its contents
            raise UserError(f"cannot read {npz}: {e.strerror or e}") from None
        raise UserError(_damaged(npz, e, run_dir)) from None
    except Exception as e:  # not an .npz, truncated, or an archive member broken (zip, zlib, pickle)
        raise UserError(_damaged(npz, e, run_dir)) from None
    problem = _record_problem(meta, arrays)
    if problem:
        raise UserError(f"{npz} and {index} are damaged or incomplete: {problem}; "
                        f"{_MONITOR_FIX.format(run_dir=run_dir)}")
    fields = {f.name for f in attrs.fields(MonitorRecord)}
    units = {k: v.get("unit", ARRAYS[k][0]) if isinstance(v, dict) else ARRAYS[k][0]
             for k, v in meta["arrays"].items() if k in ARRAYS}
    return MonitorRecord(
        synapses=tuple(meta["synapses"]),
        weight_shapes={k: tuple(v) for k, v in meta["weight_shapes"].items()},
        rules=dict(meta["rules"]), total_steps=int(meta["total_steps"]), config=dict(meta["config"]),
        units=units,
        **{k: arrays.get(k) for k in fields if k in ARRAYS},
    )


_MONITOR_FIX = ("the run rewrites both after every epoch; to draw its other figures meanwhile, move "
                "monitor.npz and monitor.json out of {run_dir}")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:160] if text and text[0] else type(e).__name__


def _damaged(npz: Path, e: Exception, run_dir: Path) -> str:
    # NumPy's own words are left out: for a file that is not an archive they suggest loading it
    # with pickle, which a damaged or foreign file must never be.
    return (f"{npz} is damaged or not a monitor file: it cannot be read as an .npz archive (cut short, or "
            f"something else under that name); {_MONITOR_FIX.format(run_dir=run_dir)}")


def _record_problem(meta: dict, arrays: dict) -> str | None:
    """What does not fit in a monitor record (missing keys or arrays, inconsistent shapes), or None."""
    for key, kind in (("synapses", list), ("weight_shapes", dict), ("rules", dict), ("total_steps", int),
                      ("config", dict), ("arrays", dict)):
        if not isinstance(meta.get(key), kind):
            return f"monitor.json has no valid {key!r}"
    names = meta["synapses"]
    if not names or not all(isinstance(n, str) and n in meta["weight_shapes"] for n in names):
        return "monitor.json's synapses and weight shapes do not match"
    missing = [k for k in ARRAYS if k not in SLEEP and k not in arrays]
    if missing:
        return f"monitor.npz lacks the arrays {', '.join(missing)}"
    sleep = [k for k in SLEEP if k in arrays]
    if sleep and len(sleep) != len(SLEEP):
        return f"monitor.npz has only some sleep arrays ({', '.join(sleep)})"
    r, s = arrays["steps"].shape[0] if arrays["steps"].ndim == 1 else -1, len(names)
    k = arrays["trace_index"].shape[1] if arrays["trace_index"].ndim == 2 else -1
    p = arrays["scatter_steps"].shape[0] if arrays["scatter_steps"].ndim == 1 else -1
    n = arrays["scatter_index"].shape[1] if arrays["scatter_index"].ndim == 2 else -1
    expected = {"steps": (r,), "trace_index": (s, k), "scatter_steps": (p,), "scatter_index": (s, n),
                "traces_w": (r, s, k), "traces_b": (r, s, k), "scatter_w": (p, s, n), "scatter_b": (p, s, n),
                **{name: (r, s) for name in SCALARS + tuple(sleep)}}
    for name, shape in expected.items():
        if -1 in shape or arrays[name].shape != shape:
            return (f"array {name} has shape {arrays[name].shape} where {shape} fits the other arrays "
                    f"({s} synapses)")
    return None
