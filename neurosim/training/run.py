"""The training loop: engaged steps, sleep on the rule's schedule, evaluation, checkpoints."""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from pathlib import Path

import attrs
import torch

from neurosim.common.errors import UserError
from neurosim.common.files import DirectoryLock, write_atomic
from neurosim.core.circuit import Circuit
from neurosim.core.sync_bn import sync_batch_norm
from neurosim.data import BatchStream, ImageData, load_dataset, stream
from neurosim.models.registry import MODELS
from neurosim.observe.monitors import Monitor, MonitorConfig, probe_batch
from neurosim.training import distributed
from neurosim.training.callbacks import Callback, MonitorCallback
from neurosim.training.checkpoint import CheckpointWriter, load_checkpoint, write_checkpoint
from neurosim.training.config import RunConfig, refuse_unsupported
from neurosim.training.evaluation import evaluate_stream, evaluation_result, evaluation_totals
from neurosim.training.run_log import RunLog, epoch_list, merged_records, metrics_line, metrics_records, without_timing
from neurosim.training.step import batch_at, engaged_step, loss_function, sleep_plan, sleep_steps, time_execution


class RunInterrupted(UserError):
    """Training stopped on request (Ctrl-C); the checkpoint holds the position reached."""


class RunDiverged(UserError):
    """The training loss became non-finite or exploded; nothing after the last checkpoint is saved."""


class RunDirectoryGone(UserError):
    """The run directory was deleted or moved while the run trained; nothing more is written."""


# The loss is copied into a ring of this many device slots each step and read once per ring:
# divergence is caught within that many steps at the cost of one host sync per ring.
WATCH_STEPS = 32


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but no CUDA GPU is available; use --device cpu")
    return device


def set_determinism(deterministic: bool, cuda: bool) -> None:
    """Choose between cuDNN's autotuned kernels (fast, not bit-repeatable) and deterministic ones.

    Deterministic mode also makes PyTorch refuse any operation that has no deterministic
    implementation, so a run that passes in it repeats and resumes bit for bit on the same
    device model and software. cuBLAS needs its workspace fixed for that, before its first use.
    """
    if deterministic and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if torch.are_deterministic_algorithms_enabled() != deterministic:
        # Only on a change: the call imports the compiler's configuration, a second or more.
        torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = cuda and not deterministic


def build_circuit(cfg: RunConfig, image_shape, num_classes: int) -> Circuit:
    """The circuit a configuration describes, for data of the given shape: built by the function
    its model declares (``neurosim.models.registry``)."""
    return MODELS[cfg.model].build(cfg, cfg.make_rule(), image_shape, num_classes)


def compiled_with_dynamic_batch(module, backend: str = "inductor"):
    """``torch.compile(module, backend=backend)``, called with the batch dimension marked dynamic.

    An epoch's last batch is smaller, and so is an evaluation's: compiled for a fixed batch, each
    would compile its graph a second time (on a GPU, a minute each). Marked from the first call,
    one graph serves every batch size."""
    compiled = torch.compile(module, backend=backend)

    def call(x):
        torch._dynamo.maybe_mark_dynamic(x, 0)
        return compiled(x)

    return call


class Run:
    """One training run of a circuit on a dataset, resumable bit for bit from its checkpoint.

    Holds the circuit, the device-resident data streams, the engaged optimizer (SGD over
    forward weights, norms and task-learned feedback weights), the sleep optimizer (WM's
    feedback weights), the learning-rate schedule and the position ``(epoch, batch)``.
    ``callbacks`` (the monitor among them) are called after each engaged step, around each
    sleep and at each checkpoint; ``log`` writes the metrics and progress lines.
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, data: ImageData | None = None, quiet: bool = False):
        # Under torchrun every process builds the same run; rank 0 alone writes and reports.
        self.world = distributed.world()
        self.log = RunLog(run_dir, quiet or not self.world.writer, writer=self.world.writer)
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.device = resolve_device(cfg.device)
        if self.world.distributed and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # the local rank's GPU
        # Refusals every rank meets alike: under torchrun rank 0 says them and the others stop with
        # it (a collective, not a wait for its word, which a loaded machine can outlast).
        distributed.decided_by_rank0(lambda: refuse_unsupported(cfg, self.world.distributed))
        cuda, timed = self.device.type == "cuda", cfg.dynamics == "time"
        self.amp_dtype = torch.bfloat16 if (cfg.amp == "bf16" or (cfg.amp == "auto" and cuda and not timed)) else None
        self.channels_last = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda and not MODELS[cfg.model].is_mlp)
        set_determinism(cfg.deterministic, cuda)
        # Every random stream of a run derives from its seed; the process-wide generators too
        # (a new process draws their seed at random), for anything that draws from them.
        torch.manual_seed(cfg.seed)
        # A folder too big to hold on the device (ImageNet) is read from disk as the run trains.
        self.streamed = data is None and stream.wants_stream(cfg.data, cfg.data_dir, cfg.stream)
        if self.streamed:
            data = stream.open_folder(cfg.data, cfg.data_dir, cfg.val_per_class, cfg.image_size, cfg.train_limit)
        elif data is None:
            # Rank 0 first: it downloads or decodes (and caches) what the others then read.
            if not self.world.writer:
                distributed.barrier()
            with self.log.console.warnings_said():  # a checksum mismatch: one line, in the log too
                data = load_dataset(cfg.data, cfg.data_dir, cfg.val_per_class,
                                    (cfg.synthetic_train, cfg.synthetic_test), self.device, cfg.seed,
                                    progress=self.log.report)
            if self.world.writer:
                distributed.barrier()
        self.data = data
        if cfg.train_limit and not self.streamed:
            # The training split is held in a fixed mixed order, so its head is a fair subset.
            self.data = attrs.evolve(self.data, train_x=self.data.train_x[:cfg.train_limit],
                                     train_y=self.data.train_y[:cfg.train_limit])
        c = self.data.image_shape[0]
        mean, std = (self.data.mean, self.data.std) if cfg.normalize == "standard" else ((0.0,) * c, (1.0,) * c)
        self.normalization = (tuple(mean), tuple(std))  # saved: evaluation on other data reuses it
        rank, size = self.world.rank, self.world.size
        self.train_stream = self._stream(train=True, rank=rank, world=size)
        # Evaluation: each rank a contiguous shard of the split; the counts are summed over ranks.
        self.test_stream = self._stream(train=False, rank=rank, world=size)
        self.global_batch = cfg.batch_size * size
        self.lr = cfg.lr * self.global_batch / cfg.lr_batch if cfg.lr_batch else cfg.lr
        self.circuit = build_circuit(cfg, self.data.image_shape, self.data.num_classes).to(self.device)
        if self.channels_last:
            self.circuit.to(memory_format=torch.channels_last)
        if cfg.sync_bn:
            sync_batch_norm(self.circuit)
        # ``engine`` runs the engaged steps: the circuit, under DDP when there are several ranks.
        self.engine = distributed.wrap(self.circuit, self.device) if self.world.distributed else self.circuit
        self.model = compiled_with_dynamic_batch(self.engine) if cfg.compile and not timed else self.engine
        self.time = time_execution(self.circuit, cfg.time_settings(), cfg.execution, cfg.compile)
        self.loss_fn = loss_function(cfg.loss)
        self.optimizer = torch.optim.SGD(self.circuit.engaged_parameters(), lr=self.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        # Each sleeping synapse's own rule says how it sleeps; synapses sharing a schedule form a group.
        self.sleep_optimizer, self.sleep_groups = sleep_plan(self.circuit)
        self._replays = any(g.replays for g in self.sleep_groups)
        self._sleep_data = None  # the batch of the last engaged step, for sleeps that replay data
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(cfg.milestones), cfg.lr_gamma)
        self.sleep_generator = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        self.monitor = None
        if cfg.monitor_every and self.world.writer:
            mcfg = MonitorConfig(every=cfg.monitor_every, synapses=cfg.monitor_synapses,
                                 traces=cfg.monitor_traces, probe=cfg.monitor_probe)
            # The probe is the head of the single-process stream: the same batch for any world size.
            probe = None
            if cfg.monitor_probe:
                whole = self._stream(train=True, rank=0, world=1, workers=0)
                probe = probe_batch(whole, cfg.monitor_probe)
                if self.streamed:
                    whole.close()
            self.monitor = Monitor(self.circuit, mcfg, cfg.epochs * len(self.train_stream), probe,
                                   self.loss_fn, cfg.seed, autocast_dtype=self.amp_dtype,
                                   time_settings=cfg.time_settings(),
                                   learning_rate=lambda: self.optimizer.param_groups[0]["lr"])
        self.callbacks: list[Callback] = [MonitorCallback(self.monitor, self.log)] if self.monitor is not None else []
        self.epoch = 0  # completed epochs
        self.batch = 0  # batches completed in the current epoch
        self.step = 0  # engaged steps completed
        self.slept_before = False  # the sleep before training is done
        # Mirror batches of the current sleep still to do, per sleep group: a stop is honoured
        # between mirror batches, and the checkpoint keeps what is left for a resume to do first.
        self.sleep_left = [0] * len(self.sleep_groups)
        self.best = -math.inf
        # The metrics record of every epoch so far (epoch 0: before training), kept in the
        # checkpoint so that a resume can rebuild metrics.jsonl; None: restored from a
        # checkpoint written before checkpoints kept them.
        self.records: list[dict] | None = []
        self.stop_requested = False  # set by a signal handler; honoured between steps
        self._stop_agreed = False  # under torchrun: every rank has heard the stop request
        self.first_loss = None  # the first engaged step's loss: divergence is measured against it
        self._recent = torch.zeros(WATCH_STEPS, dtype=torch.float32, device=self.device)
        self._unwatched = 0  # steps whose loss sits in the ring unread
        self.lock = None  # the run directory's DirectoryLock while this run writes into it
        self._gone_said = False  # the training loop has stopped with RunDirectoryGone
        # Checkpoints are hashed and written in the background (see ``save``).
        self.checkpoint_writer = CheckpointWriter(pinned=cuda)
        self._reset_stats()

    def _stream(self, train: bool, rank: int, world: int, workers: int | None = None):
        """Batches of the training or the evaluation split for one rank: cut from the tensors on
        the device (``BatchStream``) or read from the folder as they are needed (``FolderStream``)."""
        cfg, data = self.cfg, self.data
        mean, std = self.normalization
        # Evaluation of data on the device goes in batches of at least 256 (no gradients to hold).
        batch = cfg.batch_size if train or self.streamed else max(cfg.batch_size, 256)
        if self.streamed:
            paths, labels = data.train if train else data.val
            return stream.FolderStream(paths, labels, batch, train=train, mean=mean, std=std, seed=cfg.seed,
                                       image_size=cfg.image_size, rank=rank, world=world,
                                       workers=cfg.workers if workers is None else workers, device=self.device,
                                       channels_last=self.channels_last)
        if train:
            return BatchStream(data.train_x, data.train_y, batch, mean, std, shuffle=cfg.shuffle, seed=cfg.seed,
                               crop_padding=cfg.crop_padding, flip=cfg.flip, channels_last=self.channels_last,
                               rank=rank, world=world)
        n = len(data.test_y)
        shard = slice(rank * n // world, (rank + 1) * n // world)
        return BatchStream(data.test_x[shard], data.test_y[shard], batch, mean, std, shuffle=False, seed=cfg.seed,
                           channels_last=self.channels_last)

    def close(self) -> None:
        """Finish writing the last checkpoint and stop the data-loading processes of a streamed run."""
        try:
            self.flush()
        finally:
            for s in (self.train_stream, self.test_stream):
                if hasattr(s, "close"):
                    s.close()

    @property
    def quiet(self) -> bool:
        return self.log.quiet

    @quiet.setter
    def quiet(self, value: bool) -> None:
        self.log.quiet = value

    # -- state ----------------------------------------------------------------------------------
    def _reset_stats(self):
        # Running loss·n and correct count stay on the device; the image count is a host int.
        self.stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.seen = 0

    def state_dict(self, rank_stats: torch.Tensor | None = None) -> dict:
        """Everything a resume needs (tensors and plain data). ``rank_stats``: the running
        ``[loss·n, correct, n]`` of every rank (``_rank_stats``), one row each; by default this
        process's alone, which is the whole under a single process."""
        if rank_stats is None:
            rank_stats = torch.cat([self.stats, self.stats.new_tensor([self.seen])])[None]
        rank_stats = rank_stats.cpu()
        rng = {"torch": torch.get_rng_state(), "sleep": self.sleep_generator.get_state(),
               "device": self.device.type}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "format": 1, "config": self.cfg.to_dict(), "circuit": self.circuit.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "sleep_optimizer": self.sleep_optimizer.state_dict() if self.sleep_optimizer else None,
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "slept_before": self.slept_before,
            "sleep_left": list(self.sleep_left),
            # Each rank's share of the epoch's running statistics: on resume each rank takes its
            # own back, so the epoch's end sums them exactly as if the run had never stopped.
            "best": self.best, "stats": rank_stats[:, :2].clone(),
            "seen": [int(n) for n in rank_stats[:, 2].tolist()], "rng": rng,
            "first_loss": self.first_loss, "world": self.world.size,
            "metrics": None if self.records is None else [without_timing(r) for r in self.records],
            "monitor": self.monitor.state_dict() if self.monitor else None,
            "data": {"name": self.data.name, "classes": list(self.data.classes),
                     "mean": list(self.normalization[0]), "std": list(self.normalization[1]),
                     "image_shape": list(self.data.image_shape)},
        }

    def load_state_dict(self, state: dict) -> None:
        self.circuit.load_state_dict(state["circuit"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.sleep_optimizer:
            self.sleep_optimizer.load_state_dict(state["sleep_optimizer"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.slept_before, self.best = state["slept_before"], state["best"]
        # Per sleep group; a number in checkpoints of one group's runs (earlier ones: no sleep_left).
        left = state.get("sleep_left", 0)
        self.sleep_left = list(left) if isinstance(left, list) else [left] + [0] * (len(self.sleep_groups) - 1)
        stats, seen = state["stats"], state["seen"]
        if stats.dim() == 2:
            # A row per rank of the run that saved it (world sizes match: ``resume_run``).
            rank = self.world.rank if stats.shape[0] == self.world.size else 0
            stats, seen = stats[rank], seen[rank]
        # (Checkpoints written before kept rank 0's share alone, which every rank then takes.)
        self.stats, self.seen = stats.to(self.device).clone(), int(seen)
        records = state.get("metrics")
        self.records = None if records is None else [dict(r) for r in records]
        self.first_loss = state.get("first_loss")
        # Losses of steps taken before the restore (a warm-up, an abandoned attempt) belong to
        # no position of the restored run: the divergence watch starts from the checkpoint.
        self._recent.zero_()
        self._unwatched = 0
        if self.monitor is not None:
            self.monitor.load_state_dict(state["monitor"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng.get("device", self.device.type) == self.device.type:
            self.sleep_generator.set_state(rng["sleep"])
        else:
            # A CUDA generator's state means nothing to a CPU one (and the reverse): continue
            # from a seed fixed by the run's seed and position. The run goes on correctly, but
            # no longer repeats the random draws of one that stayed on its device.
            self.sleep_generator.manual_seed(_position_seed(self.cfg.seed + 1, self.step))
        if "cuda" in rng and self.device.type == "cuda" and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def save(self, best: bool = False, metrics: dict | None = None) -> None:
        """Commit the position reached: every file first, ``last.pt`` last.

        ``last.pt`` is the commit point. Whatever was written before it (``best.pt``, the monitor
        files, the epoch's metrics line) belongs to a position at or after the previous
        ``last.pt``; a resume from that checkpoint truncates and rewrites all of it, so a kill at
        any moment ends, after ``--resume``, in the same run directory as no kill at all.
        ``metrics`` (the epoch's record) joins ``records``, which the checkpoint keeps too.

        Training is not held up by the writing: the state is copied into host buffers here, the
        callbacks write their files, and a background thread (``CheckpointWriter``) hashes and
        serialises the copy and writes ``best.pt``, the metrics line and ``last.pt``, in that
        order. The next ``save`` and ``flush`` wait for it and raise its error (a full disk); a
        commit that fails stops before ``last.pt``, so the previous one is kept.
        """
        self._check_divergence()
        rank_stats = self._rank_stats()  # under torchrun every rank takes part
        if not self.world.writer:
            return
        self._check_directory()
        records = None
        if metrics is not None:
            # A copy: the caller's dict may change while the file is written in the background.
            self.records = [*(self.records or []), copy.deepcopy(metrics)]
            records = copy.deepcopy(self.records)
        state = self.checkpoint_writer.snapshot(self.state_dict(rank_stats))  # waits for the previous commit
        for callback in self.callbacks:
            callback.on_checkpoint(self.run_dir)

        def commit():
            self._check_directory(said=False)  # it may have gone since save() looked
            try:
                # Serialised once; best.pt gets its own copy of the bytes rather than a hard
                # link, so that damage to one file leaves the other to resume from.
                with self.checkpoint_writer.serialised(state) as data:
                    if best:
                        write_checkpoint(data, self.run_dir / "best.pt")
                    if records is not None:
                        self._log_metrics(self.run_dir / "metrics.jsonl", records[-1], records[:-1])
                    write_checkpoint(data, self.run_dir / "last.pt")
            except UserError:
                self._check_directory(said=False)  # a directory that went meanwhile is the reason
                raise

        self.checkpoint_writer.start(commit)

    def flush(self) -> None:
        """Wait until the checkpoint being written is on disk; raise its error if it failed."""
        self.checkpoint_writer.flush()

    def _rank_stats(self) -> torch.Tensor:
        """``[loss·n, correct, n]`` of the epoch so far on every rank, a row each (a collective
        under torchrun: every rank calls it at the same point)."""
        return distributed.gathered(torch.cat([self.stats, self.stats.new_tensor([self.seen])]))

    def _check_directory(self, said: bool = True) -> None:
        """Stop if the run directory was deleted or moved while the run trained.

        Written on regardless, its files would go nowhere, or into a new directory of the old
        name that holds no configuration, no lock and none of the epochs before. Nothing more is
        written: a moved directory keeps the run as of its last checkpoint. ``said``: the
        training loop raises this error (not the checkpoint writer), and the run's end need not
        repeat the writer's of the same cause."""
        what = self.lock.whereabouts() if self.lock is not None and self.lock.held else None
        if what is None:
            return
        self._gone_said = self._gone_said or said
        at = (f"at epoch {self.epoch + 1}, batch {self.batch}/{len(self.train_stream)}" if self.batch
              else f"after epoch {self.epoch}" if self.epoch else "before its first epoch")
        stopped = f"run directory {self.run_dir} {what} while the run trained; it stopped {at} and wrote nothing more"
        if what.startswith("was moved to "):
            moved = what.removeprefix("was moved to ")
            raise RunDirectoryGone(f"{stopped}. {moved} holds the run as of its last checkpoint: continue it "
                                   f"there with --resume {moved}")
        if what.startswith("lost its lock"):
            raise RunDirectoryGone(f"{stopped}, since another process could now write there too. Its files are "
                                   f"kept: continue it with --resume {self.run_dir}")
        raise RunDirectoryGone(f"{stopped}; nothing of it is left there to continue from. Start it again with --out")

    # -- steps ----------------------------------------------------------------------------------
    def engaged_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Forward, feedback and local updates on one batch; statistics stay on the device."""
        loss, out = engaged_step(self.circuit, self.model, self.optimizer, x, y, self.loss_fn, self.amp_dtype,
                                 self.sleep_generator, self.cfg.execution, self.time)
        n = y.shape[0]
        self.stats += torch.stack([loss.detach().double() * n, (out.argmax(1) == y).sum().double()])
        self.seen += n
        self.step += 1
        self._sleep_data = x if self._replays else None
        self._recent[self._unwatched].copy_(loss.detach())
        self._unwatched += 1
        if self._unwatched == WATCH_STEPS or self.first_loss is None:
            self._check_divergence()

    def _check_divergence(self) -> None:
        """Read the losses of the steps since the last check (one host sync) and stop the run
        at the first one that is not finite or exceeds ``max_loss_ratio`` × the first loss."""
        if not self._unwatched:
            return
        ring = self._recent[:self._unwatched]
        if self.world.distributed:
            # Every rank judges the mean loss over ranks, and learns whether any was asked to
            # stop: all decide alike at the same step, and none is left waiting for the others.
            shared = distributed.all_sum(torch.cat([ring, ring.new_tensor([float(self.stop_requested)])]))
            ring = shared[:-1] / self.world.size
            self._stop_agreed = bool(shared[-1] > 0)
        losses = ring.tolist()
        first_step = self.step - self._unwatched + 1
        self._unwatched = 0
        if self.first_loss is None:
            self.first_loss = losses[0]
        ratio = self.cfg.max_loss_ratio
        for i, loss in enumerate(losses):
            if not math.isfinite(loss) or (ratio and loss > ratio * max(self.first_loss, 1e-12)):
                raise RunDiverged(self._divergence_message(first_step + i, loss))

    def _divergence_message(self, step: int, loss: float) -> str:
        if math.isfinite(loss):
            what = (f"the loss reached {loss:.4g}, over {self.cfg.max_loss_ratio:g}× the first step's "
                    f"{self.first_loss:.4g} (--max-loss-ratio)")
        else:
            what = f"the loss became {loss}"
        bad = [f"{which} of synapse {syn.name!r}" for syn in self.circuit.synapses.values()  # forward order
               for which, t in (("weight", syn.weight), ("feedback weight", syn.feedback))
               if t is not None and t.is_floating_point() and not torch.isfinite(t).all()]
        first_bad = f"; non-finite: {', '.join(bad[:4])}{' …' if len(bad) > 4 else ''}" if bad else ""
        unwritten = self.checkpoint_writer.wait()  # the last good checkpoint may still be being written
        last = self.run_dir / "last.pt"
        if last.exists():
            kept = (f"The last good checkpoint ({last}, epoch {load_checkpoint(last)['epoch']}) is kept; "
                    f"nothing after it was saved.")
        else:
            kept = (f"No checkpoint had been written yet; {self.run_dir} can be started again from the "
                    f"beginning with --resume or reused as --out.")
        if unwritten is not None:
            kept += f" Writing the next checkpoint failed: {unwritten}."
        return (f"training diverged at step {step} (epoch {self.epoch + 1}): {what}{first_bad}. {kept} "
                f"Lower --lr (now {self.cfg.lr:g}) and start again.")

    def sleep(self, batches) -> None:
        """A sleep: ``batches[i]`` mirror batches for sleep group ``i`` (``sleep_groups``; an int:
        as many for each), group after group, each as its synapses' rules say.

        A stop request is honoured between mirror batches (a sleep can be long: the one before
        training is an epoch's worth in wm_mlp_original). ``RunInterrupted`` is raised with the
        mirror batches still to do in ``sleep_left``, which the checkpoint keeps, and a resumed
        run does them first (``_finish_sleep``): each mirror batch draws from the checkpointed
        noise stream (or replays the batch at the checkpointed position) and updates through the
        checkpointed sleep optimizer, so the run goes on bit for bit as if never broken."""
        if isinstance(batches, int):
            batches = [batches] * len(self.sleep_groups)
        for callback in self.callbacks:
            callback.before_sleep(self.step)
        self.sleep_left = list(batches)
        self._finish_sleep()

    def _replayed_batch(self) -> torch.Tensor:
        """The input batch a data-driven sleep replays: the last engaged step's (the first batch
        of the first epoch before training); after a resume, read again at that position."""
        if self._sleep_data is None:
            at = (self.epoch, self.batch - 1) if self.slept_before else (0, 0)
            self._sleep_data = batch_at(self.train_stream, *at)
        return self._sleep_data

    def _finish_sleep(self) -> None:
        """The mirror batches of the current sleep still to do (``sleep_left``), group by group,
        then its end (the callbacks' ``after_sleep``); ``RunInterrupted`` if a stop is asked on
        the way."""
        bs = self.cfg.batch_size  # each synapse's phase may ask for another (Circuit.sleep)
        total = sum(self.sleep_left)
        # The sleep before training can take minutes: its progress is shown like an evaluation's.
        what = "sleeping before training" if not self.slept_before and total > 1 else None
        for i, group in enumerate(self.sleep_groups):
            todo = self.sleep_left[i]
            if not todo:
                continue
            so_far = total - sum(self.sleep_left)

            def stop(done: int, so_far=so_far) -> bool:
                if what is not None:
                    self.log.report(what, so_far + done, total, " mirror batches")
                return self._stop_asked_in_sleep(done)

            data = self._replayed_batch() if group.replays else None
            done = sleep_steps(self.circuit, self.sleep_optimizer, todo, bs, self.sleep_generator,
                               literal=self.cfg.execution == "reference", stop=stop, synapses=group.names,
                               data=data)
            self.sleep_left[i] = todo - done
            if self.sleep_left[i]:
                left = f"{sum(self.sleep_left):,} of its mirror batches still to do"
                where = (f"in the sleep before training ({left})" if not self.slept_before else
                         f"at epoch {self.epoch + 1}, batch {self.batch}/{len(self.train_stream)}, in the sleep "
                         f"after it ({left})")
                raise RunInterrupted(f"interrupted {where}; checkpoint saved. Continue with --resume {self.run_dir}")
        if what is not None:
            self.log.report(what, total, total, " mirror batches")
        for callback in self.callbacks:
            callback.after_sleep(self.step)

    def _stop_asked_in_sleep(self, done: int) -> bool:
        """Whether to stop after mirror batch ``done`` of a sleep. Under torchrun the ranks agree
        first, every ``WATCH_STEPS`` mirror batches (one all-reduce of a flag): sleep needs no
        traffic of its own and every rank sleeps alike, so all ask at the same mirror batch and
        stop at the same one, as the engaged loop's ``_stop_agreed`` does between steps."""
        if not self.world.distributed:
            return self.stop_requested
        if done % WATCH_STEPS:
            return False
        asked = torch.tensor([float(self.stop_requested)], device=self.device)
        return bool(distributed.all_sum(asked).item() > 0)

    def evaluate(self, stream: BatchStream | None = None) -> dict:
        """Loss, top-1 and top-5 accuracy (percent) over a stream (the test split by default).

        Under torchrun each rank evaluates its shard of the test split and the counts are summed."""
        if not self.world.distributed:
            return evaluate_stream(self.model, self.circuit, stream or self.test_stream, self.loss_fn, self.amp_dtype,
                                   progress=self.log.evaluating)
        # The circuit itself, not DDP: shards may differ by a batch, and evaluation needs no traffic.
        totals = distributed.all_sum(evaluation_totals(self.circuit, self.circuit, stream or self.test_stream,
                                                       self.loss_fn, self.amp_dtype, progress=self.log.evaluating))
        return evaluation_result(totals)

    # -- the loop -------------------------------------------------------------------------------
    def train(self, on_step=None) -> dict:
        """Train to ``cfg.epochs``; returns the last metrics. ``on_step(run)`` is called after
        every engaged step (used by tests to interrupt a run)."""
        cfg = self.cfg
        writer = self.world.writer
        if writer and (self.lock is None or not self.lock.held):
            self.lock = DirectoryLock(self.run_dir)
        try:
            metrics_path = self.run_dir / "metrics.jsonl"
            # Not fresh either: a run stopped inside the sleep before training (its epoch-0 record is kept).
            fresh = self.epoch == 0 and self.batch == 0 and not self.slept_before and not any(self.sleep_left)
            if writer:
                self.flush()  # a checkpoint saved before train() would write the file rewritten here
                if not fresh:
                    self._restore_metrics(metrics_path)
            if fresh:
                m = self._epoch_metrics(0, 0.0, None)
                self.records = [m]
                if writer:
                    self._log_metrics(metrics_path, m)
            last = None
            try:
                if not self.slept_before:
                    if self.sleep_groups and fresh:
                        self.sleep([g.before(len(self.train_stream)) for g in self.sleep_groups])
                    elif self.sleep_groups:
                        self._finish_sleep()  # the rest of a sleep before training that was stopped
                    self.slept_before = True
                self.circuit.set_mode("engaged")
                while self.epoch < cfg.epochs:
                    last = self._train_epoch(on_step)
            except RunInterrupted:
                self.save()
                self.flush()  # the message says the checkpoint is saved: it is on disk before it is seen
                raise
            self.flush()  # a finished run's files are complete when it returns
            return last
        finally:
            # Stopped by anything else (divergence, a second Ctrl-C, an error): the commit in
            # progress, of a position reached earlier, still completes before the lock is let go.
            try:
                unwritten = self.checkpoint_writer.wait()
            finally:
                if self.lock is not None:
                    self.lock.release()
            # Not hidden by the error that stopped the run, unless that said the same.
            if unwritten is not None and not (isinstance(unwritten, RunDirectoryGone) and self._gone_said):
                print(f"error: {unwritten}", file=sys.stderr)

    def _train_epoch(self, on_step) -> dict:
        cfg, stream = self.cfg, self.train_stream
        total = len(stream)
        t0 = time.perf_counter()
        self.log.start_epoch(self.batch, t0)
        if any(self.sleep_left):
            self._finish_sleep()  # the rest of the sleep after the last step before a stop
        for x, y in stream.epoch(self.epoch, start=self.batch):
            self.engaged_step(x, y)
            for callback in self.callbacks:
                callback.after_step(self.step)
            self.batch += 1  # before the sleep: a stop inside it saves the position after this step
            if self.sleep_groups:
                due = [g.schedule.due(self.step) for g in self.sleep_groups]
                if any(due):
                    self.sleep(due)
            if self.step % WATCH_STEPS == 0 and self.world.writer:
                self._check_directory()  # a few stat calls: a vanished directory is noticed within as many steps
            if on_step is not None:
                on_step(self)
            if self.stop_requested if not self.world.distributed else self._stop_agreed:
                raise RunInterrupted(f"interrupted at epoch {self.epoch + 1}, batch {self.batch}/{total}; "
                                     f"checkpoint saved. Continue with --resume {self.run_dir}")
            self.log.after_batch(self.epoch, cfg.epochs, self.batch, total, self.stats, self.seen, cfg.batch_size,
                                 cfg.log_every)
        self._check_divergence()
        seen = self.stats.new_tensor([self.seen]) if self.world.distributed else None
        train = distributed.all_sum(torch.cat([self.stats, seen])).tolist() if seen is not None else \
            [*self.stats.tolist(), self.seen]
        elapsed = time.perf_counter() - t0
        self.epoch, self.batch = self.epoch + 1, 0
        with warnings.catch_warnings():
            # A resume stopped after an epoch's last step ends that epoch at once: the schedule
            # steps before this process's optimizer has, though the optimizer's steps were taken.
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            self.scheduler.step()
        m = self._epoch_metrics(self.epoch, elapsed, train)
        self._reset_stats()
        improved = m["test_acc"] > self.best
        self.best = max(self.best, m["test_acc"])
        self.save(best=improved, metrics=m)
        self.log.epoch_summary(self.epoch, cfg.epochs, m)
        return m

    def _epoch_metrics(self, epoch: int, elapsed: float, train) -> dict:
        test = self.evaluate()
        angles = self.circuit.alignment_angles()
        m = {"epoch": epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"]}
        if train is not None:
            loss_sum, correct, n = train
            m.update(train_loss=loss_sum / max(n, 1), train_acc=100 * correct / max(n, 1),
                     time_s=elapsed, images_per_s=n / elapsed if elapsed > 0 else 0.0)
        m.update(test_loss=test["loss"], test_acc=test["top1"], test_top5=test["top5"],
                 mean_angle=_mean_defined(angles.values()), angles=angles)
        return m

    def _log_metrics(self, path: Path, m: dict, earlier=()) -> None:
        """The metrics file, ``earlier`` records then epoch ``m``'s, through the run's log (the
        step of ``save`` that writes it)."""
        self.log.metrics(path, m, earlier)

    def _restore_metrics(self, path: Path) -> None:
        """Make ``metrics.jsonl`` hold exactly the records of the epochs the checkpoint committed.

        A kill may leave records of an epoch that was not committed, or half a line: both go.
        Records of committed epochs that the file lost (truncated, emptied, deleted, a line
        removed) or holds changed are rewritten from the checkpoint's copy, and said. A line
        that is not a record at all is refused (``metrics_records``), naming it."""
        found = metrics_records(path) if path.exists() else []
        if self.records is not None:
            self.records, lost, altered = merged_records(self.records, found)
            for epochs, how in ((lost, "had lost"), (altered, "held other values for")):
                if epochs:
                    self.log.say(f"note: {path} {how} the records of {epoch_list(epochs)}, which the run had "
                                 f"committed; they are rewritten from its checkpoint (without their timings)")
        else:
            # A checkpoint from before checkpoints kept the records: the file is all there is.
            self.records = [r for r in found if r["epoch"] <= self.epoch]
            missing = sorted(set(range(self.epoch + 1)) - {r["epoch"] for r in self.records})
            if missing:
                self.log.say(f"note: {path} lacks the records of {epoch_list(missing)}, and the checkpoint, "
                             f"written by an earlier version, has no copy of them; the run goes on without them")
        text = "".join(metrics_line(r) for r in self.records)
        if not path.exists() or path.read_bytes() != text.encode():
            write_atomic(path, text.encode(), what="metrics")


def _mean_defined(values) -> float:
    """The mean of the defined values (synapses that send nothing back have no W–Bᵀ angle)."""
    defined = [v for v in values if v == v]
    return sum(defined) / len(defined) if defined else math.nan


def _position_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)
