"""How a run was made: ``run.json`` in its directory, one entry for every start (the first, each
``--resume``), with the command line, the versions, the machine and the code.

``config.json`` says what the run trains; ``run.json`` says how it was started, so that the run
can be told apart from another and started again: the full command line and working directory,
neurosim, PyTorch and Python versions, thread count and device name, and the git commit of the
checkout neurosim was run from (none outside a checkout, or without git).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from neurosim.common.files import write_atomic

RECORD = "run.json"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The model of the device (``NVIDIA H100 80GB HBM3``, the CPU's model name)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    return _cpu_name()


def git_state(where: Path | None = None) -> dict:
    """``{"commit": …, "modified": …}`` of the git checkout holding ``where`` (neurosim's own
    source by default); both None when it is not in a checkout or git is not installed."""
    where = Path(where) if where is not None else Path(__file__).resolve().parent
    unknown = {"commit": None, "modified": None}

    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):  # no git, or it hangs
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return unknown
    changes = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "modified": None if changes is None else bool(changes.strip())}


def start_entry(run, argv: list[str]) -> dict:
    """The record of one start of ``run`` (a ``neurosim.training.run.Run``) by the arguments ``argv``."""
    world = run.world
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "arguments": list(argv),
        "cwd": os.getcwd(),
        "at": {"epoch": run.epoch, "batch": run.batch},
        "versions": {"neurosim": _version("neurosim"), "torch": torch.__version__,
                     "torchvision": _version("torchvision"), "numpy": _version("numpy"),
                     "python": platform.python_version()},
        "threads": torch.get_num_threads(),
        "device": str(run.device),
        "device_name": device_name(run.device),
        "processes": world.size,
        "host": platform.node(),
        "git": git_state(),
    }


def record_start(run, argv: list[str]) -> dict:
    """Add this start of ``run`` to its ``run.json`` (written whole, through a temporary file)."""
    path = Path(run.run_dir) / RECORD
    try:
        starts = json.loads(path.read_text())["starts"]
    except (OSError, ValueError, KeyError, TypeError):
        starts = []  # none yet, or unreadable: this start begins the record again
    entry = start_entry(run, argv)
    write_atomic(path, (json.dumps({"starts": [*starts, entry]}, indent=2) + "\n").encode(), what="run record")
    return entry
