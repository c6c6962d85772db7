"""Step time and memory of compiled circuits against the same ResNet in plain PyTorch.

    python benchmarks/step_time.py --model resnet18 --batch 64 --device cuda --dtype bf16 \\
        --channels-last --rules native,bp,fa,ss,kp,wm --json results.json

Each *variant* is one way to train the same architecture: ``native`` is
``native.native_resnet`` (``benchmarks/native.py``) under ordinary autograd; ``bp``, ``fa``, ``ss``, ``kp``
and ``wm`` are ``neurosim.models.build_resnet`` circuits under those rules (compiled execution:
custom autograd functions whose backward sends errors through the rule's feedback matrix and
writes local updates into ``.grad``). ``--monitors`` adds ``<rule>+mon`` variants that also run a
``neurosim.observe.monitors.Monitor``.

What is timed is the full training step a user runs::

    optimizer.zero_grad(set_to_none=True)
    with autocast (bf16 only): loss = cross_entropy(model(x).float(), y)
    loss.backward()
    optimizer.step()                    # SGD, momentum 0.9, weight decay 5e-4
    + for wm: the sleep the wm_<model> preset schedules after this step (mirror batches of
      circuit.sleep plus the sleep optimizer's step), exactly as neurosim.training.run.Run does

All variants live in one process and see the same fixed synthetic batch. After warm-up the
repetitions are interleaved (rep 1: every variant once, rep 2: again, starting one variant later,
…), each timing K consecutive steps with the device synchronised before the clock is read, so a
slow spell of a shared machine hits all variants alike. ``--sequential`` instead takes the
variants one at a time — built, warmed up, timed, freed — so that a run stopped by a time limit
keeps every variant it finished (a compiled variant's warm-up can take a minute) and each
variant's memory is its own. Reported: median ms/step over reps, its ratio to ``native`` (and
to ``bp``), images/s and the projected time of a 50,000-image epoch; on CPU also the process's
CPU time per step (less sensitive to other processes than wall time); per variant the seconds
of building, of the warm-up and of its first step, and with ``--compile`` what was compiled
(graphs, seconds per graph, recompiles; ``compile_stats.py``) in the warm-up and while timing.

``--json FILE`` is rewritten (atomically) after every variant's warm-up, every repetition and
every memory measurement, with ``"complete": false`` and the phase reached until the end: a run
that is killed keeps what it finished.

``--profile`` prints torch.profiler's op table of each variant after the timing, to find where
a variant's extra time goes.

``--memory`` adds a peak-memory phase. On CUDA each variant is built alone (the others freed)
and ``torch.cuda.max_memory_allocated`` over two steps is its peak; with ``--sequential`` it is
instead the peak over the variant's timed steps (no separate phase, compiled variants not
compiled twice). On CPU each variant runs in a fresh subprocess (``--memory-child VARIANT``)
that reports the growth of its peak RSS from after building to after two steps (the kernel's peak mark, ``ru_maxrss``/``VmHWM``, reset after
building where Linux allows): the memory the steps need (activations, gradients, optimizer
state), uncontaminated by the other variants.

``--compile`` wraps each model in ``torch.compile`` (``--compile-backend``, default inductor;
``aot_eager`` traces and runs the same graphs without generating kernels, for quick checks). Each
variant is first compiled and stepped in a subprocess of its own (``--compile-check VARIANT``), so
one whose compiled code fails — an exception or a hard crash of the interpreter — is reported as
failed and the others are still measured. ``--no-compile-check`` skips that step (each variant is
then compiled once, in the timing process, during its warm-up): for a caller that runs this script
in a process of its own with a time limit, where the second compilation costs more than it buys.
``--dynamic-batch`` marks the batch dimension dynamic before the first compiled call: the graph a
training run settles on once its epoch's last, smaller batch has made it recompile (and the one
``benchmarks/epoch_time.py`` compiles), so that inductor's on-disk cache can serve both.

Bad arguments end in one message and exit status 2. Timings on a shared machine are noisy: the
JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import compile_stats  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from neurosim.models import RESNETS, build_resnet  # noqa: E402
from native import native_resnet  # noqa: E402
from neurosim.rules import RULES as _REGISTRY  # noqa: E402
from neurosim.training.step import engaged_step, sleep_steps  # noqa: E402

RULES = ("native", *_REGISTRY)  # every registered rule
NUM_CLASSES = 100
IN_SHAPE = (3, 32, 32)
EPOCH_IMAGES = 50_000
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4  # the ResNet presets' engaged optimizer
MONITOR_SUFFIX = "+mon"
# Defaults that keep a run to minutes: a CPU ResNet-18 step at batch 64 takes seconds.
DEFAULTS = {"cuda": dict(reps=10, warmup=5, steps_per_rep=10), "cpu": dict(reps=5, warmup=2, steps_per_rep=2)}


# ---------------------------------------------------------------------------------------------
# arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and validate; any problem ends in ``parser.error`` (one message, exit status 2)."""
    p = argparse.ArgumentParser(
        prog="step_time.py", description="Time a full training step of ResNet circuits against native PyTorch.",
        epilog="Defaults for --reps/--warmup/--steps-per-rep: 10/5/10 on cuda, 5/2/2 on cpu.")
    p.add_argument("--model", default="resnet18", help=f"one of {', '.join(sorted(RESNETS))} (default resnet18)")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (default 1.0)")
    p.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default cuda if available)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="bf16: torch.autocast around forward and loss (default fp32)")
    p.add_argument("--compile", action="store_true", help="wrap each model (circuit or native) in torch.compile")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend with --compile (default inductor; aot_eager for a quick check)")
    p.add_argument("--no-compile-check", action="store_true",
                   help="with --compile: skip compiling each variant in a subprocess first (compile once, "
                        "in the warm-up of the timing process)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="with --compile: mark the batch dimension dynamic, as a run's graph is once its "
                        "epoch's last, smaller batch has been seen")
    p.add_argument("--sequential", action="store_true",
                   help="each variant built, warmed up, timed and freed before the next (a time limit keeps "
                        "finished variants; on CUDA --memory is the peak over the variant's timed steps); "
                        "default: repetitions interleaved across variants")
    p.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    p.add_argument("--rules", default=",".join(RULES), help=f"variants, comma-separated, from {','.join(RULES)}")
    p.add_argument("--monitors", action="store_true",
                   help="also time <rule>+mon variants with a neurosim.observe.monitors.Monitor attached")
    p.add_argument("--monitor-every", type=int, default=None,
                   help="monitor recording interval in steps (default: the presets' monitor_every; 1 shows the "
                        "full cost of a record)")
    p.add_argument("--reps", type=int, help="interleaved repetitions (medians are over these)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant before timing")
    p.add_argument("--steps-per-rep", type=int, help="consecutive steps timed together in one repetition")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU intra-op threads)")
    p.add_argument("--memory", action="store_true", help="also measure peak memory per variant")
    p.add_argument("--profile", action="store_true",
                   help="after timing, print torch.profiler's op table for one repetition of each variant")
    p.add_argument("--json", type=Path, help="write settings, raw per-rep times and results here")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic batch")
    p.add_argument("--memory-child", metavar="VARIANT", help=argparse.SUPPRESS)
    p.add_argument("--compile-check", metavar="VARIANT", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.model not in RESNETS:
        p.error(f"unknown --model {args.model!r}; choose from {', '.join(sorted(RESNETS))}")
    if not args.width > 0:
        p.error(f"--width must be positive, got {args.width}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"unknown --device {args.device!r}; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device} asked for but no CUDA GPU is available; use --device cpu")
    if args.sequential and args.profile:
        p.error("--profile profiles variants side by side; it cannot be used with --sequential")
    if args.dynamic_batch and not args.compile:
        p.error("--dynamic-batch needs --compile")
    if args.compile:  # importing the compiler's registry takes seconds: only when it is used
        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.compile_backend not in backends:
            p.error(f"unknown --compile-backend {args.compile_backend!r}; choose from {', '.join(sorted(backends))}")
    args.device = device
    for name in ("batch", "reps", "warmup", "steps_per_rep", "threads"):
        value = getattr(args, name)
        low = 0 if name == "warmup" else 1
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
        if value is None and name in DEFAULTS[device.type]:
            setattr(args, name, DEFAULTS[device.type][name])
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in rules if r not in RULES and r not in _REGISTRY]  # a rule's alias (ss) counts
    if unknown or not rules:
        p.error(f"--rules: unknown {unknown or 'empty list'}; choose from {','.join(RULES)}")
    args.rules = list(dict.fromkeys(rules))
    args.variants = list(args.rules)
    if args.monitor_every is not None and args.monitor_every < 1:
        p.error(f"--monitor-every must be at least 1, got {args.monitor_every}")
    if args.monitors:
        args.variants += [r + MONITOR_SUFFIX for r in args.rules if r != "native"]
    for flag in ("memory_child", "compile_check"):
        child = getattr(args, flag)
        base = (child or "").removesuffix(MONITOR_SUFFIX)
        if child is not None and (base not in RULES and base not in _REGISTRY
                                  or (child.endswith(MONITOR_SUFFIX) and base == "native")):
            p.error(f"--{flag.replace('_', '-')}: unknown variant {child!r}")
    return args


def monitor_every(args) -> int:
    """The recording interval of ``+mon`` variants: ``--monitor-every``, else the ResNet
    presets' ``monitor_every`` (MonitorConfig's default if the preset turns monitors off)."""
    if args.monitor_every is not None:
        return args.monitor_every
    from neurosim.observe.monitors import MonitorConfig
    from neurosim.training.config import preset

    return preset(f"bp_{args.model}").monitor_every or MonitorConfig().every


# ---------------------------------------------------------------------------------------------
# variants

def make_rule(name: str, model: str):
    """The plasticity rule of a circuit variant, with the settings of its ``<rule>_<model>`` preset
    (WM's sleep schedule, KP's decay, ...)."""
    from neurosim.training.config import preset

    return preset(f"{name}_{model}").make_rule()


class Variant:
    """One model, its optimizers and (for WM) its sleep, stepping on a fixed batch.

    ``step()`` is the unit that is timed: everything a training loop does per batch.
    """

    def __init__(self, name: str, args: argparse.Namespace, batch: tuple[torch.Tensor, torch.Tensor],
                 monitor_dir: Path | None = None):
        self.name, self.args = name, args
        self.rule_name = name.removesuffix(MONITOR_SUFFIX)
        device = args.device
        self.amp_dtype = torch.bfloat16 if args.dtype == "bf16" else None
        self.sleep_optimizer = self.schedule = self.monitor = None
        if self.rule_name == "native":
            self.net = native_resnet(args.model, NUM_CLASSES, IN_SHAPE, args.width, seed=args.seed)
            params = list(self.net.parameters())
        else:
            self.net = build_resnet(args.model, make_rule(self.rule_name, args.model), NUM_CLASSES, IN_SHAPE,
                                    args.width, seed=args.seed)
            params = self.net.engaged_parameters()
        self.net.to(device)
        if args.channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.net.train()
        self.optimizer = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.sleep_generator = torch.Generator(device).manual_seed(args.seed + 1)
        if self.rule_name != "native" and self.net.rule.sleeps:
            rule = self.net.rule
            self.sleep_optimizer = torch.optim.SGD(self.net.sleep_parameters(), lr=rule.lr)
            self.schedule = rule.schedule
            self.sleep_batch = rule.sleep_batch_size or args.batch
        self.monitor_dir = monitor_dir
        if name.endswith(MONITOR_SUFFIX):
            self.monitor = bench_monitor(self.net, args, *batch)
        self.model = torch.compile(self.net, backend=args.compile_backend) if args.compile else self.net
        self.steps = 0
        self.last_loss = None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One full training step (no host synchronisation): ``neurosim.training.step``'s functions, as
        ``neurosim.training.run.Run`` calls them."""
        if self.steps == 0 and self.args.dynamic_batch:
            torch._dynamo.maybe_mark_dynamic(x, 0)
        circuit = None if self.rule_name == "native" else self.net  # the native net draws nothing per batch
        loss, _ = engaged_step(circuit, self.model, self.optimizer, x, y, F.cross_entropy, self.amp_dtype,
                               self.sleep_generator)
        self.steps += 1
        if self.monitor is not None:
            self.monitor.after_step(self.steps)
        due = self.schedule.due(self.steps) if self.schedule is not None else 0
        if due:
            if self.monitor is not None:
                self.monitor.before_sleep(self.steps)
            sleep_steps(self.net, self.sleep_optimizer, due, self.sleep_batch, self.sleep_generator)
            if self.monitor is not None:
                self.monitor.after_sleep(self.steps)
        self.last_loss = loss.detach()

    def close(self) -> None:
        """Write the monitor's files, outside the timed steps, as at an epoch end."""
        if self.monitor is not None and self.monitor_dir is not None:
            self.monitor.flush(self.monitor_dir)


def bench_monitor(circuit, args, x: torch.Tensor, y: torch.Tensor):
    """A ``neurosim.observe.monitors.Monitor`` configured as the ``<rule>_<model>`` preset configures it
    (synapses, traces, probe size, run length of ``epochs`` × 50,000 images, so its snapshot plan
    and buffers are those of a real run), recording every ``monitor_every(args)`` steps; its
    probe (delta and update angles) uses the benchmark's batch and cross-entropy. ``Variant``
    drives it as ``neurosim.training.run.Run`` does."""
    from neurosim.observe.monitors import Monitor, MonitorConfig
    from neurosim.training.config import preset

    run = preset(f"{circuit.rule.name}_{args.model}")
    total = run.epochs * math.ceil(EPOCH_IMAGES / args.batch)
    # The benchmark records a handful of rows, whatever a whole run would: no size limit.
    cfg = MonitorConfig(every=monitor_every(args), synapses=run.monitor_synapses, traces=run.monitor_traces,
                        probe=run.monitor_probe, max_bytes=2**62)
    return Monitor(circuit, cfg, total, probe=(x, y), loss_fn=F.cross_entropy, seed=args.seed)


def synthetic_batch(args) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch on the device (every variant sees the same one)."""
    g = torch.Generator().manual_seed(args.seed + 2)
    x = torch.randn(args.batch, *IN_SHAPE, generator=g)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), generator=g)
    x, y = x.to(args.device), y.to(args.device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def describe_failure(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# timing

class Results:
    """What has been measured so far, per variant, and the JSON file (``--json``) that holds it:
    rewritten whole (atomically) after every variant's warm-up, every repetition and every
    memory measurement, so a run stopped by a time limit keeps what it finished."""

    def __init__(self, args, argv, load_before):
        self.args, self.argv, self.load_before = args, argv, load_before
        self.times = {n: [] for n in args.variants}
        self.cpu = {n: [] for n in args.variants}
        self.failures: dict[str, str] = {}
        self.extra: dict[str, dict] = {n: {} for n in args.variants}  # build, warm-up, compile per variant
        self.memory: dict | None = {} if args.memory else None
        self.final_loss: dict[str, float] = {}
        self.phase = "started"

    def fail(self, name: str, e: BaseException, when: str) -> None:
        self.failures[name] = describe_failure(e)
        print(f"  {name}: failed {when}: {self.failures[name]}", file=sys.stderr)

    def rows(self) -> dict:
        rows = summarise(self.args, self.times, self.cpu, self.failures, self.memory)
        for name, row in rows.items():
            row.update(self.extra.get(name, {}))
        return rows

    def write(self, phase: str | None = None, complete: bool = False) -> None:
        if phase is not None:
            self.phase = phase
        if self.args.json is None:
            return
        args = self.args
        result = {
            "settings": settings_of(args), "torch": torch.__version__, "device_name": device_name(args.device),
            "python": platform.python_version(), "date": datetime.datetime.now().astimezone().isoformat(),
            "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if self.argv is None else self.argv)),
            "load_average": {"before": self.load_before, "after": os.getloadavg() if complete else None},
            "final_loss": self.final_loss, "complete": complete, "phase": self.phase, "variants": self.rows(),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.json)


def warm_up(args, v: Variant, x, y) -> dict:
    """The untimed steps of one variant; with ``--compile`` the first of them compiles. Returns
    their seconds, the first step's, and (compiled) what was compiled: graphs, seconds per graph,
    recompiles (``compile_stats.py``)."""
    if not args.warmup:
        return {}
    start = compile_stats.mark() if args.compile else None
    synchronize(args.device)
    t0 = time.perf_counter()
    v.step(x, y)
    synchronize(args.device)
    first = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        v.step(x, y)
    synchronize(args.device)
    out = {"warmup_s": time.perf_counter() - t0, "first_step_s": first}
    if start is not None:
        out["compile"] = compile_stats.since(start)
    return out


def time_steps(args, v: Variant, x, y) -> tuple[float, float]:
    """Wall and CPU seconds per step over ``steps_per_rep`` consecutive steps."""
    synchronize(args.device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps_per_rep):
        v.step(x, y)
    synchronize(args.device)
    return (time.perf_counter() - t0) / args.steps_per_rep, (time.process_time() - c0) / args.steps_per_rep


def time_variants(args, variants: dict[str, Variant], x, y, results: Results) -> None:
    """Warm up each variant, then time interleaved repetitions into ``results``: per-rep wall
    seconds per step, per-rep CPU seconds per step of this process (``time.process_time``: on a
    shared machine it leaves out the time other processes held the cores), and the failure
    message of each variant that raised."""
    failures, times, cpu = results.failures, results.times, results.cpu
    for name, v in variants.items():
        try:
            results.extra[name].update(warm_up(args, v, x, y))
        except Exception as e:  # e.g. torch.compile cannot trace a variant: report, go on
            results.fail(name, e, "in warm-up")
        results.write(f"warmed up {name}")
    live = [n for n in variants if n not in failures]
    start = compile_stats.mark() if args.compile else None
    for rep in range(args.reps):
        # Start each repetition one variant later so none always runs right after the same one.
        order = live[rep % len(live):] + live[:rep % len(live)] if live else []
        for name in order:
            if name in failures:
                continue
            try:
                wall, proc = time_steps(args, variants[name], x, y)
                times[name].append(wall)
                cpu[name].append(proc)
            except Exception as e:
                results.fail(name, e, "while timing")
        if not any(n not in failures for n in live):
            break
        print(f"  rep {rep + 1}/{args.reps}: " + "  ".join(
            f"{n} {times[n][-1] * 1e3:.1f}" for n in live if n not in failures and times[n]) + " ms/step",
            file=sys.stderr)
        results.write(f"repetition {rep + 1} of {args.reps}")
    if start is not None:  # graphs compiled while timing (all variants together): recompiles
        stats = compile_stats.since(start)
        for name in live:
            results.extra[name]["compiled_while_timing"] = compile_stats.describe(stats)


def run_sequential(args, x, y, tmp: Path, results: Results) -> None:
    """``--sequential``: each variant alone, built, warmed up, timed (its repetitions one after
    the other) and freed before the next; the JSON is written after each. On CUDA with
    ``--memory`` its peak is ``max_memory_allocated`` over its timed steps (reset after the
    warm-up: the steady state of a long run, without first-use allocations and cuDNN's search)."""
    cuda = args.device.type == "cuda"
    for name in args.variants:
        if name in results.failures:
            continue
        v = None
        extra = results.extra[name]
        try:
            if cuda:
                gc.collect()
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            v = Variant(name, args, (x, y), tmp / name)
            synchronize(args.device)
            extra["build_s"] = time.perf_counter() - t0
            if cuda:
                extra["built_mb"] = torch.cuda.memory_allocated(args.device) / 2**20
            extra.update(warm_up(args, v, x, y))
            results.write(f"warmed up {name}")
            if cuda:
                synchronize(args.device)
                torch.cuda.reset_peak_memory_stats(args.device)
            start = compile_stats.mark() if args.compile else None
            for rep in range(args.reps):
                wall, proc = time_steps(args, v, x, y)
                results.times[name].append(wall)
                results.cpu[name].append(proc)
            if start is not None:
                extra["compiled_while_timing"] = compile_stats.describe(compile_stats.since(start))
            if cuda and args.memory:
                peak = torch.cuda.max_memory_allocated(args.device)
                results.memory[name] = {"peak_mb": peak / 2**20, "built_mb": extra["built_mb"],
                                        "step_mb": peak / 2**20 - extra["built_mb"],
                                        "method": "max_memory_allocated over the timed steps"}
            if v.last_loss is not None:
                results.final_loss[name] = float(v.last_loss)
            print(f"  {name}: {statistics.median(results.times[name]) * 1e3:.1f} ms/step (median of "
                  f"{args.reps})", file=sys.stderr)
            v.close()
        except Exception as e:
            results.fail(name, e, "in its run")
        finally:
            del v
            gc.collect()
            if args.compile:
                torch._dynamo.reset()  # the next variant's graphs are its own
            if cuda:
                torch.cuda.empty_cache()
        results.write(f"timed {name}")


def profile_variants(args, variants: dict[str, Variant], x, y, failures: dict) -> dict[str, str]:
    """torch.profiler op tables (self time) for ``steps_per_rep`` steps of each live variant."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if args.device.type == "cuda" else "self_cpu_time_total"
    tables = {}
    for name, v in variants.items():
        if name in failures:
            continue
        with profile(activities=activities) as prof:
            for _ in range(args.steps_per_rep):
                v.step(x, y)
            synchronize(args.device)
        tables[name] = prof.key_averages().table(sort_by=sort, row_limit=20)
    return tables


# ---------------------------------------------------------------------------------------------
# memory

def cuda_peak_memory(args, names: list[str], x, y) -> dict[str, dict]:
    """Each variant alone on the GPU: peak bytes allocated over two steps (model, optimizer
    state, activations, gradients)."""
    out = {}
    for name in names:
        gc.collect()
        torch.cuda.empty_cache()
        v = None
        try:
            torch.cuda.reset_peak_memory_stats(args.device)
            with tempfile.TemporaryDirectory() as tmp:
                v = Variant(name, args, (x, y), Path(tmp))
                synchronize(args.device)
                built = torch.cuda.memory_allocated(args.device)
                for _ in range(2):
                    v.step(x, y)
                synchronize(args.device)
                v.close()
            peak = torch.cuda.max_memory_allocated(args.device)
            out[name] = {"peak_mb": peak / 2**20, "built_mb": built / 2**20, "step_mb": (peak - built) / 2**20}
        except Exception as e:
            out[name] = {"error": describe_failure(e)}
        del v
    gc.collect()
    torch.cuda.empty_cache()
    return out


def child_argv(args, mode: str, variant: str) -> list[str]:
    """Command line that makes a fresh process run one variant in ``mode`` (``--memory-child``
    or ``--compile-check``) with this run's settings."""
    argv = [sys.executable, str(Path(__file__).resolve()), mode, variant, "--model", args.model,
            "--width", repr(args.width), "--batch", str(args.batch), "--device", str(args.device),
            "--dtype", args.dtype, "--seed", str(args.seed), "--rules", variant.removesuffix(MONITOR_SUFFIX)]
    if args.compile:
        argv += ["--compile", "--compile-backend", args.compile_backend]
    if args.channels_last:
        argv.append("--channels-last")
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.monitor_every is not None:
        argv += ["--monitor-every", str(args.monitor_every)]
    return argv


def run_child(args, mode: str, variant: str) -> dict:
    """Run one variant in a fresh process; its last JSON line, or ``{"error": ...}`` saying how it
    failed — including a hard crash (a signal), which no ``except`` in this process could catch."""
    proc = subprocess.run(child_argv(args, mode, variant), capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    if lines and "error" in json.loads(lines[-1]):
        return json.loads(lines[-1])
    # The last line that is not a log record (torch's "W1127 00:59:40.5 ..." warnings, tracer
    # lines) nor part of a traceback body: the exception or the C library's crash message.
    log = re.compile(r"^([IWEF]\d{4} |USDT:|ERROR:|Traceback|\s)")
    err = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not log.match(ln)]
    how = (f"killed by signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
           else f"exited with status {proc.returncode}")
    return {"error": f"{mode.lstrip('-')} process {how}: {err[-1] if err else 'no message'}"}


def compile_preflight(args, names: list[str]) -> dict[str, str]:
    """With ``--compile``: compile and step each variant once in its own process first, so that a
    variant whose compiled code crashes the interpreter (seen with inductor on some CPUs) is
    reported and left out instead of ending the benchmark. Also fills the compile cache."""
    failures = {}
    for name in names:
        out = run_child(args, "--compile-check", name)
        if "error" in out:
            failures[name] = out["error"]
            print(f"  {name}: compile check failed: {failures[name]}", file=sys.stderr)
        else:
            print(f"  {name}: compile check passed ({out['seconds']:.0f} s)", file=sys.stderr)
    return failures


def compile_check(args) -> int:
    """Body of ``--compile-check VARIANT``: build, compile, two steps; print the outcome as JSON."""
    t0 = time.perf_counter()
    x, y = synthetic_batch(args)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            v = Variant(args.compile_check, args, (x, y), Path(tmp))
            for _ in range(2):
                v.step(x, y)
            synchronize(args.device)
            v.close()
    except Exception as e:
        print(json.dumps({"error": describe_failure(e)}))
        return 1
    print(json.dumps({"ok": True, "seconds": time.perf_counter() - t0}))
    return 0


def cpu_peak_memory(args, names: list[str]) -> dict[str, dict]:
    """Peak-RSS growth of each variant over two steps, each in its own fresh process."""
    out = {}
    for name in names:
        out[name] = run_child(args, "--memory-child", name)
        print(f"  memory {name}: {out[name]}", file=sys.stderr)
    return out


def _release_free_memory() -> None:
    """Give memory freed while building (e.g. a monitor's first probe pass) back to the OS
    (glibc ``malloc_trim``), so that the steps' growth is not hidden by reusing it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (``VmHWM``) to its current RSS (Linux ≥ 4.0);
    False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in KiB, None if unreadable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def memory_child(args) -> int:
    """Body of ``--memory-child VARIANT``: build, two steps, print the peak-RSS growth as JSON.

    ``ru_maxrss`` (KiB on Linux) is a high-water mark since the process began: importing torch
    alone peaks near half a GiB here, which hides the growth of a small model's steps. So where
    the kernel allows, the peak mark is reset after building and the growth is measured as
    ``VmHWM`` after two steps minus ``VmRSS`` after building (the same kernel counter that
    ``ru_maxrss`` reads, but resettable — ``ru_maxrss`` also keeps exited threads' peaks and is
    not). Otherwise it falls back to the ``ru_maxrss`` difference (``"method"`` says which).
    """
    name = args.memory_child
    x, y = synthetic_batch(args)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            v = Variant(name, args, (x, y), Path(tmp))
            gc.collect()
            _release_free_memory()
            maxrss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            reset = _reset_peak_rss()
            rss_built = _status_kib("VmRSS")
            for _ in range(2):
                v.step(x, y)
            maxrss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            hwm = _status_kib("VmHWM")
            v.close()
    except Exception as e:
        print(json.dumps({"error": describe_failure(e)}))
        return 1
    if reset and rss_built is not None and hwm is not None:
        built, peak, method = rss_built, hwm, "VmHWM after reset - VmRSS"
    else:
        built, peak, method = maxrss_built, maxrss_peak, "ru_maxrss difference"
    print(json.dumps({"built_rss_mb": built / 1024, "peak_rss_mb": peak / 1024, "peak_mb": (peak - built) / 1024,
                      "ru_maxrss_mb": maxrss_peak / 1024, "method": method}))
    return 0


# ---------------------------------------------------------------------------------------------
# reporting

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"


def summarise(args, times: dict, cpu: dict, failures: dict, memory: dict | None) -> dict:
    """Medians, ratios, throughput, epoch projections and memory per variant."""
    med = {n: statistics.median(t) for n, t in times.items() if t and n not in failures}
    cpu_med = {n: statistics.median(t) for n, t in cpu.items() if t and n not in failures}
    rows = {}
    for name in args.variants:
        row = {"times_s": times.get(name, []), "cpu_times_s": cpu.get(name, [])}
        if name in failures:
            row["failure"] = failures[name]
        if name in med:
            m = med[name]
            row.update(median_ms=m * 1e3, images_per_s=args.batch / m, epoch_s=EPOCH_IMAGES / args.batch * m,
                       spread_ms=(min(times[name]) * 1e3, max(times[name]) * 1e3))
            for ref in ("native", "bp"):
                if ref in med:
                    row[f"ratio_vs_{ref}"] = m / med[ref]
            row["cpu_ms"] = cpu_med[name] * 1e3
            if "native" in cpu_med:
                row["cpu_ratio_vs_native"] = cpu_med[name] / cpu_med["native"]
        if memory is not None:
            row["memory"] = memory.get(name, {})
            base = memory.get("native", {}).get("peak_mb")
            mine = row["memory"].get("peak_mb")
            if base and mine is not None:
                row["memory"]["ratio_vs_native"] = mine / base
        rows[name] = row
    return rows


def print_table(args, rows: dict, on_cpu: bool) -> None:
    """The results table; on CPU also the process's CPU time per step and its ratio to native."""
    mem_label = "RSS growth MB" if on_cpu else "peak MB"
    head = f"{'variant':<10} {'ms/step':>9} {'min..max':>15} {'vs native':>9} {'vs bp':>7} {'img/s':>8} " \
           f"{'epoch 50k':>10}"
    if on_cpu:
        head += f" {'cpu ms':>8} {'cpu vs nat':>10}"
    if args.memory:
        head += f" {mem_label:>14} {'mem ratio':>9}"
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        if "median_ms" not in r:
            print(f"{name:<10} FAILED: {r.get('failure', 'no timing')}")
            continue
        fmt = lambda k: f"{r[k]:.3f}" if k in r else "-"
        lo, hi = r["spread_ms"]
        line = (f"{name:<10} {r['median_ms']:>9.1f} {f'{lo:.1f}..{hi:.1f}':>15} {fmt('ratio_vs_native'):>9} "
                f"{fmt('ratio_vs_bp'):>7} {r['images_per_s']:>8.1f} {_duration(r['epoch_s']):>10}")
        if on_cpu:
            line += f" {r['cpu_ms']:>8.1f} {fmt('cpu_ratio_vs_native'):>10}"
        if args.memory:
            m = r.get("memory", {})
            if "error" in m:
                line += f"  memory failed: {m['error']}"
            else:
                ratio = f"{m['ratio_vs_native']:.3f}" if "ratio_vs_native" in m else "-"
                line += f" {m.get('peak_mb', float('nan')):>14.1f} {ratio:>9}"
        if r.get("failure"):
            line += f"  (failed later: {r['failure']})"
        print(line)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def settings_of(args) -> dict:
    keys = ("model", "width", "batch", "dtype", "compile", "compile_backend", "no_compile_check", "dynamic_batch",
            "sequential", "channels_last", "rules", "variants", "monitors", "reps", "warmup", "steps_per_rep",
            "threads", "memory", "seed")
    s = {k: getattr(args, k) for k in keys}
    if any(v.endswith(MONITOR_SUFFIX) for v in args.variants):
        s["monitor_every"] = monitor_every(args)
    s["device"] = str(args.device)
    s.update(num_classes=NUM_CLASSES, in_shape=IN_SHAPE, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    if "wm" in args.rules:
        from neurosim.training.config import preset

        cfg = preset(f"wm_{args.model}")
        s["wm_sleep"] = dict(preset=f"wm_{args.model}", sleep_every=cfg.wm_sleep_every,
                             sleep_batches=cfg.wm_sleep_batches,
                             sleep_batch_size=cfg.wm_sleep_batch_size or args.batch, wm_lr=cfg.wm_lr)
    return s


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.memory_child is not None:
        return memory_child(args)
    if args.compile_check is not None:
        return compile_check(args)

    load_before = os.getloadavg()
    print(f"{args.model} width {args.width} batch {args.batch} on {device_name(args.device)}, {args.dtype}"
          f"{f', compiled ({args.compile_backend})' if args.compile else ''}"
          f"{', dynamic batch' if args.dynamic_batch else ''}{', channels_last' if args.channels_last else ''}; "
          f"{args.reps} reps x {args.steps_per_rep} steps after {args.warmup} warm-up"
          f"{', variants one after the other' if args.sequential else ''}; "
          f"load average {load_before[0]:.2f}", file=sys.stderr)

    results = Results(args, argv, load_before)
    try:
        results.write("started")
    except OSError as e:
        print(f"error: cannot write --json {args.json}: {e}", file=sys.stderr)
        return 2
    x, y = synthetic_batch(args)
    if args.compile and not args.no_compile_check:
        results.failures.update(compile_preflight(args, args.variants))
        results.write("compile checks done")
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.sequential:
            run_sequential(args, x, y, Path(tmp), results)
        else:
            variants = {}
            for name in args.variants:
                if name in results.failures:
                    continue
                try:
                    t0 = time.perf_counter()
                    variants[name] = Variant(name, args, (x, y), Path(tmp) / name)
                    results.extra[name]["build_s"] = time.perf_counter() - t0
                except Exception as e:
                    results.fail(name, e, "to build")
            time_variants(args, variants, x, y, results)
            results.final_loss.update({n: float(v.last_loss) for n, v in variants.items() if v.last_loss is not None})
            tables = profile_variants(args, variants, x, y, results.failures) if args.profile else {}
            for v in variants.values():
                try:
                    v.close()
                except Exception as e:
                    print(f"  {v.name}: monitor close failed: {describe_failure(e)}", file=sys.stderr)
            del variants
    for name, loss in results.final_loss.items():
        if not math.isfinite(loss):
            print(f"  warning: {name} diverged (loss {loss}); its timings may include non-finite arithmetic",
                  file=sys.stderr)
    gc.collect()

    if args.memory and not (args.sequential and args.device.type == "cuda"):
        live = [n for n in args.variants if n not in results.failures]
        results.write("memory")
        if args.device.type == "cuda":
            results.memory.update(cuda_peak_memory(args, live, x, y))
        else:
            for name in live:
                results.memory.update(cpu_peak_memory(args, [name]))
                results.write(f"memory of {name}")
    load_after = os.getloadavg()

    rows = results.rows()
    for name, tab in tables.items():
        print(f"\n== profile: {name} ({args.steps_per_rep} steps) ==\n{tab}")
    print()
    print_table(args, rows, on_cpu=args.device.type == "cpu")
    print(f"\nload average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
          f"({os.cpu_count()} logical CPUs); torch {torch.__version__}")
    if args.json:
        results.write("done", complete=True)
        print(f"wrote {args.json}")
    return 1 if results.failures and len(results.failures) == len(args.variants) else 0


if __name__ == "__main__":
    sys.exit(main())
