"""Command-line entry points; every user error ends in one message and exit status 2.

``main(entry)`` runs an entry (``run_circuit``, ``evaluate``, ``neurosim.plot_cli.plot_run``) and
turns what a user can cause into one line on stderr: a ``UserError`` or an ``OSError`` (the path
and the cause) gives status 2, Ctrl-C gives status 130. Nothing else is caught: a traceback
means a bug.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import textwrap
import time
from pathlib import Path

from neurosim.errors import UserError


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# errno → (cause, what to do about it)
_OS_CAUSES = {
    errno.ENOSPC: ("disk full", "free some space or choose another location"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another location"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.EACCES: ("permission denied", "choose a location you can write to, or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a location you can write to, or change its permissions"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "check the path"),
    errno.EISDIR: ("is a directory", "give the path of a file"),
    errno.EEXIST: ("already exists", "choose another path"),
    errno.EIO: ("input/output error", "check the disk"),
}


def os_error_message(exc: OSError) -> str:
    """One line naming the path of an ``OSError`` and its cause (``disk full``, ``read-only file system``)."""
    cause, fix = _OS_CAUSES.get(exc.errno, (exc.strerror or str(exc) or type(exc).__name__, ""))
    path = exc.filename
    if path is not None and exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    where = f"{os.fsdecode(path) if isinstance(path, bytes) else path}: " if path is not None else ""
    return f"{where}{cause}" + (f"; {fix}" if fix else "")


def main(entry, argv=None) -> None:
    """Run ``entry(argv)`` and exit with its status; user errors, I/O errors and Ctrl-C end in one line."""
    try:
        code = entry(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        if _echo(e):
            sys.exit(2)  # said once, by rank 0
        rank = os.environ.get("RANK", "0")
        fail(str(e) if rank == "0" else f"(rank {rank}) {e}")
    except OSError as e:
        fail(os_error_message(e))
    except KeyboardInterrupt:
        # Entries write their files through a temporary file and a rename, and a run that is
        # training handles Ctrl-C itself (it saves a checkpoint), so an interrupt that reaches
        # here leaves every file as it was or complete.
        print("\ninterrupted; nothing was lost", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)


def _echo(e: UserError) -> bool:
    """Whether ``e`` is reported already: rank 0 of a torchrun job said it (``Echo``), or it is
    an error every rank meets together and rank 0 says (this being another rank)."""
    from neurosim.distributed import Echo, launched

    if isinstance(e, Echo):
        return True
    if launched().rank == 0:
        return False
    from neurosim.train import RunDiverged, RunInterrupted

    return isinstance(e, (RunDiverged, RunInterrupted))


def wants_help(argv: list[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


# -- run_circuit.py -------------------------------------------------------------------------------

def run_usage() -> str:
    """The help of ``run_circuit.py``: presets and every option, read from the configuration."""
    import attrs

    from neurosim.config import MODEL_FAMILIES, PRESETS, RULE_NAMES, RunConfig, rule_settings

    lines = [
        "usage: run_circuit.py PRESET [--out DIR | --resume RUN_DIR] [--quiet] [--field-name VALUE ...]",
        "",
        f"Train a circuit. PRESET is <rule>_<model>: rule in {', '.join(RULE_NAMES)}; model in",
        f"{', '.join(MODEL_FAMILIES)} (e.g. kp_mlp_digits, wm_resnet18).",
        "The preset fixes the rule and the model; any other setting can be overridden, e.g. --epochs 3",
        "--lr 0.05 --data synthetic --device cpu (--hidden sizes MLPs, --width scales ResNets).",
        "docs/presets.md lists what each preset sets.",
        "",
        "  --out DIR          the run directory: new, empty, or a run that never finished its first",
        "                     epoch (default runs/PRESET-YYYYmmdd-HHMMSS)",
        "  --resume RUN_DIR   continue an interrupted run (Ctrl-C saves a checkpoint first)",
        "  --quiet            no progress lines",
        "  -h, --help         this help",
        "",
        "Settings, with their defaults (a preset sets some of them otherwise):",
    ]
    defaults = RunConfig()
    fields = [(f.name, f, getattr(defaults, f.name), _NOTES.get(f.name)) for f in attrs.fields(RunConfig)
              if f.name not in ("preset", "rule_params")]
    fields += [(key, f, f.default, f"{rule} only" + (f"; {_NOTES[key]}" if key in _NOTES else ""))
               for key, (rule, f) in rule_settings().items()]
    for key, f, shown, note in fields:
        option = f"--{key.replace('_', '-')} {_value_form(f)}"
        if isinstance(shown, tuple):
            shown = ",".join(map(str, shown)) or "none"
        elif isinstance(shown, bool) or shown is None:
            shown = str(shown).lower()
        lines.append(f"  {option:<48} {shown}" + (f"  ({note})" if note else ""))
    lines += ["", *textwrap.wrap("Presets: " + " ".join(sorted(PRESETS)), 100, subsequent_indent="  ")]
    return "\n".join(lines) + "\n"


_NOTES = {
    "rule": "fixed by the preset", "model": "fixed by the preset", "val_per_class": "image folders only",
    "train_limit": "0: every training image", "hidden": "MLPs only", "activation": "MLPs only",
    "init": "MLPs only", "width": "ResNets only", "milestones": "epochs at which lr is multiplied by lr-gamma",
    "wm_lr": "of the sleep optimizer", "wm_sleep_before": "-1: one epoch's worth",
    "wm_sleep_batch_size": "0: --batch-size",
    "wm_sleep_events": "co-activations per weight per mirror batch, at least; 0: no minimum",
    "monitor_every": "engaged steps between records; 0: no monitor", "monitor_synapses": "e.g. 'x->h1,h2->*'",
    "log_every": "steps between progress lines; 0: by time",
    "max_loss_ratio": "stop at this multiple of the first loss; 0: at a non-finite one",
}


def _value_form(field) -> str:
    choices = getattr(field.validator, "options", None)
    if choices:
        return "|".join(map(str, choices))
    from neurosim.config import RULE_NAMES

    special = {"rule": "|".join(RULE_NAMES), "data": "digits|cifar10|cifar100|synthetic|FOLDER", "data_dir": "DIR",
               "device": "auto|cpu|cuda|cuda:N", "monitor_synapses": "PATTERNS", "val_per_class": "N|none"}
    if field.name in special:
        return special[field.name]
    typ = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    return {"bool": "true|false", "int": "N", "float": "X", "tuple[int, ...]": "N,N,..."}.get(typ, "VALUE")


def _degrees(angle: float) -> str:
    return "n/a (no feedback matrix)" if angle != angle else f"{angle:.1f}°"


def unique_run_dir(root: Path, name: str) -> Path:
    """``root/name-YYYYmmdd-HHMMSS`` (with a suffix if taken): never an existing directory."""
    base = root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        path = Path(f"{base}-{i}")
        i += 1
    return path


def check_out_dir(out: Path) -> None:
    """Refuse an ``--out`` that cannot become a run directory, before anything is loaded or written:
    a file, a folder holding other things than a run, or a place that cannot be written."""
    check_new_dir(out, "run", "config.json")


def check_new_dir(out: Path, what: str, marker: str) -> None:
    """Refuse an ``--out`` that cannot become a ``what`` directory (a run, a study): a file, a
    folder holding other things than a ``what`` (recognised by its ``marker`` file), or a place
    that cannot be written. A folder holding a ``what`` passes; its owner decides about it."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give the path of a new or empty directory")
    if out.is_dir():
        if (out / marker).exists():
            return
        others = sorted(p.name for p in out.iterdir() if p.name != ".lock")
        if others:
            listed = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
            no = "" if what == "run" else f" but no {what} ({marker})"
            raise UserError(f"{out} exists and holds other files ({listed}){no}; choose a new or empty directory "
                            f"for --out")
        where = out
    else:
        where = next((p for p in out.parents if p.exists()), Path("."))
        if not where.is_dir():
            raise UserError(f"cannot make the {what} directory {out}: {where} is a file, not a directory; "
                            f"choose another --out")
    if not os.access(where, os.W_OK | os.X_OK):
        raise UserError(f"cannot make the {what} directory {out}: {where} is not writable (read-only or "
                        f"permission denied); choose another --out")


def check_device(spec: str) -> None:
    """Refuse a device spec other than auto, cpu, cuda, cuda:N, or a GPU index this machine lacks."""
    from neurosim.config import device_problem

    problem = device_problem(spec)
    if problem:
        raise UserError(problem)
    if spec.startswith("cuda"):
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise UserError(f"device {spec!r} asked for but no CUDA GPU is available; use --device cpu")
        if spec.startswith("cuda:") and int(spec[5:]) >= count:
            raise UserError(f"device {spec} asked for, but this machine has {count} CUDA GPU"
                            f"{'s' if count > 1 else ''} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")


def run_circuit(argv: list[str]) -> int:
    from neurosim import distributed

    try:
        return _run_circuit(argv)
    finally:
        distributed.finish()


def _run_circuit(argv: list[str]) -> int:
    import attrs

    from neurosim import distributed
    from neurosim.config import check_rule_settings, parse_overrides, preset
    from neurosim.plots import plot_run
    from neurosim.train import RunInterrupted, open_run, resume_run

    if not argv or wants_help(argv):
        print(run_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name.startswith("-"):
        raise UserError(f"the first argument is the preset (e.g. kp_mlp_digits), not the option {name}; "
                        f"run_circuit.py --help lists presets and options")
    out = resume = None
    quiet = False
    args = []
    i = 0
    while i < len(rest):
        if rest[i] in ("--out", "--resume"):
            if i + 1 >= len(rest) or not rest[i + 1]:
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
    if out is not None and resume is not None:
        raise UserError("--out and --resume cannot go together: --resume continues a run in its own directory")
    overrides = parse_overrides(args)
    cfg = preset(name, **overrides)
    check_rule_settings(name, overrides)
    check_device(cfg.device)
    world, device = distributed.init(cfg.device)  # torchrun's processes join here
    if device != cfg.device:
        cfg = attrs.evolve(cfg, device="cuda")  # each rank its local GPU; the run records "cuda"
    quiet = quiet or not world.writer
    if resume is not None:
        run = resume_run(resume, expect=cfg, overrides=overrides, quiet=quiet)
    else:
        def choose():  # rank 0 names the run directory for every rank
            chosen = out or unique_run_dir(Path("runs"), name)
            check_out_dir(chosen)
            return chosen

        run = open_run(distributed.decided_by_rank0(choose, share=True), cfg, quiet=quiet)
    if not quiet:
        print(f"run directory: {run.run_dir}", file=sys.stderr)
        print(run.circuit, file=sys.stderr)
        if world.distributed or run.cfg.lr_batch:
            print(f"{world.size} process{'es' if world.distributed else ''} on {run.device.type}: global batch "
                  f"{run.global_batch} ({run.cfg.batch_size} per process), lr {run.lr:g}"
                  + (f" (= {run.cfg.lr:g} x {run.global_batch}/{run.cfg.lr_batch}, the linear scaling rule)"
                     if run.cfg.lr_batch else " (as given; --lr-batch N scales it with the global batch)"),
                  file=sys.stderr)

    def request_stop(signum, frame):
        run.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    previous = signal.signal(signal.SIGINT, request_stop), signal.signal(signal.SIGTERM, request_stop)
    try:
        m = run.train()
    except RunInterrupted as e:
        if world.writer:
            print(f"\n{e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of the current epoch
        if (run.run_dir / "last.pt").exists():
            kept = "keeps the checkpoint of its last finished epoch; continue it"
        else:
            kept = "has no checkpoint yet (no epoch had finished); start it again from the beginning"
        print(f"\nstopped at once; {run.run_dir} {kept} with --resume {run.run_dir}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    if not world.writer:
        return 0
    for path in plot_run(run.run_dir):
        print(f"wrote {path}", file=sys.stderr)
    if m is not None:
        print(f"final: test top-1 {m['test_acc']:.2f}%  top-5 {m['test_top5']:.2f}%  "
              f"mean W-Bᵀ angle {_degrees(m['mean_angle'])}  ({run.run_dir})")
    return 0


# -- evaluate.py ----------------------------------------------------------------------------------

EVAL_USAGE = """usage: evaluate.py RUN_DIR [--data NAME_OR_PATH] [--last] [--split test|all] [--data-dir DIR]
                   [--val-per-class N] [--device DEV] [--json PATH]

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


def evaluate(argv: list[str]) -> int:
    import json
    import re

    import torch

    from neurosim import stream as streaming
    from neurosim.checkpoint import load_checkpoint
    from neurosim.config import RunConfig
    from neurosim.data import DATASET_NAMES, BatchStream, load_dataset
    from neurosim.files import write_atomic
    from neurosim.train import build_circuit, evaluate_stream, loss_function, resolve_device

    if not argv or wants_help(argv):
        print(EVAL_USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0].startswith("--"):
        raise UserError(f"the first argument is the run directory, not the option {argv[0]}\n{EVAL_USAGE}")
    run_dir, opts = Path(argv[0]), {"--data": None, "--split": None, "--data-dir": None, "--val-per-class": None,
                                    "--device": "auto", "--json": None}
    which, i, rest = "best", 0, argv[1:]
    while i < len(rest):
        if rest[i] == "--last":
            which, i = "last", i + 1
        elif rest[i] in opts:
            if i + 1 >= len(rest) or not rest[i + 1]:
                raise UserError(f"option {rest[i]} needs a value")
            opts[rest[i]], i = rest[i + 1], i + 2
        else:
            raise UserError(f"unexpected argument {rest[i]!r}\n{EVAL_USAGE}")
    split = opts["--split"]
    if split not in (None, "test", "all"):
        raise UserError(f"--split must be test or all, not {split!r}")
    if opts["--val-per-class"] is not None and not opts["--val-per-class"].isdigit():
        raise UserError(f"--val-per-class takes a whole number, not {opts['--val-per-class']!r}")
    check_device(opts["--device"])
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
    val = int(opts["--val-per-class"]) if opts["--val-per-class"] is not None else (
        0 if split == "all" and is_folder else cfg.val_per_class)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", Path(spec).name if is_folder else spec).strip("_")
    out = Path(opts["--json"] or run_dir / f"eval-{slug}-{which}.json")
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
    m = evaluate_stream(circuit, circuit, stream, loss_function(cfg.loss))
    result = {"run": str(run_dir), "checkpoint": which, "epoch": state["epoch"], "data": spec, "split": split, **m}
    # Through a temporary file and a rename; the temporary file never outlives a failure.
    write_atomic(out, (json.dumps(result, indent=2) + "\n").encode(), what="evaluation result")
    print(f"{cfg.preset} ({which}, epoch {state['epoch']}) on {spec} [{split}, {m['images']} images]: "
          f"top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  -> {out}")
    return 0
