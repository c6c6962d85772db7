"""The monitor's files: ``monitor.npz`` (the arrays) and ``monitor.json`` (their index), written
atomically through ``neurosim.files.write_atomic``, and read back as a ``MonitorRecord``.

What the arrays hold is described in ``neurosim.monitors`` and docs/monitors.md; this module
knows only their names, units, shapes and how they fit together.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import attrs
import numpy as np

from neurosim.errors import UserError
from neurosim.files import write_atomic

FORMAT = 1

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


def monitor_index(arrays: dict[str, np.ndarray], *, synapses, weight_shapes: dict, rules: dict,
                  total_steps: int, config: dict, probe_size: int, trace_index: dict) -> dict:
    """The contents of ``monitor.json``: what every array and column is."""
    return {
        "format": FORMAT,
        "synapses": list(synapses),
        "weight_shapes": weight_shapes,
        "rules": rules,
        "total_steps": total_steps,
        "config": config,
        "probe_size": probe_size,
        "arrays": {name: {"shape": list(a.shape), "unit": ARRAYS[name][0], "meaning": ARRAYS[name][1]}
                   for name, a in arrays.items()},
        "trace_index": trace_index,
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
