"""A study's files and its report: what ``study.json`` holds and what each rule's run directory
says of it, drawn into ``report.md`` and its figures.

``read_study``/``write_study`` read and write ``study.json``; ``run_state`` tells from a run's files
how far it went; ``collect`` gathers each rule's ``RuleResult`` from its metrics, monitor file and
attempts; ``write_report(study_dir)`` draws the report of a study from its files at any time, while
it trains or long after, with a robustness table where ``evaluate.py RUN --attack ...`` has
written a run's ``robustness.json``. Below it: ``neurosim.tools.study.figures`` alone.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import time
from pathlib import Path

import attrs

from neurosim.common.errors import UserError
from neurosim.common.files import DirectoryLock, describe_os_error, write_atomic
from neurosim.tools.study.figures import _finite, draw_figures

FORMAT = 1
STUDY_FILE = "study.json"
REPORT_FILE = "report.md"
LOGS = "logs"


# -- the study directory ---------------------------------------------------------------------------

def read_study(study_dir: Path) -> dict | None:
    """The contents of ``study.json`` (None when there is none), checked to be a study."""
    path = Path(study_dir) / STUDY_FILE
    if not path.exists():
        return None
    fix = f"repair it, or move {path} away to start the study's bookkeeping anew (its runs are kept)"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read {path}: {describe_os_error(e)}") from None
    except ValueError as e:
        raise UserError(f"{path} is damaged: it is not JSON ({str(e).splitlines()[0][:120]}); {fix}") from None
    shape = {"format": int, "model": str, "rules": list, "options": dict, "runs": dict}
    bad = [k for k, kind in shape.items() if not isinstance(data, dict) or not isinstance(data.get(k), kind)]
    if bad:
        raise UserError(f"{path} is not a study file (it lacks a valid {', '.join(bad)}); {fix}")
    if data["format"] != FORMAT:
        raise UserError(f"{path} has format {data['format']}; this version reads format {FORMAT}")
    return data


def write_study(study_dir: Path, data: dict) -> None:
    data["updated"] = _now()
    write_atomic(Path(study_dir) / STUDY_FILE, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode(), what="study state")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_state(run_dir: Path, epochs: int) -> str:
    """``new`` (no run there yet), ``started`` (configured, no checkpoint), ``partial`` (a checkpoint,
    epochs to go) or ``done`` (its metrics hold the last epoch)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        return "new"
    if not (run_dir / "last.pt").exists():
        return "started"
    return "done" if epochs_done(run_dir) >= epochs else "partial"


def epochs_done(run_dir: Path) -> int:
    from neurosim.training.run_log import metrics_records

    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    try:
        return max((int(r["epoch"]) for r in metrics_records(path)), default=0)
    except UserError:
        return 0  # damaged: the run's own resume names the problem


def _self_command() -> list[str]:
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.name == "compare_rules.py":
        return ["python", str(script)]
    return ["python", "experiments/compare_rules.py"]


# -- words the report and the runner share ---------------------------------------------------------

def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _exit_words(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exit status {code}"


def failure_text(tail: list[str]) -> str:
    """What went wrong, from a run's last lines: its ``error:`` line, or the end of a traceback."""
    errors = [line for line in tail if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: "):]
    lines = [line.strip() for line in tail if line.strip()]
    return " / ".join(lines[-3:]) or "no output"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _degrees(angle) -> str:
    """An angle as the report writes it; ``n/a`` where it is undefined (no feedback matrix)."""
    if angle is None or not isinstance(angle, (int, float)) or angle != angle:
        return "n/a"
    return f"{angle:.2f}" if abs(angle) < 1 else f"{angle:.1f}"


# -- the report ------------------------------------------------------------------------------------

@attrs.define
class RuleResult:
    """What a study's report says of one rule, read from its run's files and ``study.json``."""

    rule: str
    state: str  # done, failed, interrupted, running, pending
    epochs: int  # the study's budget
    records: list  # metrics.jsonl, epoch 0 (before training) included
    wall_s: float | None
    error: str | None = None  # what went wrong, for a failed run
    exit: int | None = None
    command: list | None = None
    monitor_note: str | None = None
    delta: dict | None = None  # synapse -> delta angle (degrees) at the last probed step
    grad: dict | None = None  # synapse -> ΔW-vs-gradient angle at that step
    delta_step: int | None = None
    delta_curve: tuple | None = None  # (steps, mean delta angle over synapses)

    @property
    def trained(self) -> list:
        return [r for r in self.records if r.get("epoch", 0) >= 1]

    @property
    def final(self) -> dict | None:
        return self.trained[-1] if self.trained else None

    def recent_mean(self, key: str, epochs: int = 3) -> float | None:
        """``key`` averaged over the last ``epochs`` trained epochs (fewer if fewer were trained): at a
        constant learning rate the test accuracy moves by points from one epoch to the next."""
        tail = self.trained[-epochs:]
        return sum(r[key] for r in tail) / len(tail) if tail else None

    def best(self, key: str) -> tuple[float, int] | None:
        if not self.trained:
            return None
        top = max(self.trained, key=lambda r: r[key])
        return top[key], top["epoch"]

    @property
    def has_angles(self) -> bool:
        return self.final is not None and any(_finite(a) for a in self.final["angles"].values())


def collect(study_dir: Path, data: dict) -> list[RuleResult]:
    from neurosim.training.run_log import metrics_records

    out = []
    for rule in data["rules"]:
        entry = data["runs"].get(rule, {})
        run_dir = Path(study_dir) / rule
        epochs = int(data.get("epochs", {}).get(rule, 0))
        records, note = [], None
        if (run_dir / "metrics.jsonl").exists():
            try:
                records = metrics_records(run_dir / "metrics.jsonl")
            except UserError as e:
                note = str(e)
        attempts = entry.get("attempts") or []
        last = attempts[-1] if attempts else {}
        state, files = entry.get("state", "pending"), run_state(run_dir, epochs)
        if files == "done":
            state = "done"
        elif state == "running" and files != "new" and DirectoryLock.holder_alive(run_dir):
            pass  # training now (another process reads the study: --combine)
        elif state in ("done", "running"):  # its files say otherwise now / a study that was killed
            state = "pending" if files == "new" else "interrupted"
        r = RuleResult(rule=rule, state=state, epochs=epochs, records=records, wall_s=entry.get("wall_s"),
                       exit=last.get("exit"), command=last.get("command"))
        if state == "failed":
            r.error = failure_text(last.get("tail") or [])
        if note:
            r.error = note if r.error is None else f"{r.error}; {note}"
        _read_monitor(r, run_dir)
        out.append(r)
    return out


def _read_monitor(r: RuleResult, run_dir: Path) -> None:
    import numpy as np

    from neurosim.observe.monitor_files import load_monitor

    if not (run_dir / "monitor.npz").exists():
        return
    try:
        rec = load_monitor(run_dir)
    except UserError as e:
        r.monitor_note = str(e)
        return
    finite = np.isfinite(rec.delta_angle)
    rows = np.flatnonzero(finite.any(1))
    if not len(rows):
        return
    last = rows[-1]
    r.delta_step = int(rec.steps[last])
    r.delta = {s: float(rec.delta_angle[last, i]) for i, s in enumerate(rec.synapses)}
    r.grad = {s: float(rec.grad_angle[last, i]) for i, s in enumerate(rec.synapses)}
    with np.errstate(all="ignore"):
        means = np.nanmean(np.where(finite[rows], rec.delta_angle[rows], np.nan), axis=1)
    r.delta_curve = (rec.steps[rows].astype(float).tolist(), means.tolist())


def _points(v: float) -> str:
    return f"{v:+.2f}".replace("-", "−")


def write_report(study_dir: Path) -> Path:
    """Write ``report.md`` and its figures from a study's files; returns the report's path."""
    study_dir = Path(study_dir)
    data = read_study(study_dir)
    if data is None:
        raise UserError(f"{study_dir} holds no study ({STUDY_FILE})")
    results = collect(study_dir, data)
    figures = draw_figures(study_dir, data["model"], results)
    text = report_markdown(study_dir, data, results, figures)
    path = study_dir / REPORT_FILE
    write_atomic(path, text.encode(), what="report")
    return path


def report_markdown(study_dir: Path, data: dict, results: list[RuleResult], figures: list[tuple[str, str]]) -> str:
    model, options = data["model"], data["options"]
    shown = " ".join(f"{_flag(k)} {shlex.quote(v)}" for k, v in options.items()) or "none"
    counts = {}
    for r in results:
        counts[r.state] = counts.get(r.state, 0) + 1
    bp = next((r for r in results if r.rule == "bp" and r.final is not None), None)
    lines = [
        f"# Plasticity rules compared on `{model}`",
        "",
        f"Each rule trained its preset `<rule>_{model}` with the same options, seed and budget; options: "
        f"`{shown}`{_budget(study_dir, data)}. {len(results)} rule{'s' if len(results) != 1 else ''}: "
        + ", ".join(f"{n} {s}" for s, n in counts.items()) + f". Written {_now()}.",
        "",
        f"Runs are in `<rule>/` beside this file, each run's output in `{LOGS}/<rule>.log`, the study's state "
        f"and the command of every attempt in `{STUDY_FILE}`.",
        "",
        "## Results",
        "",
        "Test accuracy in percent at the final epoch, averaged over the last three epochs (last 3) and "
        "at the best one (its epoch in brackets)"
        + ("; vs BP: final top-1 minus bp's, in points" if bp else "")
        + "; mean W–Bᵀ angle: over synapses, at the final epoch (n/a: the rule has no feedback matrix); "
          "wall time: every attempt of the run, start-up included.",
        "",
        "| rule | state | epochs | top-1 | top-5 | top-1 last 3 | best top-1 | best top-5 |" + (" vs BP |" if bp else "")
        + " mean W–Bᵀ angle (°) | wall time |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if bp else "") + " ---: | ---: |",
    ]
    for r in results:
        f = r.final
        done = f"{f['epoch'] if f else 0}/{r.epochs}"
        cells = [f"**{r.rule}**", r.state, done]
        if f is None:
            cells += ["—"] * (5 + bool(bp) + 1)
        else:
            b1, b5 = r.best("test_acc"), r.best("test_top5")
            cells += [f"{f['test_acc']:.2f}", f"{f['test_top5']:.2f}", f"{r.recent_mean('test_acc'):.2f}",
                      f"{b1[0]:.2f} ({b1[1]})", f"{b5[0]:.2f} ({b5[1]})"]
            if bp:
                cells.append("—" if r.rule == "bp" else _points(f["test_acc"] - bp.final["test_acc"]))
            cells.append(_degrees(f.get("mean_angle")))
        cells.append(_duration(r.wall_s))
        lines.append("| " + " | ".join(cells) + " |")
    failures = [r for r in results if r.state == "failed" or (r.error and r.state != "done")]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            what = _exit_words(r.exit) if r.exit is not None else "no exit status"
            lines.append(f"- **{r.rule}** ({what}): {_md_inline(r.error or 'unknown')} — whole output: "
                         f"`{LOGS}/{r.rule}.log`")
    unfinished = [r.rule for r in results if r.state in ("interrupted", "running", "pending")]
    if unfinished:
        lines += ["", f"Not finished: {', '.join(unfinished)}; `compare_rules.py --resume {study_dir}` continues "
                      f"the study."]
    lines += _robustness_lines(study_dir, results)
    with_angles = [r for r in results if r.final is not None]
    if with_angles:
        names = list(dict.fromkeys(s for r in with_angles for s in r.final["angles"]))
        lines += ["", "## W–Bᵀ angle per synapse at the final epoch (degrees)", "",
                  "Angle between each synapse's forward weight W and its feedback matrix Bᵀ (the last record of "
                  "`metrics.jsonl`); n/a where the rule has no feedback matrix.", ""]
        lines += _synapse_table(names, [(r.rule, r.final["angles"]) for r in with_angles])
    probed = [r for r in results if r.delta is not None]
    if probed:
        names = list(dict.fromkeys(s for r in probed for s in r.delta))
        steps = ", ".join(f"{r.rule} {r.delta_step}" for r in probed)
        lines += ["", "## Delta angle per synapse at the end (degrees)", "",
                  "Angle between the error each synapse's output receives under the rule and the error backprop "
                  "would deliver, on the monitor's fixed probe batch, at the last recorded step (`monitor.npz`; "
                  f"steps: {steps}). The synapse into the output population gets the loss's own error: 0°.", ""]
        lines += _synapse_table(names, [(r.rule, r.delta) for r in probed])
        lines += ["", "## Update angle per synapse at the end (degrees)", "",
                  "Angle between each synapse's update ΔW under the rule and the true gradient, on the same "
                  "probe batch and step.", ""]
        lines += _synapse_table(names, [(r.rule, r.grad) for r in probed])
    notes = [f"- {r.rule}: {_md_inline(r.monitor_note)}" for r in results if r.monitor_note]
    if notes:
        lines += ["", "Monitor files that could not be read:", "", *notes]
    lines += ["", "## Figures", ""]
    if figures:
        for caption, rel in figures:
            lines += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
    else:
        lines += ["None yet: no run has finished an epoch.", ""]
    lines += ["## Commands", "", "The study:", "", "```",
              shlex.join([*_self_command(), model, "--rules", ",".join(data["rules"]), "--out", str(study_dir),
                          *[t for k, v in options.items() for t in (_flag(k), v)]]),
              "```", "", "Each rule's run (its last attempt; every attempt is in `study.json`):", "", "```"]
    for r in results:
        lines.append(shlex.join(r.command) if r.command else f"# {r.rule}: not started")
    lines += ["```", ""]
    return "\n".join(lines)


def _robustness_lines(study_dir: Path, results: list[RuleResult]) -> list[str]:
    """``## Robustness``: what ``evaluate.py RUN --attack ...`` wrote into each rule's run directory
    (``robustness.json``) on the run's own data and test split; nothing when no run has one."""
    from neurosim.training.attack import ROBUSTNESS_FILE, Attack, read_robustness

    rows, columns, notes = {}, {}, []
    for r in results:
        run_dir = Path(study_dir) / r.rule
        try:
            own = json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("data")
            entries = read_robustness(run_dir / ROBUSTNESS_FILE)
        except UserError as e:
            notes.append(f"- {r.rule}: {_md_inline(e)}")
            continue
        except (OSError, ValueError, AttributeError):
            continue
        for e in entries:
            if e.get("split") != "test" or e.get("data") != own:
                continue
            try:
                label = Attack(e["attack"], e["steps"], e["step_size"], e["random_start"], e["seed"] or 0).label()
                cells = [((label, c["eps"]), f"{label} {c['eps_text']}", float(c["top1"])) for c in e["eps"]]
                clean, key = float(e["clean"]["top1"]), (r.rule, str(e["checkpoint"]), e["epoch"])
            except (KeyError, TypeError, ValueError):
                continue  # not written by evaluate.py: left out
            row = rows.setdefault(key, {"clean": clean})
            for column, title, top1 in cells:
                columns.setdefault(column, title)
                row[column] = top1
    if not rows and not notes:
        return []
    keys = sorted(columns)
    lines = ["", "## Robustness (test top-1, %)", "",
             "Clean and under attack, as `evaluate.py RUN --attack fgsm|pgd --eps ...` wrote into each run's "
             f"`{ROBUSTNESS_FILE}`: eps in pixel units (the image's range is [0, 1]); the attack's input gradients "
             "are true backprop's through the forward weights, whatever rule trained the circuit.", ""]
    if rows:
        lines += ["| rule | checkpoint | clean | " + " | ".join(columns[k] for k in keys) + " |",
                  "| --- | --- | ---: | " + " | ".join("---:" for _ in keys) + " |"]
        for (rule, which, epoch), row in rows.items():
            cells = [f"**{rule}**", f"{which} (epoch {epoch})", f"{row['clean']:.2f}",
                     *(f"{row[k]:.2f}" if k in row else "—" for k in keys)]
            lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "Robustness files that could not be read:", "", *notes]
    return lines


def _budget(study_dir: Path, data: dict) -> str:
    """`` (data X, seed S, N epochs)`` as the runs' configurations say, where one can be read."""
    epochs = sorted(set(data.get("epochs", {}).values()))
    said = []
    for rule in data["rules"]:
        try:
            cfg = json.loads((Path(study_dir) / rule / "config.json").read_text(encoding="utf-8"))
            said = [f"data {cfg['data']}", f"seed {cfg['seed']}"]
            break
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if epochs:
        said.append(f"{'/'.join(map(str, epochs))} epoch{'s' if epochs != [1] else ''}")
    return f" ({', '.join(said)})" if said else ""


def _md_inline(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _synapse_table(names: list[str], columns: list[tuple[str, dict]]) -> list[str]:
    lines = ["| synapse | " + " | ".join(rule for rule, _ in columns) + " |",
             "| --- | " + " | ".join("---:" for _ in columns) + " |"]
    for name in names:
        lines.append(f"| `{name}` | " + " | ".join(_degrees(values.get(name)) if name in values else "—"
                                                  for _, values in columns) + " |")
    return lines
