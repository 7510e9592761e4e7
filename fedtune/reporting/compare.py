"""Reading finished (or failed) run directories back, and ``fedtune compare``'s table of several runs.

Every number comes from ``metrics.jsonl`` as the run wrote it: nothing is recomputed from
the model. Bytes are the training messages (``bytes_up`` + ``bytes_down``, all clients); the
time is the sum of ``round_seconds`` (round 0, the evaluation of the untuned base, included).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedtune.errors import FedtuneError
from fedtune.reporting.runlog import METRICS_FILE


class RunDirectoryError(FedtuneError, ValueError):
    """Directories given as runs that are not (no ``metrics.jsonl``, no round, a broken line), all of them.

    Parameters
    ----------
    problems : list of str
        One per directory, each naming it and the fix.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl``, one per round, in the order they were written.

    Raises
    ------
    RunDirectoryError
        ``run_dir`` has no ``metrics.jsonl``, holds no round, or a line is not JSON.
    """
    return read_runs([run_dir])[0]


def read_runs(run_dirs: Iterable[str | Path]) -> list[list[dict[str, Any]]]:
    """:func:`read_metrics` of each directory; the problems of all of them are raised together."""
    out, problems = [], []
    for run_dir in map(Path, run_dirs):
        path = run_dir / METRICS_FILE
        if not path.is_file():
            problems.append(f"{run_dir} is not a run directory (no {METRICS_FILE}); pass the output.dir of a run")
            continue
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{number} is not a JSON line ({e}); was the file edited by hand?")
        if not rows and not any(p.startswith(str(path)) for p in problems):
            problems.append(f"{path} holds no round yet (the run ended before evaluating round 0)")
        out.append(rows)
    if problems:
        raise RunDirectoryError(problems)
    return out


def value(row: dict[str, Any], key: str) -> float | None:
    """``row[key]`` as a number; None when it is absent, null, not a number, or not finite."""
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return v


def cumulative_bytes(rows: Sequence[dict[str, Any]]) -> list[int]:
    """Training bytes (up + down, all clients) sent up to and including each row's round.

    A round without a byte count (round 0 sends nothing to train) adds nothing.
    """
    total, out = 0, []
    for row in rows:
        total += int(value(row, "bytes_up") or 0) + int(value(row, "bytes_down") or 0)
        out.append(total)
    return out


@dataclass(frozen=True)
class RunSummary:
    """One run in a comparison: exactly what its ``metrics.jsonl`` says.

    Attributes
    ----------
    run_dir : str
        The directory as given.
    strategy : str
        The ``strategy`` of its rows.
    final_accuracy : float or None
        ``eval_accuracy`` of the last round (None when that round has none).
    best_accuracy, best_round : float or None, int or None
        The highest ``eval_accuracy`` of any round (round 0 included) and the first round that reached it.
    rounds : int
        The last round in the file.
    bytes_up, bytes_down, bytes_total : int
        Training bytes summed over the rounds; total = up + down.
    seconds : float
        The sum of ``round_seconds``.
    """

    run_dir: str
    strategy: str
    final_accuracy: float | None
    best_accuracy: float | None
    best_round: int | None
    rounds: int
    bytes_up: int
    bytes_down: int
    bytes_total: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(run_dir: str | Path, rows: Sequence[dict[str, Any]]) -> RunSummary:
    """The comparison numbers of one run from its rows (as :func:`read_metrics` returns them)."""
    scored = [(value(r, "eval_accuracy"), r["round"]) for r in rows if value(r, "eval_accuracy") is not None]
    # max() keeps the first of equal accuracies: the earliest round that reached the best.
    best = max(scored, key=lambda pair: pair[0], default=(None, None))
    up = sum(int(value(r, "bytes_up") or 0) for r in rows)
    down = sum(int(value(r, "bytes_down") or 0) for r in rows)
    return RunSummary(run_dir=str(run_dir), strategy=str(rows[0].get("strategy", "?")),
                      final_accuracy=value(rows[-1], "eval_accuracy"), best_accuracy=best[0], best_round=best[1],
                      rounds=int(rows[-1]["round"]), bytes_up=up, bytes_down=down, bytes_total=up + down,
                      seconds=sum(value(r, "round_seconds") or 0.0 for r in rows))


def summarize_runs(run_dirs: Sequence[str | Path]) -> list[RunSummary]:
    """:func:`summarize` for each directory; every unreadable directory is named in one RunDirectoryError."""
    return [summarize(d, rows) for d, rows in zip(run_dirs, read_runs(run_dirs))]


def human_bytes(n: int) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as the plots' axes)."""
    if abs(n) < 1000:
        return f"{n} B"
    size = float(n)
    for unit in ("kB", "MB", "GB"):
        size /= 1000
        if abs(size) < 1000:
            return f"{size:.2f} {unit}"
    return f"{size / 1000:.2f} TB"


def human_seconds(seconds: float) -> str:
    """``75.2`` -> ``"1m15s"``; under a minute, ``"12.3s"``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{rest:02d}s" if hours else f"{minutes}m{rest:02d}s"


def format_table(summaries: Sequence[RunSummary]) -> str:
    """The comparison as aligned text, one line per run, accuracies with 4 decimals."""
    def acc(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    header = ["run", "strategy", "final acc", "best acc (round)", "rounds", "bytes", "time"]
    lines = [[s.run_dir, s.strategy, acc(s.final_accuracy),
              "-" if s.best_accuracy is None else f"{s.best_accuracy:.4f} ({s.best_round})",
              str(s.rounds), human_bytes(s.bytes_total), human_seconds(s.seconds)] for s in summaries]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    # Text columns left-aligned, numbers right-aligned.
    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join(fmt(row) for row in [header, *lines])


__all__ = ["RunDirectoryError", "RunSummary", "cumulative_bytes", "format_table", "human_bytes", "human_seconds", "read_metrics",
           "read_runs", "summarize", "summarize_runs", "value"]
