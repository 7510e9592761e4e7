"""The run log's table columns and the generations file of a generative eval metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.config import FedtuneConfig
from fedtune.reporting.runlog import GENERATIONS_FILE, RunLog


def test_an_extra_metric_column_follows_the_eval_accuracy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = FedtuneConfig()
    cfg.output.progress = False
    log = RunLog(cfg, tmp_path, columns=["eval_exact_match"])
    log.add(eval_loss=1.5, eval_accuracy=0.5, eval_exact_match=0.25)
    log.end_round(0)
    log.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # run directory, header, one line for the round: wider than 80 columns, not wrapped
    header, row = lines[1:]
    assert header.split()[:8] == ["round", "train", "loss", "eval", "loss", "eval", "acc", "exact"]
    assert row.split()[:5] == ["0", "-", "1.5000", "0.5000", "0.2500"]
    assert header.index("exact match") + len("exact match") == row.index("0.2500") + len("0.2500")


def test_generations_of_rounds_after_a_resumed_checkpoint_are_dropped(tmp_path: Path) -> None:
    cfg = FedtuneConfig()
    cfg.output.progress = False
    log = RunLog(cfg, tmp_path)
    for server_round in range(3):
        log.add_generations(server_round, [f"#### {server_round}"], ["#### 1"])
    log.close()
    RunLog(cfg, tmp_path, rows=[{"round": 0}, {"round": 1}]).close()
    rows = [json.loads(line) for line in (tmp_path / GENERATIONS_FILE).read_text().splitlines()]
    assert rows == [{"round": 0, "index": 0, "prediction": "#### 0", "reference": "#### 1"},
                    {"round": 1, "index": 0, "prediction": "#### 1", "reference": "#### 1"}]
