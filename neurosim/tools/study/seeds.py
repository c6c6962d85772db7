"""Studies that differ only in their seed, combined into one report:
``compare_rules.py --combine STUDY_DIR STUDY_DIR ... [--out FILE.md]``.

One study trains every rule on one seed; what a rule's result is worth shows only across seeds.
``combine`` reads each study's files (``neurosim.tools.study.report.collect``), refuses studies that
differ in anything but the seed and the machine they ran on (model, options, budget), and writes per
rule: the final and best top-1/top-5 as the mean over the seeds with their range, the gap to BP
paired seed by seed (each seed's rule minus the same seed's BP), the W–Bᵀ and delta angles per
synapse averaged over the seeds, and every seed's own final top-1. Only runs that finished their
budget count; the others are named. With ``--out`` a figure of the test accuracy by epoch (mean and
range over the seeds) is drawn beside the file.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import attrs

from neurosim.common.errors import UserError
from neurosim.common.files import write_atomic
from neurosim.tools.study.report import (
    STUDY_FILE,
    RuleResult,
    _degrees,
    _flag,
    _md_inline,
    _now,
    _points,
    _synapse_table,
    collect,
    read_study,
)

USAGE = """\
usage: {prog} --combine STUDY_DIR STUDY_DIR [...] [--out FILE.md]

Combine studies of one model and options that differ only in --seed (each made by {prog} MODEL
--seed S --out STUDY_DIR) into one report: per rule the final and best top-1/top-5 as the mean over
the seeds with their range (min–max), the gap to bp paired seed by seed, the W–Bᵀ and delta angles
per synapse averaged over the seeds, and each seed's final top-1. Only runs that finished their
epochs count; the others are named. The studies may still be training: the report says what is
finished now.

  --out FILE.md   write the report there (atomically) and its figure beside it
                  (FILE_accuracy.png); without it the report goes to standard output
  -h, --help      this help
"""


@attrs.frozen
class Seeded:
    """One study of the combination: its directory, seed and the results of its rules."""

    path: Path
    seed: int
    results: dict  # rule -> RuleResult


def combine(argv: list[str], prog: str = "compare_rules.py") -> int:
    """``--combine STUDY_DIR ... [--out FILE]`` (argv without ``--combine``); returns the exit status."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE.format(prog=prog), end="")
        return 0
    dirs, out = _parse(argv, prog)
    model, options, studies = read_studies(dirs)
    if out is None:
        sys.stdout.write(combined_markdown(model, options, studies))
        return 0
    figure = out.with_name(f"{out.stem}_accuracy.png")
    drawn = draw_accuracy(figure, model, studies)
    text = combined_markdown(model, options, studies, figure=figure.name if drawn else None)
    write_atomic(out, text.encode(), what="combined report")
    print(f"wrote {out}" + (f" and {figure}" if drawn else ""), file=sys.stderr)
    return 0


def _parse(argv: list[str], prog: str) -> tuple[list[Path], Path | None]:
    dirs, out, rest = [], None, list(argv)
    while rest:
        token = rest.pop(0)
        if token == "--out":
            if out is not None:
                raise UserError("option --out is given twice; give it once")
            if not rest or not rest[0] or rest[0].startswith("--"):
                raise UserError("option --out needs a value: the report's file, e.g. --out seeds.md")
            out = Path(rest.pop(0))
        elif token.startswith("-"):
            raise UserError(f"unknown option {token} with --combine; it takes study directories and --out FILE.md "
                            f"({prog} --combine --help)")
        else:
            dirs.append(Path(token))
    if len(dirs) < 2:
        raise UserError(f"--combine needs two or more study directories, one per seed (e.g. {prog} --combine "
                        f"studies/seed0 studies/seed1); got {len(dirs)}")
    if len({d.resolve() for d in dirs}) < len(dirs):
        raise UserError("--combine names one study directory twice; name each seed's study once")
    if out is not None:
        if out.is_dir():
            raise UserError(f"--out {out} is a directory; give the report's file, e.g. --out {out / 'seeds.md'}")
        if not out.parent.is_dir():
            raise UserError(f"--out {out}: the folder {out.parent} does not exist; make it first")
        if out.suffix != ".md":
            raise UserError(f"--out {out}: the report is markdown; give a file ending in .md")
    return dirs, out


def read_studies(dirs: list[Path]) -> tuple[str, dict, list[Seeded]]:
    """The model, the options every study was given alike (the seed left out; a machine setting
    such as --data-dir may differ) and each study, checked to be seeds of one study."""
    from neurosim.tools.study.plan import MACHINE_SETTINGS, _in_order, effective_settings

    stored = []
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"no study directory {d}; give directories made by compare_rules.py MODEL --out DIR")
        data = read_study(d)
        if data is None:
            raise UserError(f"{d} holds no study ({STUDY_FILE}); give directories made by compare_rules.py")
        stored.append(data)
    models = {data["model"] for data in stored}
    if len(models) > 1:
        raise UserError("the studies are of different models (" + ", ".join(f"{d}: {data['model']}" for d, data in
                        zip(dirs, stored)) + "); combine seeds of one model")
    model = stored[0]["model"]
    rules = _in_order([r for data in stored for r in data["rules"]])

    def settings(data):
        return {k: v for k, v in effective_settings(model, rules, data["options"]).items()
                if k != "seed" and k not in MACHINE_SETTINGS}

    first = settings(stored[0])
    for d, data in zip(dirs[1:], stored[1:]):
        other = settings(data)
        if other != first:
            keys = [k for k in dict.fromkeys([*first, *other]) if first.get(k) != other.get(k)]
            said = "; ".join(f"{_flag(k)} {_shown(first.get(k))} in {dirs[0]}, {_shown(other.get(k))} "
                             f"in {d}" for k in keys)
            raise UserError(f"the studies differ in more than the seed ({said}); combine studies made with the same "
                            f"options and another --seed")
    studies = []
    for d, data in zip(dirs, stored):
        seed = _seed(d, data)
        results = {r.rule: r for r in collect(d, data)}
        studies.append(Seeded(path=d, seed=seed, results=results))
    seeds = [s.seed for s in studies]
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise UserError(f"the studies share seed {', '.join(map(str, twice))} (" + ", ".join(
            f"{s.path}: {s.seed}" for s in studies) + "); a spread over seeds needs studies of different --seed")
    shared = {k: v for k, v in stored[0]["options"].items()
              if k != "seed" and all(data["options"].get(k) == v for data in stored[1:])}
    return model, shared, studies


def _shown(value) -> str:
    return "the preset's" if value is None else json.dumps(value)


def _seed(study_dir: Path, data: dict) -> int:
    """The seed the study's runs trained with: their configurations' (the options' where no run has
    been configured yet, else the preset's)."""
    for rule in data["rules"]:
        try:
            return int(json.loads((study_dir / rule / "config.json").read_text(encoding="utf-8"))["seed"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if "seed" in data["options"]:
        return int(data["options"]["seed"])
    from neurosim.training.config import preset

    return preset(f"{data['rules'][0]}_{data['model']}").seed


# -- the report ------------------------------------------------------------------------------------

def _spread(values: list[float], show=lambda v: f"{v:.2f}", between: str = "–") -> str:
    """``mean (min–max)`` over the seeds; the value alone for one seed."""
    if not values:
        return "—"
    mean = show(sum(values) / len(values))
    return mean if len(values) == 1 else f"{mean} ({show(min(values))}{between}{show(max(values))})"


def _gap(values: list[float]) -> str:
    """A gap in points, signed: ``mean (min to max)``."""
    return _spread(values, show=_points, between=" to ")


def _mean_angles(per_seed: list[dict]) -> dict:
    """Each synapse's angle averaged over the seeds (undefined where a seed's is)."""
    names = list(dict.fromkeys(s for angles in per_seed for s in angles))
    out = {}
    for name in names:
        values = [a.get(name) for a in per_seed]
        finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        out[name] = sum(finite) / len(finite) if len(finite) == len(values) else math.nan
    return out


def finished(study: Seeded, rule: str) -> RuleResult | None:
    r = study.results.get(rule)
    return r if r is not None and r.state == "done" and r.final is not None else None


def combined_markdown(model: str, options: dict, studies: list[Seeded], figure: str | None = None) -> str:
    """The report; ``figure``: the accuracy figure's file name beside it, where one was drawn."""
    from neurosim.tools.study.plan import _in_order

    rules = _in_order([r for s in studies for r in s.results])
    shared = " ".join(f"{_flag(k)} {v}" for k, v in options.items()) or "none"
    seeds = ", ".join(str(s.seed) for s in studies)
    lines = [
        f"# Plasticity rules compared on `{model}` over {len(studies)} seeds",
        "",
        f"Seeds {seeds}, each a study of its own (" + ", ".join(f"seed {s.seed}: `{s.path}`" for s in studies)
        + f"); the options they were all given: `{_md_inline(shared)}`. Written {_now()}.",
        "",
        "## Results over the seeds",
        "",
        "Test accuracy in percent: the mean over the seeds whose run finished, and their range (min–max). "
        "vs BP: the rule's final top-1 minus bp's of the same seed, in points, averaged over the seeds where both "
        "finished (range in brackets). Mean W–Bᵀ angle: over synapses at the final epoch, averaged over the seeds "
        "(n/a: the rule has no feedback matrix).",
        "",
        "| rule | seeds finished | final top-1 | final top-5 | best top-1 | best top-5 | vs BP (points) "
        "| mean W–Bᵀ angle (°) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    unfinished = []
    for rule in rules:
        done = [(s, finished(s, rule)) for s in studies]
        done = [(s, r) for s, r in done if r is not None]
        for s in studies:
            r = s.results.get(rule)
            if r is None or finished(s, rule) is None:
                state = "not in the study" if r is None else f"{r.state}, {r.final['epoch'] if r.final else 0}/{r.epochs}"
                if r is not None and r.final is not None:  # where it stands now
                    state += (f"; at its last epoch top-1 {r.final['test_acc']:.2f}, mean W–Bᵀ angle "
                              f"{_degrees(r.final.get('mean_angle'))}°")
                unfinished.append(f"{rule} seed {s.seed} ({state})")
        cells = [f"**{rule}**", f"{len(done)}/{len(studies)}"]
        finals = [r.final for _, r in done]
        cells += [_spread([f["test_acc"] for f in finals]), _spread([f["test_top5"] for f in finals]),
                  _spread([r.best("test_acc")[0] for _, r in done]), _spread([r.best("test_top5")[0] for _, r in done])]
        gaps = []
        for s, r in done:
            bp = finished(s, "bp")
            if bp is not None and rule != "bp":
                gaps.append(r.final["test_acc"] - bp.final["test_acc"])
        cells.append("—" if rule == "bp" else _gap(gaps))
        angles = [f.get("mean_angle") for f in finals]
        defined = [a for a in angles if isinstance(a, (int, float)) and math.isfinite(a)]
        cells.append(_degrees(sum(defined) / len(defined)) if defined and len(defined) == len(angles) else
                     ("—" if not angles else "n/a"))
        lines.append("| " + " | ".join(cells) + " |")
    if unfinished:
        lines += ["", "Not counted (not finished): " + "; ".join(unfinished) + "."]
    lines += ["", "## Final top-1 per seed (%)", "",
              "| rule | " + " | ".join(f"seed {s.seed}" for s in studies) + " |",
              "| --- | " + " | ".join("---:" for _ in studies) + " |"]
    for rule in rules:
        cells = []
        for s in studies:
            r = finished(s, rule)
            cells.append(f"{r.final['test_acc']:.2f}" if r is not None else "—")
        lines.append(f"| **{rule}** | " + " | ".join(cells) + " |")
    angled = [(rule, [finished(s, rule) for s in studies]) for rule in rules]
    angled = [(rule, [r for r in rs if r is not None]) for rule, rs in angled]
    angled = [(rule, rs) for rule, rs in angled if rs]
    if angled:
        names = list(dict.fromkeys(n for _, rs in angled for r in rs for n in r.final["angles"]))
        lines += ["", "## W–Bᵀ angle per synapse at the final epoch, mean over the seeds (degrees)", ""]
        lines += _synapse_table(names, [(rule, _mean_angles([r.final["angles"] for r in rs])) for rule, rs in angled])
    probed = [(rule, [r for r in rs if r.delta is not None]) for rule, rs in angled]
    probed = [(rule, rs) for rule, rs in probed if rs]
    if probed:
        names = list(dict.fromkeys(n for _, rs in probed for r in rs for n in r.delta))
        lines += ["", "## Delta angle per synapse at the end, mean over the seeds (degrees)", "",
                  "Angle between the error each synapse's output receives under the rule and backprop's, on each "
                  "run's probe batch at its last recorded step (`monitor.npz`); the synapse into the output gets the "
                  "loss's own error: 0°.", ""]
        lines += _synapse_table(names, [(rule, _mean_angles([r.delta for r in rs])) for rule, rs in probed])
    if figure:
        caption = "Test top-1 by epoch, the mean over the seeds (line) and their range (band)"
        lines += ["", "## Figure", "", f"![{caption}]({figure})", "", f"*{caption}*"]
    lines += ["", "## Commands", "", "Each seed's study (`report.md` in its directory has its runs' commands):", ""]
    lines += [f"- seed {s.seed}: `compare_rules.py --resume {s.path}`" for s in studies]
    return "\n".join(lines) + "\n"


def draw_accuracy(path: Path, model: str, studies: list[Seeded]) -> bool:
    """Test top-1 by epoch per rule: the mean over the seeds (line) and their range (band), of the
    runs the report counts (those that finished). False when none has."""
    from neurosim.tools.figures import save_figure
    from neurosim.tools.study.figures import _pyplot
    from neurosim.tools.study.plan import _in_order

    rules = _in_order([r for s in studies for r in s.results])
    curves = []
    for rule in rules:
        runs = [r.trained for r in (finished(s, rule) for s in studies) if r is not None]
        if not runs:
            continue
        xs = [t["epoch"] for t in runs[0]]
        ys = [[t[i]["test_acc"] for t in runs] for i in range(len(xs))]
        curves.append((rule, len(runs), xs, ys))
    if not curves:
        return False
    plt = _pyplot()
    palette = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    for i, (rule, n, xs, ys) in enumerate(curves):
        color = palette(i % 10)
        ax.plot(xs, [sum(y) / len(y) for y in ys], color=color, label=f"{rule} ({n} seed{'s' if n > 1 else ''})")
        if n > 1:
            ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color, alpha=0.2, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(f"{model}: test accuracy by epoch, mean over the seeds and their range", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=100)
    return True
