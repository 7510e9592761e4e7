"""The methods written only through the public API, end to end through Flower's Simulation Runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtune.config import load_config
from fedtune.flower.simulation import simulate
from fedtune.reporting.runlog import ADAPTER_DIR, METRICS_FILE

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def overrides(model: str, out: Path, *extra: str) -> list[str]:
    return [f"model.name={model}", "federation.num_clients=3", "federation.num_rounds=2", "federation.client_cpus=1",
            "data.max_examples=180", "data.max_test_examples=48", "data.max_length=24", "train.batch_size=16",
            "train.local_steps=3", "train.learning_rate=5e-3", "adapter.rank=4", "partition.method=iid",
            f"output.dir={out}", "output.progress=false", *extra]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def test_fedsa_lora_reports_each_clients_personal_evaluation(tiny_bert: str, tmp_path: Path) -> None:
    run_dir = simulate(load_config(None, overrides(tiny_bert, tmp_path, "strategy.name=fedsa-lora")))
    last = rows(run_dir)[-1]
    assert last["clients_aggregated"] == 3 and last["clients_rejected"] == 0
    assert 0.0 <= last["client_eval_accuracy"] <= 1.0 and torch.isfinite(torch.tensor(last["eval_loss"]))
    assert (run_dir / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def test_flexlora_with_mixed_ranks(tiny_bert: str, tmp_path: Path) -> None:
    run_dir = simulate(load_config(None, overrides(tiny_bert, tmp_path, "strategy.name=flexlora",
                                                   "adapter.client_ranks=[2,4,3]")))
    last = rows(run_dir)[-1]
    assert last["clients_aggregated"] == 3 and last["aggregate_rank"] == 9.0
    assert 0.0 < last["truncation_error"] < 1.0
    assert sorted(r["lora_rank"] for r in last["client_resources"]) == [2.0, 3.0, 4.0]


def test_fedprox_from_a_file_outside_the_package(tiny_bert: str, tmp_path: Path) -> None:
    """Both halves of a method in one user file, named by path: the clients find its routine."""
    name = f"{EXAMPLES / 'fedprox.py'}:FedProx"
    run_dir = simulate(load_config(None, overrides(tiny_bert, tmp_path, f"strategy.name={name}",
                                                   "strategy.options.mu=0.1")))
    table = rows(run_dir)
    assert table[-1]["strategy"] == name and table[-1]["clients_aggregated"] == 3
    assert table[-1]["eval_loss"] < table[0]["eval_loss"]
