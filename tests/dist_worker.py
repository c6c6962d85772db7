"""One process of the distributed tests (``tests/test_distributed.py`` starts 1 or 2 of them).

``python -m tests.dist_worker MODE OUT_DIR`` with torchrun's environment (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Each mode trains small runs and saves what the test compares to
``OUT_DIR/<mode>-rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from neurosim.core.circuit import Circuit
from neurosim.core.sync_bn import sync_batch_norm
from neurosim.rules import RULES
from neurosim.rules.backprop import Backprop
from neurosim.rules.kolen_pollack import KolenPollack
from neurosim.training import distributed
from neurosim.training.config import RULE_NAMES, preset
from neurosim.training.run import RunInterrupted, build_circuit
from neurosim.training.run_dir import open_run, resume_run
from neurosim.training.step import engaged_step, sleep_steps


def weights(run) -> dict[str, torch.Tensor]:
    """Every synapse's W and feedback weight, and every batch-norm state, on the CPU."""
    return circuit_weights(run.circuit)


def circuit_weights(circuit) -> dict[str, torch.Tensor]:
    out = {}
    for name, syn in circuit.synapses.items():
        out[f"{name}.weight"] = syn.weight.detach().cpu().clone()
        if syn.feedback is not None:
            out[f"{name}.feedback"] = syn.feedback.detach().cpu().clone()
    for name, t in circuit.state_dict().items():
        if ".norm." in name:
            out[name] = t.detach().cpu().clone()
    return out


# Every rule but those that learn in time (PAL): a circuit in time runs in one process.
DISTRIBUTED_RULES = [r for r in RULE_NAMES if not RULES[r].needs_time]


def every_rule(out: Path, world: distributed.World) -> dict:
    """Each rule's digits MLP after a few steps: 16 images per rank (or 32 on one process)."""
    result = {}
    for rule in DISTRIBUTED_RULES:
        cfg = preset(f"{rule}_mlp_digits", epochs=1, train_limit=256, batch_size=32 // world.size,
                     monitor_every=0, device="cpu")
        run = open_run(out / f"runs-{world.size}" / rule, cfg, quiet=True)
        run.train()
        result[rule] = weights(run)
    return result


def sync_bn(out: Path, world: distributed.World) -> dict:
    """A small float64 ResNet (KP and WM) for three steps of 16 images, with and without
    synchronised batch norm."""
    return {(rule, sync): float64_resnet(rule, sync, world) for rule in ("kp", "wm") for sync in (True, False)}


def compiled_sync_bn(out: Path, world: distributed.World) -> dict:
    """The small KP circuit with synchronised batch norm for two steps, compiled by Dynamo and
    not. The eager backend: what is under test is the tracing, and it keeps the test fast."""
    return {compiled: circuit_weights(small_circuit_trained(world, KolenPollack(decay=0.01), sync=True,
                                                            compiled=compiled)) for compiled in (True, False)}


def reduced(out: Path, world: distributed.World) -> dict:
    """KP and backprop on the small circuit (synchronised batch norm) for three steps: what DDP
    all-reduced per step, the size of the forward side's updates (W, biases, norms), and the
    weights before and after."""
    result = {}
    for rule in (KolenPollack(decay=0.01), Backprop()):
        sent = []
        circuit = small_circuit_trained(world, rule, sync=True, steps=3, sent=sent)
        result[rule.name] = {"bytes": sum(sent) / 3, "weights": circuit_weights(circuit),
                             "start": circuit_weights(small_circuit(rule))}
        result[rule.name]["forward_bytes"] = sum(p.numel() * p.element_size() for n, p in circuit.named_parameters()
                                                 if not n.endswith(".feedback"))
    return result


def small_circuit(rule) -> Circuit:
    """A float64 circuit with a convolution, a dense layer and batch norm in both."""
    circuit = Circuit(rule=rule)
    circuit.input("x", (3, 8, 8))
    circuit.population("c", (4, 8, 8), activation="relu", norm="batch")
    circuit.population("p", 4, pool="global_avg")
    circuit.population("h", 6, activation="relu", norm="batch")
    circuit.population("y", 3)
    circuit.conv("x", "c", 3, padding=1)
    circuit.identity("c", "p")
    circuit.dense("p", "h")
    circuit.dense("h", "y")
    return circuit.double()


def small_circuit_trained(world: distributed.World, rule, sync: bool = False, compiled: bool = False,
                          steps: int = 2, batch: int = 8, sent: list | None = None) -> Circuit:
    """``small_circuit`` trained on seeded images, this rank's share of each global batch; the
    bytes of every bucket DDP all-reduces are appended to ``sent``."""
    circuit = small_circuit(rule)
    if sync:
        sync_batch_norm(circuit)
    model = circuit
    if world.distributed:
        model = distributed.wrap(circuit, torch.device("cpu"))
        if sent is not None:
            model.register_comm_hook(sent, counted_allreduce)
    if compiled:
        model = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD(circuit.engaged_parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    data = torch.Generator().manual_seed(0)
    share = slice(world.rank * batch // world.size, (world.rank + 1) * batch // world.size)
    for _ in range(steps):
        x = torch.randn(batch, 3, 8, 8, generator=data, dtype=torch.float64)
        y = torch.randint(0, 3, (batch,), generator=data)
        engaged_step(circuit, model, optimizer, x[share], y[share], F.cross_entropy, None, None)
    return circuit


def counted_allreduce(sent: list, bucket):
    """DDP's own all-reduce, noting the bucket's size."""
    sent.append(bucket.buffer().numel() * bucket.buffer().element_size())
    return default_hooks.allreduce_hook(None, bucket)


def float64_resnet(rule: str, sync: bool, world: distributed.World, steps: int = 3, batch: int = 16) -> dict:
    """A narrow ResNet-18 built, wrapped and stepped as a run does it, but in float64 on seeded
    random images (this rank's share of each global batch), so that comparing process counts
    measures the distributed arithmetic and not float32 rounding."""
    cfg = preset(f"{rule}_resnet18", width=0.125, device="cpu")
    circuit = build_circuit(cfg, (3, 16, 16), 10).double()
    if sync:
        sync_batch_norm(circuit)
    model = distributed.wrap(circuit, torch.device("cpu")) if world.distributed else circuit
    optimizer = torch.optim.SGD(circuit.engaged_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    sleepers = circuit.sleep_parameters()
    sleep_optimizer = torch.optim.SGD(sleepers, lr=circuit.rule.lr) if sleepers else None
    noise, data = torch.Generator().manual_seed(1), torch.Generator().manual_seed(0)
    share = slice(world.rank * batch // world.size, (world.rank + 1) * batch // world.size)
    for _ in range(steps):
        x = torch.randn(batch, 3, 16, 16, generator=data, dtype=torch.float64)
        y = torch.randint(0, 10, (batch,), generator=data)
        engaged_step(circuit, model, optimizer, x[share], y[share], F.cross_entropy, None, noise)
        if sleep_optimizer is not None:
            sleep_steps(circuit, sleep_optimizer, 1, 4, noise)
    return circuit_weights(circuit)


def stream(out: Path, world: distributed.World) -> dict:
    """An ImageNet ResNet on a streamed folder (argv[3]), synchronised batch norm (one process has
    nothing to synchronise), 12 images a step."""
    cfg = preset("kp_resnet18_imagenet", data_dir=sys.argv[3], width=0.0625, image_size=32, epochs=1,
                 batch_size=12 // world.size, workers=1, device="cpu", monitor_every=0, sync_bn=world.size > 1)
    run = open_run(out / f"stream-{world.size}", cfg, quiet=True)
    run.train()
    run.close()
    return {"weights": weights(run), "steps": run.step}


def stop(out: Path, world: distributed.World) -> dict:
    """Rank 1 alone is asked to stop in step 3; every rank must stop at the same step."""
    cfg = preset("kp_mlp_digits", epochs=3, train_limit=256, batch_size=16, monitor_every=5, device="cpu")
    run = open_run(out / "stop", cfg, quiet=True)

    def on_step(r):
        if r.step == 3 and world.rank == 1:
            r.stop_requested = True

    try:
        run.train(on_step)
        stopped = None
    except RunInterrupted:
        stopped = run.step
    return {"stopped": stopped, "weights": weights(run)}


def resume(out: Path, world: distributed.World) -> dict:
    """Train one epoch, stop, resume to two; the same as two epochs straight."""
    cfg = preset("kp_mlp_digits", epochs=1, train_limit=256, batch_size=16, monitor_every=3, device="cpu")
    open_run(out / "resumed", cfg, quiet=True).train()
    resumed = resume_run(out / "resumed", overrides={"epochs": 2}, quiet=True)
    resumed.train()
    straight = open_run(out / "straight", attrs.evolve(cfg, epochs=2), quiet=True)
    straight.train()
    return {"resumed": weights(resumed), "straight": weights(straight)}


def partial_stats(out: Path, world: distributed.World) -> dict:
    """Two epochs straight, and the same run stopped one batch into its second epoch (asked on
    rank 1 alone) then resumed: the test compares their metrics files."""
    cfg = preset("kp_mlp_digits", epochs=2, train_limit=256, batch_size=16, monitor_every=0, device="cpu")
    open_run(out / "straight", cfg, quiet=True).train()
    stopped = open_run(out / "stopped", cfg, quiet=True)

    def on_step(r):
        if r.step == 3 and world.rank == 1:  # heard by all at the epoch's end, honoured one step later
            r.stop_requested = True

    try:
        stopped.train(on_step)
    except RunInterrupted:
        pass
    # Rank 0 wrote the checkpoint before its RunInterrupted came; another rank may be ahead of it.
    at = torch.load(out / "stopped" / "last.pt", weights_only=False)["batch"] if world.writer else None
    resume_run(out / "stopped", quiet=True).train()
    return {"stopped_at_batch": at}


def refuse(out: Path, world: distributed.World) -> dict:
    """Resume, with this world size, a run another world size trained."""
    try:
        resume_run(Path(sys.argv[3]), overrides={"epochs": 2}, quiet=True)
    except Exception as e:  # noqa: BLE001 - the test reads the message
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    world, _ = distributed.init("cpu")
    result = globals()[mode](out, world)
    torch.save(result, out / f"{mode}-{world.size}-rank{world.rank}.pt")
    distributed.finish(together=True)




if __name__ == "__main__":
    main()
