"""One command for a lent GPU: environment, CUDA tests, step time, training epochs, real data.

On the GPU machine, from the repository root (nothing is installed there and nothing can be
fetched; this script puts the repository on ``sys.path`` and gives the processes it starts
``PYTHONPATH=<repo>``, so the repository's own ``neurosim`` is the one that runs — the environment
part checks that)::

    python3 benchmarks/gpu_check.py $OUT/gpu --budget-s 420

(about 7 minutes; allow the command some 60 s more than the budget). Exit status 0 when every
part that ran finished cleanly, 1 otherwise, 2 for bad arguments.

It writes under OUT_DIR only three files, since copying results back from a lent machine is
limited to a few files: ``gpu_check.json``
(everything measured, per part: status, seconds, command, output tail, results),
``gpu_check.md`` (markdown tables ready to paste into docs/benchmarks.md) and ``gpu_check.log``
(every part's full output, one section each). Both summaries are rewritten after every part,
so a run cut short keeps what it finished. Scratch files (benchmark JSON, run directories
with checkpoints) go to a temporary folder that is removed at the end (``--keep-work`` keeps it).

Parts, in this order, each in a process of its own with its own time limit, so a failure or a
crash of one does not lose the others:

``env``
    device, driver (nvidia-smi), CUDA, cuDNN, torch/torchvision/Python versions, GPU memory.
``tests``
    ``pytest tests/test_cuda.py tests/test_stream.py tests/test_equivalence.py`` (the CUDA
    tests, JPEG decoding on the GPU among them, and the CPU equivalence tests on this machine's
    software).
``bench_eager``
    ``benchmarks/step_time.py``: ResNet-18 full width, batch 512, bf16 autocast, channels_last,
    variants native,bp,fa,ss,kp,wm, with CUDA peak memory (``--memory``).
``bench_compiled``
    the same for native,kp under ``torch.compile`` (inductor), each compiled once in the timing
    process (``bench_compiled_wm``, wm alone, comes after ``epoch_kp``: one compilation per
    variant takes long enough that a part holding all three could lose all three to its limit).
``epoch_kp``, ``epoch_bp`` (``bench_compiled_wm`` between them)
    one epoch of ``kp_resnet18`` / ``bp_resnet18`` through ``neurosim.train.Run``, compiled, on
    device-resident random uint8 images of CIFAR-100's shape (50,000 + 10,000 images, 3×32×32,
    100 classes): image content does not change the time of dense GPU arithmetic. A warm-up
    first compiles the training graph (batch dimension dynamic, so the epoch's last, partial
    batch needs no new graph) and the evaluation graph, and the run is then restored to its
    initial state; the reported ``time_s`` is the run's own epoch time (every batch drawn,
    forward, feedback, local updates, SGD; not evaluation, checkpoint or compilation).
``cifar``
    optional: if ``gpu_data/cifar-100-python`` (or ``--cifar-dir``) holds a packed copy of
    CIFAR-100 (see below), ``kp_resnet18`` on it for as many epochs as the remaining budget
    allows, and the curve.

Time: ``--budget-s`` (default 420 s) is shared. Each part's limit is what is left minus the
minimum the later required parts need; ``bench_compiled_wm``, ``epoch_bp`` and ``cifar`` are
optional and run only with time to spare. On the H100 the compilations dominate; inductor caches them under
``/tmp/torchinductor_<user>``, so a second run on the same (warm) machine is faster.
``--parts`` runs a subset, e.g. ``--parts bench_compiled,epoch_kp --budget-s 400``.

Targets, printed as PASS/FAIL: KP compiled ≥ 0.97× native images/s (both compiled); one
kp_resnet18 epoch ≤ 3 s training time; KP CUDA peak memory ≤ 1.10× native (eager).

``--smoke`` runs the same code path at tiny sizes on the CPU (width 0.0625, float32, small
batches, a hundred-odd random images, no memory phase; torch.compile with the ``aot_eager``
backend for the KP benchmark and ``eager`` (graph capture only) elsewhere: inductor takes minutes
per ResNet on a small CPU); CUDA tests are skipped there. tests/test_gpu_check.py runs it.

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

Bad arguments end in one message and exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import lzma
import math
import os
import pickle
import platform
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
sys.path.insert(0, str(ROOT))

SCRIPT = Path(__file__).resolve()
PARTS = ("env", "tests", "bench_eager", "bench_compiled", "epoch_kp", "bench_compiled_wm", "epoch_bp", "cifar")
OPTIONAL = {"bench_compiled_wm", "epoch_bp", "cifar"}  # run only with time to spare: no time is held for them
TITLES = {
    "env": "environment", "tests": "CUDA tests", "bench_eager": "step time, eager",
    "bench_compiled": "step time, torch.compile", "epoch_kp": "one kp_resnet18 epoch",
    "bench_compiled_wm": "step time, torch.compile, wm",
    "epoch_bp": "one bp_resnet18 epoch", "cifar": "kp_resnet18 on packed CIFAR-100",
}
# (least seconds worth starting with, most seconds allowed) per part.
LIMITS = {
    "gpu": {"env": (10, 60), "tests": (60, 240), "bench_eager": (45, 150), "bench_compiled": (100, 300),
            "bench_compiled_wm": (70, 200),
            "epoch_kp": (100, 300), "epoch_bp": (80, 240), "cifar": (60, 600)},
    "smoke": {"env": (5, 120), "tests": (5, 240), "bench_eager": (10, 300), "bench_compiled": (10, 300),
              "bench_compiled_wm": (10, 300),
              "epoch_kp": (10, 300), "epoch_bp": (10, 300), "cifar": (10, 300)},
}
BENCH = {
    "gpu": {
        "common": ["--model", "resnet18", "--width", "1.0", "--batch", "512", "--dtype", "bf16", "--channels-last",
                   "--device", "cuda", "--reps", "5", "--warmup", "3", "--steps-per-rep", "10"],
        "bench_eager": ["--rules", "native,bp,fa,ss,kp,wm", "--memory"],
        "bench_compiled": ["--rules", "native,kp", "--compile", "--no-compile-check"],
        "bench_compiled_wm": ["--rules", "wm", "--compile", "--no-compile-check"],
    },
    "smoke": {
        "common": ["--model", "resnet18", "--width", "0.0625", "--batch", "8", "--channels-last", "--device", "cpu",
                   "--reps", "1", "--warmup", "1", "--steps-per-rep", "1"],
        "bench_eager": ["--rules", "native,kp"],
        "bench_compiled": ["--rules", "kp", "--compile", "--compile-backend", "aot_eager", "--no-compile-check"],
        "bench_compiled_wm": ["--rules", "wm", "--compile", "--compile-backend", "eager", "--no-compile-check"],
    },
}
EPOCH = {
    "gpu": dict(device="cuda", width=1.0, batch_size=None, train=50_000, test=10_000, classes=100,
                backend="inductor"),
    "smoke": dict(device="cpu", width=0.0625, batch_size=32, train=128, test=32, classes=100, backend="eager"),
}
CIFAR = {
    "gpu": dict(device="cuda", width=1.0, batch_size=None, compile=True, backend="inductor", max_epochs=200),
    # The smoke run's compiled path is the epoch parts'; here it would only add a graph capture.
    "smoke": dict(device="cpu", width=0.0625, batch_size=32, compile=False, backend="eager", max_epochs=1),
}
TESTS = {"gpu": ["tests/test_cuda.py", "tests/test_stream.py", "tests/test_equivalence.py"],
         "smoke": ["tests/test_cuda.py"]}
TARGETS = {"kp_compiled_speed": 0.97, "kp_epoch_s": 3.0, "kp_memory": 1.10}

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
        description="Run the GPU check (environment, CUDA tests, step time, epochs) and write "
                    "OUT_DIR/gpu_check.{json,md,log}; or pack CIFAR-100 to travel to the GPU machine.",
        epilog="On the GPU machine, from the repository root: python3 benchmarks/gpu_check.py $OUT/gpu "
               "--budget-s 420")
    p.add_argument("out_dir", nargs="?", type=Path, help="where gpu_check.json, .md and .log are written")
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
    p.add_argument("--child", choices=("env", "epoch", "cifar"), help=argparse.SUPPRESS)
    p.add_argument("--settings", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        if not args.settings or not args.result:
            p.error("--child needs --settings and --result")
        return args
    if args.pack_cifar100:
        if args.out_dir is not None:
            p.error("--pack-cifar100 takes no OUT_DIR")
        if not 1 <= args.train_per_class <= 500:
            p.error(f"--train-per-class must be 1..500 (CIFAR-100 has 500 per class), got {args.train_per_class}")
        return args
    if args.out_dir is None:
        p.error("OUT_DIR is required (or --pack-cifar100 SRC_DIR DEST_DIR)")
    if args.out_dir.exists() and not args.out_dir.is_dir():
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
# running parts

def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_logged(cmd: list[str], log_path: Path, timeout: float) -> dict:
    """Run ``cmd`` from the repository root, output to ``log_path``; kill its whole process group
    (compiler workers included) at ``timeout``. Returns rc (None if killed), timed_out, seconds."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=child_env(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
            timed_out = False
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
        self.summary = {
            "tool": "benchmarks/gpu_check.py", "format": 1, "mode": self.mode,
            "started": _now(), "finished": None, "budget_s": args.budget_s, "elapsed_s": None,
            "command": shlex.join(["python3", "benchmarks/gpu_check.py", *sys.argv[1:]]),
            "repo": repo_info(), "parts": {}, "targets": [],
        }

    # -- time ------------------------------------------------------------------------------------
    def limit_for(self, name: str) -> tuple[float, str | None]:
        least, most = LIMITS[self.mode][name]
        later = [p for p in self.args.parts[self.args.parts.index(name) + 1:] if p not in OPTIONAL]
        reserve = sum(LIMITS[self.mode][p][0] for p in later)
        left = self.deadline - time.monotonic()
        limit = min(most, left - reserve)
        if limit < least:
            why = (f"not enough of the budget left: {left:.0f} s, of which {reserve:.0f} s are held for "
                   f"{', '.join(later)}; this part needs at least {least} s" if reserve else
                   f"not enough of the budget left: {left:.0f} s; this part needs at least {least} s")
            return limit, why
        return limit, None

    # -- the run ---------------------------------------------------------------------------------
    def run(self) -> int:
        runners = {"env": self.part_env, "tests": self.part_tests, "bench_eager": self.part_bench,
                   "bench_compiled": self.part_bench, "bench_compiled_wm": self.part_bench,
                   "epoch_kp": self.part_epoch, "epoch_bp": self.part_epoch,
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
                env = (self.summary["parts"].get("env") or {}).get("result") or {}
                if why is None and name != "env" and self.mode == "gpu" and env.get("cuda_available") is False:
                    why = "torch sees no CUDA GPU here (use --smoke on a machine without one)"
                if why is not None:
                    rec = {"status": "skipped", "reason": why, "seconds": 0.0}
                else:
                    print(f"[{name}] {TITLES[name]}: limit {limit:.0f} s ...", flush=True)
                    try:
                        rec = runners[name](name, limit)
                    except Exception as e:  # a bug here must not lose the other parts
                        rec = {"status": "failed", "reason": f"gpu_check error: {type(e).__name__}: {e}",
                               "seconds": 0.0}
                self.summary["parts"][name] = rec
                note = f" ({rec['reason']})" if rec.get("reason") else ""
                print(f"[{name}] {rec['status']} in {rec.get('seconds', 0):.0f} s{note}", flush=True)
                self.write()
        except KeyboardInterrupt:
            self.summary["interrupted"] = True
            if name is not None and name not in self.summary["parts"]:
                self.summary["parts"][name] = {"status": "interrupted", "reason": "gpu_check was stopped during it",
                                               "seconds": 0.0}
            print("interrupted: writing what was finished", file=sys.stderr)
        self.write(final=True)
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        else:
            print(f"scratch files kept in {self.work}")
        print((self.out / "gpu_check.md").read_text())
        bad = [n for n, r in self.summary["parts"].items()
               if r["status"] in ("failed", "timeout", "partial", "interrupted")]
        return 1 if bad else 0

    def write(self, final: bool = False) -> None:
        s = self.summary
        s["targets"] = evaluate_targets(s["parts"], self.mode)
        s["elapsed_s"] = round(time.monotonic() - self.start, 1)
        if final:
            s["finished"] = _now()
        write_json_atomic(self.out / "gpu_check.json", s)
        (self.out / "gpu_check.md").write_text(render_markdown(s))
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

    # -- parts -----------------------------------------------------------------------------------
    def child_cmd(self, kind: str, settings: dict, result: Path) -> list[str]:
        return [sys.executable, str(SCRIPT), "--child", kind, "--settings", json.dumps(settings), "--result",
                str(result)]

    def part_env(self, name: str, limit: float) -> dict:
        result, log = self.work / "env.json", self.work / "logs" / "env.log"
        cmd = self.child_cmd("env", {}, result)
        rec = base_record(cmd, run_logged(cmd, log, limit), log, limit)
        info = read_json(result)
        rec["result"] = info
        if rec["status"] == "ok" and not info:
            rec.update(status="failed", reason="wrote no result")
        elif info and not info.get("neurosim_from_repo"):
            rec.update(status="failed", reason=f"neurosim was imported from {info.get('neurosim_file')}, not from "
                                               f"this repository")
        elif info and self.mode == "gpu" and not info.get("cuda_available"):
            rec.update(status="failed", reason="torch sees no CUDA GPU")
        return rec

    def part_tests(self, name: str, limit: float) -> dict:
        junit, log = self.work / "junit.xml", self.work / "logs" / "tests.log"
        files = TESTS[self.mode]
        cmd = [sys.executable, "-m", "pytest", *files, "-v", "-rfEs", "-p", "no:cacheprovider",
               f"--junitxml={junit}"]
        proc = run_logged(cmd, log, limit)
        rec = base_record(cmd, proc, log, limit)
        rec["command"] = shlex.join(["python3", "-m", "pytest", *files, "-v", "-rfEs"])
        res = parse_junit(junit)
        rec["result"] = res
        if res is None:
            if rec["status"] == "ok":
                rec.update(status="failed", reason="pytest wrote no report")
            return rec
        if rec["status"] == "failed" and proc["rc"] == 1:
            rec["reason"] = f"{res['failed']} failed, {res['errors']} errors"
        if res["tests"] and res["skipped"] == res["tests"]:
            reasons = "; ".join(f"{why} ({n})" for why, n in res["skip_reasons"].items())
            rec.update(status="skipped", reason=f"all {res['tests']} tests skipped: {reasons}")
        return rec

    def part_bench(self, name: str, limit: float) -> dict:
        result, log = self.work / f"{name}.json", self.work / "logs" / f"{name}.log"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "step_time.py"), *BENCH[self.mode]["common"],
               *BENCH[self.mode][name], "--json", str(result)]
        rec = base_record(cmd, run_logged(cmd, log, limit), log, limit)
        rec["command"] = rec["command"].replace(str(result), f"{name}.json")
        data = read_json(result)
        if data is None:
            if rec["status"] == "ok":
                rec.update(status="failed", reason="step_time.py wrote no JSON")
            return rec
        rec["result"] = bench_summary(data)
        native = _variant(self.summary["parts"], "bench_compiled", "native")
        if name == "bench_compiled_wm" and "median_ms" in native:  # native was timed in its own process
            for r in rec["result"]["variants"].values():
                if "median_ms" in r:
                    r["ratio_vs_native"] = r["median_ms"] / native["median_ms"]
            rec["result"]["ratio_note"] = "vs native: native compiled, timed by the bench_compiled part"
        failed = {v: r["failure"] for v, r in rec["result"]["variants"].items() if r.get("failure")}
        mem_failed = {v: r["memory"]["error"] for v, r in rec["result"]["variants"].items()
                      if isinstance(r.get("memory"), dict) and "error" in r["memory"]}
        if rec["status"] == "ok" and (failed or mem_failed):
            what = "; ".join([f"{v}: {m}" for v, m in failed.items()]
                             + [f"{v} memory: {m}" for v, m in mem_failed.items()])
            rec.update(status="partial", reason=f"some variants failed: {what}")
        return rec

    def part_epoch(self, name: str, limit: float) -> dict:
        rule = name.split("_")[1]
        result, log = self.work / f"{name}.json", self.work / "logs" / f"{name}.log"
        settings = dict(EPOCH[self.mode], rule=rule, run_dir=str(self.work / f"run_{name}"), seed=0)
        cmd = self.child_cmd("epoch", settings, result)
        rec = base_record(cmd, run_logged(cmd, log, limit), log, limit)
        rec["command"] = f"gpu_check.py --child epoch (settings: {json.dumps(settings_for_display(settings))})"
        rec["result"] = read_json(result)
        if rec["status"] == "ok" and not (rec["result"] or {}).get("metrics"):
            rec.update(status="failed", reason="the epoch reported no metrics")
        return rec

    def part_cifar(self, name: str, limit: float) -> dict:
        result, log = self.work / "cifar.json", self.work / "logs" / "cifar.log"
        settings = dict(CIFAR[self.mode], data_dir=str(self.args.cifar_dir.resolve()),
                        run_dir=str(self.work / "run_cifar"), seed=0, deadline_s=max(limit - 20, 10))
        cmd = self.child_cmd("cifar", settings, result)
        rec = base_record(cmd, run_logged(cmd, log, limit), log, limit)
        rec["command"] = f"gpu_check.py --child cifar (settings: {json.dumps(settings_for_display(settings))})"
        rec["result"] = read_json(result)
        if rec["status"] == "ok" and not (rec["result"] or {}).get("curve"):
            rec.update(status="failed", reason="no epoch finished")
        return rec


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


def parse_junit(path: Path) -> dict | None:
    """Counts, failures and skip reasons from pytest's JUnit XML."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases = root.iter("testcase")
    res = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [],
           "skip_reasons": Counter(), "seconds": 0.0}
    for suite in root.iter("testsuite"):
        res["seconds"] += float(suite.get("time", 0) or 0)
    for case in cases:
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


def bench_summary(data: dict) -> dict:
    """The parts of step_time.py's JSON the summary keeps (raw per-rep times included)."""
    keep = ("median_ms", "spread_ms", "images_per_s", "epoch_s", "ratio_vs_native", "ratio_vs_bp", "failure",
            "memory", "times_s")
    return {"settings": data.get("settings"), "device_name": data.get("device_name"), "torch": data.get("torch"),
            "command": data.get("command"), "date": data.get("date"), "final_loss": data.get("final_loss"),
            "variants": {n: {k: v for k, v in r.items() if k in keep} for n, r in data.get("variants", {}).items()}}


# ---------------------------------------------------------------------------------------------
# targets and the markdown summary

def _variant(parts: dict, part: str, name: str) -> dict:
    return (((parts.get(part) or {}).get("result") or {}).get("variants") or {}).get(name) or {}


def evaluate_targets(parts: dict, mode: str) -> list[dict]:
    judged = mode == "gpu"
    out = []

    kp, native = _variant(parts, "bench_compiled", "kp"), _variant(parts, "bench_compiled", "native")
    basis = "both compiled"
    if "images_per_s" not in native:
        native, basis = _variant(parts, "bench_eager", "native"), "kp compiled, native eager"
    t = {"name": "kp_compiled_speed", "target": f"KP compiled ≥ {TARGETS['kp_compiled_speed']}× native images/s"}
    if "images_per_s" in kp and "images_per_s" in native:
        r = kp["images_per_s"] / native["images_per_s"]
        t.update(value=r, measured=f"{r:.3f}× (kp {kp['images_per_s']:.0f}, native {native['images_per_s']:.0f} "
                                   f"images/s; {basis})", passed=r >= TARGETS["kp_compiled_speed"])
    out.append(t)

    m = ((parts.get("epoch_kp") or {}).get("result") or {}).get("metrics") or {}
    t = {"name": "kp_epoch_s", "target": f"one kp_resnet18 epoch ≤ {TARGETS['kp_epoch_s']:g} s training time"}
    if "time_s" in m:
        t.update(value=m["time_s"], measured=f"{m['time_s']:.2f} s ({m.get('images_per_s', 0):.0f} images/s)",
                 passed=m["time_s"] <= TARGETS["kp_epoch_s"])
    out.append(t)

    kp_mem = _variant(parts, "bench_eager", "kp").get("memory") or {}
    nat_mem = _variant(parts, "bench_eager", "native").get("memory") or {}
    t = {"name": "kp_memory", "target": f"KP CUDA peak memory ≤ {TARGETS['kp_memory']:.2f}× native"}
    if "ratio_vs_native" in kp_mem:
        r = kp_mem["ratio_vs_native"]
        t.update(value=r, measured=f"{r:.3f}× (kp {kp_mem['peak_mb']:.0f} MB, native {nat_mem.get('peak_mb', 0):.0f} "
                                   f"MB; eager)", passed=r <= TARGETS["kp_memory"])
    out.append(t)

    for t in out:
        if "value" not in t:
            t.update(measured="not measured", passed=None, result="NOT MEASURED")
        elif not judged:
            t.update(passed=None, result="not judged (smoke run: CPU, tiny sizes)")
        else:
            t["result"] = "PASS" if t["passed"] else "FAIL"
    return out


def _fmt(v, spec=".1f", dash="–") -> str:
    return dash if v is None else format(v, spec)


def _hms(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def render_markdown(s: dict) -> str:
    parts = s["parts"]
    env = (parts.get("env") or {}).get("result") or {}
    dev = (env.get("devices") or [{}])[0]
    smi = env.get("nvidia_smi") or {}
    lines = [f"# GPU check ({s['mode']})", ""]
    if s["mode"] == "smoke":
        lines += ["Smoke run: the GPU check's code path at tiny sizes on the CPU. No number here is a GPU "
                  "measurement.", ""]
    lines += [f"`{s['command']}`, started {s['started']}, {s.get('elapsed_s') or 0:.0f} s of a "
              f"{s['budget_s']:.0f} s budget; commit {s['repo'].get('commit', 'unknown')[:12]}"
              + (f" with {s['repo']['modified_files']} modified files" if s['repo'].get('modified_files') else "")
              + ".", ""]

    lines += ["## Parts", "", "| part | status | seconds | limit | note |", "| --- | --- | --- | --- | --- |"]
    for name in PARTS:
        if name not in parts:
            continue
        r = parts[name]
        lines.append(f"| {name} ({TITLES[name]}) | {r['status']} | {r.get('seconds', 0):.0f} | "
                     f"{_fmt(r.get('timeout_s'), '.0f')} | {_md(r.get('reason', ''))} |")
    lines.append("")

    lines += ["## Targets", "", "| target | measured | result |", "| --- | --- | --- |"]
    for t in s.get("targets", []):
        lines.append(f"| {t['target']} | {t['measured']} | {t['result']} |")
    lines.append("")

    if env:
        lines += ["## Environment", "", "| | |", "| --- | --- |"]
        rows = [("device", dev.get("name") or env.get("device")),
                ("GPU memory", f"{dev['total_memory_gib']:.1f} GiB, {dev.get('multiprocessors')} SMs, "
                               f"compute capability {dev.get('capability')}" if dev else None),
                ("driver", smi.get("driver_version")), ("CUDA (torch)", env.get("cuda")),
                ("cuDNN", env.get("cudnn")), ("torch", env.get("torch")), ("torchvision", env.get("torchvision")),
                ("triton", env.get("triton")), ("Python", env.get("python")),
                ("CPU", f"{env.get('cpu_count')} logical CPUs"),
                ("neurosim", env.get("neurosim_file")),
                ("inductor cache at start", env.get("inductor_cache"))]
        lines += [f"| {k} | {_md(str(v))} |" for k, v in rows if v]
        lines.append("")

    tests = (parts.get("tests") or {}).get("result")
    if tests:
        lines += ["## Tests", "", f"`{parts['tests'].get('command', '')}`: {tests['passed']} passed, "
                  f"{tests['failed']} failed, {tests['errors']} errors, {tests['skipped']} skipped "
                  f"({tests['seconds']:.0f} s).", ""]
        for f in tests["failures"]:
            lines.append(f"- FAILED `{f['test']}`: {_md(f['message'])}")
        for why, n in tests["skip_reasons"].items():
            lines.append(f"- skipped ({n}): {_md(why)}")
        lines.append("")

    for name in ("bench_eager", "bench_compiled", "bench_compiled_wm"):
        res = (parts.get(name) or {}).get("result")
        if not res:
            continue
        st = res.get("settings") or {}
        lines += [f"## {TITLES[name].capitalize()}: {st.get('model')} width {st.get('width')}, batch "
                  f"{st.get('batch')}, {st.get('dtype')}{', channels_last' if st.get('channels_last') else ''}"
                  f"{', torch.compile (' + str(st.get('compile_backend')) + ')' if st.get('compile') else ''}, "
                  f"{res.get('device_name')}", "",
                  "```", f"python3 benchmarks/{parts[name]['command'].split('benchmarks/', 1)[-1]}", "```", "",
                  f"{st.get('reps')} interleaved repetitions of {st.get('steps_per_rep')} steps after "
                  f"{st.get('warmup')} warm-up steps; medians. torch {res.get('torch')}, {res.get('date')}."
                  + (f" {res['ratio_note']}." if res.get("ratio_note") else ""), ""]
        has_mem = any(isinstance(r.get("memory"), dict) for r in res["variants"].values())
        head = "| variant | ms/step (median) | min..max | vs native | images/s | 50k-image epoch |"
        sep = "| --- | --- | --- | --- | --- | --- |"
        if has_mem:
            mem = "CUDA peak" if "cuda" in str(st.get("device")) else "peak RSS growth"
            head += f" {mem} | memory vs native |"
            sep += " --- | --- |"
        lines += [head, sep]
        for v, r in res["variants"].items():
            if "median_ms" not in r:
                lines.append(f"| {v} | failed: {_md(r.get('failure', 'no timing'))} |")
                continue
            lo, hi = r["spread_ms"]
            row = (f"| {v} | {r['median_ms']:.1f} | {lo:.1f}..{hi:.1f} | {_fmt(r.get('ratio_vs_native'), '.3f')} | "
                   f"{r['images_per_s']:.0f} | {_hms(r.get('epoch_s'))} |")
            if has_mem:
                m = r.get("memory") or {}
                row += (f" failed: {_md(m['error'])} | |" if "error" in m else
                        f" {_fmt(m.get('peak_mb'), '.0f')} MB | {_fmt(m.get('ratio_vs_native'), '.3f')} |")
            lines.append(row)
        lines.append("")

    epochs = [(n, (parts.get(n) or {}).get("result")) for n in ("epoch_kp", "epoch_bp")]
    epochs = [(n, r) for n, r in epochs if r]
    if epochs:
        first = epochs[0][1]
        lines += ["## One training epoch through neurosim.train.Run, compiled", "",
                  _md(first.get("data_note", "")), "",
                  "| preset | batch | steps | compile warm-up | epoch time (time_s) | images/s | CUDA peak | "
                  "graphs compiled in the epoch | graph breaks | train loss |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for n, r in epochs:
            m = r.get("metrics") or {}
            lines.append(f"| {r.get('preset')} | {r.get('batch_size')} | {r.get('steps_per_epoch')} | "
                         f"{_fmt(r.get('warmup_s'), '.1f')} s | {_fmt(m.get('time_s'), '.2f')} s | "
                         f"{_fmt(m.get('images_per_s'), '.0f')} | {_fmt(r.get('peak_memory_mb'), '.0f')} MB | "
                         f"{_fmt(r.get('graphs_compiled_in_train'), 'd')} | {_fmt(r.get('graph_breaks'), 'd')} | "
                         f"{_fmt(m.get('train_loss'), '.3f')} |")
        lines += ["", _md(first.get("time_note", "")), ""]

    cifar = (parts.get("cifar") or {}).get("result")
    if cifar and cifar.get("curve"):
        lines += [f"## kp_resnet18 on packed CIFAR-100 ({_md(cifar.get('data_note', ''))})", "",
                  "| epoch | train loss | train top-1 | test top-1 | test top-5 | mean W–Bᵀ angle | epoch time | "
                  "images/s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m in cifar["curve"]:
            lines.append(f"| {m['epoch']} | {_fmt(m.get('train_loss'), '.3f')} | {_fmt(m.get('train_acc'), '.2f')} % | "
                         f"{_fmt(m.get('test_acc'), '.2f')} % | {_fmt(m.get('test_top5'), '.2f')} % | "
                         f"{_fmt(m.get('mean_angle'), '.1f')}° | {_fmt(m.get('time_s'), '.2f')} s | "
                         f"{_fmt(m.get('images_per_s'), '.0f')} |")
        lines.append("")

    failing = [(n, r) for n, r in parts.items() if r["status"] in ("failed", "timeout", "partial", "interrupted")]
    if failing:
        lines += ["## Output of parts that did not finish cleanly", ""]
        for n, r in failing:
            lines += [f"### {n}: {r['status']}", "", "```", r.get("log_tail", "")[-4000:], "```", ""]
    return "\n".join(lines) + "\n"


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------
# child processes (they import torch; the parent does not)

def child_main(args) -> int:
    settings = json.loads(args.settings)
    result_path = args.result
    if args.child == "env":
        write_json_atomic(result_path, environment())
        return 0
    if args.child == "epoch":
        return child_epoch(settings, result_path)
    return child_cifar(settings, result_path)


def environment() -> dict:
    import torch

    import neurosim

    info = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "cuda_available": torch.cuda.is_available(), "neurosim_file": str(Path(neurosim.__file__).resolve())}
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


def random_cifar100_shaped(n_train: int, n_test: int, classes: int, device, seed: int):
    """uint8 images of CIFAR's shape drawn uniformly on the device, random labels. The channel
    statistics are the uniform distribution's (mean 127.5/255, std √((256²−1)/12)/255)."""
    import torch

    from neurosim.data import ImageData

    g = torch.Generator(device=device).manual_seed(seed)
    draw = lambda n: (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device, generator=g),
                      torch.randint(0, classes, (n,), device=device, generator=g))
    (tx, ty), (vx, vy) = draw(n_train), draw(n_test)
    mean, std = 127.5 / 255, math.sqrt((256**2 - 1) / 12) / 255
    return ImageData("random uint8, CIFAR-100 shape", tx, ty, vx, vy, tuple(f"class{i}" for i in range(classes)),
                     (mean,) * 3, (std,) * 3)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graph_counts() -> tuple[int, int]:
    """Graphs dynamo has compiled in this process, and graph breaks it has taken."""
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0)), int(sum(counters["graph_break"].values()))


def make_run(cfg, run_dir: Path, data, backend: str):
    from neurosim.train import Run

    run_dir.mkdir(parents=True, exist_ok=True)
    run = Run(cfg, run_dir, data=data, quiet=True)
    if cfg.compile and backend != "inductor":  # Run compiles with the default backend (inductor)
        import torch

        run.model = torch.compile(run.circuit, backend=backend)
    return run


def warm_up(run) -> dict:
    """Compile what an epoch and its evaluation call, then put the run back as it was.

    The training graph is compiled for a batch whose first dimension is marked dynamic, so the
    full batches and the epoch's last, smaller one share it (a real run reaches the same graph
    after its first partial batch); then a few steps including that last batch, the evaluation
    graph the same way, and a whole evaluation. The run's state (weights, optimizer, position,
    random generators) is saved before and restored after.
    """
    import torch

    state = copy.deepcopy(run.state_dict())
    graphs0, _ = _graph_counts()
    t0 = time.perf_counter()
    stream, n = run.train_stream, len(run.train_stream)
    x, y = stream.batch(0, 0)
    torch._dynamo.maybe_mark_dynamic(x, 0)
    run.engaged_step(x, y)
    for i in sorted({1, n - 1} - {0}):
        if i < n:
            run.engaged_step(*stream.batch(0, i))
    _sync(run.device)
    train_s = time.perf_counter() - t0
    with torch.no_grad():  # as evaluate_stream calls the model
        run.circuit.set_mode("eval")
        x, _ = run.test_stream.batch(0, 0)
        torch._dynamo.maybe_mark_dynamic(x, 0)
        with torch.autocast(run.device.type, run.amp_dtype, enabled=run.amp_dtype is not None):
            run.model(x)
        run.circuit.set_mode("engaged")
    run.evaluate()
    _sync(run.device)
    total = time.perf_counter() - t0
    run.load_state_dict(state)
    graphs1, _ = _graph_counts()
    return {"warmup_s": total, "warmup_train_s": train_s, "graphs_compiled_in_warmup": graphs1 - graphs0}


def child_epoch(settings: dict, result_path: Path) -> int:
    import torch

    from neurosim.config import preset

    device = torch.device(settings["device"])
    rule = settings["rule"]
    name = f"{rule}_resnet18"
    overrides = dict(device=str(device), epochs=1, compile=True, monitor_every=0, width=settings["width"],
                     data="synthetic", synthetic_train=settings["train"], synthetic_test=settings["test"],
                     seed=settings["seed"])
    if settings.get("batch_size"):
        overrides["batch_size"] = settings["batch_size"]
    cfg = preset(name, **overrides)
    data_note = (f"Data: device-resident random uint8 images of CIFAR-100's shape ({settings['train']:,} training "
                 f"+ {settings['test']:,} test images, 3×32×32, {settings['classes']} classes), drawn on the "
                 f"{device.type.upper() if device.type == 'cuda' else device.type}; the content of the images does "
                 f"not change the time of the dense arithmetic. Preset settings otherwise (batch "
                 f"{cfg.batch_size}, crop and flip on the device, SGD momentum 0.9, bf16 autocast and "
                 f"channels_last on CUDA), monitors off, width {cfg.width}, torch.compile backend "
                 f"{settings['backend']}.")
    time_note = ("Epoch time is the run's own `time_s`: every batch of the epoch drawn (augmented on the "
                 "device), forward, feedback, local updates and the SGD step, synchronised at the end; not the "
                 "evaluation, the checkpoint or compilation. Compilation happened in the warm-up (training "
                 "graph with a dynamic batch dimension, evaluation graph) before the run was restored to its "
                 "initial state.")
    result = {"preset": name, "batch_size": cfg.batch_size, "data_note": data_note, "time_note": time_note,
              "settings": settings}
    print(data_note, flush=True)
    write_json_atomic(result_path, result)

    data = random_cifar100_shaped(settings["train"], settings["test"], settings["classes"], device, settings["seed"])
    run = make_run(cfg, Path(settings["run_dir"]), data, settings["backend"])
    result["steps_per_epoch"] = len(run.train_stream)
    print(f"{name}: {len(run.train_stream)} steps per epoch; compiling (warm-up) ...", flush=True)
    result.update(warm_up(run))
    print(f"warm-up done in {result['warmup_s']:.1f} s ({result['graphs_compiled_in_warmup']} graphs)", flush=True)
    write_json_atomic(result_path, result)

    graphs0, _ = _graph_counts()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    m = run.train()
    result["train_call_s"] = time.perf_counter() - t0
    graphs1, breaks = _graph_counts()
    result["graphs_compiled_in_train"] = graphs1 - graphs0
    result["graph_breaks"] = breaks
    if device.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["metrics"] = {k: v for k, v in m.items() if k != "angles"}
    print(f"epoch: {m['time_s']:.2f} s, {m['images_per_s']:.0f} images/s, train loss {m['train_loss']:.3f}; "
          f"{result['graphs_compiled_in_train']} graphs compiled during train(), {breaks} graph breaks", flush=True)
    write_json_atomic(result_path, result)
    return 0


def child_cifar(settings: dict, result_path: Path) -> int:
    import attrs
    import torch

    from neurosim.config import preset

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
