"""One engaged step and one stretch of sleep: the per-batch work of a training loop.

Neither synchronises with the device: the loss and output come back as device tensors, so a
caller can time a step or keep its statistics on the device. ``neurosim.training.run.Run`` and the
step-time benchmark both step through these functions.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F

from neurosim.core.dynamics import time_backward
from neurosim.core.reference import reference_backward
from neurosim.rules.base import SleepSchedule
from neurosim.training.distributed import derive_feedback_updates


def loss_function(name: str):
    if name == "cross_entropy":
        return F.cross_entropy

    def sigmoid_bce(logits, target):
        # Sigmoid cross-entropy on one-hot targets, summed over classes, averaged over the batch.
        onehot = F.one_hot(target, logits.shape[1]).to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / logits.shape[0]

    return sigmoid_bce


def engaged_step(circuit, model, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, loss_fn,
                 amp_dtype: torch.dtype | None, generator: torch.Generator | None,
                 execution: str = "compiled", time=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward, feedback and local updates on one batch; returns ``(loss, output)``.

    ``model`` is ``circuit`` itself or its compiled form. ``circuit`` None: ``model`` is a plain
    module that draws nothing per batch (the benchmark's native baseline). ``execution``
    "reference" runs the step literally (``neurosim.core.reference``), without autocast.
    ``time`` (``time_execution``): the batch is presented to the circuit in time instead, and
    the loss and output are those at the stimulus's last step.
    """
    optimizer.zero_grad(set_to_none=True)
    if circuit is not None:
        # Per-batch feedback draws (brSF) share the seeded, checkpointed sleep-noise stream.
        circuit.new_batch(generator)
    if time is not None:
        # Continuous plasticity moves the weights during the presentation, at the optimizer's rate
        # (its schedule's); it leaves no .grad, so the step below changes nothing then.
        loss, out = time.backward(x, lambda a: loss_fn(a, y), generator, lr=optimizer.param_groups[0]["lr"])
    elif execution == "reference":
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


class LiteralTime:
    """The literal execution of a circuit in time (``neurosim.core.dynamics.time_backward``)
    behind the call the compiled one answers: ``backward(x, loss_fn) -> (loss, output)``, both
    at the stimulus's last step; ``generator`` draws the intrinsic noise (``TimeSettings.noise``)."""

    def __init__(self, circuit, settings):
        self.circuit, self.settings = circuit, settings

    def backward(self, x: torch.Tensor, loss_fn, generator: torch.Generator | None = None, lr: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        last, outputs = self.settings.steps(self.settings.duration), []

        def loss_of(a):  # called once per time step; the stimulus is on for the first ``last``
            if len(outputs) < last:
                outputs.append(a.detach())
            return loss_fn(a)

        loss = time_backward(self.circuit, x, loss_of, self.settings, generator=generator, lr=lr)
        return loss, outputs[-1]


def time_execution(circuit, settings, execution: str = "compiled", compile: bool = False):
    """What presents each batch to ``circuit`` in time under ``settings`` (None: nothing, the
    step is instantaneous): the literal execution for ``execution`` "reference", else the
    batched one (``neurosim.core.time_execution``), compiled with ``compile``."""
    if settings is None:
        return None
    if execution == "reference":
        return LiteralTime(circuit, settings)
    from neurosim.core.time_execution import TimeExecution

    return TimeExecution(circuit, settings, compile=compile)


@attrs.frozen
class SleepGroup:
    """Sleeping synapses that share one schedule: ``names`` (in construction order), the
    ``schedule``, and whether any of them replays data (``SleepPhase.drive``)."""

    schedule: SleepSchedule
    names: tuple[str, ...]
    replays: bool = False

    def before(self, epoch_batches: int) -> int:
        """Mirror batches of the sleep before training (-1 in the schedule: an epoch's batches)."""
        return epoch_batches if self.schedule.before == -1 else self.schedule.before


def sleep_plan(circuit) -> tuple[torch.optim.Optimizer | None, tuple[SleepGroup, ...]]:
    """The sleep optimizer and the sleep groups of ``circuit``'s sleeping synapses, from each
    one's own rule (its ``sleep_phase``), never the circuit's default rule; ``(None, ())`` when
    none sleeps.

    The optimizer is plain SGD with one parameter group per distinct rate, in the order the
    rates first appear among the synapses (a circuit whose sleeping synapses share one rate has
    one group, as the checkpoints written before there were several hold). Synapses sleep in
    groups, one per distinct schedule, in the order the schedules first appear: each group
    sleeps on its own schedule, and when several are due after the same step they sleep one
    after the other, in that order (``Run.sleep``)."""
    sleepers = circuit.sleeping_synapses()
    if not sleepers:
        return None, ()
    names = {id(s): n for n, s in circuit.synapses.items()}
    phases = {}
    for s in sleepers:
        phase = s.rule.sleep_phase
        if phase is None:
            raise TypeError(f"{type(s.rule).__name__} learns its feedback in sleep but declares no sleep_phase")
        phases[names[id(s)]] = phase
    by_schedule: dict[SleepSchedule, list[str]] = {}
    for name, phase in phases.items():
        by_schedule.setdefault(phase.schedule, []).append(name)
    groups = tuple(SleepGroup(sch, tuple(ns), any(phases[n].drive == "data" for n in ns))
                   for sch, ns in by_schedule.items())
    rates: dict[float, list] = {}
    for s in sleepers:
        rates.setdefault(phases[names[id(s)]].rate, []).append(s.feedback)
    first = next(iter(rates))
    optimizer = torch.optim.SGD([{"params": ps, "lr": r} for r, ps in rates.items()], lr=first)
    return optimizer, groups


def sleep_steps(circuit, sleep_optimizer: torch.optim.Optimizer, batches: int, batch_size: int,
                generator: torch.Generator | None, literal: bool = False, stop=None, synapses=None,
                data: torch.Tensor | None = None) -> int:
    """``batches`` mirror batches for every sleeping synapse (or those named in ``synapses``):
    noise (or the replayed ``data``) in, feedback updates out.

    ``stop(done)``, if given, is asked after each mirror batch but the last (``done`` of them so
    far); True ends the stretch there. Returns the mirror batches done: ``batches`` unless
    stopped. Each mirror batch depends only on the weights, the noise stream (or the data), and
    the sleep optimizer, so a stretch stopped after ``done`` and continued with ``batches - done``
    more draws and updates exactly what one unbroken stretch would. Synapses not asked to sleep
    keep ``.grad`` None and the optimizer passes them by."""
    for done in range(1, batches + 1):
        sleep_optimizer.zero_grad(set_to_none=True)
        circuit.sleep(batch_size, generator, literal=literal, synapses=synapses, data=data)
        sleep_optimizer.step()
        if stop is not None and done < batches and stop(done):
            return done
    return batches


def batch_at(stream, epoch: int, index: int) -> torch.Tensor:
    """The input batch number ``index`` of ``stream``'s epoch ``epoch`` (streams repeat an
    epoch's batches exactly, which is how a run resumes mid-epoch)."""
    batches = stream.epoch(epoch, start=index)
    try:
        return next(iter(batches))[0]
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # a streamed epoch's loader workers end here
