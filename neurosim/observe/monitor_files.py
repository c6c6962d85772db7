"""The monitor's files: ``monitor.npz`` (the arrays) and ``monitor.json`` (their index), written
atomically through ``neurosim.common.files.write_atomic``, and read back as a ``MonitorRecord``.

Every array is declared once, in ``QUANTITIES``: its name, axes, unit, what it is, which figure
draws it, and whether every file has it. The monitor's column layout (``SCALARS``, ``SLEEP``),
``monitor.json``'s description of each array, the loader's checks and the table of
docs/monitors.md (``python -m neurosim.observe.monitor_files docs/monitors.md`` rewrites it) all come
from there. An array declared ``required=False`` may be missing from a file (one written before
it existed, or by a run that does not record it): it then loads as ``None``.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import attrs
import numpy as np

from neurosim.common.errors import UserError
from neurosim.common.files import write_atomic

FORMAT = 1


@attrs.frozen
class Quantity:
    """One array of ``monitor.npz``.

    ``axes`` name its dimensions (see ``AXES``); ``unit`` and ``meaning`` are also written into
    ``monitor.json``; ``plot`` says which figure draws it (None: none, it is in the files only);
    ``required``: every monitor file has it (False: files may lack it, and it then loads as
    ``None``); ``group``: arrays written together or not at all (the sleep columns)."""

    name: str
    axes: tuple[str, ...]
    unit: str
    meaning: str
    plot: str | None = None
    required: bool = True
    group: str | None = None


# The axes of the arrays, and the array whose shape gives each one's length (synapse: the
# synapses named in monitor.json).
AXES = {
    "record": ("steps", 0, "one row per record: step 0, then every `every`-th engaged step"),
    "synapse": (None, None, "the monitored synapses, in the order monitor.json names them"),
    "trace": ("trace_index", 1, "the traced (W, B) pairs of each synapse"),
    "snapshot": ("scatter_steps", 0, "the scatter snapshots, evenly spaced over the run"),
    "scatter": ("scatter_index", 1, "the sampled (W, B) pairs of each synapse in a snapshot"),
    "time": ("time_steps", 0, "the time steps of one presentation of the probe batch in time (runs in time only)"),
}

_TIME = ("runs in time only (a monitor given time_settings; see neurosim.observe.time_traces): one presentation "
         "of the probe batch at each scatter snapshot, on a copy of the circuit")
_NO_PROBE = "NaN without a probe batch (probe 0)"
_SLEEP = ("written only by circuits whose rule sleeps (WM); NaN in rows without a sleep and for "
          "synapses that do not sleep")

QUANTITIES = (
    Quantity("steps", ("record",), "steps",
             "engaged optimizer steps completed when the row was recorded (0: before training)",
             "the x axis of every by-step figure"),
    Quantity("angle", ("record", "synapse"), "degrees",
             "angle between W and the feedback matrix Bᵀ (in W's layout), both flattened: 0° means the feedback "
             "path carries exactly the direction backprop would; FA stays near 90°, KP and WM fall. NaN where the "
             "rule sends nothing back (DFA)",
             "angle_w_bt_by_step.png"),
    Quantity("norm_ratio", ("record", "synapse"), "ratio",
             "‖Bᵀ‖ / ‖W‖: whether feedback keeps the scale of the forward weights (NaN where nothing goes back)",
             "norm_ratio_by_step.png"),
    Quantity("delta_angle", ("record", "synapse"), "degrees",
             "the paper's delta angle: on a fixed probe batch, the angle between the error the circuit delivers "
             "to the synapse's postsynaptic neurons (the gradient with respect to its output) and the error "
             "backprop would deliver; always 0° for the synapse into the output population, whose error comes "
             f"from the loss. {_NO_PROBE}",
             "delta_angle_by_step.png (top); a study's report.md and figures/delta_angle.png"),
    Quantity("grad_angle", ("record", "synapse"), "degrees",
             f"on the same probe batch, the angle between the rule's update ΔW and the true gradient of the loss "
             f"with respect to W. {_NO_PROBE}",
             "delta_angle_by_step.png (bottom); a study's report.md"),
    Quantity("probe_loss", ("record",), "loss",
             f"the training loss on the fixed probe batch at the recorded step, under the circuit's own forward "
             f"pass (batch statistics of the probe batch): the loss by step. {_NO_PROBE}; absent from files "
             f"written before it was recorded",
             "dashboard.html (loss by step)", required=False, group="probe"),
    Quantity("probe_top1", ("record",), "%",
             "top-1 accuracy on the same probe batch at the recorded step", "dashboard.html (accuracy by step)",
             required=False, group="probe"),
    Quantity("sleep_angle_before", ("record", "synapse"), "degrees",
             f"W–Bᵀ angle just before the sleep (mirror) batches that follow the recorded step; {_SLEEP}",
             "sleep_effect.png", required=False, group="sleep"),
    Quantity("sleep_angle_after", ("record", "synapse"), "degrees",
             "W–Bᵀ angle just after that sleep", "sleep_effect.png", required=False, group="sleep"),
    Quantity("sleep_norm_ratio_before", ("record", "synapse"), "ratio",
             "‖Bᵀ‖/‖W‖ just before that sleep", None, required=False, group="sleep"),
    Quantity("sleep_norm_ratio_after", ("record", "synapse"), "ratio",
             "‖Bᵀ‖/‖W‖ just after that sleep", None, required=False, group="sleep"),
    Quantity("traces_w", ("record", "synapse", "trace"), "weight",
             "W.flatten()[i] at the traced positions i (trace_index: fixed, seeded, random); NaN where "
             "trace_index is -1",
             "synapse_traces.png"),
    Quantity("traces_b", ("record", "synapse", "trace"), "weight",
             "Bᵀ.flatten()[i] at the same positions: the feedback weight B_ij paired with W_ji, which KP and WM "
             "should bring together",
             "synapse_traces.png"),
    Quantity("trace_index", ("synapse", "trace"), "index",
             "flat position in W of each traced pair; -1 pads a synapse with fewer weights",
             "synapse_traces.png (the labels)"),
    Quantity("scatter_steps", ("snapshot",), "steps",
             "engaged steps at which the scatter snapshots were taken (evenly spaced, the first at step 0)",
             "w_vs_bt_scatter.png"),
    Quantity("scatter_w", ("snapshot", "synapse", "scatter"), "weight",
             "W.flatten()[scatter_index] at each snapshot", "w_vs_bt_scatter.png"),
    Quantity("scatter_b", ("snapshot", "synapse", "scatter"), "weight",
             "Bᵀ.flatten()[scatter_index] at each snapshot: the pairs (W_ji, Bᵀ_ji) of the scatter plot",
             "w_vs_bt_scatter.png"),
    Quantity("scatter_index", ("synapse", "scatter"), "index",
             "flat position in W of each scatter pair; -1 pads", "w_vs_bt_scatter.png"),
    Quantity("time_steps", ("time",), "time (unit of dt)",
             f"the end of each Euler step of a presentation, (n + 1)·dt; the stimulus is on up to its duration "
             f"(monitor.json's time_settings). {_TIME}",
             "within_presentation.png; dashboard.html (within a presentation)", required=False, group="time"),
    Quantity("time_pre", ("snapshot", "synapse", "trace", "time"), "activity",
             "presynaptic signal of each traced pair at unit i (the eligibility trace, or the activity where there "
             "is none), mean over the probe batch; for a convolution input channel i, mean over positions too",
             "within_presentation.png; dashboard.html", required=False, group="time"),
    Quantity("time_error", ("snapshot", "synapse", "trace", "time"), "error (∂L/∂drive)",
             "local error δ_j at the drive of the pair's postsynaptic unit j (for a convolution output channel j), "
             "mean over the probe batch and positions: what the rule multiplies with the presynaptic signal",
             "within_presentation.png; dashboard.html", required=False, group="time"),
    Quantity("time_update", ("snapshot", "synapse", "trace", "time"), "weight (as .grad)",
             "running integrated update of W_ji within the presentation (ΔW so far, decay included; the last "
             "step's value is what the presentation writes into W's .grad)",
             "within_presentation.png; dashboard.html", required=False, group="time"),
    Quantity("time_update_b", ("snapshot", "synapse", "trace", "time"), "weight (as .grad)",
             "running integrated update of the feedback weight B_ij (in W's layout) where the rule learns it within "
             "the presentation (KP while engaged; a rule whose feedback learns in time); NaN for the other rules",
             "within_presentation.png; dashboard.html", required=False, group="time"),
    Quantity("time_w", ("snapshot", "synapse", "trace"), "weight",
             "W_ji at the start of the presentation", None, required=False, group="time"),
    Quantity("time_b", ("snapshot", "synapse", "trace"), "weight",
             "Bᵀ_ji (B_ij in W's layout) at the start of the presentation; NaN where the rule sends nothing back",
             None, required=False, group="time"),
)


def declared() -> dict[str, Quantity]:
    """``QUANTITIES`` by name (read afresh: the reader and writer follow the table as it is)."""
    return {q.name: q for q in QUANTITIES}


# name: (unit, meaning), as monitor.json writes them beside each array's shape.
ARRAYS = {q.name: (q.unit, q.meaning) for q in QUANTITIES}
# The per-record, per-synapse values a monitor row holds, in its column order: SCALARS in every
# row, SLEEP where the circuit sleeps.
SCALARS = tuple(q.name for q in QUANTITIES if q.axes == ("record", "synapse") and q.group is None)
# One value per record (the probe batch's loss and accuracy), after every per-synapse column: rows
# of checkpoints written before them are the prefix of today's and load with these NaN.
RECORD_VALUES = tuple(q.name for q in QUANTITIES if q.axes == ("record",) and q.name != "steps")
SLEEP = tuple(q.name for q in QUANTITIES if q.group == "sleep")


def monitor_index(arrays: dict[str, np.ndarray], *, synapses, weight_shapes: dict, rules: dict,
                  total_steps: int, config: dict, probe_size: int, trace_index: dict,
                  time_settings: dict | None = None) -> dict:
    """The contents of ``monitor.json``: what every array and column is (``time_settings``: the
    settings of the presentations in time, written only where there were any)."""
    known = declared()
    extra = {} if time_settings is None else {"time_settings": time_settings}
    return {
        "format": FORMAT,
        "synapses": list(synapses),
        "weight_shapes": weight_shapes,
        "rules": rules,
        "total_steps": total_steps,
        "config": config,
        "probe_size": probe_size,
        "arrays": {name: {"shape": list(a.shape), "unit": known[name].unit, "meaning": known[name].meaning}
                   for name, a in arrays.items()},
        "trace_index": trace_index,
        **extra,
    }


def write_monitor(run_dir, arrays: dict[str, np.ndarray], index: dict, create: bool = True) -> None:
    """Write ``monitor.npz`` (``arrays``) and ``monitor.json`` (``index``) into ``run_dir``, each
    atomically (temporary file, then rename); ``create``: make ``run_dir`` if it is missing."""
    run_dir = Path(run_dir)
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(run_dir / "monitor.npz", buf.getvalue(), what="monitor records")
    write_atomic(run_dir / "monitor.json", (json.dumps(index, indent=1) + "\n").encode(),
                 what="monitor index")


# -- reading -------------------------------------------------------------------------------------

@attrs.frozen(eq=False)
class MonitorRecord:
    """A run's monitor files, loaded: arrays indexed ``[record, synapse, …]`` and the names.

    ``synapses[i]`` names column ``i`` of every per-synapse array. Each array of ``QUANTITIES``
    reads as an attribute (``rec.angle``, ``rec.traces_w``); one the file does not hold (the
    sleep columns of a rule that does not sleep, an optional array newer than the file) is
    ``None``. ``arrays`` holds them all by name.
    """

    synapses: tuple[str, ...]
    arrays: dict
    weight_shapes: dict
    rules: dict
    total_steps: int
    config: dict
    units: dict
    time_settings: dict | None = None

    def __getattr__(self, name):
        if not name.startswith("__") and name in declared():
            return self.arrays.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __dir__(self):
        return [*super().__dir__(), *declared()]

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
    known = declared()
    units = {k: v.get("unit", known[k].unit) if isinstance(v, dict) else known[k].unit
             for k, v in meta["arrays"].items() if k in known}
    return MonitorRecord(
        synapses=tuple(meta["synapses"]),
        arrays={k: arrays[k] for k in known if k in arrays},
        weight_shapes={k: tuple(v) for k, v in meta["weight_shapes"].items()},
        rules=dict(meta["rules"]), total_steps=int(meta["total_steps"]), config=dict(meta["config"]),
        units=units,
        time_settings=meta["time_settings"] if isinstance(meta.get("time_settings"), dict) else None,
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
    missing = [q.name for q in QUANTITIES if q.required and q.name not in arrays]
    if missing:
        return f"monitor.npz lacks the arrays {', '.join(missing)}"
    for group in dict.fromkeys(q.group for q in QUANTITIES if q.group):
        members = [q.name for q in QUANTITIES if q.group == group]
        present = [k for k in members if k in arrays]
        if present and len(present) != len(members):
            return f"monitor.npz has only some {group} arrays ({', '.join(present)})"
    known = declared()
    sizes = {"synapse": len(names)}
    for axis, (source, position, _) in AXES.items():
        if source is not None and source in arrays:  # an optional array's axis: absent with it
            a = arrays[source]
            sizes[axis] = a.shape[position] if a.ndim == len(known[source].axes) else -1
    s = sizes["synapse"]
    # The arrays that give the axes their lengths first, so a mismatch names the array that is off.
    order = [src for src, _, _ in AXES.values() if src] + [q.name for q in QUANTITIES]
    for name in dict.fromkeys(order):
        if name not in arrays:
            continue
        shape = tuple(sizes[axis] for axis in known[name].axes)
        if -1 in shape or arrays[name].shape != shape:
            return (f"array {name} has shape {arrays[name].shape} where {shape} fits the other arrays "
                    f"({s} synapses)")
    return None


# -- the table of docs/monitors.md -----------------------------------------------------------------

DOC_BEGIN = ("<!-- monitor quantities: generated from neurosim.observe.monitor_files.QUANTITIES; rewrite with "
             "python -m neurosim.observe.monitor_files docs/monitors.md -->")
DOC_END = "<!-- end of monitor quantities -->"


def quantities_markdown() -> str:
    """The table of every monitor array (``QUANTITIES``) and its axes, as docs/monitors.md shows it."""
    def cell(text) -> str:
        return "—" if text is None else str(text).replace("|", "\\|")

    lines = ["| array | shape | unit | what it is | drawn in | in every file |",
             "| --- | --- | --- | --- | --- | --- |"]
    for q in QUANTITIES:
        lines.append(f"| `{q.name}` | `[{', '.join(q.axes)}]` | {q.unit} | {cell(q.meaning)} | {cell(q.plot)} | "
                     f"{'yes' if q.required else 'no (loads as None)'} |")
    lines += ["", "Axes: " + "; ".join(f"`{axis}`, {text}" + (f" (its length from `{src}`)" if src else "")
                                       for axis, (src, _, text) in AXES.items()) + "."]
    return "\n".join(lines) + "\n"


def with_quantities(doc: str) -> str:
    """``doc`` (docs/monitors.md's text) with the block between ``DOC_BEGIN`` and ``DOC_END``
    replaced by ``quantities_markdown()``."""
    if doc.count(DOC_BEGIN) != 1 or doc.count(DOC_END) != 1 or doc.index(DOC_BEGIN) > doc.index(DOC_END):
        raise ValueError(f"the document needs one line {DOC_BEGIN} and, after it, one line {DOC_END}")
    head, rest = doc.split(DOC_BEGIN + "\n", 1)
    _, tail = rest.split(DOC_END, 1)
    return f"{head}{DOC_BEGIN}\n{quantities_markdown()}{DOC_END}{tail}"


if __name__ == "__main__":  # python -m neurosim.observe.monitor_files [docs/monitors.md]
    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
        path.write_text(with_quantities(path.read_text(encoding="utf-8")), encoding="utf-8")
    else:
        print(quantities_markdown(), end="")
