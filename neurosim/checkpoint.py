"""Checkpoints written atomically: a finished checkpoint is never lost or half-written."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from neurosim.errors import UserError


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` to ``path`` via a temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint (tensors and plain data only: no pickled objects are executed)."""
    path = Path(path)
    if not path.exists():
        where = path.parent
        hint = "" if where.exists() else f" ({where} does not exist)"
        raise UserError(f"no checkpoint {path}{hint}; give the directory of a run that finished at least "
                        f"one epoch or was interrupted")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != 1 or "config" not in state:
        raise UserError(f"{path} is not a neurosim checkpoint")
    return state
