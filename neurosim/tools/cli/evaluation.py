"""``neurosim evaluate`` (``evaluate.py``): a run's checkpoint scored on a dataset."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

from neurosim.common.errors import UserError
from neurosim.tools.cli.checks import check_device
from neurosim.tools.cli.entry import loading
from neurosim.tools.cli.options import wants_help

EVAL_USAGE = """usage: evaluate.py RUN_DIR [--data NAME_OR_PATH] [--last] [--split test|all] [--data-dir DIR]
                   [--val-per-class N] [--device DEV] [--json PATH]
                   [--attack fgsm|pgd --eps LIST [--steps N] [--step-size X] [--random-start [--seed N]]]

Evaluate a run's best checkpoint (or --last) on a dataset: top-1, top-5 and loss, printed as
one line and written as JSON (default RUN_DIR/eval-<data>-<best|last>.json). --data defaults to
the run's own data; a folder path is evaluated whole (--split all) unless --split test asks for
its held-out images only.

  --data NAME_OR_PATH   digits, cifar10, cifar100, synthetic or an image folder (default: the run's)
  --last                evaluate last.pt (the last epoch) instead of best.pt (the best test top-1)
  --split test|all      the held-out images only, or every image
  --data-dir DIR        where torchvision datasets are kept (default: the run's)
  --val-per-class N     images per class held out of a folder
  --device DEV          auto, cpu, cuda or cuda:N (default auto)
  --json PATH           where the JSON result goes

Adversarial robustness: with --attack, top-1 and loss clean and under the attack at each --eps,
printed as a table and added to RUN_DIR/robustness.json (or --json), which compare_rules.py's
report reads. The attack's input gradients are true backprop's through the forward weights (the
attacker knows them), whatever rule trained the circuit; the circuit is evaluated in eval mode
and nothing of it changes.

  --attack fgsm|pgd     FGSM (x + eps·sign(∇x)) or PGD (signed steps, each projected to the eps
                        ball and to the valid pixel range)
  --eps LIST            strengths in pixel units, the image's intensity range being [0, 1]:
                        fractions or decimals, e.g. 2/255,4/255,8/255 (converted per channel into
                        the normalised input: eps/std). Digits: scikit-learn's gray levels 0..16
                        are stored as 0..255, so one level is 16/255 and 8/255 is half a level
  --steps N             PGD steps (default 10)
  --step-size X         PGD step in pixel units (default 2.5·eps/steps)
  --random-start        PGD starts from a uniform random point of the eps ball
  --seed N              the random start's seed (default 0)
"""


def _checkpoint_path(run_dir: Path, which: str) -> Path:
    """The checkpoint to evaluate, or a ``UserError`` saying what to give instead."""
    if not run_dir.exists():
        raise UserError(f"no run directory {run_dir}; give the directory of a run made by run_circuit.py")
    if not run_dir.is_dir():
        hint = (f"; for {run_dir.name} give {run_dir.parent}" + (" --last" if run_dir.name == "last.pt" else "")
                if run_dir.suffix == ".pt" else "")
        raise UserError(f"{run_dir} is a file; give the run directory that holds best.pt and last.pt{hint}")
    path = run_dir / f"{which}.pt"
    if not path.exists() and which == "best" and (run_dir / "last.pt").exists():
        raise UserError(f"{run_dir} has no best.pt (no epoch has finished with a test score yet); --last "
                        f"evaluates its last checkpoint: evaluate.py {run_dir} --last")
    return path


def _check_json_target(out: Path) -> None:
    """Refuse a ``--json`` path that cannot be written, before the evaluation runs."""
    if out.is_dir():
        raise UserError(f"--json {out} is a directory; give the path of a file")
    if not out.parent.is_dir():
        what = "is a file" if out.parent.exists() else "does not exist"
        raise UserError(f"cannot write {out}: its folder {out.parent} {what}; give --json a path in an "
                        f"existing folder")


def _check_applicable(opts: dict, spec: str, is_folder: bool, split: str) -> None:
    """Refuse an option the evaluation would not read, or a held-out split that would be empty."""
    from neurosim.training.applies import reads_data_dir

    val = opts["--val-per-class"]
    if val is not None:
        if not is_folder:
            raise UserError(f"--val-per-class applies to image folders only (the images of each class held out for "
                            f"testing); {spec} has a test split of its own: leave --val-per-class out")
        if split == "all":
            raise UserError("--val-per-class applies with --split test only: --split all evaluates every image of "
                            "the folder, held out or not; give --split test with it, or leave it out")
        if int(val) == 0:
            raise UserError("--val-per-class 0 holds no image out, so --split test would evaluate none: give at "
                            "least 1, or --split all to evaluate every image")
    if opts["--data-dir"] is not None and not reads_data_dir(spec):
        raise UserError(f"--data-dir applies to data kept in a directory only (where it is kept or downloaded, and "
                        f"decoded folders cached); {spec} needs none: leave --data-dir out")

_ATTACK_OPTIONS = ("--attack", "--eps", "--steps", "--step-size", "--seed")


def _attack_request(opts: dict, random_start: bool):
    """The ``Attack`` and the strengths asked for (None without --attack), every value checked;
    an option that would not be read is refused."""
    from neurosim.training.attack import ATTACKS, Attack, eps_value, parse_eps

    kind = opts["--attack"]
    given = [o for o in _ATTACK_OPTIONS[1:] if opts[o] is not None] + (["--random-start"] if random_start else [])
    if kind is None:
        if given:
            raise UserError(f"{given[0]} applies with --attack only (fgsm or pgd); add e.g. --attack pgd --eps 8/255, "
                            f"or leave {given[0]} out")
        return None, ()
    if kind not in ATTACKS:
        raise UserError(f"--attack must be fgsm or pgd, not {kind!r}")
    if opts["--eps"] is None:
        raise UserError(f"--attack {kind} needs --eps, the strengths in pixel units, e.g. --eps 2/255,4/255,8/255")
    eps = parse_eps(opts["--eps"])
    if kind == "fgsm":
        extra = [o for o in given if o != "--eps"]
        if extra:
            raise UserError(f"{extra[0]} applies to --attack pgd only: FGSM takes one step of eps from the clean "
                            f"image; leave {extra[0]} out or use --attack pgd")
        return Attack("fgsm"), eps
    steps = opts["--steps"] or "10"
    if not steps.strip().isdigit() or not 1 <= int(steps) <= 10_000:
        raise UserError(f"bad value {steps!r} for --steps: expected a whole number of steps from 1 to 10000")
    size = None
    if opts["--step-size"] is not None:
        size = eps_value(opts["--step-size"], "--step-size")
        if size == 0:
            raise UserError("--step-size 0 would never move the image; give a positive step in pixel units, "
                            "e.g. 2/255")
    seed = opts["--seed"]
    if seed is not None and not random_start:
        raise UserError("--seed applies with --random-start only (the draw of the starting point); add "
                        "--random-start or leave --seed out")
    if seed is not None and (not seed.strip().isdigit() or int(seed) >= 2 ** 63):
        raise UserError(f"bad value {seed!r} for --seed: expected a whole number from 0")
    return Attack("pgd", int(steps), size, random_start, int(seed or 0)), eps


def evaluate(argv: list[str], prog: str = "evaluate.py") -> int:
    """``evaluate.py RUN_DIR [...]``; returns the exit status."""
    import json
    import re

    if not argv or wants_help(argv):
        print(EVAL_USAGE.replace("evaluate.py", prog), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    with loading():
        import torch

        from neurosim.common.files import write_atomic
        from neurosim.data import DATASET_NAMES, BatchStream, load_dataset
        from neurosim.data import stream as streaming
        from neurosim.training.attack import ROBUSTNESS_FILE, read_robustness
        from neurosim.training.checkpoint import load_checkpoint
        from neurosim.training.config import RunConfig
        from neurosim.training.evaluation import evaluate_stream
        from neurosim.training.run import build_circuit, loss_function, resolve_device
    if argv[0].startswith("--"):
        raise UserError(f"the first argument is the run directory, not the option {argv[0]}; {prog} --help lists "
                        f"the options")
    run_dir, opts = Path(argv[0]), {"--data": None, "--split": None, "--data-dir": None, "--val-per-class": None,
                                    "--device": "auto", "--json": None, **dict.fromkeys(_ATTACK_OPTIONS)}
    which, random_start, i, seen = "best", False, 0, set()
    rest = [part for a in argv[1:] for part in (a.split("=", 1) if a.split("=", 1)[0] in opts else (a,))]  # --k=v
    while i < len(rest):
        if rest[i] in seen:
            raise UserError(f"option {rest[i]} is given twice; give it once")
        if rest[i] == "--last":
            which, i = "last", i + 1
            seen.add("--last")
        elif rest[i] == "--random-start":
            random_start, i = True, i + 1
            seen.add("--random-start")
        elif rest[i] in opts:
            if i + 1 >= len(rest) or not rest[i + 1].strip():
                raise UserError(f"option {rest[i]} needs a value")
            seen.add(rest[i])
            opts[rest[i]], i = rest[i + 1], i + 2
        elif rest[i].startswith("-"):
            close = difflib.get_close_matches(rest[i].split("=")[0], [*opts, "--last", "--random-start"], n=1, cutoff=0.6)
            raise UserError(f"unknown option {rest[i].split('=')[0]}"
                            + (f"; did you mean {close[0]}?" if close else f"; {prog} --help lists the options"))
        else:
            raise UserError(f"unexpected argument {rest[i]!r}; {prog} takes one run directory ({prog} --help)")
    split = opts["--split"]
    if split not in (None, "test", "all"):
        raise UserError(f"--split must be test or all, not {split!r}")
    if opts["--val-per-class"] is not None and not opts["--val-per-class"].isdigit():
        raise UserError(f"--val-per-class takes a whole number, not {opts['--val-per-class']!r}")
    check_device(opts["--device"])
    attack, eps = _attack_request(opts, random_start)
    if opts["--json"] is not None:
        _check_json_target(Path(opts["--json"]))
    path = _checkpoint_path(run_dir, which)
    try:
        state = load_checkpoint(path)
    except UserError as e:
        other = run_dir / "last.pt"
        if which == "best" and other.exists() and "--last" not in str(e):
            raise UserError(f"{e} evaluate.py {run_dir} --last evaluates the run's last checkpoint instead.") from None
        raise
    cfg = RunConfig.from_dict(state["config"])
    trained = state["data"]
    spec = opts["--data"] or cfg.data
    is_folder = spec not in DATASET_NAMES
    split = split or ("all" if is_folder and opts["--data"] else "test")
    _check_applicable(opts, spec, is_folder, split)
    val = int(opts["--val-per-class"]) if opts["--val-per-class"] is not None else (
        0 if split == "all" and is_folder else cfg.val_per_class)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", Path(spec).name if is_folder else spec).strip("_")
    if attack is None:
        out = Path(opts["--json"] or run_dir / f"eval-{slug}-{which}.json")
    else:
        out = Path(opts["--json"] or run_dir / ROBUSTNESS_FILE)
        read_robustness(out)  # a damaged file is refused before the attack runs
    _check_json_target(out)
    device = resolve_device(opts["--device"])
    data_dir = opts["--data-dir"] or cfg.data_dir
    streamed = streaming.wants_stream(spec, data_dir, cfg.stream)
    if streamed:  # a folder read from disk, as the run read it (ImageNet)
        data = streaming.open_folder(spec, data_dir, val, cfg.image_size)
    else:
        data = load_dataset(spec, data_dir, val, (cfg.synthetic_train, cfg.synthetic_test), device, cfg.seed)
    if list(data.image_shape) != trained["image_shape"]:
        raise UserError(f"{spec} has images of shape {data.image_shape}; the run was trained on "
                        f"{tuple(trained['image_shape'])}")
    if data.num_classes != len(trained["classes"]):
        raise UserError(f"{spec} has {data.num_classes} classes; the run was trained on {len(trained['classes'])}")
    if [c.lower() for c in data.classes] != [c.lower() for c in trained["classes"]]:
        raise UserError(f"class names of {spec} {list(data.classes)[:5]}… differ from the run's "
                        f"{trained['classes'][:5]}…; labels would not correspond")
    circuit = build_circuit(cfg, tuple(trained["image_shape"]), len(trained["classes"])).to(device)
    circuit.load_state_dict(state["circuit"])
    if streamed:
        paths, labels = data.val if split == "test" else (data.train[0] + data.val[0], data.train[1] + data.val[1])
        if not paths:
            raise UserError("the evaluation split is empty; hold out some images (e.g. --val-per-class 50)")
        stream = streaming.FolderStream(paths, labels, 256, train=False, mean=trained["mean"], std=trained["std"],
                                        seed=0, image_size=cfg.image_size, workers=cfg.workers, device=device)
    else:
        if split == "all":
            x, y = torch.cat([data.train_x, data.test_x]), torch.cat([data.train_y, data.test_y])
        else:
            x, y = data.test_x, data.test_y
        stream = BatchStream(x, y, 256, trained["mean"], trained["std"], shuffle=False, seed=0)
    head = f"{cfg.preset} ({which}, epoch {state['epoch']}) on {spec}"
    if attack is not None:
        result = {"run": str(run_dir), "checkpoint": which, "epoch": state["epoch"], "preset": cfg.preset,
                  "rule": cfg.rule, "data": spec, "split": split}
        return _attack(circuit, stream, loss_function(cfg.loss), attack, eps, trained, result, head, out)
    m = evaluate_stream(circuit, circuit, stream, loss_function(cfg.loss))
    result = {"run": str(run_dir), "checkpoint": which, "epoch": state["epoch"], "data": spec, "split": split, **m}
    # Through a temporary file and a rename; the temporary file never outlives a failure.
    write_atomic(out, (json.dumps(result, indent=2) + "\n").encode(), what="evaluation result")
    print(f"{head} [{split}, {m['images']} images]: "
          f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  -> {out}")
    return 0


def _attack(circuit, stream, loss_fn, attack, eps, trained: dict, result: dict, head: str, out: Path) -> int:
    """Run ``attack`` at each strength, print the table and add the result to ``out``."""
    from neurosim.training.attack import GRADIENT_NOTE, robustness, write_robustness

    m = robustness(circuit, stream, loss_fn, attack, [value for _, value in eps], trained["mean"], trained["std"])
    rows = [{"eps_text": text, "step_size": attack.step(row["eps"]), **row} for (text, _), row in zip(eps, m["eps"])]
    result.update(images=m["images"], **attack.settings(), gradient="backprop", eps_units="pixel, [0, 1]",
                  clean=m["clean"], eps=rows)
    write_robustness(out, result)
    width = max(len("0 (clean)"), *(len(r["eps_text"]) for r in rows))
    print(f"{head} [{result['split']}, {m['images']} images]: {attack.describe()}")
    print(f"{GRADIENT_NOTE}; eps in pixel units [0, 1]")
    print(f"  {'eps':<{width}}  {'top-1 %':>8}  {'loss':>8}")
    print(f"  {'0 (clean)':<{width}}  {m['clean']['top1']:8.2f}  {m['clean']['loss']:8.4f}")
    for r in rows:
        print(f"  {r['eps_text']:<{width}}  {r['top1']:8.2f}  {r['loss']:8.4f}")
    print(f"-> {out}")
    study = Path(result["run"]).resolve().parent
    if (study / "study.json").exists() and out.resolve().parent == Path(result["run"]).resolve():
        print(f"compare_rules.py --resume {study} adds it to the study's report", file=sys.stderr)
    return 0
