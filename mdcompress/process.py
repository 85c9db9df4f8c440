"""The process around a command: signals (Ctrl-C, SIGTERM) and the watchdog that makes them stop a run
within seconds, torch's threads, transformers' messages, the process group of a multi-process run,
and the exit.

Every command (``compress_model.py``, ``mdcompress.translate``, ``mdcompress.onnx_export``) imports
this module before its Ctrl-C handling starts, so it imports only the standard library at its top:
torch and transformers are imported by the two functions that need them, when called.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path



def program_name() -> str:
    """The command's name as the user typed it, for its messages: ``md-translate`` (installed),
    ``python -m mdcompress.translate``, ``compress_model.py``."""
    path = Path(sys.argv[0])
    if path.parent.name == "mdcompress" and path.suffix == ".py":  # run as python -m mdcompress.<module>
        return f"python -m mdcompress.{path.stem}"
    return path.name

class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, Slurm, ``docker stop``) while ``main()`` runs, raised in the main
    thread: the run stops the way Ctrl-C stops it (temporary folders removed, one line), with exit
    status 143 (128 + SIGTERM)."""


def interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (or Terminated) during whose handling ``e`` was raised, if any: a library
    cleaning up after an interrupt can raise an error of its own (datasets' worker pool, stopped while
    it tokenizes, a TimeoutError), which is no failure of the run."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__context__
    return None


class InterruptWatch:
    """Ctrl-C (SIGINT) and SIGTERM stop the run within seconds, whatever it was doing: the first
    signal raises KeyboardInterrupt (for SIGTERM its subclass ``Terminated``) in the main thread, and a
    watchdog thread hears of it at once through the signal wakeup file descriptor, which the C-level
    handler writes to even while the main thread is stuck in a library call (where Python's own
    handler cannot run) or deadlocked after the interrupt. Should ``main()`` not have returned after a
    grace time, the watchdog reports and exits. A signal that was ignored, or had a handler of its
    own, when ``main()`` started is left alone; the handlers are restored by ``close``. Processes
    forked meanwhile (datasets' tokenizing workers) get the default SIGTERM back and ignore SIGINT,
    which a terminal's Ctrl-C sends them too: the parent stops them, and their tracebacks stay out of
    the way of the one line."""

    GRACE_SECONDS = 15
    active: "InterruptWatch | None" = None  # the installed watch, for the fork hook
    _fork_hook = False

    def __init__(self, describe, prog: str = "compress_model.py") -> None:
        self.describe = describe  # signal number → the one line saying what is kept
        self.prog = prog  # the command's name as the user typed it, starting the line
        self.installed, self.previous = False, {}
        self.report_lock, self.reported = threading.Lock(), False
        self.terminated = False  # a SIGTERM was raised as Terminated
        if threading.current_thread() is not threading.main_thread():
            return
        ours = {signal.SIGINT: (signal.default_int_handler, self._on_sigint),
                signal.SIGTERM: (signal.SIG_DFL, self._on_sigterm)}
        ours = {signum: handler for signum, (default, handler) in ours.items() if signal.getsignal(signum) == default}
        if not ours:
            return
        self.reader, self.writer = socket.socketpair()
        self.writer.setblocking(False)  # the C handler must never block on it
        self.previous_fd = signal.set_wakeup_fd(self.writer.fileno(), warn_on_full_buffer=False)
        self.previous = {signum: signal.signal(signum, handler) for signum, handler in ours.items()}
        self.installed = True
        InterruptWatch.active = self
        if not InterruptWatch._fork_hook:
            os.register_at_fork(after_in_child=InterruptWatch._after_fork_in_child)
            InterruptWatch._fork_hook = True
        threading.Thread(target=self._watchdog, name="interrupt-watchdog", daemon=True).start()

    def _on_sigint(self, signum, frame):
        raise KeyboardInterrupt

    def _on_sigterm(self, signum, frame):
        if self.terminated:  # a repeat (``timeout`` signals the process, then its group): already stopping
            return
        self.terminated = True
        raise Terminated

    @staticmethod
    def _after_fork_in_child() -> None:
        watch, InterruptWatch.active = InterruptWatch.active, None
        if watch is None or not watch.installed:
            return
        try:
            signal.set_wakeup_fd(-1)  # the parent's watchdog must not hear of the child's signals
            for signum, previous in watch.previous.items():
                signal.signal(signum, signal.SIG_IGN if signum == signal.SIGINT else previous)
        except ValueError:  # not the child's main thread: nothing can be changed
            pass

    def _watchdog(self) -> None:
        # The reader stays open until close() has put the previous wakeup fd back and closed the writer
        # (end of file here): closed earlier, a signal arriving meanwhile (``timeout`` sends SIGTERM to
        # the process and then to its group) would make the C handler's write fail, and Python print
        # "Exception ignored when trying to write to the signal wakeup fd: BrokenPipeError" before the
        # one line.
        with self.reader:
            signum, deadline = None, None
            while True:  # the wakeup fd carries the number of every signal caught; wait for one of ours
                if deadline is not None:
                    self.reader.settimeout(max(deadline - time.monotonic(), 0.001))
                try:
                    received = self.reader.recv(64)
                except TimeoutError:  # main() has not returned within the grace time
                    break
                except OSError:
                    return
                if not received:  # close(): main() returned
                    return
                if signum is None:
                    signum = next((s for s in received if s in self.previous), None)
                    if signum is not None:
                        deadline = time.monotonic() + self.GRACE_SECONDS
            self.report(signum, raw=True)
            for name in ("multiprocess", "multiprocessing"):  # workers ignoring SIGINT must not outlive us
                if name in sys.modules:
                    for child in sys.modules[name].active_children():
                        child.terminate()
            os._exit(128 + signum)

    def stopped(self, interrupt: KeyboardInterrupt) -> int:
        """Report ``interrupt`` (Ctrl-C, or SIGTERM if ``Terminated``); the exit status a shell gives a
        command the signal stopped."""
        signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
        self.report(signum)
        return 128 + signum

    def report(self, signum: int, raw: bool = False) -> None:
        """The one line after an interrupt, once (from main(), or the watchdog with ``raw`` writes,
        which bypass Python's stderr buffer in case the stuck main thread holds it)."""
        if not self.report_lock.acquire(timeout=1):
            return
        try:
            if self.reported or int(os.environ.get("RANK", "0")) != 0:
                return
            self.reported = True
            line = f"{self.prog}: {self.describe(signum)}\n"
            if raw:
                os.write(2, line.encode())
            else:
                print(line, end="", file=sys.stderr, flush=True)
        finally:
            self.report_lock.release()

    def close(self) -> None:
        if self.installed:
            for signum, previous in self.previous.items():
                signal.signal(signum, previous)
            signal.set_wakeup_fd(self.previous_fd)
            self.writer.close()  # the watchdog reads end-of-file and leaves
            self.installed = False
            InterruptWatch.active = None


def torch_threads(num_threads: int | None, environ=os.environ, cores: int | None = None,
                  load: float | None = None, torch_default: int | None = None) -> tuple[int, str]:
    """(threads for torch, why). ``num_threads`` if given, else ``OMP_NUM_THREADS`` if set, else
    torch's default (a thread per core) less the cores the 1-minute load average says other jobs
    keep busy: on shared cores, OpenMP threads waiting for each other slowed training 10-30×."""
    import torch  # here: see the module's docstring

    if num_threads:
        return num_threads, "num_threads"
    if environ.get("OMP_NUM_THREADS", "").isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = max(1, min(torch_default or torch.get_num_threads(), cores - round(load)))
    return threads, f"{cores} cores, load average {load:.1f}; set num_threads or OMP_NUM_THREADS to choose"


def quiet_transformers() -> None:
    """Silence transformers' warnings and "Loading weights" bars: ours are the messages that matter."""
    from transformers.utils import logging as hf_logging  # here: see the module's docstring

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Recommended: pip install sacremoses")


def leave_process_group() -> None:
    """Destroy the process group of a multi-process run (torchrun) once this process's part is done.
    Left to the interpreter's exit, gloo's worker threads can abort the process at random (SIGABRT,
    "terminate called without an active exception", pytorch/pytorch#190489). Called only after a
    run that returned: a process that failed leaves it alone, as destroying a group another process
    may still wait on in a collective can hang (the processes exchange nothing after training)."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


def exit_with(code: int) -> None:
    """Leave a command-line script with ``code``; an interrupted one (130: Ctrl-C, 143: SIGTERM) at once,
    not waiting for threads a library left running."""
    if code in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
