"""What a run reports as it goes: the metrics file, TensorBoard, its header, progress lines and epoch
summaries."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from neurosim.common.console import FILE_FIRST, FILE_PERIOD, TERMINAL_PERIOD, Console, hms
from neurosim.common.errors import UserError
from neurosim.common.files import write_atomic


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


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else ""


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


# Fields of a record that measure the machine, not the run: they differ between two runs that
# are otherwise bit for bit the same, so a checkpoint keeps its records without them.
TIMING = ("time_s", "images_per_s")


def without_timing(record: dict) -> dict:
    """An epoch record without its ``TIMING`` fields, as a checkpoint keeps it."""
    return {k: v for k, v in record.items() if k not in TIMING}


def merged_records(committed: list[dict], found: list[dict]) -> tuple[list[dict], list[int], list[int]]:
    """The records of the epochs a checkpoint committed, each taken from ``metrics.jsonl``
    (``found``) where the file holds it unchanged (with its timings), else from the checkpoint's
    copy (``committed``, without timings); and the epochs the file had ``lost`` and those it
    held ``altered``. Records of later epochs in the file (a commit cut short) are left out."""
    in_file = {r.get("epoch"): r for r in found}
    records, lost, altered = [], [], []
    for c in committed:
        f = in_file.get(c["epoch"])
        if f is not None and _null_for_non_finite(without_timing(f)) == _null_for_non_finite(without_timing(c)):
            # The file's line as it is (its order, its timings), with the checkpoint's values,
            # whose undefined ones are NaN as in a run that never stopped (the file has null).
            records.append({k: c.get(k, v) for k, v in f.items()})
            continue
        (lost if f is None else altered).append(c["epoch"])
        records.append(c)
    return records, lost, altered


def epoch_list(epochs: list[int]) -> str:
    """``epoch 3`` or ``epochs 0–2, 5``."""
    spans = []
    for e in epochs:
        if spans and e == spans[-1][1] + 1:
            spans[-1][1] = e
        else:
            spans.append([e, e])
    text = ", ".join(f"{a}–{b}" if b > a + 1 else f"{a}, {b}" if b > a else f"{a}" for a, b in spans)
    return f"epoch{'s' if len(epochs) > 1 else ''} {text}"


class RunLog:
    """The records of one run directory: its metrics (``metrics.jsonl``, TensorBoard) and what
    it prints (``Console``: the terminal and ``log.txt``). ``quiet`` silences the terminal, not
    the files; ``writer``: this process writes the run's files (rank 0 under torchrun)."""

    def __init__(self, run_dir: Path, quiet: bool = False, writer: bool = True):
        self.run_dir = Path(run_dir)
        self.console = Console(self.run_dir / "log.txt", quiet, writer)
        self._writer = None
        self._writer_opened = False
        self._t0 = self._shown = self._logged = 0.0
        self._lines = 0  # progress lines written to the log this epoch
        self._start = 0
        self._evaluation_t0 = 0.0
        self._trained = False  # whether an epoch has started: an evaluation before is of the untrained circuit
        self._evaluation_s = None  # how long the last evaluation took
        # Said once when the run's ETA passes a day: how to make it fit (set by the command line).
        self.slow_hint: str | None = None
        self._hinted = False

    @property
    def quiet(self) -> bool:
        return self.console.quiet

    @quiet.setter
    def quiet(self, value: bool) -> None:
        self.console.quiet = value

    def say(self, text: str, stream=None, always: bool = False) -> None:
        """Print a line (unless quiet; ``always``: even then) and keep it in ``log.txt``."""
        self.console.say(text, stream, always)

    def keep(self, text: str) -> None:
        """Keep a line in ``log.txt`` without printing it."""
        self.console.keep(text)

    def report(self, what: str, done: int, total: int, unit: str = "") -> None:
        """Progress of loading data: decoding, caching (see ``Console.report``)."""
        self.console.report(what, done, total, unit)

    def evaluating(self, done: int, total: int) -> None:
        """Progress of an evaluation, in batches; its duration counts in the run's ETA."""
        now = time.perf_counter()
        if done == 0:
            self._evaluation_t0 = now
        elif done >= total:
            self._evaluation_s = now - self._evaluation_t0
        what = "evaluating the test split" + ("" if self._trained else " before training")
        self.console.report(what, done, total, " batches")

    def metrics(self, path: Path, m: dict, earlier=()) -> None:
        """Write the metrics file, the ``earlier`` epochs' records and then ``m``'s, and ``m``'s
        TensorBoard scalars.

        The whole file is replaced (temporary file, fsync, rename), not appended to: lines lost
        meanwhile (the file truncated, emptied or deleted while the run trained) come back, a
        half-written line is never left, and a full disk names the file."""
        text = "".join(metrics_line(r) for r in (*earlier, m))
        write_atomic(path, text.encode(), what="metrics")
        def scalars(writer):
            for key, value in m.items():
                if isinstance(value, float):
                    writer.add_scalar(key, value, m["epoch"])
            for name, angle in m["angles"].items():
                writer.add_scalar(f"angle/{name}", angle, m["epoch"])

        self.to_tensorboard(scalars)

    def tensorboard_available(self) -> bool:
        """Whether this process writes TensorBoard records (tensorboard installed, the writer
        rank, and no failure so far); does not open the writer."""
        if self._writer_opened:
            return self._writer is not None
        if not self.console.writer:
            return False
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            return False
        return True

    def tensorboard(self):
        """A TensorBoard writer into ``run_dir/tensorboard`` when tensorboard is installed, else None
        (also after a failure to open or write it, which ``to_tensorboard`` says once)."""
        if not self._writer_opened:
            self._writer_opened = True
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass
            else:
                try:
                    self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
                except Exception as e:  # an unwritable place: the run goes on without TensorBoard
                    self._tensorboard_failed(e)
        return self._writer

    def to_tensorboard(self, write) -> bool:
        """Call ``write(writer)`` and flush, if TensorBoard records are written; returns whether
        they were. A failure (a full disk, an unwritable folder, the writer's thread gone) is said
        in one line and ends the run's TensorBoard records; the run goes on."""
        writer = self.tensorboard()
        if writer is None:
            return False
        try:
            write(writer)
            writer.flush()
        except Exception as e:
            self._tensorboard_failed(e)
            return False
        return True

    def _tensorboard_failed(self, e: Exception) -> None:
        writer, self._writer = self._writer, None
        self.say(f"warning: cannot write TensorBoard records into {self.run_dir / 'tensorboard'} "
                 f"({type(e).__name__}: {_first_line(e)}); the run goes on without them")
        if writer is not None:
            try:
                writer.close()
            except Exception:
                pass

    def start_epoch(self, start: int, t0: float) -> None:
        """An epoch (re)starts at batch ``start`` at time ``t0``."""
        self._t0 = self._shown = self._logged = t0
        self._start = start
        self._lines = 0
        self._trained = True

    def after_batch(self, epoch: int, epochs: int, batch: int, total: int, stats: torch.Tensor, seen: int,
                    batch_size: int, log_every: int) -> None:
        """A progress line every ``log_every`` batches, or by time when that is 0: redrawn twice a
        second on a terminal; in a file a few seconds into the epoch, then every 30 s. Each line
        costs a host sync, so they are never more frequent than that."""
        if not self.console.writer:
            return
        now = time.perf_counter()
        if log_every:
            to_terminal = to_file = batch % log_every == 0
        else:
            to_terminal = now - self._shown >= TERMINAL_PERIOD
            to_file = now - self._logged >= (FILE_PERIOD if self._lines else FILE_FIRST)
        to_terminal = to_terminal and self.console.terminal
        if not (to_terminal or to_file):
            return
        line, run_eta = self.progress(epoch, epochs, batch, total, stats, seen, batch_size)
        self.console.periodic(line, to_terminal, to_file)
        self._shown = now if to_terminal else self._shown
        if to_file:
            self._logged, self._lines = now, self._lines + 1
        if self.slow_hint and not self._hinted and run_eta > 86400 and now - self._t0 >= FILE_FIRST:
            self._hinted = True
            self.say(f"note: at this pace the whole run takes {hms(run_eta)}; {self.slow_hint}")

    def progress(self, epoch: int, epochs: int, batch: int, total: int, stats: torch.Tensor, seen: int,
                 batch_size: int) -> tuple[str, float]:
        """The progress line, and the seconds left in the whole run: the rest of this epoch and
        of the epochs after it at this epoch's pace, and an evaluation at the end of each."""
        (loss_sum, correct), n = stats.tolist(), seen  # one host sync per progress line
        done = batch - self._start
        rate = done / max(time.perf_counter() - self._t0, 1e-9)  # batches per second
        epoch_eta = (total - batch) / max(rate, 1e-9)
        run_eta = epoch_eta + (epochs - epoch - 1) * total / max(rate, 1e-9) + (
            (epochs - epoch) * self._evaluation_s if self._evaluation_s else 0.0)
        line = (f"epoch {epoch + 1}/{epochs} [{batch:>{len(str(total))}}/{total}]"
                f" loss {loss_sum / max(n, 1):.4f} acc {100 * correct / max(n, 1):.2f}%"
                f" {rate * batch_size:.0f} img/s  ETA epoch {hms(epoch_eta)}, run {hms(run_eta)}")
        return line, run_eta

    def epoch_summary(self, epoch: int, epochs: int, m: dict) -> None:
        self.say(f"epoch {epoch}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.2f}%"
                 f"  test loss {m['test_loss']:.4f} top1 {m['test_acc']:.2f}% top5 {m['test_top5']:.2f}%"
                 f"  mean angle {m['mean_angle']:.1f}°  {m['images_per_s']:.0f} img/s".replace("nan°", "n/a"))


def weight_counts(circuit) -> tuple[int, int]:
    """``(forward, feedback)``: the circuit's trainable parameters other than feedback weights
    (W, biases, norms), and the entries of its feedback weights (B, learned or fixed)."""
    feedback = sum(t.numel() for name, t in [*circuit.named_parameters(), *circuit.named_buffers()]
                   if name.endswith(".feedback") and t.dim() > 0)
    forward = sum(p.numel() for name, p in circuit.named_parameters() if not name.endswith(".feedback"))
    return forward, feedback


def device_label(device: torch.device) -> str:
    """``cpu (2 threads)`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    threads = torch.get_num_threads()
    return f"{device.type} ({threads} thread{'s' if threads != 1 else ''})"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def run_header(run) -> str:
    """The line a run starts with: preset, device, size of the circuit, the data, how long, and
    where it writes (``run`` a ``neurosim.training.run.Run``)."""
    cfg, data = run.cfg, run.data
    forward, feedback = weight_counts(run.circuit)
    if run.streamed:
        train, test = len(data.train[0]), len(data.val[0])
    else:
        train, test = len(data.train_y), len(data.test_y)
    shape = "×".join(map(str, data.image_shape))
    processes = f"{run.world.size} processes on " if run.world.distributed else ""
    steps = len(run.train_stream)
    at = f", from epoch {run.epoch + 1}" + (f" batch {run.batch + 1}" if run.batch else "") if run.epoch or run.batch \
        else ""
    return (f"{cfg.preset} on {processes}{device_label(run.device)}: {_millions(forward)} weights"
            + (f" + {_millions(feedback)} feedback" if feedback else "")
            + f", {data.name} ({train:,} training + {test:,} test images, {shape}, {data.num_classes} classes), "
            f"{cfg.epochs} epoch{'s' if cfg.epochs != 1 else ''} of {steps:,} steps{at} -> {run.run_dir}")
