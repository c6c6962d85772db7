"""Checkpoints written atomically and verified when read.

A finished checkpoint is never lost or half-written (``write_atomic``), and one damaged on disk
afterwards is recognised: every checkpoint carries a digest of its contents (each tensor's
dtype, shape and bytes, and every plain value), recomputed on load.

A training run does not wait for its checkpoints: ``CheckpointWriter`` copies the state into
host buffers and hashes, serialises and writes it in a background thread, one commit at a time.
Its buffers (a copy of the state, and the serialised file) are kept from one save to the next:
about twice the checkpoint's size in host memory.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import pickle
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import attrs
import numpy as np
import torch

from neurosim.common.errors import UserError
from neurosim.common.files import write_atomic

FORMAT = 1


def state_digest(state) -> str:
    """A digest of a checkpoint's contents, independent of how ``torch.save`` lays them out."""
    h = hashlib.blake2b(digest_size=16)

    def walk(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():  # hashed in place: a copy of every tensor's bytes costs as much as the hash
                h.update(t.reshape(-1).view(torch.uint8).numpy())
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


def checkpoint_bytes(state: dict, into: io.BytesIO | None = None) -> memoryview:
    """The contents of a checkpoint file holding ``state`` and its digest.

    ``into``: a buffer to write them over, kept from one checkpoint to the next (a buffer grown
    afresh costs as much again as the serialisation). Release the view before reusing it."""
    buf = io.BytesIO() if into is None else into
    buf.seek(0)
    torch.save({**state, "digest": state_digest(state)}, buf)
    buf.truncate()
    return buf.getbuffer()  # the serialised bytes themselves, not a second copy of them


def save_checkpoint(state: dict, path: Path) -> None:
    """Write ``state`` with its digest to ``path`` (temporary file, fsync, atomic rename)."""
    write_checkpoint(checkpoint_bytes(state), path)


def write_checkpoint(data: bytes | memoryview, path: Path) -> None:
    """Write serialised checkpoint contents (``checkpoint_bytes``) to ``path`` atomically."""
    write_atomic(Path(path), data, what="checkpoint")


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


def committed_records(path: Path) -> list[dict] | None:
    """The metrics records a checkpoint holds (its committed epochs, without timings), or None
    where the file is missing, cannot be read or predates them.

    For readers of a run's files (figures): the file is mapped, not read (no tensor's bytes are
    touched), and not verified; resuming verifies it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, damaged or foreign: the figures are drawn from metrics.jsonl alone
        return None
    records = state.get("metrics") if isinstance(state, dict) else None
    if not isinstance(records, list) or not all(isinstance(r, dict) and "epoch" in r for r in records):
        return None
    return records


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


@attrs.define(eq=False)
class CheckpointWriter:
    """Writes a run's checkpoints in a background thread, so that training goes on meanwhile.

    ``snapshot(state)`` copies every tensor of a state into host buffers kept from one save to
    the next (pinned memory for CUDA tensors: one asynchronous copy each and a single
    synchronisation), so the caller may change its weights at once. ``start(commit)`` runs a
    commit (hash, serialise, write the files in their order) in a thread of its own. Commits
    never overlap and keep their order: ``start`` and ``flush`` first wait for the one in
    progress and raise its error (a full disk's ``UserError``), so no error is lost and no
    file of a later commit is written after a failed one. ``wait`` waits without raising and
    hands the error back, for a caller that is already stopping for another reason.
    """

    pinned: bool = False  # copy CUDA tensors into page-locked memory (fast, asynchronous copies)
    _buffers: dict = attrs.field(factory=dict, init=False)
    _file: io.BytesIO = attrs.field(factory=io.BytesIO, init=False)  # the serialised checkpoint
    _thread: threading.Thread | None = attrs.field(default=None, init=False)
    _error: BaseException | None = attrs.field(default=None, init=False)

    @property
    def busy(self) -> bool:
        """Whether a commit is still being written."""
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self, state):
        """A copy of ``state`` that stays as it is while the original goes on changing.

        Waits for the commit in progress first: it may still be reading the buffers."""
        self.flush()
        devices = set()
        copies = self._copy(state, (), devices)
        for device in devices:
            torch.cuda.synchronize(device)  # the one wait for every device-to-host copy above
        return copies

    @contextlib.contextmanager
    def serialised(self, state):
        """The contents of the checkpoint file of ``state`` (``checkpoint_bytes``), in a buffer
        kept from one commit to the next; valid inside the ``with`` block."""
        data = checkpoint_bytes(state, self._file)
        try:
            yield data
        finally:
            data.release()  # even if an error's traceback still refers to it: the buffer is reusable

    def start(self, commit: Callable[[], None]) -> None:
        """Run ``commit`` in the background, after the commit before it has finished."""
        self.flush()
        self._thread = threading.Thread(target=self._run, args=(commit,), name="checkpoint-writer")
        self._thread.start()

    def flush(self) -> None:
        """Wait for the commit in progress; raise its error, if it failed."""
        error = self.wait()
        if error is not None:
            raise error

    def wait(self) -> BaseException | None:
        """Wait for the commit in progress and return its error (once), or None."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        return error

    def _run(self, commit: Callable[[], None]) -> None:
        try:
            commit()
        except BaseException as e:  # handed to the training thread by flush or wait
            self._error = e

    def _copy(self, value, path: tuple, devices: set):
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value.detach(), path, devices)
        if isinstance(value, dict):
            out = copy.copy(value)  # the same kind of dict (a scheduler's milestones are a Counter)
            for key in value:
                out[key] = self._copy(value[key], (*path, key), devices)
            return out
        if type(value) in (list, tuple):
            return type(value)(self._copy(v, (*path, i), devices) for i, v in enumerate(value))
        if value is None or isinstance(value, (bool, int, float, str, bytes)):
            return value
        return copy.deepcopy(value)

    def _copy_tensor(self, t: torch.Tensor, path: tuple, devices: set) -> torch.Tensor:
        layout = (t.shape, t.stride(), t.dtype)
        kept = self._buffers.get(path)
        if kept is None or kept[0] != layout:
            # The tensor's own strides (channels_last stays channels_last in the file).
            buffer = torch.empty_like(t, device="cpu", pin_memory=self.pinned and t.is_cuda)
            kept = self._buffers[path] = (layout, buffer)
        buffer = kept[1]
        if t.device.type == "cpu" and t.is_contiguous() and buffer.is_contiguous():
            # Byte for byte on one thread: the copy is bound by memory bandwidth, which one core
            # nearly fills, and torch's parallel copy only adds barrier waits when the cores are
            # shared (171 MiB: 230 ms against 27 ms on a loaded 2-core machine).
            np.copyto(_bytes(buffer), _bytes(t))
            return buffer
        asynchronous = t.is_cuda and buffer.is_pinned()
        buffer.copy_(t, non_blocking=asynchronous)
        if asynchronous:
            devices.add(t.device)
        return buffer


def _bytes(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous CPU tensor, as a NumPy array sharing its memory."""
    return t.reshape(-1).view(torch.uint8).numpy()
