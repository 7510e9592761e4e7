"""FLoRA's fresh LoRA per round and client: PEFT's initialisation, drawn from a seed of (run, round, client)."""

from __future__ import annotations

import math

import pytest
import torch
from fedtune.strategies.aggregation import LORA_A, LORA_B
from fedtune.strategies.flora.routine import draw_fresh_lora, fresh_lora_seed

from fedtune.config import AdapterConfig, ModelConfig
from fedtune.models.loading import clear_model_cache, get_adapter


@pytest.fixture
def handle(tiny_bert: str):
    clear_model_cache()
    yield get_adapter(ModelConfig(name=tiny_bert), AdapterConfig(rank=4, target_modules=["query", "value"]), 4, seed=0)
    clear_model_cache()


def lora_a(handle) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in handle.params.items() if k.endswith(LORA_A)}


def test_seeds_differ_between_rounds_and_clients_and_repeat_within_a_run() -> None:
    seeds = {(r, c): fresh_lora_seed(0, r, c) for r in range(1, 4) for c in range(3)}
    assert len(set(seeds.values())) == len(seeds)
    assert fresh_lora_seed(0, 2, 1) == seeds[(2, 1)]
    assert fresh_lora_seed(1, 2, 1) != seeds[(2, 1)]


def test_a_is_new_for_each_seed_the_same_for_the_same_seed_and_b_is_zero(handle) -> None:
    draw_fresh_lora(handle, fresh_lora_seed(0, 1, 0))
    first = lora_a(handle)
    draw_fresh_lora(handle, fresh_lora_seed(0, 2, 0))
    next_round = lora_a(handle)
    draw_fresh_lora(handle, fresh_lora_seed(0, 1, 1))
    other_client = lora_a(handle)
    draw_fresh_lora(handle, fresh_lora_seed(0, 1, 0))
    again = lora_a(handle)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(not torch.equal(first[k], next_round[k]) and not torch.equal(first[k], other_client[k]) for k in first)
    assert all(not torch.equal(first[k], handle.initial[k]) for k in first)  # not the run's initial A either
    assert all(float(v.detach().abs().max()) == 0.0 for k, v in handle.params.items() if k.endswith(LORA_B))


def test_the_draw_is_peft_s_own_initialisation(handle) -> None:
    # PEFT initialises lora_A Kaiming-uniform (a = √5) from torch's global generator: seeded
    # alike, it gives the first A (in name order) exactly.
    draw_fresh_lora(handle, 1234)
    name = sorted(lora_a(handle))[0]
    ours = lora_a(handle)[name]
    layer = handle.model.get_submodule(name.split(".lora_A")[0])
    torch.manual_seed(1234)
    layer.reset_lora_parameters(handle.adapter_name, True)
    peft_draw = layer.lora_A[handle.adapter_name].weight.detach()
    assert torch.equal(peft_draw, ours)
    assert float(ours.abs().max()) <= 1 / math.sqrt(ours.shape[1])
