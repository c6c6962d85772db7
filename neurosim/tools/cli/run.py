"""``neurosim run`` (``run_circuit.py``): train a preset, repeat a saved configuration, or continue a run.

    run_circuit.py kp_resnet18 --epochs 3            a new run of a preset, with overrides
    run_circuit.py --config RUN/config.json --seed 1  a new run from a saved configuration
    run_circuit.py --resume RUN                       continue a run from its last checkpoint

The configuration is settled (and every option checked) before PyTorch loads. What the run
prints goes to stderr and to its ``log.txt``; ``run.json`` records how it was started.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import attrs

from neurosim.common.errors import UserError
from neurosim.models.registry import MODELS
from neurosim.tools.cli.checks import check_budget, check_device, check_out_dir, unique_run_dir
from neurosim.tools.cli.entry import loading
from neurosim.tools.cli.options import RunRequest, parse_run_args


def run_circuit(argv: list[str], prog: str = "run_circuit.py") -> int:
    """``run_circuit.py PRESET [...]``; returns the exit status."""
    request = parse_run_args(argv, prog)
    if isinstance(request, int):
        return request
    if request.processes is not None:
        from neurosim.tools.cli.launch import as_processes, launch

        with as_processes(request.processes):
            configure(request)  # every setting checked once, here, before any process starts
        with loading():
            import torch.distributed.run  # noqa: F401
        return launch(request.processes, argv)
    cfg = configure(request)
    with loading():
        from neurosim.training import distributed
    code = None
    try:
        code = _run(request, cfg, argv)
        return code
    finally:
        distributed.finish(together=code == 0)


def configure(request: RunRequest):
    """The configuration ``request`` asks for, checked; None for a run to continue that holds
    none (``resume_run`` then says what is missing)."""
    from neurosim.training import config
    if request.config is not None:
        return config.from_saved(read_config(request.config), request.overrides)
    cfg = config.preset(request.preset, **request.overrides) if request.preset is not None else None
    if request.resume is not None:
        saved = request.resume / "config.json"
        if saved.is_file():
            try:
                saved = read_config(saved)
            except UserError:
                if any((request.resume / name).is_file() for name in ("last.pt", "best.pt")):
                    return cfg  # resume_run restores config.json from the checkpoint, with a note
                raise
            if request.preset is None or saved.preset == request.preset:  # else resume_run names the mismatch
                cfg = config.from_saved(saved, request.overrides)
    return cfg


def read_config(path: Path):
    """The ``RunConfig`` saved in ``path`` (a run's ``config.json``, or the run directory);
    one written by an older version of neurosim is brought up to date."""
    from neurosim.training.config import RunConfig

    path = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no configuration {path}; give the config.json of a run (RUN_DIR/config.json)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a configuration (not JSON: {e}); give the config.json of a run") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a configuration (a JSON object of settings); give the config.json of a run")
    try:
        return RunConfig.from_dict(data)
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} holds an invalid setting: {e}") from None


def _run(request: RunRequest, cfg, argv: list[str]) -> int:
    with loading():
        from neurosim.tools.dashboard import DashboardCallback, draw_dashboard
        from neurosim.tools.figures import plot_run
        from neurosim.training import distributed
        from neurosim.training.run import RunInterrupted
        from neurosim.training.run_dir import open_run, resume_run
        from neurosim.training.run_log import run_header
        from neurosim.training.run_record import record_start

    spec = cfg.device if cfg is not None else "auto"
    check_device(spec)
    check_budget(cfg, request.overrides)
    world, device = distributed.init(spec)  # torchrun's processes join here
    if cfg is not None and device != cfg.device:
        cfg = attrs.evolve(cfg, device="cuda")  # each rank its local GPU; the run records "cuda"
    quiet = request.quiet or not world.writer
    if request.resume is not None:
        run = resume_run(request.resume, expect=cfg, overrides=request.overrides, quiet=quiet)
    else:
        def choose():  # rank 0 names the run directory for every rank
            chosen = request.out or unique_run_dir(Path("runs"), cfg.preset)
            check_out_dir(chosen)
            return chosen

        run = open_run(distributed.decided_by_rank0(choose, share=True), cfg, quiet=quiet)
    log = run.log
    if world.writer:
        record_start(run, argv)
        board = DashboardCallback(run, lambda line: draw_failed(log, line))
        run.callbacks.append(board)
    log.say(run_header(run))
    if request.verbose:
        log.say(str(run.circuit))
    if world.distributed or run.cfg.lr_batch:
        log.say(f"{world.size} process{'es' if world.distributed else ''} on {run.device.type}: global batch "
                f"{run.global_batch} ({run.cfg.batch_size} per process), lr {run.lr:g}"
                + (f" (= {run.cfg.lr:g} x {run.global_batch}/{run.cfg.lr_batch}, the linear scaling rule)"
                   if run.cfg.lr_batch else " (as given; --lr-batch N scales it with the global batch)"))
    if run.device.type == "cpu":
        log.slow_hint = (f"{run.cfg.preset} at these settings is a job for a GPU; to try it on this CPU, shrink it "
                         f"(e.g. --epochs 2 --train-limit 5000{'' if MODELS[run.cfg.model].is_mlp else ' --width 0.25'})")

    # SIGTERM (a scheduler's or torchrun's stop) and SIGHUP (the terminal closed) stop the run as
    # a first Ctrl-C does: after the step or mirror batch under way, with a checkpoint. A signal
    # the process was started to ignore (nohup, a background job) stays ignored. Once training is
    # over the handlers before are back: main()'s, which make any of them end the command with
    # status 130 and one line (while figures are drawn, or as the process exits).
    stops = [s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None))
             if s is not None and signal.getsignal(s) is not signal.SIG_IGN]
    terminals = [fd for fd in (1, 2) if _is_terminal(fd)]

    def request_stop(signum, frame):
        run.stop_requested = True
        if signum == getattr(signal, "SIGHUP", None):
            _leave_closed_terminals(terminals)
        if signal.SIGINT in stops:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    previous = {s: signal.signal(s, request_stop) for s in stops}
    try:
        m = run.train()
    except RunInterrupted as e:
        _said(log, f"\n{e}")  # where the checkpoint is and how to continue: even when quiet
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of the current epoch
        if (run.run_dir / "last.pt").exists():
            kept = "keeps the checkpoint of its last finished epoch; continue it"
        else:
            kept = "has no checkpoint yet (no epoch had finished); start it again from the beginning"
        _said(log, f"\nstopped at once; {run.run_dir} {kept} with --resume {run.run_dir}")
        return 130
    except UserError as e:  # said by main(); the log keeps it too
        log.keep(f"error: {e}")
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not world.writer:
        return 0
    figures = plot_run(run.run_dir)
    if figures:
        log.say(f"wrote {len(figures)} figures into {run.run_dir}: {', '.join(p.name for p in figures)}")
    if board.current():  # written at the last checkpoint, from the same files
        page = run.run_dir / "dashboard.html"
    else:
        page = draw_dashboard(run.run_dir, lambda line: draw_failed(log, line))
    if page is not None:
        log.say(f"wrote {page}")
    if m is not None:
        log.say(f"final: test top-1 {m['test_acc']:.2f}%  top-5 {m['test_top5']:.2f}%  "
                f"mean W-Bᵀ angle {_degrees(m['mean_angle'])}  ({run.run_dir})", stream=sys.stdout)
    return 0


def draw_failed(log, line: str) -> None:
    """A dashboard that could not be drawn: one line on stderr and in the log (never a stop)."""
    try:
        log.say(line)
    except OSError:  # a closed terminal: the log keeps it
        log.keep(line)


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _leave_closed_terminals(fds: list[int]) -> None:
    """After SIGHUP: point those of ``fds`` (stdout, stderr) whose terminal was closed at
    /dev/null. Every write to a closed terminal fails (EIO), and a progress line drawn before
    the run stops would end it with that error instead of its checkpoint; log.txt keeps what
    the run says from now on. A terminal still open (SIGHUP sent by kill) keeps its lines."""
    for fd in fds:
        if not _is_terminal(fd):  # a closed terminal answers as none
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)


def _said(log, line: str) -> None:
    """``line`` on stderr even when quiet, and in the log. A terminal that was closed (SIGHUP)
    refuses the line: the log keeps it all the same, and the status says the rest."""
    try:
        log.say(line, always=True)
    except OSError:
        log.keep(line)


def _degrees(angle: float) -> str:
    return "n/a (no feedback matrix)" if angle != angle else f"{angle:.1f}°"
