"""Command-line entry points; every user error ends in one message and exit status 2."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from neurosim.errors import UserError

USAGE = """usage: run_circuit.py PRESET [--out DIR] [--resume RUN_DIR] [--key value ...]

Train a circuit. PRESET is <rule>_<model>: rule in bp, fa, ss, wm, kp; model in mlp_digits,
mlp_original, resnet18, resnet34, resnet50 (e.g. kp_mlp_digits, wm_resnet18). Any configuration
field can be overridden: --epochs 30 --lr 0.05 --width 0.25 --data synthetic --device cpu ...
A new run directory is made under runs/ (or --out DIR); --resume RUN_DIR continues a run.
"""


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def unique_run_dir(root: Path, name: str) -> Path:
    """``root/name-YYYYmmdd-HHMMSS`` (with a suffix if taken): never an existing directory."""
    base = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path = Path(f"{base}-{i}")
        i += 1
    return path


def run_circuit(argv: list[str]) -> int:
    from neurosim.config import PRESETS, parse_overrides, preset
    from neurosim.plots import plot_run
    from neurosim.train import RunInterrupted, open_run, resume_run

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\nPresets: " + " ".join(sorted(PRESETS)))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    out = resume = None
    quiet = False
    args = []
    i = 0
    while i < len(rest):
        if rest[i] in ("--out", "--resume"):
            if i + 1 >= len(rest):
                raise UserError(f"option {rest[i]} needs a directory")
            if rest[i] == "--out":
                out = Path(rest[i + 1])
            else:
                resume = Path(rest[i + 1])
            i += 2
        elif rest[i] == "--quiet":
            quiet, i = True, i + 1
        else:
            args.append(rest[i])
            i += 1
    overrides = parse_overrides(args)
    cfg = preset(name, **overrides)
    if resume is not None:
        run = resume_run(resume, expect=cfg, overrides=overrides, quiet=quiet)
    else:
        run = open_run(out or unique_run_dir(Path("runs"), name), cfg, quiet=quiet)
    if not quiet:
        print(f"run directory: {run.run_dir}", file=sys.stderr)
        print(run.circuit, file=sys.stderr)

    def request_stop(signum, frame):
        run.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    previous = signal.signal(signal.SIGINT, request_stop), signal.signal(signal.SIGTERM, request_stop)
    try:
        m = run.train()
    except RunInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    for path in plot_run(run.run_dir):
        print(f"wrote {path}", file=sys.stderr)
    if m is not None:
        print(f"final: test top-1 {m['test_acc']:.2f}%  top-5 {m['test_top5']:.2f}%  "
              f"mean W-Bᵀ angle {m['mean_angle']:.1f}°  ({run.run_dir})")
    return 0


def main(entry, argv=None) -> None:
    try:
        sys.exit(entry(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        fail(str(e))


EVAL_USAGE = """usage: evaluate.py RUN_DIR [--data NAME_OR_PATH] [--last] [--split test|all] [--data-dir DIR]
                   [--val-per-class N] [--device DEV] [--json PATH]

Evaluate a run's best checkpoint (or --last) on a dataset: top-1, top-5 and loss, printed as
one line and written as JSON (default RUN_DIR/eval-<data>-<best|last>.json). --data defaults to
the run's own data; a folder path is evaluated whole (--split all) unless --split test asks for
its held-out images only.
"""


def evaluate(argv: list[str]) -> int:
    import json
    import os
    import re

    import torch

    from neurosim.checkpoint import load_checkpoint
    from neurosim.config import RunConfig
    from neurosim.data import BatchStream, DATASET_NAMES, load_dataset
    from neurosim.train import build_circuit, evaluate_stream, loss_function, resolve_device

    if not argv or argv[0] in ("-h", "--help"):
        print(EVAL_USAGE)
        return 0 if argv else 2
    run_dir, opts = Path(argv[0]), {"--data": None, "--split": None, "--data-dir": None, "--val-per-class": None,
                                    "--device": "auto", "--json": None}
    which, i, rest = "best", 0, argv[1:]
    while i < len(rest):
        if rest[i] == "--last":
            which, i = "last", i + 1
        elif rest[i] in opts and i + 1 < len(rest):
            opts[rest[i]], i = rest[i + 1], i + 2
        else:
            raise UserError(f"unexpected argument {rest[i]!r}\n{EVAL_USAGE}")
    state = load_checkpoint(run_dir / f"{which}.pt")
    cfg = RunConfig.from_dict(state["config"])
    trained = state["data"]
    spec = opts["--data"] or cfg.data
    is_folder = spec not in DATASET_NAMES
    split = opts["--split"] or ("all" if is_folder and opts["--data"] else "test")
    if split not in ("test", "all"):
        raise UserError(f"--split must be test or all, not {split!r}")
    if opts["--val-per-class"] is not None and not opts["--val-per-class"].isdigit():
        raise UserError(f"--val-per-class takes a whole number, not {opts['--val-per-class']!r}")
    val = int(opts["--val-per-class"]) if opts["--val-per-class"] is not None else (
        0 if split == "all" and is_folder else cfg.val_per_class)
    device = resolve_device(opts["--device"])
    data = load_dataset(spec, opts["--data-dir"] or cfg.data_dir, val, (cfg.synthetic_train, cfg.synthetic_test),
                        device, cfg.seed)
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
    if split == "all":
        x, y = torch.cat([data.train_x, data.test_x]), torch.cat([data.train_y, data.test_y])
    else:
        x, y = data.test_x, data.test_y
    stream = BatchStream(x, y, 256, trained["mean"], trained["std"], shuffle=False, seed=0)
    m = evaluate_stream(circuit, circuit, stream, loss_function(cfg.loss))
    result = {"run": str(run_dir), "checkpoint": which, "epoch": state["epoch"], "data": spec, "split": split, **m}
    slug = re.sub(r"[^A-Za-z0-9]+", "_", Path(spec).name if is_folder else spec).strip("_")
    out = Path(opts["--json"] or run_dir / f"eval-{slug}-{which}.json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"{cfg.preset} ({which}, epoch {state['epoch']}) on {spec} [{split}, {m['images']} images]: "
          f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  -> {out}")
    return 0
