"""The runs a dashboard shows: their files read (``RunData``), their labels (the settings that
differ) and their facts (preset, overrides, device, versions, wall time, command)."""

from __future__ import annotations

import html
import json
import shlex
from pathlib import Path

# Config keys that say where, not what: never a difference between runs worth a label.
_PLACES = {"data_dir", "workers", "log_every", "device"}


# -- reading ---------------------------------------------------------------------------------------

def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RunData:
    """What the page shows of one run: its metrics records, monitor record (or None), config and
    starts (``run.json``)."""

    def __init__(self, run_dir: Path, records: list[dict] | None = None):
        from neurosim.observe.monitors import load_monitor
        from neurosim.tools.figures import read_metrics

        self.dir = Path(run_dir)
        self.records = list(records) if records is not None else read_metrics(self.dir)
        self.config = _read_json(self.dir / "config.json")
        if not isinstance(self.config, dict):
            self.config = {}
        starts = _read_json(self.dir / "run.json")
        self.starts = starts.get("starts", []) if isinstance(starts, dict) else []
        self.monitor = load_monitor(self.dir) if (self.dir / "monitor.npz").exists() else None
        self.label = self.config.get("preset") or self.dir.name


def _flat(config: dict) -> dict:
    flat = {}
    for k, v in config.items():
        if isinstance(v, dict):
            flat.update({f"{config.get('rule', 'rule')}_{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    return flat


def run_labels(runs: list[RunData]) -> list[str]:
    """A label per run: its preset, with the settings that differ among runs of the same preset
    (``kp_mlp_digits lr=0.1``), and its folder where that still does not tell them apart."""
    labels = [r.label for r in runs]
    out = []
    for r, lab in zip(runs, labels):
        same = [o for o in runs if o.label == lab]
        if len(same) > 1:
            flats = [_flat(o.config) for o in same]
            keys = sorted({k for f in flats for k in f} - _PLACES - {"preset"})
            differ = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
            mine = _flat(r.config)
            lab = " ".join([lab, *(f"{k}={mine.get(k)}" for k in differ)])
        out.append(lab)
    return [f"{lab} ({r.dir.name})" if out.count(lab) > 1 else lab for lab, r in zip(out, runs)]


def overrides(config: dict) -> dict:
    """The settings of ``config`` (config.json) that differ from its preset's."""
    from neurosim.training.config import preset

    try:
        base = json.loads(json.dumps(preset(config["preset"]).to_dict(), default=str))
    except Exception:  # a preset this version does not have, or no config: every setting is its own
        return {}
    return {k: v for k, v in config.items() if k != "preset" and base.get(k) != v}


def _wall(run) -> str:
    t = sum(r.get("time_s", 0.0) for r in run.records if isinstance(r.get("time_s"), (int, float)))
    return f"{t:.1f} s of training over {len(run.records) - 1} epoch(s)" if t else "—"


def facts(runs, labels, colours) -> str:
    """An HTML table of each run's facts: preset, overrides, device, versions, wall time, command."""
    rows = []
    for run, lab, col in zip(runs, labels, colours):
        last = run.starts[-1] if run.starts else {}
        over = overrides(run.config)
        versions = ", ".join(f"{k} {v}" for k, v in (last.get("versions") or {}).items() if v)
        device = " ".join(str(v) for v in (last.get("device") or run.config.get("device"), last.get("device_name"))
                          if v)
        commands = "<br>".join(html.escape(s.get("command", "")) for s in run.starts) or "— (no run.json)"
        cells = [("preset", run.config.get("preset", "—")), ("directory", str(run.dir)),
                 ("overrides", ", ".join(f"{k}={json.dumps(v)}" for k, v in over.items()) or "none"),
                 ("rule / model / data", " / ".join(str(run.config.get(k, "?")) for k in ("rule", "model", "data"))),
                 ("device", device or "—"), ("versions", versions or "—"), ("started", last.get("started", "—")),
                 ("wall time", _wall(run)), ("git", json.dumps(last.get("git")) if last.get("git") else "—")]
        body = "".join(f"<tr><th>{k}</th><td>{html.escape(str(v))}</td></tr>" for k, v in cells)
        body += f"<tr><th>command</th><td><code>{commands}</code></td></tr>"
        if last.get("arguments"):
            body += f"<tr><th>arguments</th><td><code>{html.escape(shlex.join(last['arguments']))}</code></td></tr>"
        rows.append(f"<h3 style='color:{col}'>{html.escape(lab)}</h3><table class='facts'>{body}</table>")
    return "".join(rows)


