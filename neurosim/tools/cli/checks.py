"""Checks of what a command is asked, made before it loads data or writes anything: where a
run or a study goes, the device it names, and whether the run fits in that device's memory."""

from __future__ import annotations

import os
import time
from pathlib import Path

from neurosim.common.errors import UserError


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
    from neurosim.training.config import device_problem

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


def check_budget(cfg, given=()) -> None:
    """Refuse a run that cannot fit in the memory of its device, naming the setting that makes it
    too large (``neurosim.tools.cli.budget``); ``given``: the settings the user gave. None (a run to
    continue whose configuration is missing) passes: resuming it says what is missing."""
    if cfg is None:
        return
    from neurosim.tools.cli import budget

    budget.check_budget(cfg, given)
