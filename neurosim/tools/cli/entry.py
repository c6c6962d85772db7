"""How a command ends: every user error in one message and exit status 2.

``main(entry)`` runs an entry (``run_circuit``, ``evaluate``, ``neurosim.tools.cli.plot.plot_run``;
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

from neurosim.common.errors import UserError


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
    status; user errors, I/O errors and Ctrl-C end in one line.

    Ctrl-C, SIGTERM and SIGHUP (the terminal closed) reach the entry as ``KeyboardInterrupt``,
    unless it handles them itself (a run that trains saves a checkpoint first); one that a
    finaliser swallowed is sent again (``_Interrupts``). Called as the program itself (on the
    process's own command line, ``argv`` None, by the top level of its ``__main__`` module: the
    scripts in experiments/, the ``neurosim`` command), ``main`` also ends the process itself
    (``_exit_process``): from the moment the entry is done, a signal ends it at once with status
    130 and one line, however far its exit has come. Code that passes ``argv`` gets the
    ``SystemExit`` to catch, as before."""
    program = argv is None and _called_by_program()
    if entry is None:
        from neurosim.tools.cli.commands import neurosim as entry
    shown = warnings.formatwarning
    warnings.formatwarning = one_line_warning
    interrupts = _Interrupts()
    try:
        try:
            code = entry(sys.argv[1:] if argv is None else argv)
        finally:
            warnings.formatwarning = shown
            interrupts.end(at_exit=program)
    except UserError as e:
        code = 2
        if not _echo(e):  # else said once, by rank 0
            rank = os.environ.get("RANK", "0")
            _say(f"error: {e}" if rank == "0" else f"error: (rank {rank}) {e}")
    except OSError as e:
        code = 2
        _say(f"error: {os_error_message(e)}")
    except KeyboardInterrupt:
        # Entries write their files through a temporary file and a rename, and a run that is
        # training handles Ctrl-C itself (it saves a checkpoint), so an interrupt that reaches
        # here leaves every file as it was or complete.
        code = 130
        _say("\ninterrupted; nothing was lost")
    except SystemExit as e:  # an entry's own exit (argparse's --help, a usage error)
        if not program:
            raise
        code = e.code
    if program:
        _exit_process(code)
    sys.exit(code)


def _echo(e: UserError) -> bool:
    """Whether ``e`` is reported already, or by another process: rank 0 of a torchrun job said it
    (``Echo``), or rank 0 says the same error (this being another rank). False: this process
    says it.

    Under torchrun a rank other than 0 ends here with status 0 once it knows rank 0 fails too
    (having said its own error if rank 0's is another), and rank 0, once it has said ``e``,
    waits for them before it exits with status 2: torchrun's summary then names rank 0 alone
    (``neurosim.training.distributed``)."""
    rank = os.environ.get("RANK", "0")
    if not _several_processes():
        _torchrun_error_file(f"error: {e}")
        return False
    if rank == "0":
        loaded = sys.modules.get("neurosim.training.distributed")
        said = loaded is not None and isinstance(e, loaded.Echo)
        if not said:
            # Said before the others are told (telling them may load PyTorch first: seconds).
            print(f"error: {e}", file=sys.stderr, flush=True)
        _torchrun_error_file(f"error: {e}")
        _tell_the_other_ranks(str(e))
        return True
    train = sys.modules.get("neurosim.training.run")  # not loaded: e cannot be one of its errors
    together = train is not None and isinstance(e, (train.RunDiverged, train.RunInterrupted))
    try:
        from neurosim.training import distributed
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
        from neurosim.training import distributed
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
    """While a command loads PyTorch and the modules that need it (seconds): Ctrl-C (or SIGTERM,
    SIGHUP) ends the process at once with one line. An interrupt inside a C extension's import
    can surface as any error, or leave the extension half initialised; nothing has been written
    yet."""
    def stop(signum, frame):
        _say("\ninterrupted while starting; nothing was written")
        os._exit(130)

    try:
        previous = {s: signal.signal(s, stop) for s in _SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    except ValueError:  # not the main thread: its owner handles signals
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# The signals that ask a command to stop: Ctrl-C, a stop from outside (a scheduler, torchrun,
# kill) and the terminal closed. One the process was started to ignore (nohup, a background
# job) stays ignored.
_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


def _say(line: str) -> None:
    """``line`` on stderr, flushed; nothing if stderr is gone (a terminal closed: SIGHUP)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class _Interrupts:
    """While ``main`` runs an entry: ``_SIGNALS`` raise ``KeyboardInterrupt`` (an entry may handle
    them otherwise while it needs to, and put these handlers back), and an interrupt that lands
    in a finaliser (``__del__``, a weakref callback, garbage collection), where Python drops the
    exception and prints "Exception ignored in …", is sent again, to land in the code that was
    running once the finaliser is over. ``end`` puts back what was there before, or, when the
    program is about to exit, handlers that end it at once."""

    def __init__(self):
        self.previous = {}
        try:
            for s in _SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self.previous[s] = signal.signal(s, signal.default_int_handler)
        except ValueError:  # not the main thread: its owner handles signals
            pass
        self.hook = sys.unraisablehook
        sys.unraisablehook = self._unraisable
        self.active = True

    def _unraisable(self, info) -> None:
        if not (self.active and info.exc_type is not None and issubclass(info.exc_type, KeyboardInterrupt)):
            self.hook(info)
            return
        import threading

        # Sent from another thread, a moment later: sent from here it would land in this hook,
        # still inside the finaliser, and be dropped again.
        threading.Thread(target=self._again, name="interrupt-again", daemon=True).start()

    def _again(self) -> None:
        import threading
        import time

        time.sleep(0.01)
        if not self.active:
            return
        if hasattr(signal, "pthread_kill"):  # to the main thread itself: it wakes from a wait
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        else:
            import _thread

            _thread.interrupt_main()

    def end(self, at_exit: bool) -> None:
        self.active = False
        if sys.unraisablehook == self._unraisable:
            sys.unraisablehook = self.hook
        for s, handler in self.previous.items():
            signal.signal(s, _interrupted_at_exit if at_exit else handler)


def _interrupted_at_exit(signum, frame) -> None:
    """A signal once the command is done (its files written), while the process exits: status
    130 and one line, at once."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a stream closed, gone, or being written by the code interrupted
            pass
    try:
        os.write(2, b"\ninterrupted; nothing was lost\n")
    except OSError:
        pass
    os._exit(130)


def _called_by_program() -> bool:
    """Whether ``main``'s caller is a program's top level (the ``__main__`` module's own code),
    not a function that may go on after ``main`` (a test catching its ``SystemExit``)."""
    caller = sys._getframe(2)
    return caller.f_code.co_name == "<module>" and caller.f_globals.get("__name__") == "__main__"


def _exit_process(code) -> None:
    """End the program with ``code`` (as ``sys.exit`` takes it) the way the interpreter would
    (other threads joined, atexit hooks run, output flushed), then ``os._exit``.

    The interpreter's own teardown that ``os._exit`` skips (modules and objects freed) starts
    with Python putting signal handlers back to their defaults: a Ctrl-C there killed the
    process without a word, and one in a thread join or an atexit hook was dropped as
    "Exception ignored in …" with status 0. Here ``_interrupted_at_exit`` answers every signal
    until the end. Files are complete by now (written through a rename and closed); nothing
    that the teardown would free holds unwritten data."""
    import atexit
    import threading

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): the message, status 1
        _say(str(code))
        status = 1
    shutdown = getattr(threading, "_shutdown", None)  # what the interpreter runs first as it exits
    try:
        if shutdown is not None:
            shutdown()  # waits for the threads that are not daemons, runs threading's exit hooks
    finally:
        atexit._run_exitfuncs()  # exceptions in hooks are reported by it, as at a normal exit
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or terminal: nothing more can be said
                pass
        os._exit(status)
