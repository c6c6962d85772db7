"""How long checkpointing holds up the training loop: a full-width ResNet-18 saved at an epoch's end.

    python benchmarks/checkpoint_time.py --reps 5 --threads 2
    python benchmarks/checkpoint_time.py --root /tmp/before   # another checkout, timed alike

A run of the preset (``kp_resnet18``, width 1, CIFAR-100's shape: 3×32×32 images, 100 classes;
random images, since nothing timed depends on them) takes one engaged step, so that its
optimizer holds momentum buffers and the checkpoint its full size, and then, ``--reps`` times:
one step (the weights change), ``Run.save(best=True, metrics=...)`` as the end of an improving
epoch calls it (``best.pt``, the monitor files, the metrics line, ``last.pt``), ``--steps``
steps with the commit in the background, and ``Run.flush()``. Timed, medians and min..max:

- blocked: how long ``save`` keeps the loop from its next step;
- commit: from the start of ``save`` until the commit is on disk, i.e. what ``save`` cost
  when it wrote every file before it returned (a checkout whose ``save`` does that, run with
  ``--root``, shows its whole cost as blocked and none in the background);
- the steps taken while the commit is written against as many steps with nothing in the
  background (the writer thread shares the machine's cores with training);
- the parts of a commit, each on its own: the state's digest, ``torch.save`` into a new
  buffer, one file's atomic write (temporary file, fsync, rename), the monitor's files, and
  where the checkout has a ``CheckpointWriter``, its digest and ``torch.save`` into the buffer
  it keeps, and its snapshot copy;
- how long a thread that only wants to run Python waits while a commit is written: the
  writer holds Python's interpreter lock in stretches (``lock_held``).

Prints a Markdown table and the machine (CPU model, load average before and after, torch).
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="kp_resnet18")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch", type=int, default=16, help="batch of the steps taken between saves")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=2, help="steps timed with a commit in the background")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dir", default=None, help="where the run directory goes (default: a temporary one)")
    p.add_argument("--root", default=str(ROOT), help="the checkout whose neurosim is timed")
    return p.parse_args(argv)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def summary(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.0f} | {min(ms):.0f}..{max(ms):.0f}"


def state_bytes(state) -> int:
    import torch

    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def build_run(args, run_dir: Path):
    import torch

    from neurosim.data import ImageData
    from neurosim.training.config import preset
    from neurosim.training.run import Run

    g = torch.Generator().manual_seed(0)
    n_train, n_test = 256, 64  # enough for the monitor's 128-image probe

    def images(n):
        return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                torch.randint(0, args.classes, (n,), generator=g))

    data = ImageData("random", *images(n_train), *images(n_test), tuple(f"class{i}" for i in range(args.classes)),
                     (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    cfg = preset(args.preset, device="cpu", width=args.width, batch_size=args.batch, data="synthetic", epochs=1)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Run(cfg, run_dir, data=data, quiet=True)


def step(run, batches) -> None:
    x, y = next(batches)
    run.engaged_step(x, y)


def lock_held(run, writer, reps: int) -> tuple[list[float], list[float]]:
    """How long a thread that only wants to run Python waits while a commit is written.

    The writer shares Python's interpreter lock with the training loop: a loop that launches
    GPU work cannot launch while the writer holds it (torch.save copies each tensor under it).
    The interpreter hands the lock over every 5 ms to a thread that asks, so waits above that
    are the writer's (or, on a shared machine, other processes')."""
    longest, total = [], []
    for rep in range(reps):
        run.save(best=True, metrics={"epoch": 200 + rep, "test_acc": 0.0, "angles": {}})
        waits, last = [], time.perf_counter()
        while writer.busy:
            time.sleep(0)  # asks for the lock, like the next operation of a training step
            now = time.perf_counter()
            waits.append(now - last)
            last = now
        run.flush()
        longest.append(max(waits, default=0.0))
        total.append(sum(w for w in waits if w > 0.005))
    return longest, total


def main(argv=None) -> None:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(args.root).resolve()))
    import torch

    import neurosim
    from neurosim.common.files import write_atomic
    from neurosim.training import checkpoint

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = datetime.datetime.now(datetime.timezone.utc)
    tmp = tempfile.TemporaryDirectory(dir=args.dir)
    run = build_run(args, Path(tmp.name) / "run")
    flush = getattr(run, "flush", lambda: None)  # a checkout that writes before save returns has none

    def endless():
        epoch = 0
        while True:
            yield from run.train_stream.epoch(epoch)
            epoch += 1

    batches = endless()
    step(run, batches)  # momentum buffers exist from here on: the checkpoint's full size
    run.save(best=True, metrics={"epoch": 0, "test_acc": 0.0, "angles": {}})  # warm-up: buffers, files
    flush()

    blocked, with_commit, without = [], [], []
    for rep in range(args.reps):
        step(run, batches)
        t0 = time.perf_counter()
        run.save(best=True, metrics={"epoch": rep + 1, "test_acc": float(rep), "angles": {}})
        t1 = time.perf_counter()
        for _ in range(args.steps):
            step(run, batches)
        t2 = time.perf_counter()
        flush()
        blocked.append(t1 - t0)
        with_commit.append(t2 - t1)
        t3 = time.perf_counter()
        for _ in range(args.steps):
            step(run, batches)
        without.append(time.perf_counter() - t3)
    # The whole commit, timed on its own: save, then at once wait for its files.
    commit = []
    for rep in range(args.reps):
        t0 = time.perf_counter()
        run.save(best=True, metrics={"epoch": 100 + rep, "test_acc": 0.0, "angles": {}})
        flush()
        commit.append(time.perf_counter() - t0)

    state = run.state_dict()
    parts = {"digest": [], "torch.save into a new buffer": [], "one file written (fsync, rename)": [], "monitor files": []}
    for _ in range(args.reps):
        t0 = time.perf_counter()
        digest = checkpoint.state_digest(state)
        t1 = time.perf_counter()
        buf = io.BytesIO()
        torch.save({**state, "digest": digest}, buf)
        t2 = time.perf_counter()
        write_atomic(Path(tmp.name) / "part.pt", buf.getbuffer(), what="checkpoint")
        t3 = time.perf_counter()
        if run.monitor is not None:
            run.monitor.flush(run.run_dir)
        t4 = time.perf_counter()
        parts["digest"].append(t1 - t0)
        parts["torch.save into a new buffer"].append(t2 - t1)
        parts["one file written (fsync, rename)"].append(t3 - t2)
        parts["monitor files"].append(t4 - t3)
    writer = getattr(run, "checkpoint_writer", None)
    if writer is not None:
        snap, kept = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            writer.snapshot(state)
            t1 = time.perf_counter()
            with writer.serialised(state):
                t2 = time.perf_counter()
            snap.append(t1 - t0)
            kept.append(t2 - t1)
        parts["digest and torch.save into the writer's kept buffer"] = kept
        parts["snapshot copy (reused buffers)"] = snap
    held = lock_held(run, writer, args.reps) if writer is not None else None
    load_after = os.getloadavg()
    tmp.cleanup()

    print(f"neurosim from {Path(neurosim.__file__).resolve().parent}")
    print(f"{args.preset}, width {args.width:g}, {args.classes} classes, checkpoint "
          f"{state_bytes(state) / 2**20:.1f} MiB of tensors; steps of batch {args.batch}; {args.reps} reps")
    print(f"{started:%Y-%m-%d %H:%M} UTC, {cpu_model()}, {os.cpu_count()} logical CPUs, {args.threads} torch threads, "
          f"torch {torch.__version__}, Python {platform.python_version()}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print()
    print("| measure | ms (median) | min..max |")
    print("| --- | --- | --- |")
    print(f"| save: training loop blocked | {summary(blocked)} |")
    print(f"| save until its files are on disk (flush at once) | {summary(commit)} |")
    print(f"| {args.steps} steps while a commit is written | {summary(with_commit)} |")
    print(f"| {args.steps} steps with nothing in the background | {summary(without)} |")
    for name, values in parts.items():
        print(f"| part: {name} | {summary(values)} |")
    if held is not None:
        longest, total = held
        print(f"| training thread kept waiting during a commit: longest wait | {summary(longest)} |")
        print(f"| training thread kept waiting during a commit: waits over 5 ms, summed | {summary(total)} |")


if __name__ == "__main__":
    main()
