"""One engaged step and one stretch of sleep: the per-batch work of a training loop.

Neither synchronises with the device: the loss and output come back as device tensors, so a
caller can time a step or keep its statistics on the device. ``neurosim.training.run.Run`` and the
step-time benchmark both step through these functions.
"""

from __future__ import annotations

import torch

from neurosim.common.errors import UserError
from neurosim.core.reference import reference_backward
from neurosim.rules.base import SleepSchedule
from neurosim.training.distributed import derive_feedback_updates


def engaged_step(circuit, model, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, loss_fn,
                 amp_dtype: torch.dtype | None, generator: torch.Generator | None,
                 execution: str = "compiled") -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, feedback and local updates on one batch; returns ``(loss, output)``.

    ``model`` is ``circuit`` itself or its compiled form. ``circuit`` None: ``model`` is a plain
    module that draws nothing per batch (the benchmark's native baseline). ``execution``
    "reference" runs the step literally (``neurosim.core.reference``), without autocast.
    """
    optimizer.zero_grad(set_to_none=True)
    if circuit is not None:
        # Per-batch feedback draws (brSF) share the seeded, checkpointed sleep-noise stream.
        circuit.new_batch(generator)
    if execution == "reference":
        out_holder = []

        def loss_of(out):
            out_holder.append(out.detach())
            return loss_fn(out, y)

        loss = reference_backward(circuit, x, loss_of)
        out = out_holder[0]
    else:
        with torch.autocast(x.device.type, amp_dtype, enabled=amp_dtype is not None):
            out = model(x)
            loss = loss_fn(out.float(), y)
        loss.backward()
        if circuit is not None:
            # Under DDP the backward has reduced ΔW by now; feedback updates that follow from it
            # (KP's) are made from the reduced one, the same on every rank.
            derive_feedback_updates(circuit)
    optimizer.step()
    return loss, out


def sleep_plan(circuit) -> tuple[torch.optim.Optimizer | None, SleepSchedule | None]:
    """The sleep optimizer and the schedule of ``circuit``'s sleeping synapses, from each one's
    own rule (its ``sleep_phase``), never the circuit's default rule; ``(None, None)`` when none
    sleeps.

    The optimizer is plain SGD with one parameter group per distinct rate, in the order the
    rates first appear among the synapses (a circuit whose sleeping synapses share one rate has
    one group, as the checkpoints written before there were several hold). All sleeping synapses
    sleep together, in one schedule: sleeping rules whose schedules differ are refused
    (``UserError``), since one sleep's position (``sleep_left`` in the checkpoint) could not say
    which of several sleeps a stop fell in."""
    sleepers = circuit.sleeping_synapses()
    if not sleepers:
        return None, None
    names = {id(s): n for n, s in circuit.synapses.items()}
    phases = {}
    for s in sleepers:
        phase = s.rule.sleep_phase
        if phase is None:
            raise TypeError(f"{type(s.rule).__name__} learns its feedback in sleep but declares no sleep_phase")
        phases[names[id(s)]] = phase
    schedules = {}
    for name, phase in phases.items():
        schedules.setdefault(phase.schedule, []).append(name)
    if len(schedules) > 1:
        each = "; ".join(f"{', '.join(ns)}: {sch}" for sch, ns in schedules.items())
        raise UserError(f"the sleeping synapses keep different sleep schedules ({each}); every sleeping "
                        f"rule of one circuit must sleep on the same schedule (before, every, batches)")
    groups: dict[float, list] = {}
    for s in sleepers:
        groups.setdefault(phases[names[id(s)]].rate, []).append(s.feedback)
    rates = list(groups)
    optimizer = torch.optim.SGD([{"params": ps, "lr": r} for r, ps in groups.items()], lr=rates[0])
    return optimizer, next(iter(schedules))


def sleep_steps(circuit, sleep_optimizer: torch.optim.Optimizer, batches: int, batch_size: int,
                generator: torch.Generator | None, literal: bool = False, stop=None) -> int:
    """``batches`` mirror batches for every sleeping synapse: noise in, feedback updates out.

    ``stop(done)``, if given, is asked after each mirror batch but the last (``done`` of them so
    far); True ends the stretch there. Returns the mirror batches done: ``batches`` unless
    stopped. Each mirror batch depends only on the weights, the noise stream and the sleep
    optimizer, so a stretch stopped after ``done`` and continued with ``batches - done`` more
    draws and updates exactly what one unbroken stretch would."""
    for done in range(1, batches + 1):
        sleep_optimizer.zero_grad(set_to_none=True)
        circuit.sleep(batch_size, generator, literal=literal)
        sleep_optimizer.step()
        if stop is not None and done < batches and stop(done):
            return done
    return batches
