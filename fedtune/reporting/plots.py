"""PNG figures of a run's ``metrics.jsonl``, and one figure comparing several runs.

Written at the end of every finished run (unless ``output.plots=false``) and by
``fedtune plot RUN_DIR...`` (any run, a failed one's completed rounds included):

* ``accuracy_loss.png``: the central ``eval_accuracy`` per round, and ``eval_loss`` with ``train_loss``;
* ``traffic.png``: ``bytes_up`` and ``bytes_down`` per round, and cumulatively (with their sum);
* ``compare_accuracy.png`` (several runs): accuracy against the round and against cumulative bytes.

A round without a value (null in ``metrics.jsonl``: round 0 trains nothing) is left out of
that curve, never drawn as zero. matplotlib's object-oriented API draws on an Agg canvas:
no pyplot, so no global figure state and no display needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.reporting.compare import cumulative_bytes, read_metrics, read_runs, value

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

ACCURACY_LOSS_PNG = "accuracy_loss.png"
TRAFFIC_PNG = "traffic.png"
COMPARE_PNG = "compare_accuracy.png"

_SIZE = (11.0, 4.2)  # inches, two panels side by side
_DPI = 100


def _points(rows: Sequence[dict[str, Any]], key: str, xs: Sequence[float] | None = None) -> tuple[list, list]:
    """(x, y) of the rows that have a value for ``key``; x is the round unless ``xs`` gives one per row."""
    pairs = [(row["round"] if xs is None else x, value(row, key)) for row, x in zip(rows, xs or rows)]
    kept = [(x, y) for x, y in pairs if y is not None]
    return [x for x, _ in kept], [y for _, y in kept]


def _figure() -> tuple[Figure, Axes, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=_SIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    return fig, left, right


def _rounds_axis(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _bytes_axis(ax: Axes, axis: str) -> None:
    from matplotlib.ticker import EngFormatter, NullFormatter

    target = ax.yaxis if axis == "y" else ax.xaxis
    target.set_major_formatter(EngFormatter(unit="B"))
    target.set_minor_formatter(NullFormatter())  # a log axis would label its minor ticks as 4×10^4


def _finish(ax: Axes, title: str, drew: bool) -> None:
    ax.set_title(title)
    if drew:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no values in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _plot_lines(ax: Axes, rows: Sequence[dict[str, Any]], keys: Sequence[tuple[str, str]],
                xs: Sequence[float] | None = None) -> bool:
    drew = False
    for key, label in keys:
        x, y = _points(rows, key, xs)
        if y:
            ax.plot(x, y, marker="o", markersize=3, label=label)
            drew = True
    return drew


def run_figures(rows: Sequence[dict[str, Any]], title: str) -> dict[str, Figure]:
    """The figures of one run's rows, by file name (``accuracy_loss.png``, ``traffic.png``), not yet saved."""
    fig, acc, loss = _figure()
    drew = _plot_lines(acc, rows, [("eval_accuracy", "eval accuracy")])
    acc.set_ylabel("accuracy")
    _rounds_axis(acc)
    _finish(acc, f"{title}: central accuracy", drew)
    drew = _plot_lines(loss, rows, [("eval_loss", "eval loss"), ("train_loss", "train loss (clients)")])
    loss.set_ylabel("loss")
    _rounds_axis(loss)
    _finish(loss, "loss", drew)
    figures = {ACCURACY_LOSS_PNG: fig}

    fig, per_round, total = _figure()
    drew = _plot_lines(per_round, rows, [("bytes_up", "up"), ("bytes_down", "down")])
    _bytes_axis(per_round, "y")
    _rounds_axis(per_round)
    _finish(per_round, f"{title}: training bytes per round", drew)
    if drew:
        per_round.set_ylim(bottom=0)  # from zero: small differences between rounds do not look like jumps
        up, down = 0, 0
        cumulative = []
        for row in rows:
            up += int(value(row, "bytes_up") or 0)
            down += int(value(row, "bytes_down") or 0)
            cumulative.append({"round": row["round"], "up": up, "down": down, "total": up + down})
        _plot_lines(total, cumulative, [("up", "up"), ("down", "down"), ("total", "up + down")])
    _bytes_axis(total, "y")
    _rounds_axis(total)
    _finish(total, "cumulative", drew)
    figures[TRAFFIC_PNG] = fig
    return figures


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write ``accuracy_loss.png`` and ``traffic.png`` into ``run_dir``; return their paths.

    Raises
    ------
    RunDirectoryError
        ``run_dir`` has no readable ``metrics.jsonl``.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    figures = run_figures(rows, f"{run_dir.name} ({rows[0].get('strategy', '?')})")
    return [_save(fig, run_dir / name) for name, fig in figures.items()]


def _labels(run_dirs: Sequence[Path], rows: Sequence[Sequence[dict[str, Any]]]) -> list[str]:
    """Each run's directory name and strategy; the whole path when two runs share a name."""
    names = [d.name for d in run_dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in run_dirs]
    return [f"{n} ({r[0].get('strategy', '?')})" for n, r in zip(names, rows)]


def comparison_figure(runs: Mapping[str, Sequence[dict[str, Any]]], metric: str = "eval_accuracy") -> Figure:
    """One line per run (label -> rows): ``metric`` by round (left) and by cumulative training bytes (right).

    The bytes axis is logarithmic; round 0, which sent nothing, has no place on it.
    ``metric`` is a key of the rows (``eval_accuracy``, ``eval_rouge_l``, ...).
    """
    name = metric.removeprefix("eval_").replace("_", "-") if metric != "eval_rouge_l" else "ROUGE-L"
    fig, by_round, by_bytes = _figure()
    drew_round = drew_bytes = False
    for index, (label, rows) in enumerate(runs.items()):
        x, y = _points(rows, metric)
        if not y:
            continue
        # The colour cycle has 10 colours; from the 11th run on, dashes tell the lines apart.
        style = "-" if index < 10 else "--"
        line = by_round.plot(x, y, marker="o", markersize=3, label=label, linestyle=style)[0]
        drew_round = True
        sent = [(b, a) for b, a in zip(*_points(rows, metric, cumulative_bytes(rows))) if b > 0]
        if sent:
            by_bytes.plot([b for b, _ in sent], [a for _, a in sent], marker="o", markersize=3, label=label,
                          color=line.get_color(), linestyle=style)
            drew_bytes = True
    by_round.set_ylabel(f"central {name}")
    _rounds_axis(by_round)
    _finish(by_round, f"{name} by round", drew_round)
    by_bytes.set_xlabel("cumulative training bytes (up + down)")
    if drew_bytes:
        by_bytes.set_xscale("log")
    _bytes_axis(by_bytes, "x")
    by_bytes.grid(alpha=0.3)
    _finish(by_bytes, f"{name} by bytes", drew_bytes)
    return fig


def plot_comparison(run_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write :func:`comparison_figure` of ``run_dirs`` as ``compare_accuracy.png`` into ``out_dir`` (created if missing).

    Each run is labelled with its directory's name (its path when two names are equal) and strategy.

    Raises
    ------
    RunDirectoryError
        A directory without a readable ``metrics.jsonl`` (all of them are named).
    """
    dirs = [Path(d) for d in run_dirs]
    all_rows = read_runs(dirs)
    fig = comparison_figure(dict(zip(_labels(dirs, all_rows), all_rows)))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _save(fig, out / COMPARE_PNG)


__all__ = ["ACCURACY_LOSS_PNG", "COMPARE_PNG", "TRAFFIC_PNG", "comparison_figure", "plot_comparison", "plot_run",
           "run_figures"]
