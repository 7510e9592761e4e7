"""The run directory (config, per-round metrics, adapter) and what the terminal shows."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune.config import FedtuneConfig, to_yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
MODEL_DIR = "model"  # strategies that tune the base weights (FedKSeed, tune=full) save a whole model

# (metrics key, column title, format) for the terminal table.
_COLUMNS = [
    ("round", "round", "{:>5}"),
    ("train_loss", "train loss", "{:>10.4f}"),
    ("eval_loss", "eval loss", "{:>9.4f}"),
    ("eval_accuracy", "eval acc", "{:>8.4f}"),
    ("bytes_up", "bytes up", "{:>11,}"),
    ("bytes_down", "bytes down", "{:>11,}"),
    ("round_seconds", "seconds", "{:>7.1f}"),
]


def default_run_dir(cfg: FedtuneConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = cfg.strategy.name.rsplit(":", 1)[-1].lower()
    return Path("runs") / f"{name}-{stamp}"


def _cell(value: Any, fmt: str) -> str:
    width = int("".join(c for c in fmt if c.isdigit())[:2] or 8)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return " " * (width - 1) + "-"
    return fmt.format(int(value) if "," in fmt else value)


class RunLog:
    """Writes ``config.yaml`` and ``metrics.jsonl`` and shows a progress bar and a table.

    Parameters
    ----------
    cfg : FedtuneConfig
        The resolved configuration (written as ``config.yaml``).
    run_dir : Path
        The run directory; created if missing.
    rows : list of dict, optional
        Rows of earlier rounds (a resumed run): ``metrics.jsonl`` is rewritten to hold
        exactly these, dropping any round after the checkpoint.
    """

    def __init__(self, cfg: FedtuneConfig, run_dir: Path, rows: list[dict[str, Any]] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.metrics_path = self.run_dir / METRICS_FILE
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        self.strategy = cfg.strategy.name
        self.num_rounds = cfg.federation.num_rounds
        self._pending: dict[str, Any] = {}
        self._round_start = time.perf_counter()
        self.console = Console(stderr=False, highlight=False)
        self._progress: Progress | None = None
        if cfg.output.progress:
            self._progress = Progress(TextColumn("[bold]federated rounds"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=self.console, transient=True)
            self._task = self._progress.add_task("rounds", total=self.num_rounds,
                                                completed=self.rows[-1]["round"] if self.rows else 0)
            self._progress.start()
            self.console = self._progress.console
        self.console.print(f"run directory: {self.run_dir}")
        self.console.print("  ".join(title.rjust(len(_cell(0, fmt))) for _, title, fmt in _COLUMNS))
        for row in self.rows:
            self._print_row(row)
        if self.rows:
            self.console.print(f"resumed after round {self.rows[-1]['round']}")

    def add(self, **metrics: Any) -> None:
        """Metrics for the round in progress (later calls add to or replace earlier keys)."""
        self._pending.update(metrics)

    def pending(self, key: str) -> Any:
        """A metric already added for the round in progress, or None."""
        return self._pending.get(key)

    def end_round(self, server_round: int) -> dict[str, Any]:
        """Write the round's row to ``metrics.jsonl``, print it, and start timing the next."""
        now = time.perf_counter()
        row = {"round": server_round, "strategy": self.strategy, **self._pending,
               "round_seconds": round(now - self._round_start, 3)}
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self._pending = {}
        self._round_start = now
        self.rows.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._print_row(row)
        if self._progress is not None and server_round > 0:
            self._progress.update(self._task, completed=server_round)
        return row

    def _print_row(self, row: dict[str, Any]) -> None:
        self.console.print("  ".join(_cell(row.get(key), fmt) for key, _, fmt in _COLUMNS))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
