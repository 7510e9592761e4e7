"""The run directory (config, per-round metrics, adapter) and what the terminal shows."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedtune.schema import FedtuneConfig, to_yaml

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
ADAPTER_DIR = "adapter"
GENERATIONS_FILE = "generations.jsonl"  # a generative eval.metric's generations, per round and example
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
    width = int(re.match(r"\{:>(\d+)", fmt).group(1))  # type: ignore[union-attr]
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
    columns : sequence of str
        More metrics keys to show in the table, after the eval accuracy (``eval_exact_match``).
    """

    def __init__(self, cfg: FedtuneConfig, run_dir: Path, rows: list[dict[str, Any]] | None = None,
                 columns: Sequence[str] = ()) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(to_yaml(cfg))
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.metrics_path = self.run_dir / METRICS_FILE
        self.metrics_path.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        self._keep_generations(self.rows[-1]["round"] if self.rows else -1)
        self.strategy = cfg.strategy.name
        self.num_rounds = cfg.federation.num_rounds
        after = next(i for i, (key, _, _) in enumerate(_COLUMNS) if key == "eval_accuracy") + 1
        extra = [(key, key.removeprefix("eval_").replace("_", " "), f"{{:>{max(8, len(key) - 5)}.4f}}")
                 for key in columns]
        self.columns = _COLUMNS[:after] + extra + _COLUMNS[after:]
        self._pending: dict[str, Any] = {}
        self._round_start = time.perf_counter()
        self.console = Console(stderr=False, highlight=False)
        self._progress: Progress | None = None
        if cfg.output.progress:
            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=self.console, transient=True)
            self._task = self._progress.add_task("federated rounds", total=self.num_rounds,
                                                completed=self.rows[-1]["round"] if self.rows else 0)
            self._progress.start()
            self.console = self._progress.console
        self.console.print(f"run directory: {self.run_dir}")
        # soft_wrap: a table wider than the console (an extra metric column) stays one line per round.
        self.console.print("  ".join(title.rjust(len(_cell(0, fmt))) for _, title, fmt in self.columns),
                           soft_wrap=True)
        for row in self.rows:
            self._print_row(row)
        if self.rows:
            self.console.print(f"resumed after round {self.rows[-1]['round']}")

    @property
    def bar(self) -> Progress | None:
        """The live bars (``output.progress``), for more tasks under the rounds' (:mod:`fedtune.reporting.progress`)."""
        return self._progress

    def _keep_generations(self, last_round: int) -> None:
        """Drop generations of rounds after ``last_round`` (a resumed run redoes them)."""
        path = self.run_dir / GENERATIONS_FILE
        if path.is_file():
            lines = [line for line in path.read_text().splitlines(keepends=True)
                     if json.loads(line)["round"] <= last_round]
            path.write_text("".join(lines))

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
        self.console.print("  ".join(_cell(row.get(key), fmt) for key, _, fmt in self.columns), soft_wrap=True)

    def add_generations(self, server_round: int, predictions: Sequence[str], references: Sequence[str]) -> None:
        """Append one round's generations on the central test set to ``generations.jsonl``."""
        with (self.run_dir / GENERATIONS_FILE).open("a") as f:
            for index, (prediction, reference) in enumerate(zip(predictions, references)):
                f.write(json.dumps({"round": server_round, "index": index, "prediction": prediction,
                                    "reference": reference}) + "\n")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
