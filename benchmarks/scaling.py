"""Throughput of one process against several (torchrun, DDP) on the same global batch.

    python benchmarks/scaling.py --nproc 2 --device cpu
    python benchmarks/scaling.py --nproc 8 --device cuda --runs kp_resnet18_imagenet:--data-dir,/data

Each *run* is a preset with its overrides (``preset:--opt,value,--opt,value``). It is trained for
one epoch by one process with batch ``B × N`` and by ``N`` processes (``torchrun --standalone
--nproc_per_node N``) with batch ``B`` each, so both see the same global batches; the images/s of
that epoch come from each run's ``metrics.jsonl`` (training time only: the epoch's steps, not
start-up or evaluation). On the CPU the single process gets all ``--threads`` threads and each
of the ``N`` processes ``threads / N``, so both use the same cores.

Also printed per run: what DDP moves per engaged step and rank, from the circuit itself: the
gradients of every engaged parameter (4 bytes each; KP's feedback weights among them), and the
batch-norm buffers DDP broadcasts when batch norm is not synchronised.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_RUNS = (
    "kp_mlp_digits:--epochs,1",
    "kp_resnet18:--data,synthetic,--synthetic-train,1024,--width,0.25,--epochs,1",
)


def parse_run(spec: str) -> tuple[str, list[str]]:
    name, _, rest = spec.partition(":")
    return name, [a for a in rest.split(",") if a]


def traffic(name: str, args: list[str]) -> dict:
    """Bytes DDP reduces (gradients) and broadcasts (batch-norm buffers) per engaged step and rank."""
    from neurosim.config import parse_overrides, preset
    from neurosim.train import build_circuit

    cfg = preset(name, **parse_overrides([a for a in args]))
    shape = {"digits": (1, 8, 8)}.get(cfg.data, (3, cfg.image_size, cfg.image_size) if "imagenet" in cfg.model
                                      else (3, 32, 32))
    classes = {"digits": 10, "synthetic": 10, "cifar10": 10}.get(cfg.data, 1000 if "imagenet" in cfg.model else 100)
    circuit = build_circuit(cfg, shape, classes)
    engaged = circuit.engaged_parameters()
    feedback = sum(s.feedback.numel() for s in circuit.synapses.values()
                   if s.feedback is not None and s.rule.feedback_learns == "engaged")
    buffers = sum(b.numel() for pop in circuit.populations.values() for b in pop.buffers()
                  if b.is_floating_point())
    return {"grad_bytes": 4 * sum(p.numel() for p in engaged), "feedback_grad_bytes": 4 * feedback,
            "bn_buffer_bytes": 4 * buffers}


def images_per_s(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["images_per_s"]


def train(name: str, args: list[str], nproc: int, batch: int, device: str, threads: int, out: Path) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // nproc)), PYTHONPATH=str(ROOT))
    cmd = [str(ROOT / "experiments" / "run_circuit.py"), name, *args, "--batch-size", str(batch),
           "--device", device, "--monitor-every", "0", "--quiet", "--out", str(out)]
    if nproc > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd]
    done = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: {name} on {nproc} process(es) failed:\n{done.stderr[-2000:]}")
    return images_per_s(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="images per process (the single process gets nproc x this)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--runs", nargs="*", default=list(DEFAULT_RUNS))
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    if a.nproc < 2 or a.batch < 1:
        sys.exit("error: --nproc must be at least 2 and --batch at least 1")
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.runs:
            name, args = parse_run(spec)
            one = train(name, args, 1, a.batch * a.nproc, a.device, a.threads, Path(tmp) / f"{name}-1")
            many = train(name, args, a.nproc, a.batch, a.device, a.threads, Path(tmp) / f"{name}-{a.nproc}")
            rows.append({"run": spec, "one": one, "many": many, **traffic(name, args)})
    print(f"| run | 1 process, batch {a.batch * a.nproc} (img/s) | {a.nproc} processes, batch {a.batch} each "
          f"(img/s) | ratio | gradients all-reduced per step | of which KP feedback | BN buffers broadcast |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['run']}` | {r['one']:.0f} | {r['many']:.0f} | {r['many'] / r['one']:.2f} | "
              f"{r['grad_bytes'] / 1e6:.3f} MB | {r['feedback_grad_bytes'] / 1e6:.3f} MB | "
              f"{r['bn_buffer_bytes'] / 1e3:.1f} kB |")
    meta = {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
            "load_after": os.getloadavg(), "device": a.device, "threads": a.threads}
    print(f"\n{json.dumps(meta)}")
    if a.json:
        a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
