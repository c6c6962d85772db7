"""What running a circuit in time costs: one presentation of T steps against one discrete step.

    python benchmarks/time_cost.py --steps 10,50 --json time_cost.json
    python benchmarks/time_cost.py --circuits mlp --rules fa,kp --steps 10 --reps 3

For each circuit and rule, in one process and on the same fixed batch:

- ``discrete``: the compiled engaged step without the optimizer, as
  ``neurosim.training.step.engaged_step`` takes it: ``zero_grad``, forward through the circuit
  (custom autograd functions), cross-entropy, ``backward`` (the rule's feedback and local updates
  into ``.grad``);
- ``time_eager``: ``TimeExecution(circuit, settings).backward(x, loss)``, one presentation;
- ``time_compiled``: the same with ``compile=True`` (``--backend``, default inductor: its time
  step is one compiled graph); its compile time is reported apart, from the warm-up;
- ``literal``: ``neurosim.core.dynamics.time_backward``, the literal execution (``--literal-reps``
  repetitions: it is slow).
- ``continuous_eager``, ``continuous_compiled``: ``time_eager`` and ``time_compiled`` with the
  weights moving at every step (``plasticity="continuous"``, lr 1e-6, so that the repetitions
  present nearly the same circuit): the feedback matrices formed again and the parameters moved
  in place between the steps.

The settings are ``TimeSettings(duration=T, tau=2)``: ordered updates, no delay, so a
presentation is exactly ``T`` steps (no settle). Circuits (no batch norm: a circuit in time has
none): ``mlp``, the digits-sized MLP 64-128-64-10 (ReLU), batch ``--mlp-batch`` (128); ``conv``,
a small convolutional circuit on 3×32×32 images, 16-32-32-64 channels (two strided convolutions,
a residual identity, global average pooling, a dense readout to 10), batch ``--conv-batch`` (32).

Each variant is warmed up (``--warmup`` calls), then timed ``--reps`` times, one call each,
interleaved across the variants of one circuit, rule and T (rep 1: every variant once, rep 2:
again...), with the device synchronised before the clock is read; medians. Reported per variant:
ms per presentation (or per discrete step), wall and process CPU time (the latter less disturbed
by other processes on a shared machine), time steps per second, and the ratio to the discrete
step on the same circuit and data. ``--json FILE`` gets every row and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.checkpoint_time import cpu_model  # noqa: E402  (the same machine line)

CIRCUITS = ("mlp", "conv")
CONTINUOUS_LR = 1e-6  # the continuous variants barely move the weights: every repetition presents the same circuit
VARIANTS = ("discrete", "time_eager", "time_compiled", "literal", "continuous_eager", "continuous_compiled")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--circuits", default="mlp,conv", help=f"comma-separated, from {CIRCUITS}")
    p.add_argument("--rules", default="fa", help="comma-separated rule names (neurosim.rules.RULES)")
    p.add_argument("--steps", default="10,50", help="comma-separated presentation lengths T, in steps")
    p.add_argument("--mlp-batch", type=int, default=128)
    p.add_argument("--conv-batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--literal-reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of time_compiled")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    a.circuits, a.rules = a.circuits.split(","), a.rules.split(",")
    a.variants = a.variants.split(",")
    try:
        a.steps = [int(s) for s in a.steps.split(",")]
    except ValueError:
        p.error(f"--steps takes whole numbers separated by commas, got {a.steps!r}")
    for what, got, allowed in (("--circuits", a.circuits, CIRCUITS), ("--variants", a.variants, VARIANTS)):
        bad = [g for g in got if g not in allowed]
        if bad:
            p.error(f"{what}: unknown {bad[0]!r}; choose from {', '.join(allowed)}")
    from neurosim.rules import RULES

    bad = [r for r in a.rules if r not in RULES]
    if bad:
        p.error(f"--rules: unknown rule {bad[0]!r}; choose from {', '.join(RULES)}")
    if min(a.steps) < 1 or min(a.reps, a.literal_reps, a.mlp_batch, a.conv_batch) < 1 or a.warmup < 0:
        p.error("--steps, --reps, --literal-reps and the batches must be at least 1, --warmup at least 0")
    return a


def build(name: str, rule):
    from neurosim.core.circuit import Circuit
    from neurosim.models import build_mlp

    if name == "mlp":
        return build_mlp(rule, 64, (128, 64), 10)
    c = Circuit(rule=rule, seed=0)
    c.input("x", (3, 32, 32))
    c.population("c1", (16, 32, 32), activation="relu")
    c.conv("x", "c1", 3, padding=1)
    c.population("c2", (32, 16, 16), activation="relu")
    c.conv("c1", "c2", 3, stride=2, padding=1)
    c.population("c3", (32, 16, 16), activation="relu")
    c.conv("c2", "c3", 3, padding=1)
    c.identity("c2", "c3")
    c.population("c4", (64, 8, 8), activation="relu")
    c.conv("c3", "c4", 3, stride=2, padding=1)
    c.population("pool", (64,), pool="global_avg")
    c.identity("c4", "pool")
    c.population("y", 10)
    c.dense("pool", "y")
    if rule.direct_feedback:
        c.add_direct_feedback()
    return c


def presentations(a, circuit, x, y, s):
    """The variants' calls, each from a clean ``.grad``; the compiled one's first call (its
    compilation) made here and timed."""
    import attrs
    import torch
    import torch.nn.functional as F

    from neurosim.core.dynamics import time_backward
    from neurosim.core.time_execution import TimeExecution

    def loss_fn(out):
        return F.cross_entropy(out, y)

    def discrete():
        circuit.zero_grad(set_to_none=True)
        F.cross_entropy(circuit(x), y).backward()

    def in_time(ex, lr=None):
        circuit.zero_grad(set_to_none=True)
        ex.backward(x, loss_fn, lr=lr)

    def literal():
        circuit.zero_grad(set_to_none=True)
        time_backward(circuit, x, loss_fn, s)

    run, first = {}, None
    if "discrete" in a.variants:
        run["discrete"] = discrete
    if "time_eager" in a.variants:
        eager = TimeExecution(circuit, s)
        run["time_eager"] = lambda: in_time(eager)
    if "time_compiled" in a.variants:
        torch._dynamo.reset()
        compiled = TimeExecution(circuit, s, compile=True, backend=a.backend)
        t0 = time.perf_counter()
        in_time(compiled)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        run["time_compiled"] = lambda: in_time(compiled)
    if "literal" in a.variants:
        run["literal"] = literal
    moving = attrs.evolve(s, plasticity="continuous")
    if "continuous_eager" in a.variants:
        eager_moving = TimeExecution(circuit, moving)
        run["continuous_eager"] = lambda: in_time(eager_moving, CONTINUOUS_LR)
    if "continuous_compiled" in a.variants:
        compiled_moving = TimeExecution(circuit, moving, compile=True, backend=a.backend)
        in_time(compiled_moving, CONTINUOUS_LR)  # its compilation, untimed
        run["continuous_compiled"] = lambda: in_time(compiled_moving, CONTINUOUS_LR)
    return run, first


def measure(a, circuit, x, y, s, sync):
    """Warm-up, then ``--reps`` interleaved repetitions: wall and process CPU seconds per call."""
    run, first = presentations(a, circuit, x, y, s)
    for fn in run.values():
        for _ in range(a.warmup):
            fn()
    sync()
    times = {k: [] for k in run}
    cpu = {k: [] for k in run}
    names = list(run)
    for rep in range(a.reps):
        for k in names[rep % len(names):] + names[:rep % len(names)]:
            if k == "literal" and rep >= a.literal_reps:
                continue
            t0, c0 = time.perf_counter(), time.process_time()
            run[k]()
            sync()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return times, cpu, first


def main(argv=None) -> None:
    a = parse_args(argv)
    import torch

    from neurosim.core.dynamics import TimeSettings
    from neurosim.rules import RULES

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    rows = []
    for cname in a.circuits:
        batch = a.mlp_batch if cname == "mlp" else a.conv_batch
        g = torch.Generator().manual_seed(0)
        shape = (64,) if cname == "mlp" else (3, 32, 32)
        x = torch.randn(batch, *shape, generator=g).to(device)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        for rname in a.rules:
            circuit = build(cname, RULES[rname]()).to(device)
            for T in a.steps:
                s = TimeSettings(duration=float(T), tau=2.0)
                times, cpu, compile_s = measure(a, circuit, x, y, s, sync)
                names = list(times)
                base = statistics.median(times["discrete"]) if "discrete" in times else None
                base_cpu = statistics.median(cpu["discrete"]) if "discrete" in cpu else None
                for k in names:
                    med = statistics.median(times[k])
                    steps = 1 if k == "discrete" else T
                    row = {"circuit": cname, "batch": batch, "rule": rname, "T": T, "variant": k,
                           "ms": 1000 * med, "min_ms": 1000 * min(times[k]), "max_ms": 1000 * max(times[k]),
                           "cpu_ms": 1000 * statistics.median(cpu[k]),
                           "reps": len(times[k]), "steps_per_s": steps / med,
                           "ratio_to_discrete": med / base if base else None,
                           "cpu_ratio_to_discrete": statistics.median(cpu[k]) / base_cpu if base_cpu else None}
                    if k == "time_compiled":
                        row["first_call_s"] = compile_s
                        row["backend"] = a.backend
                    rows.append(row)
                    ratio = (f"x{row['ratio_to_discrete']:.1f} (cpu x{row['cpu_ratio_to_discrete']:.1f})"
                             if base else "")
                    print(f"{cname:5} b{batch:<4} {rname:5} T={T:<3} {k:14} {row['ms']:10.2f} ms "
                          f"({row['min_ms']:.1f}..{row['max_ms']:.1f}) cpu {row['cpu_ms']:10.2f} ms "
                          f"{row['steps_per_s']:9.1f} steps/s {ratio}"
                          + (f"  first call {compile_s:.1f} s" if k == "time_compiled" else ""),
                          flush=True)
    meta = {"started": f"{started:%Y-%m-%d %H:%M} UTC", "cpu": cpu_model(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device),
            "load_average_before": load_before[0], "load_average_after": os.getloadavg()[0],
            "command": "python benchmarks/time_cost.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    print(json.dumps(meta))
    if a.json:
        tmp = a.json.with_name(a.json.name + ".tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        os.replace(tmp, a.json)


if __name__ == "__main__":
    main()
