"""`fedtune plot` and `fedtune compare` on synthetic run directories: valid PNGs, gaps left out, exact numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedtune.cli import main
from fedtune.reporting.compare import RunDirectoryError, human_bytes, human_seconds, read_metrics, summarize_runs
from fedtune.reporting.plots import (
    ACCURACY_LOSS_PNG,
    COMPARE_PNG,
    TRAFFIC_PNG,
    comparison_figure,
    plot_comparison,
    plot_run,
    run_figures,
)
from fedtune.reporting.runlog import METRICS_FILE

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_rows(strategy: str, scale: float, rounds: int = 5) -> list[dict[str, Any]]:
    """Rows shaped like RunLog's: round 0 trains nothing (null train loss and download), round 3 lost its eval."""
    rows = []
    for r in range(rounds + 1):
        rows.append({"round": r, "strategy": strategy, "train_loss": None if r == 0 else 1.0 / (r + 1),
                     "eval_loss": 1.3 / (r + 1), "eval_accuracy": None if r == 3 else 0.25 + 0.05 * r * scale,
                     "bytes_up": 0 if r == 0 else int(10_007 * scale), "bytes_down": None if r == 0 else 23_456,
                     "round_seconds": 0.5 + r / 3, "clients_aggregated": 0 if r == 0 else 3,
                     "client_resources": [{"lora_rank": 4}]})
    return rows


def write_run(directory: Path, rows: list[dict[str, Any]]) -> Path:
    directory.mkdir(parents=True)
    (directory / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


@pytest.fixture
def two_runs(tmp_path: Path) -> list[Path]:
    return [write_run(tmp_path / "fedit-run", synthetic_rows("fedit", 1.0)),
            write_run(tmp_path / "flora-run", synthetic_rows("flora", 2.5, rounds=4))]


def assert_png(path: Path, width: int = 1100, height: int = 420) -> None:
    """A PNG by its signature, that matplotlib reads back at the figure's size (11 x 4.2 in at 100 dpi)."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.shape[:2] == (height, width)
    assert image.std() > 0  # not a blank canvas


def line_data(ax: Any) -> dict[str, tuple[list[float], list[float]]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_plot_run_writes_two_valid_pngs_into_the_run_directory(two_runs: list[Path]) -> None:
    written = plot_run(two_runs[0])
    assert written == [two_runs[0] / ACCURACY_LOSS_PNG, two_runs[0] / TRAFFIC_PNG]
    for path in written:
        assert_png(path)


def test_rounds_without_a_value_are_left_out_not_drawn_as_zero() -> None:
    rows = synthetic_rows("fedit", 1.0)
    figures = run_figures(rows, "run")
    accuracy, loss = figures[ACCURACY_LOSS_PNG].axes
    assert line_data(accuracy)["eval accuracy"] == ([0, 1, 2, 4, 5], [r["eval_accuracy"] for r in rows if r["round"] != 3])
    assert line_data(loss)["train loss (clients)"][0] == [1, 2, 3, 4, 5]
    assert line_data(loss)["eval loss"][0] == [0, 1, 2, 3, 4, 5]
    per_round, cumulative = figures[TRAFFIC_PNG].axes
    assert line_data(per_round)["down"] == ([1, 2, 3, 4, 5], [23_456] * 5)
    assert line_data(per_round)["up"] == ([0, 1, 2, 3, 4, 5], [0] + [10_007] * 5)
    assert line_data(cumulative)["up + down"] == ([0, 1, 2, 3, 4, 5], [0] + [33_463 * k for k in range(1, 6)])


def test_a_run_without_bytes_or_accuracy_says_so_instead_of_drawing(tmp_path: Path) -> None:
    rows = [{"round": r, "strategy": "fedit", "eval_accuracy": None, "train_loss": 1.0} for r in range(3)]
    figures = run_figures(rows, "run")
    accuracy = figures[ACCURACY_LOSS_PNG].axes[0]
    assert len(accuracy.lines) == 0 and "no values in metrics.jsonl" in [t.get_text() for t in accuracy.texts]
    assert all(len(ax.lines) == 0 for ax in figures[TRAFFIC_PNG].axes)
    for path in plot_run(write_run(tmp_path / "empty-ish", rows)):
        assert_png(path)


def test_comparison_plots_accuracy_by_round_and_by_cumulative_bytes(two_runs: list[Path], tmp_path: Path) -> None:
    out = plot_comparison(two_runs, tmp_path / "figures")
    assert out == tmp_path / "figures" / COMPARE_PNG
    assert_png(out)
    rows = read_metrics(two_runs[1])
    by_round, by_bytes = comparison_figure({"a": read_metrics(two_runs[0]), "b": rows}).axes
    assert line_data(by_round)["b"][0] == [0, 1, 2, 4]
    # Round 0 sent nothing (no place on a log axis); round 3 has no accuracy.
    per_round = int(10_007 * 2.5) + 23_456
    assert line_data(by_bytes)["b"] == ([per_round, 2 * per_round, 4 * per_round],
                                        [rows[1]["eval_accuracy"], rows[2]["eval_accuracy"], rows[4]["eval_accuracy"]])
    assert by_bytes.get_xscale() == "log"


def test_compare_numbers_equal_metrics_jsonl(two_runs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", *map(str, two_runs), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)
    for run_dir, summary in zip(two_runs, reported):
        rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
        scored = [r for r in rows if r["eval_accuracy"] is not None]
        best = max(scored, key=lambda r: r["eval_accuracy"])
        assert summary == {
            "run_dir": str(run_dir), "strategy": rows[0]["strategy"], "final_accuracy": rows[-1]["eval_accuracy"],
            "best_accuracy": best["eval_accuracy"], "best_round": best["round"], "rounds": rows[-1]["round"],
            "bytes_up": sum(r["bytes_up"] for r in rows), "bytes_down": sum(r["bytes_down"] or 0 for r in rows),
            "bytes_total": sum(r["bytes_up"] + (r["bytes_down"] or 0) for r in rows),
            "seconds": sum(r["round_seconds"] for r in rows)}
    assert reported[0]["best_round"] == 5 and reported[1]["rounds"] == 4


def test_compare_table_shows_the_same_numbers(two_runs: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", *map(str, two_runs)]) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["run", "strategy", "final", "acc", "best", "acc", "(round)", "rounds", "bytes", "time"]
    for line, summary in zip(lines, summarize_runs(two_runs)):
        cells = line.split()
        assert cells[:2] == [str(summary.run_dir), summary.strategy]
        assert float(cells[2]) == pytest.approx(summary.final_accuracy, abs=5e-5)  # 4 decimals shown
        assert float(cells[3]) == pytest.approx(summary.best_accuracy, abs=5e-5)
        assert cells[4] == f"({summary.best_round})" and int(cells[5]) == summary.rounds
        assert " ".join(cells[6:8]) == human_bytes(summary.bytes_total)
        assert cells[8] == human_seconds(summary.seconds)


def test_a_final_round_without_accuracy_is_reported_as_missing(tmp_path: Path) -> None:
    rows = synthetic_rows("fedit", 1.0, rounds=3)  # round 3 lost its eval
    (summary,) = summarize_runs([write_run(tmp_path / "run", rows)])
    assert summary.final_accuracy is None
    assert (summary.best_accuracy, summary.best_round) == (rows[2]["eval_accuracy"], 2)


@pytest.mark.parametrize("command", ["plot", "compare"])
def test_a_directory_without_metrics_is_named_in_one_error(command: str, two_runs: list[Path], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert main([command, str(two_runs[0]), str(empty), str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert f"{empty} is not a run directory (no metrics.jsonl)" in err
    assert f"{tmp_path / 'missing'} is not a run directory" in err
    assert not (two_runs[0] / ACCURACY_LOSS_PNG).exists()  # nothing drawn before every directory was checked


def test_a_metrics_file_without_rounds_is_an_error(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text("")
    with pytest.raises(RunDirectoryError, match="holds no round yet"):
        read_metrics(tmp_path)


def test_plot_command_writes_every_run_and_the_comparison_into_out(two_runs: list[Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", *map(str, two_runs), "--out", str(tmp_path / "cmp")]) == 0
    for run_dir in two_runs:
        assert_png(run_dir / ACCURACY_LOSS_PNG)
        assert_png(run_dir / TRAFFIC_PNG)
    assert_png(tmp_path / "cmp" / COMPARE_PNG)
    assert f"wrote {tmp_path / 'cmp' / COMPARE_PNG}" in capsys.readouterr().out


def test_runs_with_the_same_directory_name_are_labelled_by_path(tmp_path: Path) -> None:
    from fedtune.reporting.plots import _labels

    dirs = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    rows = [synthetic_rows("fedit", 1.0), synthetic_rows("flora", 1.0)]
    assert _labels(dirs, rows) == [f"{dirs[0]} (fedit)", f"{dirs[1]} (flora)"]


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (999, "999 B"), (1000, "1.00 kB"), (1_234_567, "1.23 MB"),
                                          (5 * 10**9, "5.00 GB"), (7 * 10**12, "7.00 TB")])
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(("seconds", "text"), [(12.34, "12.3s"), (75.2, "1m15s"), (3725, "1h02m05s")])
def test_human_seconds(seconds: float, text: str) -> None:
    assert human_seconds(seconds) == text
