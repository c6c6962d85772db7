"""Checkpoints written atomically and verified when read.

A finished checkpoint is never lost or half-written (``write_atomic``), and one damaged on disk
afterwards is recognised: every checkpoint carries a digest of its contents (each tensor's
dtype, shape and bytes, and every plain value), recomputed on load.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
from pathlib import Path

import torch

from neurosim.errors import UserError
from neurosim.files import write_atomic

FORMAT = 1


def state_digest(state) -> str:
    """A digest of a checkpoint's contents, independent of how ``torch.save`` lays them out."""
    h = hashlib.blake2b(digest_size=16)

    def walk(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(v, dict):
            h.update(f"D{len(v)}".encode())
            for k in sorted(v, key=repr):
                h.update(repr(k).encode())
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"L{len(v)}".encode())
            for x in v:
                walk(x)
        else:
            h.update(f"V{v!r}".encode())

    walk(state)
    return h.hexdigest()


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` with its digest to ``path`` (temporary file, fsync, atomic rename)."""
    buf = io.BytesIO()
    torch.save({**state, "digest": state_digest(state)}, buf)
    write_atomic(Path(path), buf.getvalue(), what="checkpoint")


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Read and verify a checkpoint (tensors and plain data only: no pickled code is run)."""
    path = Path(path)
    if not path.exists():
        where = path.parent
        hint = "" if where.exists() else f" ({where} does not exist)"
        raise UserError(f"no checkpoint {path}{hint}; give the directory of a run that finished at least "
                        f"one epoch or was interrupted")
    state, problem = _read(path, map_location)
    if problem is not None:
        raise UserError(f"checkpoint {path} {problem}.{_alternatives(path)}")
    return state


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with the checkpoint file at ``path``, in words, or None if it is sound."""
    return _read(Path(path))[1]


def _read(path: Path, map_location="cpu") -> tuple[dict | None, str | None]:
    try:
        if path.stat().st_size == 0:
            return None, "is empty (0 bytes): its writing was cut short"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's remarks on foreign pickles: the verdict follows
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            return None, "holds objects other than tensors and plain data; it was not written by neurosim"
        return None, "is damaged or not a checkpoint: it cannot be read as one"
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    except Exception as e:  # a truncated or foreign file: zip or pickle structure broken
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = f" ({first[:160]})" if any(c.isalpha() for c in first) else ""
        return None, f"is damaged or not a checkpoint: it cannot be read as one{why}"
    if not isinstance(state, dict) or state.get("format") != FORMAT or "config" not in state:
        return None, "is not a neurosim checkpoint"
    digest = state.pop("digest", None)
    if digest is not None and digest != state_digest(state):
        return None, "is damaged: its contents no longer match the digest written with them"
    return state, None  # (a checkpoint without a digest predates them)


def _alternatives(path: Path) -> str:
    """Name the run's other checkpoint if it is sound, and how to continue from it."""
    other = path.with_name("best.pt" if path.name == "last.pt" else "last.pt")
    if not other.exists() or checkpoint_problem(other) is not None:
        return ""
    epoch = _read(other)[0].get("epoch")
    how = (f" To continue from it: cp {other} {path} and resume" if path.name == "last.pt"
           else " evaluate.py --last reads it")
    return f" {other.name} in the same run (epoch {epoch}) is intact.{how}."
