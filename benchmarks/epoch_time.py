"""Wall-clock training epochs of a preset as users run it, against plain PyTorch on the same data.

    python benchmarks/epoch_time.py --variants kp,native --compile --device cuda --json epoch.json

Each *variant* trains for ``--epochs`` epochs (default 2) on the same device-resident images:

- a rule (``kp``, ``bp``, ``wm``, ...): the preset ``<rule>_<model>`` (default ``kp_resnet18``)
  through ``neurosim.training.run.Run``, exactly as ``experiments/run_circuit.py`` trains it: batches
  cut and augmented on the device (random crop with padding 4, horizontal flip), bf16 autocast
  and channels_last on CUDA, the preset's SGD (lr 0.1, momentum 0.9, weight decay 5e-4, batch
  128), its monitor (a record every 200 steps with a 128-image probe), the divergence watch,
  an evaluation of the test split, the alignment angles and the checkpoint (``last.pt`` and,
  when the accuracy improved, ``best.pt``) at every epoch's end; WM sleeps on its schedule.
- ``native``: the same ResNet (``benchmarks/native.py``: CIFAR stem, torchvision-style
  blocks; ``tests/test_native_baseline.py`` checks it computes what the circuit computes) in an
  ordinary PyTorch loop: ``zero_grad``, forward and cross-entropy under the same autocast,
  ``backward``, ``torch.optim.SGD`` with the preset's recipe, ``MultiStepLR``; the same batch
  streams (so the very same crops, flips and order), loss and accuracy summed on the device, an
  evaluation pass over the test split and a checkpoint (``torch.save`` of model, optimizer and
  scheduler, and ``best.pt`` when the accuracy improved) at every epoch's end.

The images: ``--train`` + ``--test`` random uint8 images of CIFAR-100's shape (default 50,000 +
10,000, 3×32×32, 100 classes) drawn on the device; image content does not change the time of
dense arithmetic. With ``--compile`` each variant's model is wrapped in ``torch.compile``
(``--compile-backend``, default inductor).

Per variant, in one process, one variant after the other (each freed before the next, so each
peak is its own):

1. **warm-up**: the training graph is compiled for a batch whose first dimension is marked
   dynamic, then a few steps that include the epoch's last, smaller batch (a guard on the
   batch size can still ask for one more graph there), the evaluation graph the same way, a
   whole evaluation; then the state from before the warm-up (weights, optimizer, position,
   random generators, the divergence watch) is restored through ``load_state_dict``. Without
   ``--compile`` this is cuDNN's algorithm search and the allocator's first use. Compile time
   per graph, from torch._dynamo's records (``compile_stats.py``), is reported.
   ``--no-warmup`` leaves it out: the first epoch then compiles as a user's first epoch does,
   and its row shows every graph and recompilation that costs.
2. **epochs**: ``--epochs`` epochs, each timed by the wall clock around the whole epoch
   (training, evaluation, checkpoint, monitor records; the first also holds the run's
   evaluation before training, and WM's sleep before training). Reported per epoch: wall
   seconds and images/s over it, the training time alone (``time_s``: every batch drawn,
   forward, feedback, local updates, SGD; synchronised at the end), graphs compiled during the
   epoch (recompiles), and on CUDA the peak memory allocated over the epoch and over its
   training steps alone (reset after every step, so a monitor record, the evaluation and the
   checkpoint are not in it). The last epoch is the headline: no compilation, nothing first.
3. the divergence watch: the first loss the run's watch holds must be the loss of the run's
   own first step, not one of the warm-up's (``watch.fresh``).

``--json`` is rewritten after every phase of every variant, so a run stopped by a time limit
keeps what it finished. Bad arguments end in one message and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import compile_stats  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from neurosim.models import RESNETS  # noqa: E402
from neurosim.rules import RULES as _REGISTRY  # noqa: E402

VARIANTS = ("native", *_REGISTRY)


# ---------------------------------------------------------------------------------------------
# arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="epoch_time.py",
                                description="Wall-clock training epochs of <rule>_<model> presets through "
                                            "neurosim.training.run.Run against a plain PyTorch loop on the same data.")
    p.add_argument("--variants", default="kp,native", help=f"comma-separated, from {','.join(VARIANTS)} "
                                                           f"(default kp,native)")
    p.add_argument("--model", default="resnet18", help=f"one of {', '.join(sorted(RESNETS))} (default resnet18)")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (default 1.0)")
    p.add_argument("--batch-size", type=int, help="images per step (default: the preset's, 128)")
    p.add_argument("--train", type=int, default=50_000, help="training images (default 50,000)")
    p.add_argument("--test", type=int, default=10_000, help="test images (default 10,000)")
    p.add_argument("--classes", type=int, default=100, help="classes (default 100)")
    p.add_argument("--epochs", type=int, default=2, help="epochs timed after the warm-up (default 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default cuda if available)")
    p.add_argument("--compile", action="store_true", help="torch.compile each variant's model")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--monitor-every", type=int,
                   help="monitor record interval in steps, 0 for none (default: the preset's, 200)")
    p.add_argument("--monitor-probe", type=int, help="monitor probe images (default: the preset's, 128)")
    p.add_argument("--no-warmup", action="store_true",
                   help="time the first epoch as a user's first epoch goes, compilation included")
    p.add_argument("--seed", type=int, default=0, help="seed of the images, the weights and the runs")
    p.add_argument("--run-dir", type=Path, help="where runs write checkpoints (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write settings and results here, after every phase")
    args = p.parse_args(argv)

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS and v not in _REGISTRY]  # a rule's alias (ss) counts
    if unknown or not names:
        p.error(f"--variants: unknown {unknown or 'empty list'}; choose from {','.join(VARIANTS)}")
    args.variants = list(dict.fromkeys(names))
    if args.model not in RESNETS:
        p.error(f"unknown --model {args.model!r}; choose from {', '.join(sorted(RESNETS))}")
    if not (args.width > 0 and math.isfinite(args.width)):
        p.error(f"--width must be a positive number, got {args.width}")
    for name, low in (("batch_size", 1), ("train", 1), ("test", 1), ("classes", 2), ("epochs", 1),
                      ("monitor_every", 0), ("monitor_probe", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"unknown --device {args.device!r}; use cpu, cuda or cuda:N")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: only cpu and cuda are supported")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device} asked for but no CUDA GPU is available; use --device cpu")
    if args.compile:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.compile_backend not in backends:
            p.error(f"unknown --compile-backend {args.compile_backend!r}; choose from {', '.join(sorted(backends))}")
    if args.run_dir is not None and args.run_dir.exists() and not args.run_dir.is_dir():
        p.error(f"--run-dir {args.run_dir} exists and is not a directory")
    return args


# ---------------------------------------------------------------------------------------------
# data and the two kinds of training loop

def random_cifar100_shaped(n_train: int, n_test: int, classes: int, device, seed: int):
    """uint8 images of CIFAR's shape drawn uniformly on the device, random labels. The channel
    statistics are the uniform distribution's (mean 127.5/255, std √((256²−1)/12)/255)."""
    from neurosim.data import ImageData

    g = torch.Generator(device=device).manual_seed(seed)
    draw = lambda n: (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device, generator=g),
                      torch.randint(0, classes, (n,), device=device, generator=g))
    (tx, ty), (vx, vy) = draw(n_train), draw(n_test)
    mean, std = 127.5 / 255, math.sqrt((256**2 - 1) / 12) / 255
    return ImageData("random uint8, CIFAR-100 shape", tx, ty, vx, vy, tuple(f"class{i}" for i in range(classes)),
                     (mean,) * 3, (std,) * 3)


def preset_config(rule: str, args_or_settings: dict):
    """The ``<rule>_<model>`` preset (``bp`` for the native loop, whose recipe is BP's) with the
    benchmark's device, data and run-length overrides."""
    from neurosim.training.config import preset

    s = args_or_settings
    overrides = dict(device=str(s["device"]), epochs=1, compile=bool(s["compile"]), width=s["width"],
                     data="synthetic", synthetic_train=s["train"], synthetic_test=s["test"], seed=s["seed"])
    for key in ("batch_size", "monitor_every", "monitor_probe"):
        if s.get(key) is not None:
            overrides[key] = s[key]
    return preset(f"{'bp' if rule == 'native' else rule}_{s['model']}", **overrides)


def make_run(cfg, run_dir: Path, data, backend: str):
    """A ``neurosim.training.run.Run`` on ``data``, compiled with ``backend`` if ``cfg.compile``."""
    from neurosim.training.run import Run, compiled_with_dynamic_batch

    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(cfg, run_dir, data=data, quiet=True)
    if cfg.compile and backend != "inductor":  # Run compiles with the default backend (inductor)
        run.model = compiled_with_dynamic_batch(run.engine, backend)
    return run


class NativeLoop:
    """An ordinary PyTorch training loop of ``native.NativeResNet`` (``benchmarks/native.py``) with a preset's
    recipe: the baseline the presets are measured against. Its streams are built as
    ``neurosim.training.run.Run`` builds them, so both see the same batches."""

    def __init__(self, cfg, run_dir: Path, data, backend: str):
        from neurosim.data import BatchStream
        from native import native_resnet

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(cfg.device)
        cuda = self.device.type == "cuda"
        # The settings Run derives from "auto": bf16 autocast and channels_last on CUDA.
        self.amp_dtype = torch.bfloat16 if (cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)) else None
        channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
        torch.backends.cudnn.benchmark = cuda
        torch.manual_seed(cfg.seed)
        self.train_stream = BatchStream(data.train_x, data.train_y, cfg.batch_size, data.mean, data.std,
                                        shuffle=cfg.shuffle, seed=cfg.seed, crop_padding=cfg.crop_padding,
                                        flip=cfg.flip, channels_last=channels_last)
        self.test_stream = BatchStream(data.test_x, data.test_y, max(cfg.batch_size, 256), data.mean, data.std,
                                       shuffle=False, seed=cfg.seed, channels_last=channels_last)
        self.net = native_resnet(cfg.model, data.num_classes, data.image_shape, cfg.width, seed=cfg.seed)
        self.net.to(self.device)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.model = torch.compile(self.net, backend=backend) if cfg.compile else self.net
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(cfg.milestones), cfg.lr_gamma)
        self.epoch, self.best = 0, -math.inf
        self.stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.seen = 0
        self.callbacks: list = []

    def engaged_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
            out = self.model(x)
            loss = F.cross_entropy(out.float(), y)
        loss.backward()
        self.optimizer.step()
        self.stats += torch.stack([loss.detach().double() * y.shape[0], (out.argmax(1) == y).sum().double()])
        self.seen += y.shape[0]

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.net.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, y in self.test_stream.epoch(0):
            with torch.autocast(self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None):
                out = self.model(x).float()
            totals += torch.stack([F.cross_entropy(out, y).double() * y.shape[0], (out.argmax(1) == y).sum().double(),
                                   totals.new_tensor(y.shape[0])])
        self.net.train()
        loss, top1, n = totals.tolist()
        return {"loss": loss / n, "top1": 100 * top1 / n}

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "best": self.best,
                "stats": self.stats.clone(), "seen": self.seen, "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.best, self.seen = state["epoch"], state["best"], state["seen"]
        self.stats = state["stats"].clone()
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save(self, name: str) -> None:
        tmp = self.run_dir / f"{name}.tmp"
        torch.save({"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "epoch": self.epoch}, tmp)
        os.replace(tmp, self.run_dir / name)

    def train(self) -> dict:
        """One more epoch; like ``Run.train``, a fresh loop first evaluates the untrained model."""
        if self.epoch == 0:
            self.evaluate()
        t0 = time.perf_counter()
        for index, (x, y) in enumerate(self.train_stream.epoch(self.epoch)):
            self.engaged_step(x, y)
            for callback in self.callbacks:
                callback.after_step(index + 1)
        loss_sum, correct = self.stats.tolist()  # the one synchronisation: the epoch's work is done
        elapsed = time.perf_counter() - t0
        n = self.seen
        self.epoch += 1
        self.scheduler.step()
        test = self.evaluate()
        improved = test["top1"] > self.best
        self.best = max(self.best, test["top1"])
        if improved:
            self.save("best.pt")
        self.save("last.pt")
        self.stats.zero_()
        self.seen = 0
        return {"epoch": self.epoch, "train_loss": loss_sum / n, "train_acc": 100 * correct / n, "time_s": elapsed,
                "images_per_s": n / elapsed, "test_loss": test["loss"], "test_acc": test["top1"]}


def train_epoch(subject, on_step=None) -> dict:
    """One more epoch of a ``Run`` (through ``Run.train``, as a user's run goes) or a ``NativeLoop``."""
    if isinstance(subject, NativeLoop):
        return subject.train()
    import attrs

    subject.cfg = attrs.evolve(subject.cfg, epochs=subject.epoch + 1)
    return subject.train(on_step=on_step)


def _net(subject):
    return subject.net if isinstance(subject, NativeLoop) else subject.circuit


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(subject) -> dict:
    """Compile what an epoch and its evaluation call, then put the subject back as it was.

    The training graph is compiled for a batch whose first dimension is marked dynamic (the
    graph a user's run reaches by a recompilation at its first partial batch); then a few steps
    including the epoch's last, smaller batch, so that any graph it still needs is compiled
    here and not in the timed epochs; the evaluation graph the same way, and a whole evaluation. The state (weights,
    optimizer, position, random generators, for a ``Run`` also its divergence watch and
    monitor) is saved before and restored after through ``state_dict``/``load_state_dict``.
    """
    state = copy.deepcopy(subject.state_dict())
    start = compile_stats.mark()
    t0 = time.perf_counter()
    stream, n = subject.train_stream, len(subject.train_stream)
    x, y = stream.batch(0, 0)
    torch._dynamo.maybe_mark_dynamic(x, 0)
    subject.engaged_step(x, y)
    for i in sorted({1, n - 1} - {0}):
        if i < n:
            subject.engaged_step(*stream.batch(0, i))
    sync(subject.device)
    train_s = time.perf_counter() - t0
    net = _net(subject)
    with torch.no_grad():  # as the evaluation calls the model
        net.eval()
        x, _ = subject.test_stream.batch(0, 0)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        with torch.autocast(subject.device.type, subject.amp_dtype, enabled=subject.amp_dtype is not None):
            subject.model(x)
        net.train()
    subject.evaluate()
    sync(subject.device)
    total = time.perf_counter() - t0
    subject.load_state_dict(state)
    return {"warmup_s": total, "warmup_train_s": train_s, "compile": compile_stats.since(start)}


class StepPeak:
    """Peak CUDA memory of the training steps alone: read after each step (before a monitor
    records), reset after each step's callbacks, so evaluation, checkpoints and monitor records
    do not count. Host-side allocator counters only: no synchronisation."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def reader(self):
        outer = self

        class Read:
            def after_step(self, step):
                outer.peak = max(outer.peak, torch.cuda.max_memory_allocated(outer.device))

        return Read()

    def resetter(self):
        outer = self

        class Reset:
            def after_step(self, step):
                torch.cuda.reset_peak_memory_stats(outer.device)

        return Reset()


# ---------------------------------------------------------------------------------------------
# one variant

def measure(name: str, settings: dict, data, run_dir: Path, report) -> None:
    """Build, warm up and time ``settings['epochs']`` epochs of one variant, into ``report``."""
    device = torch.device(settings["device"])
    cuda = device.type == "cuda"
    rec = report.variant(name)
    cfg = preset_config(name, settings)
    rec.update(preset=None if name == "native" else cfg.preset, recipe=f"{cfg.preset} (lr {cfg.lr:g}, momentum "
               f"{cfg.momentum:g}, weight decay {cfg.weight_decay:g}, batch {cfg.batch_size})",
               batch_size=cfg.batch_size, monitor_every=0 if name == "native" else cfg.monitor_every)
    base_mb = torch.cuda.memory_allocated(device) / 2**20 if cuda else None
    t0 = time.perf_counter()
    subject = (NativeLoop(cfg, run_dir, data, settings["backend"]) if name == "native"
               else make_run(cfg, run_dir, data, settings["backend"]))
    sync(device)
    rec.update(build_s=time.perf_counter() - t0, steps_per_epoch=len(subject.train_stream), phase="built")
    if cuda:
        rec["model_mb"] = torch.cuda.memory_allocated(device) / 2**20 - base_mb
    report.write()
    print(f"{name}: built in {rec['build_s']:.1f} s; {rec['steps_per_epoch']} steps per epoch; warming up ...",
          flush=True)

    if settings["warmup"]:
        rec.update(warm_up(subject), phase="warmed up")
        rec["after_restore"] = {"epoch": subject.epoch, "first_loss": getattr(subject, "first_loss", None)}
        report.write()
        print(f"{name}: warm-up {rec['warmup_s']:.1f} s; {compile_stats.describe(rec['compile'])}"
              if settings["compile"] else f"{name}: warm-up {rec['warmup_s']:.1f} s", flush=True)

    watch = {}

    def first_step(run):  # the divergence watch's first loss must be this step's own loss
        if run.step == start_step + 1 and not watch:
            watch.update(first_loss=run.first_loss, first_step_loss=float(run.stats[0]) / max(run.seen, 1))

    start_step = getattr(subject, "step", 0)
    peak = StepPeak(device) if cuda else None
    if peak is not None:
        subject.callbacks.insert(0, peak.reader())
        subject.callbacks.append(peak.resetter())
    rec["epochs"] = []
    for e in range(settings["epochs"]):
        start = compile_stats.mark()
        if cuda:
            peak.peak = 0
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        t0 = time.perf_counter()
        m = train_epoch(subject, on_step=first_step if e == 0 else None)
        sync(device)
        wall = time.perf_counter() - t0
        n = len(data.train_x)
        row = {"epoch": e + 1, "wall_s": wall, "images_per_s": n / wall, "time_s": m["time_s"],
               "train_images_per_s": m["images_per_s"], "outside_training_s": wall - m["time_s"],
               "train_loss": m["train_loss"], "test_acc": m["test_acc"], "compile": compile_stats.since(start)}
        if cuda:
            row["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            row["step_peak_mb"] = max(peak.peak, 0) / 2**20
            row["data_mb"] = base_mb
        rec["epochs"].append(row)
        if e == 0 and watch:
            a, b = watch["first_loss"], watch["first_step_loss"]
            watch["fresh"] = a is not None and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
            rec["watch"] = watch
        rec["phase"] = f"epoch {e + 1} of {settings['epochs']}"
        report.write()
        c = row["compile"]
        print(f"{name}: epoch {e + 1}: {wall:.2f} s wall ({n / wall:.0f} images/s), training {m['time_s']:.2f} s "
              f"({m['images_per_s']:.0f} images/s), train loss {m['train_loss']:.3f}"
              + (f", peak {row['peak_mb']:.0f} MB (steps {row['step_peak_mb']:.0f} MB)" if cuda else "")
              + (f"; compiled during the epoch: {compile_stats.describe(c)}" if settings["compile"] else ""),
              flush=True)
    rec["phase"] = "done"
    if hasattr(subject, "close"):
        subject.close()
    del subject
    gc.collect()
    if settings["compile"]:
        torch._dynamo.reset()  # the next variant's graphs are its own; this one's code can go
    if cuda:
        torch.cuda.empty_cache()
        rec["left_allocated_mb"] = torch.cuda.memory_allocated(device) / 2**20 - base_mb
    report.write()


class Report:
    """The JSON file, rewritten whole (atomically) after every phase."""

    def __init__(self, path: Path | None, head: dict):
        self.path, self.data = path, dict(head, variants={}, complete=False)

    def variant(self, name: str) -> dict:
        return self.data["variants"].setdefault(name, {})

    def write(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def summary_table(data: dict) -> str:
    rows = [f"{'variant':<8} {'epoch':>5} {'wall s':>8} {'images/s':>9} {'train s':>8} {'vs native':>9} "
            f"{'peak MB':>8} {'step peak':>9}"]
    native = (data["variants"].get("native", {}).get("epochs") or [{}])[-1].get("images_per_s")
    for name, rec in data["variants"].items():
        for row in rec.get("epochs", []):
            ratio = f"{row['images_per_s'] / native:.3f}" if native else "-"
            peak = f"{row['peak_mb']:.0f}" if "peak_mb" in row else "-"
            step = f"{row['step_peak_mb']:.0f}" if "step_peak_mb" in row else "-"
            rows.append(f"{name:<8} {row['epoch']:>5} {row['wall_s']:>8.2f} {row['images_per_s']:>9.0f} "
                        f"{row['time_s']:>8.2f} {ratio:>9} {peak:>8} {step:>9}")
    return "\n".join(rows)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or 'CPU'} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = dict(model=args.model, width=args.width, batch_size=args.batch_size, train=args.train,
                    test=args.test, classes=args.classes, epochs=args.epochs, device=str(args.device),
                    compile=args.compile, backend=args.compile_backend if args.compile else None,
                    monitor_every=args.monitor_every, monitor_probe=args.monitor_probe, seed=args.seed,
                    warmup=not args.no_warmup)
    report = Report(args.json, {
        "tool": "benchmarks/epoch_time.py", "settings": settings, "variants_asked": args.variants,
        "torch": torch.__version__, "python": platform.python_version(), "device_name": device_name(args.device),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["epoch_time.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "data_note": (f"random uint8 images of CIFAR-100's shape ({args.train:,} training + {args.test:,} test, "
                      f"3×32×32, {args.classes} classes) held on the {args.device.type}, the same tensors for "
                      f"every variant")})
    try:
        report.write()
        if args.run_dir is not None:
            args.run_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="epoch_time-", dir=args.run_dir))
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    failed = []
    try:
        t0 = time.perf_counter()
        data = random_cifar100_shaped(args.train, args.test, args.classes, args.device, args.seed)
        sync(args.device)
        report.data["data_s"] = time.perf_counter() - t0
        report.write()
        for name in args.variants:
            try:
                measure(name, settings, data, work / name, report)
            except Exception as e:  # one variant's failure (a compiler error) must not lose the others
                rec = report.variant(name)
                rec["failure"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                failed.append(name)
                print(f"{name}: failed: {rec['failure']}", file=sys.stderr, flush=True)
                report.write()
                gc.collect()
                if args.device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.data["complete"] = True
    report.write()
    print()
    print(summary_table(report.data))
    if args.json:
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
