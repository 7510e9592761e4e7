"""Live progress within a round: clients done, local training steps, central evaluation batches.

The server shows, under the bar of federated rounds, how many sampled clients have replied
(counted as replies arrive, while the server polls for them), how many local training
steps the clients have taken, and how many batches of the central test set are scored.
On a terminal these are live bars; otherwise a plain line every ``plain_every`` seconds.

Clients run in other processes. In a simulation they share the server's disk, so each
training message names a step file (``<run_dir>/.progress/round-<r>-node-<id>.json``) that
the client's training loop rewrites, at most once a second and by an atomic rename, with
``{"done": steps, "total": steps}``; the server sums the files of the round. A missing or
unreadable file counts as nothing. In a deployment no file is named (clients have their
own disks) and only clients done are shown. Nothing of this runs with
``output.progress=false``.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

PROGRESS_DIR = ".progress"  # in the run directory, removed when the run ends


# --------------------------------------------------------------------------- client side


class StepFile:
    """A client's local training steps of one round, kept in a small JSON file.

    Parameters
    ----------
    path : Path
        The file; its folder must exist (a client never creates folders).
    interval : float
        Least seconds between two writes while steps are counted; :meth:`flush` always writes.
    clock : callable
        Monotonic seconds (tests pass a fake one).
    """

    def __init__(self, path: str | os.PathLike[str], interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.interval = interval
        self.clock = clock
        self.done = 0
        self.total = 0
        self._written = -math.inf

    def begin(self, total: int) -> None:
        """Expect ``total`` more steps (a routine may train more than once per round)."""
        self.total += total
        self.flush()

    def advance(self, steps: int = 1) -> None:
        """Count ``steps`` taken; write when ``interval`` has passed since the last write."""
        self.done += steps
        if self.clock() - self._written >= self.interval:
            self.flush()

    def flush(self) -> None:
        """Write the counts now (best effort: progress never fails training)."""
        self._written = self.clock()
        staging = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            staging.write_text(json.dumps({"done": self.done, "total": self.total}))
            os.replace(staging, self.path)
        except OSError:
            pass


class _NoSteps:
    """What training reports to when no step file is active: nothing."""

    def begin(self, total: int) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass


_ACTIVE: contextvars.ContextVar[StepFile | None] = contextvars.ContextVar("fedtune_step_file", default=None)


@contextlib.contextmanager
def reporting_steps(path: str | None) -> Iterator[StepFile | None]:
    """Within the block, :func:`local_steps` counts into a :class:`StepFile` at ``path``.

    No file is written when ``path`` is empty or its folder does not exist (a message from
    a server on another machine).
    """
    if not path or not Path(path).parent.is_dir():
        yield None
        return
    steps = StepFile(path)
    token = _ACTIVE.set(steps)
    try:
        yield steps
    finally:
        _ACTIVE.reset(token)
        steps.flush()


def local_steps(total: int) -> StepFile | _NoSteps:
    """The active step counter, told to expect ``total`` steps (a no-op one outside :func:`reporting_steps`)."""
    steps = _ACTIVE.get()
    if steps is None:
        return _NoSteps()
    steps.begin(total)
    return steps


# --------------------------------------------------------------------------- server side


def read_steps(paths: Iterable[Path]) -> tuple[int, int]:
    """Summed ``(done, total)`` of the step files; missing or partial files count as nothing."""
    done = total = 0
    for path in paths:
        try:
            counts = json.loads(Path(path).read_text())
            d, t = int(counts["done"]), int(counts["total"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        done, total = done + d, total + t
    return done, total


def _clock_text(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RoundProgress:
    """The server's view of the round in progress, shown live or as periodic plain lines.

    Parameters
    ----------
    num_rounds : int
        Rounds of the run (for "round r/N").
    console : rich.console.Console
        Where plain lines go.
    bar : rich.progress.Progress, optional
        The run's live bars (the run log's); tasks for clients, local steps and evaluation
        batches are added to it. Without one, or when ``console`` is not a terminal, a
        plain line is printed at most every ``plain_every`` seconds.
    step_dir : Path, optional
        Where clients write their step files (a simulation); None: clients done only.
    plain_every : float
        Seconds between plain lines.
    clock : callable
        Monotonic seconds (tests pass a fake one).
    """

    def __init__(self, num_rounds: int, console: Any, bar: Any = None, step_dir: Path | None = None,
                 plain_every: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.num_rounds = num_rounds
        self.console = console
        self.step_dir = Path(step_dir).resolve() if step_dir is not None else None
        if self.step_dir is not None:
            shutil.rmtree(self.step_dir, ignore_errors=True)  # a killed run's files, before a resume
            self.step_dir.mkdir(parents=True)
        self.plain_every = plain_every
        self.clock = clock
        self.live = bar is not None and bool(getattr(console, "is_terminal", False))
        self.bar = bar if self.live else None
        self.round = 0
        self.phase = ""
        self.replied, self.sampled = 0, 0
        self.steps = (0, 0)
        self.batches = (0, 0)
        self._files: list[Path] = []
        self._phase_start = clock()
        self._last_line = clock()
        self._last_read = -math.inf
        self._tasks: dict[str, Any] = {}
        if self.bar is not None:
            for key, title in (("clients", "  clients done"), ("steps", "  local steps"),
                               ("batches", "  evaluation batches")):
                self._tasks[key] = self.bar.add_task(title, total=None, visible=False)

    def step_file(self, server_round: int, node_id: int) -> str | None:
        """The step file a training message to ``node_id`` names, or None (no shared disk)."""
        if self.step_dir is None:
            return None
        return str(self.step_dir / f"round-{server_round}-node-{node_id}.json")

    def start(self, server_round: int, phase: str, sampled: int, step_files: Iterable[str | None] = ()) -> None:
        """A new phase of ``server_round`` (``training``, ``client evaluation``) with ``sampled`` clients."""
        self.round, self.phase = server_round, phase
        self.replied, self.sampled = 0, sampled
        self._files = [Path(f) for f in step_files if f]
        self.steps = (0, 0)
        self.batches = (0, 0)
        self._phase_start = self._last_line = self.clock()
        self._last_read = -math.inf
        self._restart_bars()
        self._show()

    def replies(self, arrived: int, sent: int) -> None:
        """Called while the server polls for replies: ``arrived`` of ``sent`` messages answered."""
        self.replied, self.sampled = arrived, sent
        now = self.clock()
        if self._files and now - self._last_read >= 0.5:
            self._last_read = now
            self.steps = read_steps(self._files)
        self._show()

    def evaluation(self, done: int, total: int) -> None:
        """Batches of the central test set scored so far."""
        if self.phase != "central evaluation":
            self.phase, self._phase_start, self._last_line = "central evaluation", self.clock(), self.clock()
            self._files = []
            self._restart_bars()
        self.batches = (done, total)
        self._show()

    def line(self) -> str:
        """The plain line: round, phase, clients done, local steps, evaluation batches, time in the phase."""
        parts = [f"round {self.round}/{self.num_rounds} {self.phase}"]
        if self.phase == "central evaluation":
            parts.append(f"batches {self.batches[0]}/{self.batches[1]}")
        else:
            parts.append(f"clients done {self.replied}/{self.sampled}")
            if self.steps[1]:
                parts.append(f"local steps {self.steps[0]}/{self.steps[1]}")
        parts.append(_clock_text(self.clock() - self._phase_start))
        return ", ".join(parts)

    def _restart_bars(self) -> None:
        """Zero the bars and their clocks: each phase shows its own elapsed time."""
        if self.bar is not None:
            for task in self._tasks.values():
                self.bar.reset(task, total=None, visible=False)

    def _show(self) -> None:
        if self.bar is not None:
            central = self.phase == "central evaluation"
            self.bar.update(self._tasks["clients"], completed=self.replied, total=self.sampled or None,
                            visible=not central and self.sampled > 0)
            self.bar.update(self._tasks["steps"], completed=self.steps[0], total=self.steps[1] or None,
                            visible=not central and self.steps[1] > 0)
            self.bar.update(self._tasks["batches"], completed=self.batches[0], total=self.batches[1] or None,
                            visible=central)
            return
        now = self.clock()
        if now - self._last_line >= self.plain_every:
            self._last_line = now
            self.console.print(self.line(), soft_wrap=True, highlight=False)

    def close(self) -> None:
        """Hide the round's bars and remove the step files' folder."""
        if self.bar is not None:
            for task in self._tasks.values():
                self.bar.update(task, visible=False)
        if self.step_dir is not None:
            shutil.rmtree(self.step_dir, ignore_errors=True)


__all__ = ["PROGRESS_DIR", "RoundProgress", "StepFile", "local_steps", "read_steps", "reporting_steps"]
