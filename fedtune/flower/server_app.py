"""Flower's ServerApp: read the run's configuration, then run the federation (:mod:`fedtune.flower.server_loop`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedtune.config import FedtuneConfig, config_from_run_config
from fedtune.errors import ConfigError, FedtuneError, RunInterrupted
from fedtune.flower.federation_size import (
    check_federation_size,
    count_simulated_nodes,
    is_simulation,
    with_federation_size,
)
from fedtune.flower.server_loop import run_federation
from fedtune.server.run import RunControl


class StoppableGrid(Grid):
    """A Grid whose ``send_and_receive`` gives up as soon as ``stop`` is set (Ctrl-C).

    Everything else is the wrapped grid's: messages, node ids and replies are the same.
    While it waits for replies it calls ``on_poll(arrived, sent)`` after every poll, when
    set (the server's progress display sets it: :mod:`fedtune.reporting.progress`).
    """

    def __init__(self, inner: Grid, stop: threading.Event, poll_interval: float = 0.1) -> None:
        self.inner = inner
        self.stop = stop
        self.poll_interval = poll_interval
        self.on_poll: Callable[[int, int], None] | None = None

    def set_run(self, run: Any) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Any:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.inner.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and collect their replies until all arrived, ``timeout`` passed, or a stop."""
        waiting = set(self.push_messages(messages))
        sent = len(waiting)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting:
            if self.stop.is_set():
                raise RunInterrupted("stopped while waiting for the clients' replies")
            arrived = list(self.pull_messages(waiting))
            replies.extend(arrived)
            waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if self.on_poll is not None:
                self.on_poll(sent - len(waiting), sent)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                break
            self.stop.wait(self.poll_interval)
        return replies


# How often a grid that only counts replies polls for them (Flower's deployment grid: 3 s).
PROGRESS_POLL_SECONDS = 1.0


def server_config(grid: Grid, run_config: Mapping[str, Any]) -> FedtuneConfig:
    """The run's configuration; in a simulation, sized by (or checked against) its SuperNodes.

    Raises :class:`~fedtune.errors.ConfigError` before any model loads when the run sets
    ``federation.num_clients`` to another number than Flower simulates, or outside a simulation
    asks for simulated attackers (``attack.kind``).
    """
    if not is_simulation(grid):
        cfg = config_from_run_config(run_config)
        if cfg.attack.kind != "none":
            raise ConfigError([f"attack.kind={cfg.attack.kind!r} simulates hostile clients and runs only in a "
                               "simulation (fedtune simulate, flwr run on a simulation federation); a deployment's "
                               "clients are real: set attack.kind=none"])
        return cfg
    nodes = count_simulated_nodes(grid)
    cfg = config_from_run_config(with_federation_size(run_config, nodes))
    check_federation_size(cfg.federation.num_clients, nodes)
    return cfg


def make_server_app(fixed_run_config: Mapping[str, Any] | None = None,
                    on_finish: Callable[[Path | BaseException], None] | None = None,
                    control: RunControl | None = None) -> ServerApp:
    """A ServerApp; ``fixed_run_config`` (our CLI's config) takes precedence over Flower's run_config.

    Parameters
    ----------
    fixed_run_config : mapping, optional
        Run config entries that override Flower's (``fedtune simulate`` passes the whole
        configuration this way).
    on_finish : callable, optional
        Receives the run directory, or the exception that ended the run.
    control : fedtune.server.run.RunControl, optional
        Shares a stop request (Ctrl-C) and the run's progress with the caller.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            if control is not None and control.stop.is_set():
                raise RunInterrupted("stopped before the run started")
            cfg = server_config(grid, {**dict(context.run_config), **dict(fixed_run_config or {})})
            if control is not None:
                grid = StoppableGrid(grid, control.stop)
            elif cfg.output.progress:
                # Only to count replies as they arrive; polls as often as Flower's own grid.
                grid = StoppableGrid(grid, threading.Event(), poll_interval=PROGRESS_POLL_SECONDS)
            run_dir = run_federation(grid, cfg, control)
        except BaseException as e:
            error = e
            if control is not None and control.stop.is_set() and not isinstance(e, RunInterrupted):
                error = RunInterrupted(f"stopped during the run ({type(e).__name__}: {e})")
            if on_finish is not None:
                on_finish(error)
            if error is not e:
                raise error from e
            if on_finish is None and isinstance(e, FedtuneError):
                # Flower logs what a ServerApp raises: our message, not a traceback through fedtune.
                raise e.with_traceback(None) from None
            raise
        finally:
            if control is not None:
                control.finished.set()
        if on_finish is not None:
            on_finish(run_dir)

    return app


app = make_server_app()

__all__ = ["StoppableGrid", "app", "make_server_app", "server_config"]
