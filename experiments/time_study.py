"""What timing does to learning, on the digits MLP run in time (``--dynamics time``).

    python experiments/time_study.py delay --rules bp,fa,dfa,kp --duration 10 --values 0,2,4,6,8,10 \\
        --epochs 20 --seeds 0,1 --out studies/time-delay
    python experiments/time_study.py plasticity --rules fa,kp --duration 10 --values 0.1,0.3,1,3,10,30 \\
        --epochs 20 --seeds 0,1 --out studies/time-plasticity
    python experiments/time_study.py plasticity --rules fa,kp --duration 8 --values 1,10,100 \\
        --plasticity continuous --lr 1 --momentum 0 --batch-size 1 --epochs 2 --out studies/time-continuous

``delay``: every feedback hop takes ``value`` (in steps of dt); ``plasticity``: the synapses'
plasticity time constant is ``value`` × the stimulus duration. Every other setting is the
rule's ``<rule>_mlp_digits`` preset, with ``--bias false`` (ReLU neurons rest at 0 when the
stimulus is off) and what ``--plasticity``, ``--lr``, ``--momentum`` and ``--batch-size`` give
(``--plasticity continuous``: the weights move at every step; ``--batch-size 1``: one stimulus at
a time). Each run is an ordinary run directory under ``--out`` (its ``config.json``
repeats it); a run already finished there is not trained again. The study writes
``results.json``, ``report.md`` (final test top-1 per rule and value, mean and range over the
seeds; for ``delay`` also the share of the undelayed update each hidden synapse integrates over
one presentation, measured on the first batch) and ``<study>.png``.
"""

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without installing


def _numbers(kind):
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
        if not values or any(v < 0 for v in values):
            raise argparse.ArgumentTypeError(f"expected numbers of at least 0 separated by commas, got {text!r}")
        return values
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", choices=("delay", "plasticity"))
    p.add_argument("--rules", default="bp,fa,dfa,kp", help="rules, comma-separated (default: bp,fa,dfa,kp)")
    p.add_argument("--duration", type=float, default=10.0, help="stimulus duration in steps of dt (default: 10)")
    p.add_argument("--values", type=_numbers(float), required=True,
                   help="delays (steps) or plasticity time constants (× duration), comma-separated")
    p.add_argument("--settle", type=float, default=None,
                   help="time simulated after each stimulus, the same for every value (default: until the last "
                        "error has arrived, which lengthens with the delay)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=_numbers(int), default=[0])
    p.add_argument("--out", type=Path, required=True, help="the study directory")
    p.add_argument("--compile", action="store_true", help="compile each time step with torch.compile (--compile true)")
    p.add_argument("--plasticity", choices=("presentation", "continuous"), default="presentation",
                   help="where the weights move: at each presentation's end (default) or at every step")
    p.add_argument("--lr", type=float, default=None, help="the learning rate (default: the preset's)")
    p.add_argument("--momentum", type=float, default=None, help="SGD momentum (default: the preset's; "
                   "continuous plasticity needs 0)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="stimuli presented at once (default: the preset's; 1: one stimulus at a time)")
    args = p.parse_args(argv)
    from neurosim.rules import RULES

    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in args.rules if r not in RULES]
    if unknown or not args.rules:
        p.error(f"unknown rules {unknown}; registered: {', '.join(RULES)}")
    if args.epochs < 1 or args.duration <= 0 or args.duration != int(args.duration):
        p.error("--epochs must be at least 1 and --duration a whole number of steps above 0")
    if args.study == "plasticity" and 0 in args.values:
        p.error("a plasticity time constant of 0 × the duration is no time constant: give values above 0")
    if args.settle is not None and (args.settle < 0 or args.settle != int(args.settle)):
        p.error("--settle is a whole number of steps, at least 0")
    if args.study == "delay" and any(v != int(v) for v in args.values):
        p.error("delays are whole numbers of steps")
    if args.plasticity == "continuous" and args.momentum != 0:
        p.error("continuous plasticity moves the weights by the synapses' own dynamics, which have no momentum: "
                "give --momentum 0")
    if args.lr is not None and not args.lr > 0 or args.batch_size is not None and args.batch_size < 1:
        p.error("--lr must be above 0 and --batch-size at least 1")
    return args


def settings(args, value):
    """The overrides of one run of the study at ``value``."""
    out = dict(dynamics="time", duration=args.duration, bias=False, epochs=args.epochs, monitor_every=0,
               device="cpu", compile=args.compile)
    if args.settle is not None:
        out["settle"] = args.settle
    if args.plasticity != "presentation":
        out["plasticity"] = args.plasticity
    for key in ("lr", "momentum", "batch_size"):
        if getattr(args, key) is not None:
            out[key] = getattr(args, key)
    if args.study == "delay":
        out["delay"] = float(value)
    else:
        out["tau_plasticity"] = value * args.duration
    return out


def train(directory: Path, name: str, overrides: dict) -> dict:
    """Train (or find finished) one run, in a process of its own as ``run_circuit.py`` would;
    its last metrics line."""
    metrics = directory / "metrics.jsonl"
    if metrics.exists():
        last = json.loads(metrics.read_text().splitlines()[-1])
        if last.get("epoch") == overrides["epochs"]:
            return last
        # Unfinished: a run stopped before its first checkpoint (one that diverged) starts again
        # there; run_circuit.py refuses, and says how to continue, one that got further.
    command = [sys.executable, str(Path(__file__).with_name("run_circuit.py")), name, "--out", str(directory)]
    for key, value in overrides.items():
        command += ["--" + key.replace("_", "-"), str(value).lower() if isinstance(value, bool) else str(value)]
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    said = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    if done.returncode and "diverged" in said:  # a result of the study: this setting does not train
        return {"test_acc": None, "diverged": said.removeprefix("error: ").split(":")[0]}
    if done.returncode:
        raise SystemExit(f"error: {' '.join(command)} failed: {said}")
    return json.loads(metrics.read_text().splitlines()[-1])


def other_settings(directory: Path, overrides: dict) -> str | None:
    """What a run already in ``directory`` was started with that differs from ``overrides``."""
    try:
        saved = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    other = {k: (saved[k], v) for k, v in overrides.items() if k in saved and saved[k] != v}
    return ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in other.items()) or None


def strengths(rule: str, duration: float, delays) -> dict:
    """The share ⟨ΔW_d, ΔW_0⟩ / ‖ΔW_0‖² of the undelayed update each synapse integrates over one
    presentation of the first training batch, per delay, on the initial circuit (float64)."""
    import tempfile

    import attrs

    from neurosim.core.dynamics import time_backward
    from neurosim.training.config import preset
    from neurosim.training.run_dir import open_run

    cfg = preset(f"{rule}_mlp_digits", dynamics="time", duration=duration, bias=False, device="cpu", monitor_every=0)
    with tempfile.TemporaryDirectory() as tmp:
        run = open_run(Path(tmp) / "run", cfg, quiet=True)
        x, y = next(iter(run.train_stream.epoch(0)))
        circuit, loss = run.circuit.double(), run.loss_fn
    updates = {}
    for d in delays:
        c = copy.deepcopy(circuit)
        time_backward(c, x.double(), lambda a: loss(a, y), attrs.evolve(cfg.time_settings(), delay=float(d)))
        updates[d] = {n: s.weight.grad for n, s in c.synapses.items()}
    zero = updates[delays[0]]
    return {d: {n: float((u[n] * zero[n]).sum() / zero[n].square().sum()) for n in u} for d, u in updates.items()}


def main(argv=None):
    args = parse_args(argv)
    plan = [(rule, value, seed, args.out / f"{rule}-{args.study}{value:g}-seed{seed}", dict(settings(args, value), seed=seed))
            for rule in args.rules for value in args.values for seed in args.seeds]
    for *_, run_dir, overrides in plan:  # before anything trains: a study is one set of settings
        differs = other_settings(run_dir, overrides)
        if differs:
            print(f"error: {run_dir} holds a run with other settings ({differs}); give the study another --out",
                  file=sys.stderr)
            raise SystemExit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"study": args.study, "duration": args.duration, "epochs": args.epochs, "seeds": args.seeds,
               "values": args.values, "rules": {},
               "settings": {k: v for k, v in (("plasticity", args.plasticity), ("lr", args.lr),
                                              ("momentum", args.momentum), ("batch_size", args.batch_size))
                            if v is not None and not (k == "plasticity" and v == "presentation")}}
    for rule in args.rules:
        entry = results["rules"][rule] = {"top1": {}, "angle": {}}
        for value in args.values:
            accs, angles = [], []
            for _, _, seed, run_dir, overrides in [q for q in plan if q[:2] == (rule, value)]:
                last = train(run_dir, f"{rule}_mlp_digits", overrides)
                accs.append(last["test_acc"])
                angles.append(last.get("mean_angle"))
                said = last["diverged"] if last["test_acc"] is None else f"top-1 {last['test_acc']:.2f} %"
                print(f"{rule} {args.study} {value:g} seed {seed}: {said}", flush=True)
            entry["top1"][f"{value:g}"], entry["angle"][f"{value:g}"] = accs, angles
        if args.study == "delay":
            share = strengths(rule, args.duration, [0] + [v for v in args.values if v != 0])
            entry["strength"] = {f"{d:g}": s for d, s in share.items()}
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "report.md").write_text(report(results))
    figure(results, args.out / f"{args.study}.png")
    print(f"wrote {args.out / 'report.md'} and {args.out / (args.study + '.png')}")


def report(results) -> str:
    delay = results["study"] == "delay"
    head = "delay d (steps)" if delay else "τ_w / T"
    given = results.get("settings", {})
    extra = "".join(f", {k.replace('_', ' ')} {v:g}" if isinstance(v, float) else f", {k.replace('_', ' ')} {v}"
                    for k, v in given.items())
    lines = [f"# Digits MLP in time: {results['study']} (T = {results['duration']:g} steps, {results['epochs']} epochs, "
             f"seeds {', '.join(map(str, results['seeds']))}{extra})", "",
             f"| rule | {head} | test top-1 % (mean, range) |" + (" share of the undelayed update: x→h1, h1→h2 |"
                                                                  if delay else ""),
             "| --- | --- | --- |" + (" --- |" if delay else "")]
    for rule, entry in results["rules"].items():
        for value, accs in entry["top1"].items():
            ok = [a for a in accs if a is not None]
            shown = f"{sum(ok) / len(ok):.2f} ({min(ok):.2f}–{max(ok):.2f})" if ok else ""
            if len(ok) < len(accs):
                shown += f"{'; ' if ok else ''}{len(accs) - len(ok)} of {len(accs)} diverged"
            row = f"| {rule} | {value} | {shown} |"
            if delay:
                s = entry["strength"].get(value, {})
                row += f" {s.get('x->h1', float('nan')):.3f}, {s.get('h1->h2', float('nan')):.3f} |"
            lines.append(row)
    return "\n".join(lines) + "\n"


def figure(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for rule, entry in results["rules"].items():
        trained = {float(v): [a for a in accs if a is not None] for v, accs in entry["top1"].items()}
        trained = {v: a for v, a in trained.items() if a}  # settings where every seed diverged: no point
        xs = list(trained)
        means = [sum(a) / len(a) for a in trained.values()]
        lo = [min(a) for a in trained.values()]
        hi = [max(a) for a in trained.values()]
        ax.plot(xs, means, marker="o", label=rule)
        ax.fill_between(xs, lo, hi, alpha=0.2)
    if results["study"] == "delay":
        ax.set_xlabel(f"feedback delay per hop (steps; stimulus {results['duration']:g})")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("plasticity time constant / stimulus duration")
    ax.set_ylabel("test top-1 (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
