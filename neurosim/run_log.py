"""What a run reports as it goes: the metrics file, TensorBoard, progress lines and epoch summaries."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from neurosim.errors import UserError


def metrics_line(m: dict) -> str:
    """One epoch's record as a line of strict JSON: a value that is not a finite number (the
    W–Bᵀ angle of a synapse without a feedback matrix is NaN) is written ``null``, which every
    JSON reader accepts; ``NaN`` and ``Infinity`` are not JSON."""
    return json.dumps(_null_for_non_finite(m), allow_nan=False) + "\n"


def _null_for_non_finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _null_for_non_finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_null_for_non_finite(v) for v in value]
    return value


def _undefined(constant: str) -> None:
    """``NaN`` (or ``Infinity``) in a file written before undefined values were ``null``."""
    return None


def nan_for_null(record: dict) -> dict:
    """A record read from ``metrics.jsonl`` with its undefined values (``null``) as NaN, for
    readers that compute or draw with them."""
    return {k: (math.nan if v is None else nan_for_null(v) if isinstance(v, dict) else v)
            for k, v in record.items()}


def metrics_records(path: Path) -> list[dict]:
    """The epoch records of a ``metrics.jsonl``, in order. An undefined value is ``None``: it is
    written ``null``, and files written before that hold ``NaN``, which loads as ``None`` too.
    ``nan_for_null`` turns a record's ``None`` into NaN.

    A last line without its newline is what a run killed while writing leaves: it is ignored
    when it is not a whole record. Any other bad line is a ``UserError`` naming its (1-based)
    number."""
    lines = Path(path).read_bytes().split(b"\n")
    partial = lines.pop()  # b"" when the file ends with a newline
    records = []
    for number, raw in enumerate(lines, start=1):
        record = _metrics_record(path, number, raw)
        if record is not None:
            records.append(record)
    if partial.strip():
        try:
            records.append(_metrics_record(path, len(lines) + 1, partial))
        except UserError:
            pass  # cut short while being written
    return records


def _metrics_record(path: Path, number: int, raw: bytes) -> dict | None:
    """The record on line ``number`` of ``metrics.jsonl`` (None for a blank line)."""
    fix = "; the run writes one record per line: repair or delete that line"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} line {number} is not text{fix}") from None
    if not text.strip():
        return None
    try:
        record = json.loads(text, parse_constant=_undefined)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {number} is not a JSON record ({e.msg}, column {e.colno}){fix}") from None
    missing = [k for k in ("epoch", "test_acc", "angles") if not isinstance(record, dict) or k not in record]
    if missing or not isinstance(record["angles"], dict):
        raise UserError(f"{path} line {number} is not an epoch record (it lacks {', '.join(missing) or 'angles'})"
                        f"{fix}")
    return record


class RunLog:
    """The records of one run directory. ``quiet`` silences the terminal, not the files."""

    def __init__(self, run_dir: Path, quiet: bool = False):
        self.run_dir, self.quiet = Path(run_dir), quiet
        self._writer = None
        self._writer_opened = False
        self._t0 = self._shown = 0.0
        self._start = 0
        self._period = 30.0

    def metrics(self, path: Path, m: dict) -> None:
        """Append one epoch's metrics line (synced to disk) and its TensorBoard scalars."""
        with open(path, "a") as f:
            f.write(metrics_line(m))
            f.flush()
            os.fsync(f.fileno())
        writer = self.tensorboard()
        if writer is not None:
            for key, value in m.items():
                if isinstance(value, float):
                    writer.add_scalar(key, value, m["epoch"])
            for name, angle in m["angles"].items():
                writer.add_scalar(f"angle/{name}", angle, m["epoch"])
            writer.flush()

    def tensorboard(self):
        """A TensorBoard writer into the run directory when tensorboard is installed, else None."""
        if not self._writer_opened:
            self._writer_opened = True
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        return self._writer

    def start_epoch(self, start: int, t0: float) -> None:
        """An epoch (re)starts at batch ``start`` at time ``t0``."""
        # Progress lines cost a host sync each: by default at most one per half second on a
        # terminal, one per 30 s in a log file.
        self._period = 0.5 if sys.stderr.isatty() else 30.0
        self._t0 = self._shown = t0
        self._start = start

    def after_batch(self, epoch: int, epochs: int, batch: int, total: int, stats: torch.Tensor, seen: int,
                    batch_size: int, log_every: int) -> None:
        """A progress line every ``log_every`` batches, or on the time period when that is 0."""
        if self.quiet:
            return
        now = time.perf_counter()
        if (batch % log_every == 0) if log_every else (now - self._shown > self._period):
            self.progress(epoch, epochs, batch, total, stats, seen, batch_size)
            self._shown = now

    def progress(self, epoch: int, epochs: int, batch: int, total: int, stats: torch.Tensor, seen: int,
                 batch_size: int) -> None:
        (loss_sum, correct), n = stats.tolist(), seen  # one host sync per progress line
        done = batch - self._start
        rate = done / max(time.perf_counter() - self._t0, 1e-9)
        eta = (total - batch) / max(rate, 1e-9)
        line = (f"epoch {epoch + 1}/{epochs} [{batch:>{len(str(total))}}/{total}]"
                f" loss {loss_sum / max(n, 1):.4f} acc {100 * correct / max(n, 1):.2f}%"
                f" {rate * batch_size:.0f} img/s ETA {_hms(eta)}")
        end = "" if sys.stderr.isatty() else "\n"
        print("\r" + line if end == "" else line, end=end, file=sys.stderr, flush=True)

    def epoch_summary(self, epoch: int, epochs: int, m: dict) -> None:
        if self.quiet:
            return
        print(f"\repoch {epoch}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.2f}%"
              f"  test loss {m['test_loss']:.4f} top1 {m['test_acc']:.2f}% top5 {m['test_top5']:.2f}%"
              f"  mean angle {m['mean_angle']:.1f}°  {m['images_per_s']:.0f} img/s".replace("nan°", "n/a"),
              file=sys.stderr)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
