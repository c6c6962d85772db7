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
    from neurosim.config import parse_overrides, preset
    from neurosim.plots import plot_run
    from neurosim.train import RunInterrupted, open_run, resume_run

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\nPresets: " + " ".join(sorted(__import__("neurosim.config").config.PRESETS)))
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

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        m = run.train()
    except RunInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
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
