"""Run directories: ``open_run`` makes a new one (or takes back one that never finished an
epoch), ``resume_run`` continues one from its checkpoint, restoring what was lost or damaged
(``config.json`` from the checkpoint's configuration; a lost ``last.pt`` from ``best.pt``), and
never starts again a run that finished work."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import attrs

from neurosim.common.errors import UserError
from neurosim.common.files import DirectoryLock, describe_os_error, write_atomic
from neurosim.training import distributed
from neurosim.training.checkpoint import load_checkpoint
from neurosim.training.config import PRESETS, RunConfig
from neurosim.training.run import Run
from neurosim.training.run_log import metrics_records


def _clear_uncommitted(run_dir: Path) -> None:
    """Remove what a run that never committed a checkpoint left behind, before it starts again
    (never ``best.pt``: a directory that has one is not started again, see ``_finished_work``)."""
    for name in ("metrics.jsonl", "monitor.npz", "monitor.json"):
        (run_dir / name).unlink(missing_ok=True)


def _recorded_epochs(run_dir: Path) -> int:
    """The last epoch ``metrics.jsonl`` records as finished (0: none, or no file)."""
    path = run_dir / "metrics.jsonl"
    return max((r["epoch"] for r in metrics_records(path) if isinstance(r["epoch"], int)), default=0) \
        if path.exists() else 0


def _finished_work(run_dir: Path) -> bool:
    """Whether a directory without ``last.pt`` holds epochs its run finished: a ``best.pt``, or
    records of finished epochs. Such a directory is never started again from the beginning."""
    if (run_dir / "best.pt").exists():
        return True
    try:
        return _recorded_epochs(run_dir) > 0
    except UserError:  # a damaged metrics file: what it held cannot be told, so it is kept
        return True


def _in_place_of_last(run_dir: Path, quiet: bool) -> dict:
    """The checkpoint to continue a run from whose ``last.pt`` is gone but which finished epochs.

    ``best.pt`` when it holds the latest epoch ``metrics.jsonl`` records (as after a kill
    between the two files of the first commit): nothing finished is trained again. Otherwise a
    ``UserError`` with the choices; nothing is deleted either way."""
    best, last = run_dir / "best.pt", run_dir / "last.pt"
    recorded = _recorded_epochs(run_dir)
    again = f"start a new run from its configuration (--config {run_dir / 'config.json'} --out NEW_DIR)"
    if not best.exists():
        raise UserError(f"{run_dir} has no checkpoint (last.pt and best.pt are gone), but its metrics.jsonl records "
                        f"{recorded} finished epoch{'s' if recorded != 1 else ''}; nothing was deleted. There is "
                        f"nothing to continue from: to train it again, {again}")
    try:
        state = load_checkpoint(best)
    except UserError as e:
        raise UserError(f"{run_dir} has no last.pt, and {e} Nothing was deleted; to train it again, {again}") from None
    if state["epoch"] >= recorded:
        if not quiet:
            print(f"note: {run_dir} has no last.pt; its best.pt holds the latest epoch it finished "
                  f"({state['epoch']}): continuing from there", file=sys.stderr)
        return state
    raise UserError(f"{run_dir} has no last.pt (the checkpoint of its latest position); its best.pt (epoch "
                    f"{state['epoch']}) is intact, but metrics.jsonl records epochs up to {recorded}, which would be "
                    f"trained again. Nothing was deleted. To continue from epoch {state['epoch']}: cp {best} {last} "
                    f"and resume; to keep the later epochs, put their last.pt back")


def _write_config(run_dir: Path, cfg: RunConfig) -> None:
    write_atomic(run_dir / "config.json", (cfg.to_json() + "\n").encode(), what="configuration")


def open_run(run_dir: Path, cfg: RunConfig, quiet: bool = False) -> Run:
    """A new run in a fresh directory, or in one whose run never committed a checkpoint.

    The directory is locked before it is looked at, so two runs started on it at once cannot
    both proceed; a failure while loading data or building the circuit leaves no directory
    behind that was not there before. Under torchrun rank 0 does all of this and the other ranks
    build the same run without touching the directory."""
    run_dir = Path(run_dir)

    def prepare():
        created = not run_dir.exists()
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run directory {run_dir}: {describe_os_error(e)}") from None
        lock = DirectoryLock(run_dir)
        if (run_dir / "last.pt").exists() or _finished_work(run_dir):
            lock.release()
            raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} to continue it or choose "
                            f"another --out")
        return created, lock

    if not distributed.world().writer:
        distributed.decided_by_rank0(prepare)
        return Run(cfg, run_dir, quiet=True)
    created, lock = distributed.decided_by_rank0(prepare)
    try:
        if (run_dir / "config.json").exists() and not quiet:
            print(f"note: {run_dir} holds a run that never finished its first epoch; starting it anew",
                  file=sys.stderr)
        run = Run(cfg, run_dir, quiet=quiet)
        _clear_uncommitted(run_dir)
        _write_config(run_dir, cfg)
    except BaseException:
        lock.release()
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif not (run_dir / "config.json").exists():
            lock.path.unlink(missing_ok=True)  # the folder is left as it was found
        raise
    run.lock = lock
    return run


def resume_run(run_dir: Path, expect: RunConfig | None = None, overrides: dict | None = None,
               quiet: bool = False) -> Run:
    """Reopen a run from its last checkpoint; refuse one of another preset.

    A run that never committed a checkpoint (killed, diverged or failed in its first epoch)
    starts again from the beginning with its saved configuration. Under torchrun rank 0 reads
    the checkpoint and hands it to the other ranks (no shared file system needed for that); a
    run is resumed by as many processes as trained it."""
    run_dir = Path(run_dir)
    w = distributed.world()
    lock = None

    def decide():
        nonlocal lock
        lost = not (run_dir / "last.pt").exists() and run_dir.is_dir()
        if lost and (run_dir / "config.json").exists() and not _finished_work(run_dir):
            return "restart", _restart_config(run_dir, expect, overrides, quiet).to_dict(), None
        lock = DirectoryLock(run_dir) if run_dir.is_dir() else None
        try:
            if lost and _finished_work(run_dir):
                state = _in_place_of_last(run_dir, quiet)
            else:
                state = load_checkpoint(run_dir / "last.pt")
            cfg = _resumed_config(run_dir, RunConfig.from_dict(state["config"]), expect, overrides)
            if cfg.epochs < state["epoch"]:
                raise UserError(f"{run_dir} has finished {state['epoch']} epochs; --epochs {cfg.epochs} would "
                                f"train none. Give --epochs above {state['epoch']} to train further")
            trained_by = state.get("world", 1)
            if trained_by != w.size:
                how = ("a single process" if trained_by == 1 else
                       f"torchrun --nproc_per_node={trained_by} (or {trained_by} processes over several nodes)")
                raise UserError(f"{run_dir} was trained by {trained_by} process{'es' if trained_by > 1 else ''} "
                                f"(global batch {cfg.batch_size * trained_by}) and this is {w.size}: resume it "
                                f"with {how}. Its position in the epoch, its learning rate and its data order "
                                f"belong to that global batch; to change it, start a new run")
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        return "resume", cfg.to_dict(), state

    how, cfg_dict, state = distributed.decided_by_rank0(decide, share=True)
    cfg = RunConfig.from_dict(cfg_dict)
    if how == "restart":
        return open_run(run_dir, cfg, quiet=True)
    try:
        run = Run(cfg, run_dir, quiet=quiet)
        trained_on = state["rng"].get("device", run.device.type)
        if trained_on != run.device.type and not quiet and w.writer:
            print(f"note: {run_dir} was trained on {trained_on} and continues on {run.device.type}; training "
                  f"goes on from the checkpoint, but random draws (augmentation, sleep noise) differ from "
                  f"those of a run that stayed on {trained_on}, so it will not repeat that run bit for bit",
                  file=sys.stderr)
        run.load_state_dict(state)
        if w.writer:
            _restore_config(run_dir, cfg, RunConfig.from_dict(state["config"]), quiet)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    run.lock = lock
    return run


CHANGEABLE_ON_RESUME = ("epochs", "log_every", "device", "data_dir", "compile", "deterministic")


def _resumed_config(run_dir: Path, saved: RunConfig, expect: RunConfig | None, overrides: dict | None) -> RunConfig:
    if expect is not None and expect.preset != saved.preset:
        if saved.preset in PRESETS:
            raise UserError(f"{run_dir} holds a {saved.preset} run, not {expect.preset}; resume it with its own "
                            f"preset: {saved.preset} --resume {run_dir}")
        raise UserError(f"{run_dir} holds a run of a configuration of its own ({saved.preset!r} is no preset), not "
                        f"{expect.preset}; resume it without naming a preset: --resume {run_dir}")
    for key, value in (overrides or {}).items():
        if key not in CHANGEABLE_ON_RESUME and getattr(saved, key) != value:
            raise UserError(f"--{key.replace('_', '-')} cannot change when resuming (the run used "
                            f"{getattr(saved, key)!r}); only {', '.join(sorted(CHANGEABLE_ON_RESUME))} can")
    return attrs.evolve(saved, **{k: v for k, v in (overrides or {}).items() if k in CHANGEABLE_ON_RESUME})


def _restore_config(run_dir: Path, cfg: RunConfig, saved: RunConfig, quiet: bool) -> None:
    """Make ``config.json`` describe the run as it goes on: the checkpoint's configuration
    (``saved``) with the changes a resume may make (``cfg``).

    The checkpoint holds the configuration, so a ``config.json`` that is missing, damaged or
    edited is rewritten from it, and said; one that cannot be rewritten (a directory of that
    name, say) stops the resume with the reason."""
    path = run_dir / "config.json"
    expected = cfg.to_json() + "\n"
    problem = None
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text, problem = None, "was missing"
    except (OSError, UnicodeDecodeError) as e:
        text, problem = None, f"could not be read ({describe_os_error(e) if isinstance(e, OSError) else 'not text'})"
    if text == expected:
        return
    if text is not None:
        try:
            found = RunConfig.from_dict(json.loads(text))
        except Exception:  # not JSON, not an object, unknown or invalid fields: damaged either way
            problem = "was damaged (not a valid configuration)"
        else:
            problem = None if found == saved else "did not match the checkpoint's configuration"
    _write_config(run_dir, cfg)
    if problem and not quiet:
        print(f"note: {path} {problem}; it is rewritten from the checkpoint (a resume changes only "
              f"{', '.join('--' + k.replace('_', '-') for k in CHANGEABLE_ON_RESUME)})", file=sys.stderr)


def _restart_config(run_dir: Path, expect, overrides, quiet) -> RunConfig:
    """The configuration of a run that never committed a checkpoint, to start it again."""
    try:
        saved = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    except (ValueError, TypeError, AttributeError, KeyError, UserError) as e:
        raise UserError(f"{run_dir / 'config.json'} cannot be read ({e}); start a new run with --out") from None
    except OSError as e:
        raise UserError(f"{run_dir / 'config.json'} cannot be read ({describe_os_error(e)}); start a new run "
                        f"with --out") from None
    cfg = _resumed_config(run_dir, saved, expect, overrides)
    if not quiet:
        print(f"note: {run_dir} has no checkpoint yet (its first epoch never finished); starting it again "
              f"from the beginning", file=sys.stderr)
    return cfg
