"""Federated DPO end to end through Flower's Simulation Runtime: FedIT on SmolLM2, and the other clients' routines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedtune.config import load_config
from fedtune.flower.simulation import simulate
from fedtune.reporting.runlog import ADAPTER_DIR, METRICS_FILE

pytestmark = pytest.mark.integration

PREFERENCE = "preference/instruction-data-with-preference.json"


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def preference_file(shared_data: Path, tmp_path: Path, count: int) -> Path:
    records = json.loads((shared_data / PREFERENCE).read_text())[:count]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(records))
    return path


def test_fedit_dpo_on_smollm2_moves_the_held_out_rewards_the_right_way(smollm2: str, shared_data: Path,
                                                                     tmp_path: Path) -> None:
    source = preference_file(shared_data, tmp_path, 60)
    cfg = load_config(None, [
        f"model.name={smollm2}", "model.task=causal-lm", "adapter.target_modules=[q_proj,v_proj]",
        f"data.source={source}", "data.alpaca=true", "data.test_fraction=0.2", "data.eval_fraction=0",
        "data.max_length=96", "partition.method=iid", "federation.num_clients=2", "federation.num_rounds=1",
        "federation.client_cpus=1", "federation.fraction_evaluate=0", "train.objective=dpo", "train.local_steps=3",
        "train.batch_size=4", "train.learning_rate=2e-3", f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    run_dir = simulate(cfg)
    rows = read_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1]
    # Round 0 is the base model: the policy is the reference, every pair scores log 2 and no margin.
    assert rows[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and rows[0]["eval_reward_margin"] == 0.0
    assert rows[1]["eval_loss"] < math.log(2) and rows[1]["eval_reward_margin"] > 0
    assert 0.5 < rows[1]["eval_accuracy"] <= 1.0 and rows[1]["train_loss"] < math.log(2) + 0.05
    assert all(0.0 <= r["eval_likelihood_accuracy"] <= 1.0 for r in rows)
    assert (run_dir / ADAPTER_DIR / "adapter_config.json").is_file()


@pytest.mark.parametrize("strategy", [
    ["strategy.name=fed-sb", "strategy.options.init_samples=8", "federation.num_rounds=3"],
    ["strategy.name=fedkseed", "strategy.options.tune=adapter", "strategy.options.steps=4",
     "strategy.options.lr=1e-2"],
], ids=["fed-sb", "fedkseed"])
def test_each_kind_of_client_routine_trains_dpo(tiny_llama_folder: str, shared_data: Path, tmp_path: Path,
                                                strategy: list[str]) -> None:
    """Fed-SB's gradient-estimated initialisation and FedKSeed's two-point steps on DPO (FLoRA: the resume test)."""
    source = preference_file(shared_data, tmp_path, 24)
    cfg = load_config(None, [
        f"model.name={tiny_llama_folder}", "model.task=causal-lm", "adapter.rank=4",
        "adapter.target_modules=[q_proj,v_proj]", f"data.source={source}", "data.alpaca=true",
        "data.test_fraction=0.25", "data.eval_fraction=0", "data.max_length=64", "partition.method=iid",
        "federation.num_clients=2", "federation.num_rounds=2", "federation.client_cpus=1",
        "federation.fraction_evaluate=0", "train.objective=dpo", "train.local_steps=2", "train.batch_size=2",
        "train.learning_rate=5e-3", f"output.dir={tmp_path / 'run'}", "output.progress=false",
        "output.save_adapter=false", "output.plots=false", *strategy])
    rows = read_rows(simulate(cfg))
    assert rows[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    last = rows[-1]
    assert last["clients_aggregated"] == 2 and math.isfinite(last["train_loss"])
    assert last["eval_loss"] != rows[0]["eval_loss"] and last["eval_reward_margin"] != 0.0  # the policy moved


def test_a_resumed_flora_dpo_run_equals_an_uninterrupted_one(tiny_llama_folder: str, shared_data: Path,
                                                             tmp_path: Path) -> None:
    """FLoRA's merged updates of earlier rounds stay out of the reference, and a resume replays them exactly."""
    from safetensors.torch import load_file

    source = preference_file(shared_data, tmp_path, 24)

    def run(out: Path, rounds: int, *extra: str) -> Path:
        return simulate(load_config(None, [
            f"model.name={tiny_llama_folder}", "model.task=causal-lm", "adapter.rank=4",
            "adapter.target_modules=[q_proj,v_proj]", f"data.source={source}", "data.alpaca=true",
            "data.test_fraction=0.25", "data.eval_fraction=0", "data.max_length=64", "partition.method=iid",
            "federation.num_clients=2", f"federation.num_rounds={rounds}", "federation.client_cpus=1",
            "federation.fraction_evaluate=0", "train.objective=dpo", "train.local_steps=2", "train.batch_size=2",
            "train.learning_rate=5e-3", "strategy.name=flora", f"output.dir={out}", "output.progress=false",
            "output.plots=false", *extra]))

    whole = run(tmp_path / "whole", 2)
    run(tmp_path / "parts", 1)
    parts = run(tmp_path / "parts", 2, "output.resume=true")
    a, b = (load_file(run_dir / ADAPTER_DIR / "adapter_model.safetensors") for run_dir in (whole, parts))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_rows(whole)[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert read_rows(whole)[-1]["eval_reward_margin"] != 0.0
    keys = ("eval_loss", "eval_accuracy", "eval_reward_margin", "train_loss")
    assert [[r[k] for k in keys if k in r] for r in read_rows(whole)] == \
           [[r[k] for k in keys if k in r] for r in read_rows(parts)]
