"""Ctrl-C during ``fedtune simulate``/``resume``: stop within seconds, keep the checkpoint, exit 130.

The first Ctrl-C asks the ServerApp to stop (:class:`~fedtune.server.run.RunControl`): it stops
waiting for replies at once, or finishes the round it is checkpointing. Ray's worker
threads in this process may still be blocked on tasks whose processes the same Ctrl-C
killed, so once the ServerApp has stopped (or after ``grace`` seconds) this process ends
its Ray processes itself, prints how to resume and exits with 130. A second Ctrl-C does
that at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedtune.server.run import RunControl

EXIT_CODE = 130  # 128 + SIGINT, as shells report a Ctrl-C
_report_lock = threading.Lock()
_reported = False


def resume_hint(control: RunControl) -> str:
    """What was kept and the command that continues the run."""
    if control.run_dir is None:
        return "fedtune: interrupted before the run started; nothing to resume"
    if control.completed_round == 0:
        return (f"fedtune: interrupted before round 1 completed; {control.run_dir} has no checkpoint, "
                "start the run again")
    return (f"fedtune: interrupted; {control.run_dir} keeps the checkpoint of round {control.completed_round}. "
            f"Continue with:\n  fedtune resume {control.run_dir}")


def report_interrupted(control: RunControl) -> None:
    """Print :func:`resume_hint` once, whichever thread gets here first."""
    global _reported
    with _report_lock:
        if _reported:
            return
        _reported = True
    print(resume_hint(control), file=sys.stderr, flush=True)


def stop_child_processes(timeout: float = 2.0) -> None:
    """End every process this one started (Ray's GCS, raylet, workers): SIGTERM, then SIGKILL."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=timeout)


def _exit_interrupted(control: RunControl) -> None:
    stop_child_processes()
    if sys.stdout.isatty():
        sys.stdout.write("\x1b[?25h")  # the progress bar hides the cursor until it is stopped
    report_interrupted(control)
    sys.stdout.flush()
    os._exit(EXIT_CODE)  # Ray's threads in this process may never return: do not wait for them


def _finish_after_stop(control: RunControl, grace: float) -> None:
    control.finished.wait(grace)
    _exit_interrupted(control)


@contextlib.contextmanager
def stop_on_interrupt(control: RunControl, grace: float = 10.0) -> Iterator[None]:
    """Within this block, Ctrl-C (SIGINT) stops the run as the module describes.

    Parameters
    ----------
    control : RunControl
        Shared with the run's ServerApp: its ``stop`` is set on the first Ctrl-C, and its
        ``finished`` tells when the ServerApp has stopped.
    grace : float
        Seconds the ServerApp may take to stop before the process ends anyway.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigint(signum: int, frame: object) -> None:
        if control.stop.is_set():
            _exit_interrupted(control)
        control.stop.set()
        print("\nfedtune: stopping (Ctrl-C again to quit at once)", file=sys.stderr, flush=True)
        threading.Thread(target=_finish_after_stop, args=(control, grace), daemon=True,
                         name="fedtune-stop").start()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
