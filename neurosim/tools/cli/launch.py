"""``neurosim run --nproc-per-node N``: a run on N processes of this machine, started as
``torchrun --standalone --nproc-per-node N`` starts it, but ending as a command should.

Under ``torchrun`` itself, a process that stops with a user error (exit status 2) makes torchrun
print a traceback of its own frames (``ChildFailedError``) and exit 1, whatever the process does.
Here the settings are checked once, before any process starts, and torchrun's launcher runs
inside this command: a process's failure ends it with that process's status (2 for a mistake,
130 for an interrupt), after the one message rank 0 printed, and no traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os

from neurosim.common.errors import UserError


@contextlib.contextmanager
def as_processes(n: int):
    """While checking settings: the environment the N processes will see (settings that apply
    only to several processes, such as --sync-bn, and the memory they share, are checked as
    each process will check them)."""
    saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    os.environ["WORLD_SIZE"] = os.environ["LOCAL_WORLD_SIZE"] = str(n)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def without_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--opt N`` or ``--opt=N``)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == option:
            skip = True
        elif not token.startswith(option + "="):
            out.append(token)
    return out


def launch(n: int, argv: list[str]) -> int:
    """Run ``neurosim run ARGV`` on ``n`` processes; returns the exit status of the first that
    failed (0 when every one finished)."""
    if "WORLD_SIZE" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        raise UserError("--nproc-per-node starts the processes itself; under torchrun leave it out")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={n}", "--module", "neurosim", "run",
                                         *without_option(argv, "--nproc-per-node")])
    # torchrun's own log lines (thread settings, which process failed) say nothing a user of
    # this command needs: the processes' messages say what happened.
    for name in ("torch.distributed.run", "torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(args)
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        code = failure.exitcode
        return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it
    return 0
