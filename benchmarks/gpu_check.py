"""One command for a lent GPU: the headline answer first, then the detail; nothing lost to a time-out.

On the GPU machine, from the repository root (nothing is installed there and nothing can be
fetched; this script puts the repository on ``sys.path`` and gives the processes it starts
``PYTHONPATH=<repo>``, so the repository's own ``neurosim`` is the one that runs — the environment
part checks that)::

    python3 benchmarks/gpu_check.py $OUT/gpu --budget-s 420

Allow the command some 60 s more than the budget. ``--plan`` prints the parts, their time limits
and the expected duration of each on a cold machine, and stops. Exit status 0 when every part
that ran finished cleanly, 1 otherwise, 2 for bad arguments (one message, no traceback).

Files. Copying results back from a lent machine is limited to a few files, so OUT_DIR gets
three: ``gpu_check.json`` (everything measured, per part: status, seconds, limit, command,
output tail, results), ``gpu_check.md`` (markdown tables ready for docs/benchmarks.md) and
``gpu_check.log`` (every part's full output). All three are rewritten after every part and every
10 s while a part runs (its results so far, status ``running``), so a check cut short — by a
part's limit, by the budget, or by the whole command being killed — keeps what it measured.
Scratch files (benchmark JSON, run directories with checkpoints) go to a temporary folder that
is removed at the end (``--keep-work`` keeps it).

Parts, in this order. The order is the priority: each part runs in a process of its own and
takes what the budget has left, up to its own limit; nothing is held back for later parts, so a
slow compilation can cut the last parts short, never the first.

``env``
    device, driver (nvidia-smi), CUDA, cuDNN, torch/torchvision/triton/Python versions, GPU
    memory, whether inductor's on-disk cache is cold.
``epoch_compiled`` — the headline
    ``benchmarks/epoch_time.py --variants kp,native --compile``: in one process, on the same
    device-resident images (50,000 + 10,000 random uint8 images of CIFAR-100's shape), the preset
    ``kp_resnet18`` through ``neurosim.training.run.Run`` as a user runs it (full width, batch 128, bf16
    autocast, channels_last, crop and flip on the device, its monitor, evaluation and checkpoint
    every epoch) and a plain torchvision-style ResNet-18 training loop with the same recipe
    (``NativeResNet``, SGD momentum 0.9, lr 0.1, weight decay 5e-4, evaluation and checkpoint
    every epoch), both under ``torch.compile`` (inductor). Each: a warm-up that compiles the
    training and evaluation graphs and restores the initial state (``load_state_dict``), then two
    epochs timed by the wall clock. Reported per epoch: wall seconds and images/s, training time,
    compiled peak memory (the epoch, and its training steps alone), graphs compiled (recompiles);
    per graph of the warm-up its compile seconds; and that the run's divergence watch starts from
    its own first step, not from a warm-up batch. All three targets are judged here.
``bench_compiled``
    ``benchmarks/step_time.py`` native, kp, wm compiled, each alone (``--sequential``): batch 128,
    bf16, channels_last, batch dimension dynamic (the graphs the headline compiled, which
    inductor's cache may then serve); WM with the sleep its preset schedules; per variant its
    compile time and CUDA peak memory over its timed steps.
``bench_eager``
    the same, eager, for every rule: native, bp, fa, ss, kp, wm.
``tests``
    ``pytest -m cuda`` over the test files that hold ``cuda``-marked tests (found by reading
    tests/*.py): the CUDA tests alone.
``epoch_eager``
    the headline's measurement without torch.compile.
``cifar``
    only if ``gpu_data/cifar-100-python`` (or ``--cifar-dir``) holds a packed copy of CIFAR-100
    (see below): ``kp_resnet18`` on it for as many epochs as the remaining budget allows, and the
    curve.

Time. ``--budget-s`` (default 420 s) is shared by the parts; ``--parts`` runs a subset, e.g.
``--parts epoch_compiled --budget-s 300``. Each part has a least time worth starting with and a
most it may take (``--plan`` lists them). No part of this check has run on a GPU yet: the
expected durations for a cold machine (H100, torch 2.11, 16 CPU cores, no inductor cache) are
estimates from these figures — Python start, ``import torch`` and CUDA initialisation about 15 s
per process; inductor compiling a ResNet-18 training graph (forward and backward, batch dimension
dynamic) about 45–60 s and its evaluation graph about 15 s, Triton's kernels compiled in
parallel worker processes; a 50,000-image epoch at batch 128 about 3–5 s compiled and 5–10 s
eager; the CUDA tests compile two small circuits with inductor. Together they come to more than
420 s, so at the default budget the last parts (from ``tests`` on) are expected to be cut or
skipped on a cold machine; on a warm one (inductor's cache under ``/tmp/torchinductor_<user>``
filled by a first run) the compilations take a fraction of that. Every part's measured seconds
are in ``gpu_check.json``: replace the estimates in ``PLAN`` with them after the first GPU run.

Targets, printed as PASS/FAIL (judged on a GPU only), from the headline's last epoch: KP compiled
≥ 0.97× native throughput (images/s over the whole epoch, both compiled); one CIFAR-100-sized
epoch of full-width kp_resnet18 ≤ 3 s wall clock (stretch ≤ 1.5 s); KP's compiled peak memory
≤ 1.10× native (peak over the training steps, less the data set both hold). Where the headline
did not get as far, speed and memory fall back to the compiled step time, and say so.

``--smoke`` runs every part's code at tiny sizes on the CPU, one torch thread per process
(width 0.0625, float32, a few dozen random images; torch.compile with the ``eager`` backend,
graph capture only: inductor takes minutes per ResNet on a small CPU); the CUDA tests are
collected and skip. tests/test_gpu_check.py runs it, so the command cannot rot unseen.

Real data. The machine cannot reach ``../shared``; a copy must travel inside the repository,
and the whole working tree that travels is limited to 64 MiB. CIFAR-100's ``train`` file alone
is 155 MB, so it travels as a subset::

    python benchmarks/gpu_check.py --pack-cifar100 ../shared/data gpu_data [--train-per-class 100]

writes ``gpu_data/cifar-100-python/``: the official ``test`` file (all 10,000 images, bytes
unchanged) and a ``train`` file in the official format holding the first N training images of
each fine class in the file's order (default 100: 10,000 images), both xz-compressed
(``test.xz``, ``train.xz``), ``meta`` as is, and ``PACKED.json``; about 44 MiB with the default.
It refuses a copy that would take the working tree over 64 MiB, and writes
``gpu_data/.gitignore`` so git ignores the folder (never commit it): name ``gpu_data`` among
the paths sent along to the machine explicitly. The part reads the files itself (torchvision's
loader checks the full files' checksums and would refuse a subset).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import lzma
import math
import os
import pickle
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

from gpu_check_report import BAD, PARTS, TITLES, evaluate_targets, render_markdown  # noqa: E402

SCRIPT = Path(__file__).resolve()
# Per mode and part: (least seconds worth starting with, most seconds allowed, seconds expected).
# gpu: estimates for a cold H100 machine (see the module docstring); smoke: measured on this
# project's 2-core CPU machine, shared with other work (tests/test_gpu_check.py's smoke run).
PLAN = {
    "gpu": {"env": (10, 60, 15), "epoch_compiled": (120, 330, 170), "bench_compiled": (60, 240, 120),
            "bench_eager": (30, 120, 45), "tests": (30, 180, 60), "epoch_eager": (40, 150, 50),
            "cifar": (60, 600, 0)},
    "smoke": {"env": (5, 120, 7), "epoch_compiled": (10, 300, 31), "bench_compiled": (10, 300, 18),
              "bench_eager": (10, 300, 7), "tests": (5, 240, 13), "epoch_eager": (10, 300, 10),
              "cifar": (10, 300, 10)},
}
WHAT = {  # one line per part for --plan
    "env": "versions, device, driver, inductor cache",
    "epoch_compiled": "the headline: kp_resnet18 and plain PyTorch, compiled, warm-up and 2 epochs each",
    "bench_compiled": "step_time.py {rules}, compiled, one after the other",
    "bench_eager": "step_time.py {rules}, eager, one after the other",
    "tests": "pytest -m cuda",
    "epoch_eager": "the headline's epochs without torch.compile",
    "cifar": "kp_resnet18 on packed CIFAR-100 with what is left (only with its data)",
}
EPOCH = {  # benchmarks/epoch_time.py arguments
    "gpu": ["--variants", "kp,native", "--device", "cuda", "--width", "1.0", "--train", "50000", "--test", "10000",
            "--classes", "100", "--epochs", "2"],
    # 40 training images in batches of 16: the last batch is smaller, as CIFAR's 50,000 in 128s.
    "smoke": ["--variants", "kp,native", "--device", "cpu", "--width", "0.0625", "--batch-size", "16", "--train",
              "40", "--test", "16", "--classes", "100", "--epochs", "2", "--monitor-every", "2",
              "--monitor-probe", "8"],
}
EPOCH_COMPILE = {"gpu": ["--compile", "--compile-backend", "inductor"],
                 "smoke": ["--compile", "--compile-backend", "eager"]}
BENCH_ARGS = {  # benchmarks/step_time.py arguments
    "gpu": {
        "common": ["--model", "resnet18", "--width", "1.0", "--batch", "128", "--dtype", "bf16", "--channels-last",
                   "--device", "cuda", "--reps", "5", "--warmup", "3", "--steps-per-rep", "20", "--sequential",
                   "--memory"],
        "bench_compiled": ["--rules", "native,kp,wm", "--compile", "--compile-backend", "inductor",
                           "--no-compile-check", "--dynamic-batch"],
        "bench_eager": ["--rules", "native,bp,fa,ss,kp,wm"],
    },
    "smoke": {
        "common": ["--model", "resnet18", "--width", "0.0625", "--batch", "8", "--channels-last", "--device", "cpu",
                   "--reps", "2", "--warmup", "1", "--steps-per-rep", "1", "--sequential"],
        "bench_compiled": ["--rules", "native,kp,wm", "--compile", "--compile-backend", "eager",
                           "--no-compile-check", "--dynamic-batch"],
        "bench_eager": ["--rules", "native,kp"],
    },
}
CIFAR = {
    "gpu": dict(device="cuda", width=1.0, batch_size=None, compile=True, backend="inductor", max_epochs=200),
    # The smoke run's compiled path is the epoch parts'; here it would only add a graph capture.
    "smoke": dict(device="cpu", width=0.0625, batch_size=32, compile=False, backend="eager", max_epochs=1),
}
POLL_S = 10  # seconds between rewrites of the summary while a part runs

TREE_LIMIT = 64 * 2**20  # what the GPU tool carries: tracked + untracked-not-ignored + carried files
LOG_TAIL_LINES = 40
LOG_SECTION_BYTES = 2 * 2**20  # per part in gpu_check.log (the tool brings back files of up to 16 MiB)
CIFAR_FILES = ("train", "test", "meta")


class CheckError(Exception):
    """A problem with what was asked (arguments, files): one message, exit status 2."""


# ---------------------------------------------------------------------------------------------
# arguments

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="Run the GPU check (the headline epoch, step time, CUDA tests) and write "
                    "OUT_DIR/gpu_check.{json,md,log}; print its plan; or pack CIFAR-100 to travel to the GPU "
                    "machine.",
        epilog="On the GPU machine, from the repository root: python3 benchmarks/gpu_check.py $OUT/gpu "
               "--budget-s 420")
    p.add_argument("out_dir", nargs="?", type=Path, help="where gpu_check.json, .md and .log are written")
    p.add_argument("--plan", action="store_true",
                   help="print the parts, their limits and expected durations on a cold machine, and stop")
    p.add_argument("--smoke", action="store_true", help="the same code path at tiny sizes on the CPU")
    p.add_argument("--budget-s", type=float,
                   help="seconds for all parts together (default 420; 900 with --smoke, a bound for CI only)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--cifar-dir", type=Path, default=ROOT / "gpu_data" / "cifar-100-python",
                   help="packed CIFAR-100 for the cifar part (default gpu_data/cifar-100-python)")
    p.add_argument("--work-dir", type=Path, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch folder")
    p.add_argument("--pack-cifar100", nargs=2, type=Path, metavar=("SRC_DIR", "DEST_DIR"),
                   help="pack CIFAR-100 from SRC_DIR (holding cifar-100-python/, or that folder) into "
                        "DEST_DIR/cifar-100-python to travel to the GPU machine, and stop")
    p.add_argument("--train-per-class", type=int, default=100,
                   help="with --pack-cifar100: training images kept per class (default 100; 500 is all)")
    p.add_argument("--child", choices=("env", "cifar"), help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        if not args.settings or not args.result:
            p.error("--child needs --settings and --result")
        return args
    if args.pack_cifar100:
        if args.out_dir is not None or args.plan:
            p.error("--pack-cifar100 takes no OUT_DIR and no --plan")
        if not 1 <= args.train_per_class <= 500:
            p.error(f"--train-per-class must be 1..500 (CIFAR-100 has 500 per class), got {args.train_per_class}")
        return args
    if args.out_dir is None and not args.plan:
        p.error("OUT_DIR is required (or --plan, or --pack-cifar100 SRC_DIR DEST_DIR)")
    if args.out_dir is not None and args.out_dir.exists() and not args.out_dir.is_dir():
        p.error(f"OUT_DIR {args.out_dir} exists and is not a directory")
    if args.budget_s is None:
        args.budget_s = 900.0 if args.smoke else 420.0
    if not math.isfinite(args.budget_s) or args.budget_s <= 0:
        p.error(f"--budget-s must be a positive number of seconds, got {args.budget_s}")
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = [s for s in parts if s not in PARTS]
    if unknown or not parts:
        p.error(f"--parts: unknown {unknown or 'empty list'}; choose from {','.join(PARTS)}")
    args.parts = [s for s in PARTS if s in parts]
    if args.work_dir is not None and args.work_dir.exists() and not args.work_dir.is_dir():
        p.error(f"--work-dir {args.work_dir} exists and is not a directory")
    return args


# ---------------------------------------------------------------------------------------------
# the plan

def plan(mode: str, parts: list[str], budget: float) -> dict:
    """Each part's least and most seconds, its expected duration on a cold machine, when it is
    expected to start and end, and whether it is expected to fit the budget."""
    rows, clock = [], 0.0
    for name in parts:
        least, most, expected = PLAN[mode][name]
        left = budget - clock
        if left < least:
            fate = "expected to be skipped: less than its least time left"
            runs = 0.0
        elif expected > min(most, left):
            fate = f"expected to be cut at {min(most, left):.0f} s"
            runs = min(most, left)
        else:
            fate = "expected to finish"
            runs = expected
        rows.append({"part": name, "least_s": least, "most_s": most, "expected_s": expected, "start_s": clock,
                     "fate": fate})
        clock += runs
    total = sum(r["expected_s"] for r in rows)
    return {"mode": mode, "budget_s": budget, "parts": rows, "expected_total_s": total, "fits": total <= budget}


def describe_part(mode: str, name: str) -> str:
    if name.startswith("bench_"):
        args = BENCH_ARGS[mode][name]
        return WHAT[name].format(rules=args[args.index("--rules") + 1])
    return WHAT[name]


def print_plan(p: dict) -> None:
    where = ("a cold GPU machine (H100, torch 2.11, no inductor cache): estimates, see the docstring"
             if p["mode"] == "gpu" else "this project's 2-core CPU machine (the smoke run)")
    print(f"gpu_check plan ({p['mode']}), budget {p['budget_s']:.0f} s; expected durations for {where}\n")
    print(f"{'#':>2}  {'part':<15} {'least..most s':>13} {'expected s':>10} {'starts at':>9}  what")
    for i, r in enumerate(p["parts"], 1):
        print(f"{i:>2}  {r['part']:<15} {r['least_s']:>6}..{r['most_s']:<6} {r['expected_s']:>10} "
              f"{r['start_s']:>8.0f}s  {describe_part(p['mode'], r['part'])}; {r['fate']}")
    total = p["expected_total_s"]
    print(f"\nexpected total {total:.0f} s" + (" for a cold machine: " if p["mode"] == "gpu" else ": ")
          + ("within the budget." if p["fits"] else
             f"over the {p['budget_s']:.0f} s budget by {total - p['budget_s']:.0f} s; the parts marked cut or "
             f"skipped are expected to lose time first (the order is the priority)."))
    if "cifar" in [r["part"] for r in p["parts"]]:
        print("cifar has no expected duration of its own: it trains for as long as the budget has left.")


# ---------------------------------------------------------------------------------------------
# running parts

def child_env(smoke: bool = False) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    if smoke:
        # A shared small CPU: several torch threads per process wait on each other's cores
        # (10x slower steps were seen with 2 threads on 2 busy cores); one thread is steady.
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(key, "1")
    return env


def run_logged(cmd: list[str], log_path: Path, timeout: float, progress=None, smoke: bool = False) -> dict:
    """Run ``cmd`` from the repository root, output to ``log_path``; every ``POLL_S`` seconds call
    ``progress(seconds)``; kill its whole process group (compiler workers included) at
    ``timeout``. Returns rc (None if killed), timed_out, seconds."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(smoke),
                                start_new_session=True)
        timed_out = False
        try:
            while True:
                left = timeout - (time.perf_counter() - t0)
                if left <= 0:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                try:
                    rc = proc.wait(timeout=min(POLL_S, max(left, 0.1)))
                    break
                except subprocess.TimeoutExpired:
                    if time.perf_counter() - t0 >= timeout:
                        raise
                    if progress is not None:
                        progress(time.perf_counter() - t0)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = None
        except BaseException:  # interrupted: the part's processes go too
            _kill_group(proc)
            raise
    seconds = time.perf_counter() - t0
    if timed_out:
        with open(log_path, "a") as log:
            log.write(f"\n[gpu_check: stopped after {seconds:.0f} s, its limit was {timeout:.0f} s]\n")
    return {"rc": rc, "timed_out": timed_out, "seconds": seconds}


def _kill_group(proc: subprocess.Popen) -> None:
    """End the process group this script started for a part: SIGTERM (the part can say where it
    was), then SIGKILL for whatever is left of it (compiler worker processes)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    # Progress lines end in \r on a terminal; keep the last state of each.
    out = [ln.rsplit("\r", 1)[-1] for ln in text.splitlines()]
    return "\n".join(out[-lines:])


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def base_record(cmd: list[str], proc: dict, log: Path, timeout: float) -> dict:
    rec = {"command": shlex.join(_display(cmd)), "seconds": round(proc["seconds"], 1), "timeout_s": round(timeout),
           "rc": proc["rc"], "log_tail": tail(log)}
    if proc["timed_out"]:
        rec.update(status="timeout", reason=f"stopped at its limit of {timeout:.0f} s")
    elif proc["rc"] != 0:
        rec.update(status="failed", reason=f"exited with status {proc['rc']}"
                   + (f" (signal {signal.Signals(-proc['rc']).name})" if proc["rc"] < 0 else ""))
    else:
        rec.update(status="ok")
    return rec


def _display(cmd: list[str]) -> list[str]:
    """The command as a person would type it from the repository root."""
    out = ["python3" if c == sys.executable else c for c in cmd]
    return [os.path.relpath(c, ROOT) if c.startswith(str(ROOT) + os.sep) else c for c in out]


def cuda_test_files() -> list[str]:
    """The test files that hold ``cuda``-marked tests (a decorator or a module-wide mark)."""
    mark = re.compile(r"pytest\.mark\.cuda\b")
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if mark.search(p.read_text(errors="replace")))


class Check:
    """The sequence of parts, their time limits and the summary files."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.mode = "smoke" if args.smoke else "gpu"
        self.out = args.out_dir
        self.out.mkdir(parents=True, exist_ok=True)
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            self.work = Path(tempfile.mkdtemp(prefix="gpu_check-", dir=args.work_dir))
        else:
            self.work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        (self.work / "logs").mkdir()
        self.start = time.monotonic()
        self.deadline = self.start + args.budget_s
        expected = plan(self.mode, args.parts, args.budget_s)
        self.summary = {
            "tool": "benchmarks/gpu_check.py", "format": 2, "mode": self.mode,
            "started": _now(), "finished": None, "budget_s": args.budget_s, "elapsed_s": None,
            "command": shlex.join(["python3", "benchmarks/gpu_check.py", *sys.argv[1:]]),
            "repo": repo_info(), "order": list(args.parts),
            "plan": {r["part"]: {k: r[k] for k in ("least_s", "most_s", "expected_s")} for r in expected["parts"]},
            "parts": {}, "targets": [],
        }

    # -- time ------------------------------------------------------------------------------------
    def limit_for(self, name: str) -> tuple[float, str | None]:
        """What is left of the budget, up to the part's most; none of it is held for later parts
        (they come later because they matter less)."""
        least, most, _ = PLAN[self.mode][name]
        left = self.deadline - time.monotonic()
        limit = min(most, left)
        if limit < least:
            return limit, f"not enough of the budget left: {max(left, 0):.0f} s; this part needs at least {least} s"
        return limit, None

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> int:
        runners = {"env": self.part_env, "epoch_compiled": self.part_epoch, "bench_compiled": self.part_bench,
                   "bench_eager": self.part_bench, "tests": self.part_tests, "epoch_eager": self.part_epoch,
                   "cifar": self.part_cifar}
        print(f"gpu_check ({self.mode}): parts {', '.join(self.args.parts)}; budget {self.args.budget_s:.0f} s; "
              f"writing {self.out}/gpu_check.{{json,md,log}}", flush=True)
        name = None
        try:
            for name in self.args.parts:
                limit, why = self.limit_for(name)
                if why is None and name == "cifar" and not self.args.cifar_dir.is_dir():
                    why = (f"no packed CIFAR-100 at {_rel(self.args.cifar_dir)} (make one with "
                           f"--pack-cifar100 and send it along)")
                if why is None and name == "tests" and not cuda_test_files():
                    why = "no test file holds cuda-marked tests"
                env = (self.summary["parts"].get("env") or {}).get("result") or {}
                if why is None and name != "env" and self.mode == "gpu" and env.get("cuda_available") is False:
                    why = "torch sees no CUDA GPU here (use --smoke on a machine without one)"
                if why is not None:
                    rec = {"status": "skipped", "reason": why, "seconds": 0.0}
                else:
                    print(f"[{name}] {TITLES[name]}: limit {limit:.0f} s ...", flush=True)
                    try:
                        rec = runners[name](name, limit)
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:  # a bug here must not lose the other parts
                        rec = {"status": "failed", "reason": f"gpu_check error: {type(e).__name__}: {e}",
                               "seconds": 0.0}
                self.summary["parts"][name] = rec
                note = f" ({rec['reason']})" if rec.get("reason") else ""
                print(f"[{name}] {rec['status']} in {rec.get('seconds', 0):.0f} s{note}", flush=True)
                self.write()
        except KeyboardInterrupt:
            self.summary["interrupted"] = True
            rec = self.summary["parts"].get(name) if name is not None else None
            if name is not None and (rec is None or rec.get("status") == "running"):
                rec = dict(rec or {"seconds": 0.0})
                rec.update(status="interrupted", reason="gpu_check was stopped during it")
                self.summary["parts"][name] = rec
            print("interrupted: writing what was finished", file=sys.stderr)
        self.write(final=True)
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            print(f"scratch files kept in {self.work}")
        print((self.out / "gpu_check.md").read_text())
        bad = [n for n, r in self.summary["parts"].items() if r["status"] in BAD]
        return 1 if bad else 0

    def write(self, final: bool = False) -> None:
        s = self.summary
        s["targets"] = evaluate_targets(s["parts"], self.mode)
        s["elapsed_s"] = round(time.monotonic() - self.start, 1)
        if final:
            s["finished"] = _now()
        write_json_atomic(self.out / "gpu_check.json", s)
        md = self.out / "gpu_check.md"
        md.with_name(md.name + ".tmp").write_text(render_markdown(s))
        os.replace(md.with_name(md.name + ".tmp"), md)
        with open(self.out / "gpu_check.log", "w") as out:
            for name in self.args.parts:
                log = self.work / "logs" / f"{name}.log"
                if not log.exists():
                    continue
                data = log.read_bytes()
                cut = len(data) > LOG_SECTION_BYTES
                out.write(f"\n{'=' * 30} {name}: {TITLES[name]} {'=' * 30}\n")
                if cut:
                    out.write(f"[first {len(data) - LOG_SECTION_BYTES} bytes left out]\n")
                out.write(data[-LOG_SECTION_BYTES:].decode(errors="replace"))

    def run_part(self, name: str, cmd: list[str], limit: float, collect, display: str | None = None) -> dict:
        """Run one part's process; ``collect(rec, final)`` adds what it reported so far to a record.
        While it runs, the summaries are rewritten every ``POLL_S`` seconds with its results so far."""
        log = self.work / "logs" / f"{name}.log"

        def progress(seconds: float) -> None:
            rec = {"status": "running", "seconds": round(seconds, 1), "timeout_s": round(limit),
                   "reason": f"running: {seconds:.0f} s of its {limit:.0f} s limit", "log_tail": tail(log)}
            if display:
                rec["command"] = display
            try:
                collect(rec, False)
            except Exception as e:  # a half-written result must not stop the part
                rec["collect_error"] = f"{type(e).__name__}: {e}"
            self.summary["parts"][name] = rec
            self.write()

        rec = base_record(cmd, run_logged(cmd, log, limit, progress, smoke=self.mode == "smoke"), log, limit)
        if display:
            rec["command"] = display
        collect(rec, True)
        return rec

    # -- parts -----------------------------------------------------------------------------------
    def child_cmd(self, kind: str, settings: dict, result: Path) -> list[str]:
        return [sys.executable, str(SCRIPT), "--child", kind, "--settings", json.dumps(settings), "--result",
                str(result)]

    def part_env(self, name: str, limit: float) -> dict:
        result = self.work / "env.json"

        def collect(rec, final):
            info = read_json(result)
            rec["result"] = info
            if not final:
                return
            if rec["status"] == "ok" and not info:
                rec.update(status="failed", reason="wrote no result")
            elif info and not info.get("neurosim_from_repo"):
                rec.update(status="failed", reason=f"neurosim was imported from {info.get('neurosim_file')}, not "
                                                   f"from this repository")
            elif info and self.mode == "gpu" and not info.get("cuda_available"):
                rec.update(status="failed", reason="torch sees no CUDA GPU")

        return self.run_part(name, self.child_cmd("env", {}, result), limit, collect)

    def part_epoch(self, name: str, limit: float) -> dict:
        result = self.work / f"{name}.json"
        compiled = name == "epoch_compiled"
        cmd = [sys.executable, str(BENCH / "epoch_time.py"), *EPOCH[self.mode],
               *(EPOCH_COMPILE[self.mode] if compiled else []), "--run-dir", str(self.work / f"runs_{name}"),
               "--json", str(result)]
        display = shlex.join(_display(cmd)).replace(str(result), f"{name}.json").replace(
            str(self.work / f"runs_{name}"), "RUNS")

        def collect(rec, final):
            data = read_json(result)
            rec["result"] = data
            if not final:
                return
            if data is None:
                if rec["status"] == "ok":
                    rec.update(status="failed", reason="epoch_time.py wrote no JSON")
                return
            variants = data.get("variants") or {}
            asked = data.get("variants_asked") or []
            epochs = (data.get("settings") or {}).get("epochs")
            short = [v for v in asked if len((variants.get(v) or {}).get("epochs") or []) != epochs]
            failed = {v: r["failure"] for v, r in variants.items() if r.get("failure")}
            stale = [v for v, r in variants.items() if r.get("watch") and not r["watch"].get("fresh")]
            problems = ([f"{v}: {m}" for v, m in failed.items()]
                        + [f"{v} did not finish its {epochs} epochs" for v in short if v not in failed]
                        + [f"{v}: the divergence watch took its first loss from the warm-up, not from the run's "
                           f"first step (Run.load_state_dict must start the watch afresh)" for v in stale])
            if problems and rec["status"] in ("ok", "failed"):
                rec.update(status="partial" if rec["status"] == "ok" else "failed",
                           reason="; ".join(problems)[:600])

        return self.run_part(name, cmd, limit, collect, display)

    def part_bench(self, name: str, limit: float) -> dict:
        result = self.work / f"{name}.json"
        cmd = [sys.executable, str(BENCH / "step_time.py"), *BENCH_ARGS[self.mode]["common"],
               *BENCH_ARGS[self.mode][name], "--json", str(result)]
        display = shlex.join(_display(cmd)).replace(str(result), f"{name}.json")

        def collect(rec, final):
            data = read_json(result)
            if data is None:
                if final and rec["status"] == "ok":
                    rec.update(status="failed", reason="step_time.py wrote no JSON")
                return
            rec["result"] = bench_summary(data)
            if not final:
                return
            variants = rec["result"]["variants"]
            failed = {v: r["failure"] for v, r in variants.items() if r.get("failure")}
            untimed = [v for v, r in variants.items() if "median_ms" not in r and v not in failed]
            mem_failed = {v: r["memory"]["error"] for v, r in variants.items()
                          if isinstance(r.get("memory"), dict) and "error" in r["memory"]}
            if rec["status"] == "ok" and (failed or mem_failed or untimed):
                what = "; ".join([f"{v}: {m}" for v, m in failed.items()]
                                 + [f"{v} memory: {m}" for v, m in mem_failed.items()]
                                 + [f"{v}: not timed" for v in untimed])
                rec.update(status="partial", reason=f"some variants failed: {what}")

        return self.run_part(name, cmd, limit, collect, display)

    def part_tests(self, name: str, limit: float) -> dict:
        junit = self.work / "junit.xml"
        log = self.work / "logs" / f"{name}.log"
        files = cuda_test_files()
        # One process (``-o addopts=``: not the suite's pytest-xdist workers), so the log reads one
        # test a line, and the GPU's tests do not share it with each other.
        cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-m", "cuda", *files, "-v", "-rfEs", "-p",
               "no:cacheprovider", f"--junitxml={junit}"]
        display = shlex.join(["python3", "-m", "pytest", "-m", "cuda", *files, "-v", "-rfEs"])

        def collect(rec, final):
            res = parse_junit(junit) if final else None
            if res is None:  # running, or stopped before pytest wrote its report: what the log shows
                res = parse_pytest_log(log)
            rec["result"] = res
            if not final:
                return
            if res is None or not res["tests"]:
                if rec["status"] == "ok":
                    rec.update(status="failed", reason="pytest reported no tests")
                return
            if rec["status"] == "failed" and rec["rc"] == 1:
                rec["reason"] = f"{res['failed']} failed, {res['errors']} errors"
            if res["skipped"] == res["tests"] and rec["status"] == "ok":
                reasons = "; ".join(f"{why} ({n})" for why, n in res["skip_reasons"].items())
                rec.update(status="skipped", reason=f"all {res['tests']} tests skipped: {reasons}")

        return self.run_part(name, cmd, limit, collect, display)

    def part_cifar(self, name: str, limit: float) -> dict:
        result = self.work / "cifar.json"
        settings = dict(CIFAR[self.mode], data_dir=str(self.args.cifar_dir.resolve()),
                        run_dir=str(self.work / "run_cifar"), seed=0, deadline_s=max(limit - 20, 10))
        display = f"gpu_check.py --child cifar (settings: {json.dumps(settings_for_display(settings))})"

        def collect(rec, final):
            rec["result"] = read_json(result)
            if final and rec["status"] == "ok" and not (rec["result"] or {}).get("curve"):
                rec.update(status="failed", reason="no epoch finished")

        return self.run_part(name, self.child_cmd("cifar", settings, result), limit, collect, display)


def settings_for_display(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in ("run_dir",)}


def _rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def repo_info() -> dict:
    info = {"root": str(ROOT)}
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=20)
        if head.returncode == 0:
            info["commit"] = head.stdout.strip()
            st = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=20)
            info["modified_files"] = len(st.stdout.splitlines())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _empty_tests() -> dict:
    return {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [],
            "skip_reasons": Counter(), "seconds": 0.0}


def parse_junit(path: Path) -> dict | None:
    """Counts, failures and skip reasons from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    res = _empty_tests()
    for suite in root.iter("testsuite"):
        res["seconds"] += float(suite.get("time", 0) or 0)
    for case in root.iter("testcase"):
        res["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}".replace("tests.", "tests/", 1)
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            el = kinds.get("failure", kinds.get("error"))
            res["failed" if "failure" in kinds else "errors"] += 1
            msg = (el.get("message") or el.text or "").strip().splitlines()
            res["failures"].append({"test": name, "message": (msg[0] if msg else "")[:300]})
        elif "skipped" in kinds:
            res["skipped"] += 1
            msg = (kinds["skipped"].get("message") or "").strip()
            res["skip_reasons"][msg.removeprefix("Skipped: ") or "no reason given"] += 1
        else:
            res["passed"] += 1
    res["skip_reasons"] = dict(res["skip_reasons"])
    return res


_VERBOSE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b(?: \((.*?)\)(?= \[|$))?")


def parse_pytest_log(path: Path) -> dict | None:
    """The tests that finished, from ``pytest -v`` output: for a run that is still going or was
    stopped before pytest wrote its JUnit report."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    res = _empty_tests()
    for line in lines:
        m = _VERBOSE.match(line)
        if not m:
            continue
        test, outcome, why = m.groups()
        res["tests"] += 1
        if outcome in ("PASSED", "XFAIL", "XPASS"):
            res["passed"] += 1
        elif outcome == "SKIPPED":
            res["skipped"] += 1
            res["skip_reasons"][why or "reason not in the output"] += 1
        else:
            res["failed" if outcome == "FAILED" else "errors"] += 1
            res["failures"].append({"test": test, "message": outcome.lower()})
    res["skip_reasons"] = dict(res["skip_reasons"])
    res["source"] = "counted from the output of the tests that finished (no JUnit report)"
    res.pop("seconds")
    return res


def bench_summary(data: dict) -> dict:
    """The parts of step_time.py's JSON the summary keeps (raw per-rep times included)."""
    keep = ("median_ms", "spread_ms", "images_per_s", "epoch_s", "ratio_vs_native", "ratio_vs_bp", "failure",
            "memory", "times_s", "build_s", "warmup_s", "first_step_s", "compile", "compiled_while_timing")
    return {"settings": data.get("settings"), "device_name": data.get("device_name"), "torch": data.get("torch"),
            "command": data.get("command"), "date": data.get("date"), "final_loss": data.get("final_loss"),
            "complete": data.get("complete"), "phase": data.get("phase"),
            "variants": {n: {k: v for k, v in r.items() if k in keep} for n, r in data.get("variants", {}).items()}}


# ---------------------------------------------------------------------------------------------
# child processes (they import torch; the parent does not)

def child_main(args) -> int:
    settings = json.loads(args.settings)
    result_path = args.result
    if args.child == "env":
        write_json_atomic(result_path, environment())
        return 0
    return child_cifar(settings, result_path)


def environment() -> dict:
    import torch

    import neurosim

    info = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(), "neurosim_file": str(Path(neurosim.__file__).resolve()),
            "torch_threads": torch.get_num_threads()}
    info["neurosim_from_repo"] = Path(info["neurosim_file"]).is_relative_to(ROOT)
    for mod in ("torchvision", "triton", "numpy", "attrs"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # missing or broken: say so, go on
            info[mod] = f"not importable ({type(e).__name__})"
    cache = Path(tempfile.gettempdir()) / f"torchinductor_{_user()}"
    info["inductor_cache"] = (f"{cache} present ({sum(1 for _ in cache.rglob('*'))} files)" if cache.is_dir()
                              else f"{cache} absent (cold)")
    info["devices"] = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["devices"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                                    "total_memory_gib": p.total_memory / 2**30,
                                    "multiprocessors": p.multi_processor_count})
        free, total = torch.cuda.mem_get_info()
        info["gpu_memory_free_gib"] = free / 2**30
    else:
        info["device"] = "no CUDA GPU (CPU only)"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
            fields = [f.strip() for f in q.stdout.splitlines()[0].split(",")] if q.stdout.strip() else []
            keys = ("name", "driver_version", "memory_total", "max_sm_clock", "power_limit")
            info["nvidia_smi"] = dict(zip(keys, fields)) if fields else {"error": q.stderr.strip()[:300]}
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            info["nvidia_smi"] = {"error": f"{type(e).__name__}: {e}"}
    else:
        info["nvidia_smi"] = {"error": "nvidia-smi not found"}
    print(json.dumps(info, indent=2))
    return info


def _user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:
        return "unknown"


def child_cifar(settings: dict, result_path: Path) -> int:
    import attrs
    import torch
    from epoch_time import make_run, warm_up

    from neurosim.training.config import preset

    t_start = time.perf_counter()
    device = torch.device(settings["device"])
    data, packed = load_packed_cifar100(Path(settings["data_dir"]), device)
    overrides = dict(device=str(device), epochs=1, compile=settings["compile"], monitor_every=0,
                     width=settings["width"], data="cifar100", data_dir=str(Path(settings["data_dir"]).parent),
                     seed=settings["seed"])
    if settings.get("batch_size"):
        overrides["batch_size"] = settings["batch_size"]
    cfg = preset("kp_resnet18", **overrides)
    note = (f"{len(data.train_x):,} training images ({packed.get('train_per_class', '?')} per class, the first of "
            f"each class in the official file), the official {len(data.test_x):,} test images; preset "
            f"kp_resnet18, batch {cfg.batch_size}, width {cfg.width}, "
            + (f"compiled ({settings['backend']})" if cfg.compile else "not compiled"))
    result = {"preset": "kp_resnet18", "data_note": note, "packed": packed, "curve": [], "settings": settings}
    print(note, flush=True)
    run = make_run(cfg, Path(settings["run_dir"]), data, settings["backend"])
    result.update(warm_up(run))
    write_json_atomic(result_path, result)
    deadline = settings["deadline_s"]
    last = None
    while run.epoch < settings["max_epochs"]:
        used = time.perf_counter() - t_start
        if last is not None and used + 1.3 * last > deadline:
            result["stopped"] = f"budget: {used:.0f} s used, an epoch takes {last:.1f} s, {deadline:.0f} s allowed"
            break
        t0 = time.perf_counter()
        run.cfg = attrs.evolve(run.cfg, epochs=run.epoch + 1)
        run.train()
        last = time.perf_counter() - t0
        lines = (Path(settings["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        result["curve"] = [{k: v for k, v in json.loads(ln).items() if k != "angles"} for ln in lines if ln.strip()]
        m = result["curve"][-1]
        print(f"epoch {m['epoch']}: train loss {m['train_loss']:.3f}, test top-1 {m['test_acc']:.2f} %, "
              f"{m['time_s']:.2f} s", flush=True)
        write_json_atomic(result_path, result)
    else:
        result["stopped"] = f"reached {settings['max_epochs']} epochs"
    write_json_atomic(result_path, result)
    return 0


# ---------------------------------------------------------------------------------------------
# CIFAR-100: pack a subset to travel, read it back

def _cifar_file(folder: Path, name: str) -> Path | None:
    for p in (folder / name, folder / f"{name}.xz"):
        if p.is_file():
            return p
    return None


def read_cifar_file(path: Path) -> dict:
    """A CIFAR-100 python-format pickle (plain or ``.xz``) as a dict with str keys."""
    raw = path.read_bytes()
    if path.suffix == ".xz":
        raw = lzma.decompress(raw)
    try:
        d = pickle.loads(raw, encoding="latin1")
    except Exception as e:
        raise CheckError(f"{path} is not a CIFAR python-format file ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise CheckError(f"{path} holds a {type(d).__name__}, not a CIFAR dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _check_split(d: dict, path: Path) -> None:
    import numpy as np

    missing = [k for k in ("data", "fine_labels") if k not in d]
    if missing:
        raise CheckError(f"{path} lacks {', '.join(missing)}: not a CIFAR-100 train or test file")
    x, y = d["data"], d["fine_labels"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise CheckError(f"{path}: data must be uint8 N×3072, got {getattr(x, 'dtype', type(x))} "
                         f"{getattr(x, 'shape', '')}")
    if len(y) != len(x) or (len(y) and not 0 <= min(y) <= max(y) < 100):
        raise CheckError(f"{path}: {len(y)} fine labels for {len(x)} images, or labels outside 0..99")


def _class_names(meta_path: Path) -> tuple[str, ...]:
    meta = read_cifar_file(meta_path)
    names = meta.get("fine_label_names")
    if not names or len(names) != 100:
        raise CheckError(f"{meta_path}: no list of 100 fine_label_names")
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def load_packed_cifar100(folder: Path, device):
    """An ``ImageData`` on ``device`` from a CIFAR-100 folder (packed by ``--pack-cifar100`` or the
    official files), and the pack's manifest."""
    import torch

    from neurosim.data import ImageData, channel_stats

    found = {n: _cifar_file(folder, n) for n in CIFAR_FILES}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise CheckError(f"{folder} lacks {', '.join(missing)} (plain or .xz)")
    splits = []
    for n in ("train", "test"):
        d = read_cifar_file(found[n])
        _check_split(d, found[n])
        x = torch.from_numpy(d["data"].reshape(-1, 3, 32, 32).copy())
        splits += [x, torch.as_tensor(d["fine_labels"], dtype=torch.int64)]
    mean, std = channel_stats(splits[0])  # on the host: the same numbers on every device
    tx, ty, vx, vy = (t.to(device) for t in splits)
    manifest = read_json(folder / "PACKED.json") or {"note": "not packed by gpu_check.py (no PACKED.json)"}
    return ImageData(f"cifar100 ({len(tx)} train)", tx, ty, vx, vy, _class_names(found["meta"]), mean, std), manifest


def tree_bytes(exclude: Path | None = None) -> tuple[int, str]:
    """Bytes of what the GPU tool carries by default: tracked and untracked-not-ignored files."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return 0, f"git not usable ({type(e).__name__}): the rest of the tree is not counted"
    if out.returncode != 0:
        return 0, "not a git checkout: the rest of the tree is not counted"
    total = 0
    skip = exclude.resolve() if exclude is not None else None
    for rel in out.stdout.decode(errors="replace").split("\0"):
        if not rel:
            continue
        p = ROOT / rel
        if skip is not None and p.resolve().is_relative_to(skip):
            continue
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:
            pass
    return total, "tracked and untracked-not-ignored files"


def pack_cifar100(src: Path, dest: Path, per_class: int, limit: int = TREE_LIMIT, log=print) -> dict:
    """Pack CIFAR-100 from ``src`` into ``dest/cifar-100-python`` (see the module docstring)."""
    import numpy as np

    folder = src / "cifar-100-python" if (src / "cifar-100-python").is_dir() else src
    paths = {n: folder / n for n in CIFAR_FILES}
    missing = [n for n, p in paths.items() if not p.is_file()]
    if missing:
        raise CheckError(f"{folder} lacks {', '.join(missing)}: give the folder that holds cifar-100-python/ "
                         f"(train, test, meta) or that folder itself")
    train = read_cifar_file(paths["train"])
    _check_split(train, paths["train"])
    test_raw = paths["test"].read_bytes()
    test = read_cifar_file(paths["test"])
    _check_split(test, paths["test"])
    classes = _class_names(paths["meta"])

    labels = np.asarray(train["fine_labels"])
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(100)]))
    short = [c for c in range(100) if (labels == c).sum() < per_class]
    subset = {"batch_label": f"training subset: first {per_class} images of each fine class", "data": train["data"][keep]}
    for key in ("fine_labels", "coarse_labels", "filenames"):
        if key in train:
            subset[key] = [train[key][i] for i in keep]
    log(f"compressing {len(keep):,} training images and the {len(test['fine_labels']):,} test images (xz) ...")
    blobs = {"train.xz": lzma.compress(pickle.dumps(subset, protocol=2), preset=6),
             "test.xz": lzma.compress(test_raw, preset=6), "meta": paths["meta"].read_bytes()}
    out = dest / "cifar-100-python"
    manifest = {
        "format": "CIFAR-100 python-format pickles (str keys): train.xz, test.xz = xz-compressed train/test; "
                  "meta as is",
        "source": str(folder.resolve()), "packed": _now(), "train_per_class": per_class,
        "train_images": int(len(keep)), "test_images": int(len(test["fine_labels"])),
        "classes": len(classes), "classes_short_of_per_class": short,
        "selection": "the first train_per_class images of each fine class, in the official train file's order; "
                     "the test file's bytes unchanged",
        "files": {n: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in blobs.items()},
        "source_sha256": {"test": hashlib.sha256(test_raw).hexdigest()},
    }
    blobs["PACKED.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
    packed = sum(len(b) for b in blobs.values())
    rest, how = tree_bytes(exclude=dest)
    inside = Path(dest).resolve().is_relative_to(ROOT)
    total = packed + rest
    mib = lambda n: f"{n / 2**20:.1f} MiB"
    log(f"packed: {mib(packed)}; rest of the working tree: {mib(rest)} ({how}); together {mib(total)} of the "
        f"{mib(limit)} that travel")
    if total > limit:
        raise CheckError(f"the packed copy ({mib(packed)}) and the rest of the working tree ({mib(rest)}) come to "
                         f"{mib(total)}, over the {mib(limit)} that travel; use a smaller --train-per-class "
                         f"(now {per_class})")
    out.mkdir(parents=True, exist_ok=True)
    for n, b in blobs.items():
        (out / n).write_bytes(b)
    for n in CIFAR_FILES:  # an earlier plain copy would be read instead of the packed one
        if (out / n).exists() and n != "meta":
            (out / n).unlink()
    (Path(dest) / ".gitignore").write_text("# packed data for the GPU machine: carried explicitly, never committed\n*\n")
    log(f"wrote {out}/ ({', '.join(blobs)}) and {dest}/.gitignore (git ignores the folder)")
    if not inside:
        log(f"note: {dest} is outside the repository ({ROOT}): only what is inside it travels to the GPU machine")
    else:
        if limit - total < 4 * 2**20:
            log(f"note: only {mib(limit - total)} left under the limit for anything else carried")
        log(f"send {_rel(dest)} along to the GPU machine explicitly (git ignores it); the cifar part reads "
            f"{_rel(out)}"
            + ("" if out.resolve() == (ROOT / "gpu_data" / "cifar-100-python") else f" with --cifar-dir {_rel(out)}"))
    return manifest


# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.child:
            return child_main(args)
        if args.plan:
            print_plan(plan("smoke" if args.smoke else "gpu", args.parts, args.budget_s))
            return 0
        if args.pack_cifar100:
            src, dest = args.pack_cifar100
            pack_cifar100(src, dest, args.train_per_class)
            return 0
        return Check(args).run()
    except CheckError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)  # a time limit from outside: write what is finished
    sys.exit(main())
