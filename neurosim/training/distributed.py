"""Training on several processes: ``torchrun`` launches them, ``torch.distributed`` joins them.

Each process (rank) holds the whole circuit and a disjoint shard of every global batch;
``DistributedDataParallel`` averages the engaged updates across ranks as it averages gradients.
What keeps every rank's feedback weights identical, rule by rule:

- **KP**: its feedback update is the forward update's product with ``B``'s own decay
  (``PlasticityRule.feedback_from_forward``), so DDP reduces ``ΔW`` alone and every rank
  derives ``ΔB`` from the averaged ``ΔW`` after the backward (``derive_feedback_updates``):
  the all-reduce carries what it carries for backprop.
- **FA, SS, uSF, frSF, DFA**: the feedback weights are fixed (or follow ``W``'s signs), drawn
  from the run's seed on every rank: no traffic.
- **brSF**: redrawn every batch from the run's seeded stream, which every rank holds in the same
  state: no traffic.
- **WM**: sleep draws its noise from that same stream, so every rank makes the same mirror
  batches and the same ``ΔB`` from the same (already averaged) ``W``: no traffic, and the
  result does not depend on the number of processes. Reducing per-rank sleep updates instead
  would split the sleep work but make the mirror noise, and so the run, depend on the world size.

Only rank 0 writes into the run directory. Batch norm is per rank unless ``--sync-bn``, which
swaps every population's batch norm for ``SyncBatchNorm`` below (statistics over the global
batch, on CPU and GPU alike).

A user error is said once, by rank 0 (``who_reports``), whether the ranks meet it before they
join the process group (an invalid setting: every rank parses the same command line) or after
(a run directory in use, which rank 0 alone decides in ``decided_by_rank0``). Under torchrun the
other ranks then exit with status 0 and rank 0, once they are gone, with 2: torchrun lists every
rank that exits non-zero, or that it has to stop, as a failure of its own. What torchrun prints
about a child that exits non-zero no child can change: a log line ``failed (exitcode: 2)
local_rank: 0``, a Python traceback of torchrun's own frames ending in ``ChildFailedError``, and
a summary whose root cause is rank 0, exit code 2, with our message as its ``traceback`` (rank 0
writes it into the error file torchrun reads, ``TORCHELASTIC_ERROR_FILE``; torchrun then logs
that it has no error file of its own to copy it to); torchrun's own status is 1. Only children
that all exit 0 keep torchrun quiet, and that would report a failed command as a success.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import sys
import time

import attrs
import torch
import torch.distributed as dist
import torch.nn as nn

from neurosim.common.errors import UserError
from neurosim.core.sync_bn import SyncBatchNorm


@attrs.frozen
class World:
    """Where this process stands: its rank among ``size`` processes, and its rank on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files (rank 0 does)."""
        return self.rank == 0


def world() -> World:
    """This process's place in the process group (a lone process when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return World()


def launched() -> World:
    """What ``torchrun`` (or a SLURM script exporting the same variables) says about this process,
    before any process group exists."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers (torchrun sets them)") from None
    return World(rank, size, local)


def init(device_spec: str, timeout_s: float = 1800) -> tuple[World, str]:
    """Join the process group ``torchrun`` set up; returns this process's ``World`` and the
    device it trains on (``cuda:LOCAL_RANK`` for GPU runs). A lone process joins nothing.

    NCCL joins GPU processes, gloo CPU ones."""
    w = launched()
    if not w.distributed:
        return w, device_spec
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run a single process")
    cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if cuda:
        if device_spec.startswith("cuda:"):
            raise UserError(f"--device {device_spec} names one GPU, but under torchrun each process trains on "
                            f"the GPU of its local rank; use --device cuda (or auto)")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if w.local_rank >= count:
            raise UserError(f"process {w.rank} has local rank {w.local_rank} but this node has {count} CUDA GPU(s); "
                            f"start at most {count} processes per node (--nproc_per_node)")
        torch.cuda.set_device(w.local_rank)
        device_spec = f"cuda:{w.local_rank}"
    if not dist.is_initialized():
        # A rank that failed before joining waits for rank 0's error no longer, nor rank 0 for it.
        _tell(_agent_store(), f"joined/{w.rank}")
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return world(), device_spec


def finish(together: bool = False) -> None:
    """Leave the process group (after the last collective). ``together``: every rank ends here
    after the same collectives (a run that finished everywhere), so they meet at a barrier first
    and none tears its connections down while another's gloo threads still use them (a rank then
    aborted at exit now and then: "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if together:
            with contextlib.suppress(RuntimeError):  # a rank already gone: leave all the same
                dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if world().distributed:
        with rank0_stops_said():
            dist.barrier()


def decided_by_rank0(decide, share: bool = False):
    """Run ``decide()`` on rank 0 alone; every rank learns whether it raised a ``UserError``.

    For choices only one process may make (whether a run directory may be used, whether a
    checkpoint may be resumed): on failure rank 0 prints the message and every rank raises
    ``Echo`` with it, so every process stops and the reason is said once. Rank 0 gets ``decide()``'s result; the
    others get it too with ``share`` (it must then be picklable), else None."""
    w = world()
    if not w.distributed:
        return decide()
    box = [None]
    if w.rank == 0:
        try:
            result = decide()
        except UserError as e:
            # Said before the others hear of it: once one exits, torchrun stops every process.
            print(f"error: {e}", file=sys.stderr, flush=True)
            box[0] = ("error", str(e))
            dist.broadcast_object_list(box, src=0)
            raise Echo(str(e)) from None
        box[0] = ("ok", result if share else None)
        dist.broadcast_object_list(box, src=0)
        return result
    with rank0_stops_said():
        dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise Echo(value)
    return value


class Echo(UserError):
    """A ``UserError`` rank 0 has already reported; every rank stops with it silently."""


# -- saying a user error once --------------------------------------------------------------------

# How long a rank other than 0 waits to learn whether rank 0 met the same error. Ranks that parse
# the same command line fail within moments of each other; the wait runs out only when rank 0
# did not fail (and then the process group holds it until this rank exits).
RANK0_VERDICT_S = 30.0
# How long rank 0, having said its error, waits for the other ranks to stop before it exits
# (torchrun then stops those still running, and lists them as failed too): before joining the
# process group the others may still be loading PyTorch; after, they meet a shared error together.
OTHERS_STOP_S = {"before joining": 60.0, "after joining": 10.0}


def who_reports(e: UserError, together: bool = False) -> tuple[bool, bool]:
    """For a rank other than 0 that ``e`` ends: whether this rank says ``e`` itself, and whether
    rank 0 fails too (and says its own error).

    ``together``: every rank is known to meet ``e`` at once (an ``Echo``, a divergence found by
    an all-reduce), so rank 0 says it. Otherwise this rank waits in torchrun's store for rank 0's
    error (``after_saying`` puts it there) and stays silent if it is the same. It says its own
    when rank 0 failed with another, when rank 0 joined the process group instead (this rank
    failing before joining), after ``RANK0_VERDICT_S``, and without torchrun's store (a launcher
    that only exports RANK and WORLD_SIZE)."""
    if together or isinstance(e, Echo):
        return False, True
    store = _agent_store()
    if store is None:
        return True, False
    rank0 = _rank0_error(store, pre_join=not dist.is_initialized())
    if rank0 is None:
        _tell(store, f"says/{launched().rank}")  # rank 0, should it fail after all, need not wait for it
        return True, False
    return rank0 != str(e), True


@contextlib.contextmanager
def rank0_stops_said():
    """Around a collective on a rank other than 0: if it fails because rank 0 stopped with a
    user error that it says (leaving the process group closes its connections: gloo's
    "Connection closed by peer"), that error as an ``Echo``, so this rank stops in silence
    rather than with a traceback of the collective. Any other failure is raised as it is."""
    try:
        yield
    except RuntimeError:
        store = _agent_store() if launched().rank != 0 else None
        said = _rank0_error(store, pre_join=False) if store is not None else None
        if said is not None:
            raise Echo(said) from None
        raise


def under_torchrun() -> bool:
    """Whether torchrun's agent started this process and serves its store (``torchrun``, not a
    launcher that only exports RANK and WORLD_SIZE)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and bool(os.environ.get("MASTER_ADDR"))


def stop_quietly() -> None:
    """End this rank (not 0) with status 0 while rank 0 reports the job's failure with status 2:
    torchrun lists every rank that exits otherwise, or that it has to stop, as failed too. Rank 0
    waits for the word this leaves in the store before it exits."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _tell(_agent_store(), f"stops/{launched().rank}")
    # At once: rank 0 exits as soon as it reads this, and torchrun stops (and lists) whatever
    # is still running then. Nothing is left to save on this rank, which writes no files.
    os._exit(0)


def after_saying(message: str) -> None:
    """Rank 0, its error said: put ``message`` in torchrun's store for the other ranks, then wait
    until each has stopped (``stop_quietly``), or gone on to say an error of its own with status
    2, or (rank 0 failing before the process group was formed) joined it without failing, for at
    most ``OTHERS_STOP_S``."""
    store = _agent_store()
    if store is None:
        return
    _tell(store, "error", message)
    stage = "after joining" if dist.is_initialized() else "before joining"
    others = set(range(1, launched().size))
    deadline = time.monotonic() + OTHERS_STOP_S[stage]
    with contextlib.suppress(Exception):  # a store gone away: torchrun is stopping the job anyway
        while others and time.monotonic() < deadline:
            for r in sorted(others):
                if store.check([f"stops/{r}"]) or store.check([f"says/{r}"]) or \
                        (stage == "before joining" and store.check([f"joined/{r}"])):
                    others.discard(r)
            time.sleep(0.05)
        time.sleep(0.2)  # for the processes that just said they stop to be gone


def _agent_store():
    """A client of the store torchrun's agent serves to this job's processes, under a prefix of
    this attempt (a restarted job starts clean); None outside torchrun or when it is unreachable."""
    if not under_torchrun():
        return None
    env = os.environ
    try:
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=10))
    except Exception:  # noqa: BLE001 - no store (a bad port, the agent gone): each rank speaks for itself
        return None
    prefix = f"neurosim/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    return dist.PrefixStore(prefix, store)


def _tell(store, key: str, value: str = "") -> None:
    if store is not None:
        with contextlib.suppress(Exception):  # the others then say their errors themselves
            store.set(key, value)


def _rank0_error(store, pre_join: bool) -> str | None:
    """The error rank 0 stopped with, if it did within ``RANK0_VERDICT_S``; None when it joined
    the process group first (this rank failing before joining), or in silence."""
    deadline = time.monotonic() + RANK0_VERDICT_S
    try:
        while True:
            if store.check(["error"]):
                return store.get("error").decode()
            if (pre_join and store.check(["joined/0"])) or time.monotonic() > deadline:
                return None
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store went away (the agent stopping the job): speak
        return None


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over every rank (in place; ``t`` itself on a lone process)."""
    if world().distributed:
        with rank0_stops_said():
            dist.all_reduce(t)
    return t


def gathered(t: torch.Tensor) -> torch.Tensor:
    """``t`` of every rank, stacked in rank order (``t[None]`` on a lone process)."""
    if not world().distributed:
        return t[None]
    parts = [torch.empty_like(t) for _ in range(world().size)]
    with rank0_stops_said():
        dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def wrap(circuit: nn.Module, device: torch.device) -> nn.Module:
    """``circuit`` under ``DistributedDataParallel``, reducing exactly the engaged updates that
    cannot be derived from others.

    Parameters an engaged step does not update (WM's feedback weights, which learn in sleep)
    and the fixed feedback buffers (FA's ``B``, DFA's pathways, brSF's per-batch draws) are kept
    out of DDP: every rank computes them identically, and broadcasting them would move a
    weight-sized tensor per synapse each step for nothing. So are feedback weights whose update
    follows from their synapse's forward update (KP): autograd no longer forms it, and
    ``derive_feedback_updates`` makes it on every rank from the reduced ``ΔW`` after the
    backward, so such a rule adds nothing to the all-reduce. Batch-norm running statistics are
    broadcast from rank 0 at each forward (DDP's default) unless batch norm is synchronised,
    which makes them equal anyway."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for syn in derivable_feedback(circuit):
        syn.feedback_derived = True
        # Without a gradient to form, the synapse's backward skips the feedback update.
        syn.feedback.requires_grad_(False)
    engaged = {id(p) for p in circuit.engaged_parameters() if p.requires_grad}
    population_buffers = {id(b) for pop in circuit.populations.values() for b in pop.buffers()}
    ignore = [n for n, p in circuit.named_parameters() if id(p) not in engaged]
    ignore += [n for n, b in circuit.named_buffers() if id(b) not in population_buffers]
    DDP._set_params_and_buffers_to_ignore_for_model(circuit, ignore)
    synced = any(isinstance(m, SyncBatchNorm) for m in circuit.modules())
    # Newer PyTorch renames the switch (the old name still works, with a warning).
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
        "broadcast_buffers"
    return DDP(circuit, device_ids=[device.index] if device.type == "cuda" else None,
               gradient_as_bucket_view=True, **{sync: not synced})


def derivable_feedback(circuit: nn.Module) -> list:
    """The synapses whose engaged feedback update follows from their forward update."""
    return [s for s in circuit.synapses.values() if s.feedback is not None
            and s.rule.feedback_learns == "engaged" and s.rule.feedback_follows_forward]


def derive_feedback_updates(circuit: nn.Module) -> None:
    """After an engaged backward: the feedback updates ``wrap`` left out of autograd, each from
    its synapse's forward update — by then averaged over the ranks, so every rank derives the
    same tensor and the average of the ranks' own updates. Nothing to do outside ``wrap``."""
    for syn in circuit.synapses.values():
        if syn.feedback_derived and syn.weight.grad is not None:
            syn.feedback.grad = syn.rule.feedback_from_forward(syn.weight.grad, syn.weight.detach(),
                                                               syn.feedback.detach())
