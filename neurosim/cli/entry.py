"""How a command ends: every user error in one message and exit status 2.

``main(entry)`` runs an entry (``run_circuit``, ``evaluate``, ``neurosim.plot_cli.plot_run``;
by default the ``neurosim`` command) and turns what a user can cause into one line on stderr: a
``UserError`` or an ``OSError`` (the path and the cause) gives status 2, Ctrl-C gives status 130.
Nothing else is caught: a traceback means a bug.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import warnings

from neurosim.errors import UserError


def fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


# errno → (cause, what to do about it)
_OS_CAUSES = {
    errno.ENOSPC: ("disk full", "free some space or choose another location"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another location"),
    errno.EROFS: ("read-only file system", "choose a writable location"),
    errno.EACCES: ("permission denied", "choose a location you can write to, or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a location you can write to, or change its permissions"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("a part of the path is a file, not a directory", "check the path"),
    errno.EISDIR: ("is a directory", "give the path of a file"),
    errno.EEXIST: ("already exists", "choose another path"),
    errno.EIO: ("input/output error", "check the disk"),
}


def os_error_message(exc: OSError) -> str:
    """One line naming the path of an ``OSError`` and its cause (``disk full``, ``read-only file system``)."""
    cause, fix = _OS_CAUSES.get(exc.errno, (exc.strerror or str(exc) or type(exc).__name__, ""))
    path = exc.filename
    if path is not None and exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    where = f"{os.fsdecode(path) if isinstance(path, bytes) else path}: " if path is not None else ""
    return f"{where}{cause}" + (f"; {fix}" if fix else "")


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as a command prints it: ``warning: <message>``, without the source line of the
    code that raised it, which says nothing to someone running a command."""
    return f"warning: {' '.join(str(message).split())}\n"


def main(entry=None, argv=None) -> None:
    """Run ``entry(argv)`` (default: the ``neurosim`` command on ``sys.argv``) and exit with its
    status; user errors, I/O errors and Ctrl-C end in one line."""
    if entry is None:
        from neurosim.cli.commands import neurosim as entry
    shown = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    try:
        code = entry(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        if _echo(e):
            sys.exit(2)  # said once, by rank 0
        rank = os.environ.get("RANK", "0")
        fail(str(e) if rank == "0" else f"(rank {rank}) {e}")
    except OSError as e:
        fail(os_error_message(e))
    except KeyboardInterrupt:
        # Entries write their files through a temporary file and a rename, and a run that is
        # training handles Ctrl-C itself (it saves a checkpoint), so an interrupt that reaches
        # here leaves every file as it was or complete.
        print("\ninterrupted; nothing was lost", file=sys.stderr)
        sys.exit(130)
    finally:
        warnings.formatwarning = shown
    sys.exit(code)


def _echo(e: UserError) -> bool:
    """Whether ``e`` is reported already, or by another process: rank 0 of a torchrun job said it
    (``Echo``), or rank 0 says the same error (this being another rank). False: this process
    says it.

    Under torchrun a rank other than 0 ends here with status 0 once it knows rank 0 fails too
    (having said its own error if rank 0's is another), and rank 0, once it has said ``e``,
    waits for them before it exits with status 2: torchrun's summary then names rank 0 alone
    (``neurosim.distributed``)."""
    rank = os.environ.get("RANK", "0")
    if not _several_processes():
        _torchrun_error_file(f"error: {e}")
        return False
    if rank == "0":
        loaded = sys.modules.get("neurosim.distributed")
        said = loaded is not None and isinstance(e, loaded.Echo)
        if not said:
            # Said before the others are told (telling them may load PyTorch first: seconds).
            print(f"error: {e}", file=sys.stderr, flush=True)
        _torchrun_error_file(f"error: {e}")
        _tell_the_other_ranks(str(e))
        return True
    train = sys.modules.get("neurosim.train")  # not loaded: e cannot be one of its errors
    together = train is not None and isinstance(e, (train.RunDiverged, train.RunInterrupted))
    try:
        from neurosim import distributed

        says, rank0_fails = distributed.who_reports(e, together=together)
    except KeyboardInterrupt:  # while waiting for rank 0: torchrun is stopping every rank
        sys.exit(130)
    quietly = rank0_fails and distributed.under_torchrun()
    if says:
        _torchrun_error_file(f"error: (rank {rank}) {e}")
        if not quietly:
            return False
        print(f"error: (rank {rank}) {e}", file=sys.stderr, flush=True)
    if quietly:
        distributed.stop_quietly()  # status 0: rank 0's status 2 fails the job
    return True


def _tell_the_other_ranks(message: str) -> None:
    """Rank 0, its error said: hands it to the other ranks and waits for them to stop, under
    torchrun (see ``_echo``)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    try:
        from neurosim import distributed

        distributed.after_saying(message)
    except BaseException:  # noqa: BLE001 - the message is out; a Ctrl-C or a failure here ends the wait only
        pass


def _several_processes() -> bool:
    """Whether this process is one of several a launcher (torchrun) started, by its environment
    (without loading PyTorch)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) >= 0
    except ValueError:
        return False


def _torchrun_error_file(message: str) -> None:
    """Under torchrun: ``message`` into the error file it gives this process
    (``TORCHELASTIC_ERROR_FILE``), which its summary of a failed job shows as the failure's
    ``traceback`` instead of a pointer to how to record one."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    # The layout torchrun's ErrorHandler writes, with the message in place of a call stack.
    when = str(int(time.time()))
    record = {"message": {"message": message, "extraInfo": {"py_callstack": message, "timestamp": when}}}
    try:
        with open(path, "w") as f:
            json.dump(record, f)
    except OSError:
        pass  # torchrun then says only that the process failed; the message is on stderr


@contextlib.contextmanager
def loading():
    """While a command loads PyTorch and the modules that need it (seconds): Ctrl-C ends the
    process at once with one line. An interrupt inside a C extension's import can surface as
    any error, or leave the extension half initialised; nothing has been written yet."""
    def stop(signum, frame):
        sys.stderr.write("\ninterrupted while starting; nothing was written\n")
        sys.stderr.flush()
        os._exit(130)

    try:
        previous = signal.signal(signal.SIGINT, stop)
    except ValueError:  # not the main thread: its owner handles signals
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
