"""Throughput of one process against several (torchrun, DDP) on the same global batch.

    python benchmarks/scaling.py --nproc 2 --device cpu
    python benchmarks/scaling.py --nproc 8 --device cuda --runs kp_resnet18_imagenet:--data-dir,/data

Each *run* is a preset with its overrides (``preset:--opt,value,--opt,value``). It is trained for
one epoch by one process with batch ``B × N`` and by ``N`` processes (``torchrun --standalone
--nproc_per_node N``) with batch ``B`` each, so both see the same global batches; the images/s of
that epoch come from each run's ``metrics.jsonl`` (training time only: the epoch's steps, not
start-up or evaluation). On the CPU the single process gets all ``--threads`` threads and each
of the ``N`` processes ``threads / N``, so both use the same cores.

Also printed per run: what DDP moves per engaged step and rank, counted on one step of the
wrapped circuit (``traffic``): the gradients it all-reduces (4 bytes per engaged weight; KP's
feedback weights are not among them, their update is derived from ``ΔW`` on every rank), and
the batch-norm buffers it broadcasts when batch norm is not synchronised. That count alone:

    python benchmarks/scaling.py --traffic kp_resnet50_imagenet bp_resnet50_imagenet
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


def traffic(name: str, args: list[str], side: int = 64) -> dict:
    """Bytes DDP all-reduces (gradients) and broadcasts (batch-norm buffers) per engaged step and rank.

    The all-reduce is counted, not inferred: the circuit is wrapped as a run wraps it (in a
    one-process gloo group when there is none) and one engaged step on random images
    (``side`` pixels square where the model pools globally; the sizes of the updates do not
    depend on it) runs with a communication hook that notes every bucket. Also returned: the
    bytes of the engaged feedback weights whose update is derived on every rank instead
    (``derived_feedback_bytes``; KP's), and of the batch-norm buffers DDP broadcasts at each
    forward when batch norm is not synchronised."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from neurosim.training import distributed
    from neurosim.training.config import preset
    from neurosim.training.overrides import parse_overrides
    from neurosim.training.run import build_circuit
    from neurosim.training.step import engaged_step

    cfg = preset(name, **parse_overrides([a for a in args]))
    shape = (1, 8, 8) if cfg.data == "digits" else (3, 32, 32) if cfg.model == "mlp" else (3, side, side)
    classes = {"digits": 10, "synthetic": 10, "cifar10": 10}.get(cfg.data, 1000 if "imagenet" in cfg.model else 100)
    circuit = build_circuit(cfg, shape, classes)
    buffers = sum(b.numel() * b.element_size() for pop in circuit.populations.values() for b in pop.buffers()
                  if b.is_floating_point())
    derived = sum(s.feedback.numel() * s.feedback.element_size() for s in distributed.derivable_feedback(circuit))
    alone = not dist.is_initialized()
    if alone:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = distributed.wrap(circuit, torch.device("cpu"))
        sent = []

        def counted(state, bucket):
            sent.append(bucket.buffer().numel() * bucket.buffer().element_size())
            return default_hooks.allreduce_hook(None, bucket)

        model.register_comm_hook(None, counted)
        optimizer = torch.optim.SGD(circuit.engaged_parameters(), lr=0.0)
        x, y = torch.randn(2, *shape), torch.randint(0, classes, (2,))
        engaged_step(circuit, model, optimizer, x, y, F.cross_entropy, None, None)
    finally:
        if alone:
            dist.destroy_process_group()
    return {"grad_bytes": sum(sent), "derived_feedback_bytes": derived, "bn_buffer_bytes": buffers}


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


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def print_traffic(specs: list[str]) -> int:
    """The traffic table alone: per preset, what DDP moves per engaged step and rank."""
    print("| run | all-reduced per step | feedback derived instead | BN buffers broadcast |")
    print("| --- | --- | --- | --- |")
    for spec in specs:
        t = traffic(*parse_run(spec))
        print(f"| `{spec}` | {megabytes(t['grad_bytes'])} | {megabytes(t['derived_feedback_bytes'])} | "
              f"{t['bn_buffer_bytes'] / 1e3:.1f} kB |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="images per process (the single process gets nproc x this)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--runs", nargs="*", default=list(DEFAULT_RUNS))
    p.add_argument("--json", type=Path)
    p.add_argument("--traffic", nargs="*", metavar="PRESET",
                   help="only count what DDP moves per engaged step for these presets (no training)")
    a = p.parse_args(argv)
    if a.traffic is not None:
        return print_traffic(a.traffic)
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
          f"(img/s) | ratio | gradients all-reduced per step | feedback derived instead | BN buffers broadcast |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['run']}` | {r['one']:.0f} | {r['many']:.0f} | {r['many'] / r['one']:.2f} | "
              f"{r['grad_bytes'] / 1e6:.3f} MB | {r['derived_feedback_bytes'] / 1e6:.3f} MB | "
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
