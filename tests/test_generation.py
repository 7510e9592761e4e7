"""Batched greedy generation on a tiny local Llama, and scoring it with a generative metric."""

from __future__ import annotations

from typing import Any

import datasets
import pytest

from fedtune.config import AdapterConfig, DataConfig, EvalConfig, ModelConfig
from fedtune.evaluation.generation import eval_prompts, evaluate_generation, evaluate_generation_on, generate
from fedtune.models.loading import AdapterHandle, get_adapter

PROMPTS = ["What is two plus two?", "Name a colour.",
           ("A much longer question, with several clauses, about how many apples remain after she gives three of "
            "her twelve apples away?")]


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_folder: str) -> AdapterHandle:
    """The tiny Llama with LoRA on q/v."""
    return get_adapter(ModelConfig(name=tiny_llama_folder, task="causal-lm"),
                       AdapterConfig(rank=4, target_modules=["q_proj", "v_proj"]), None, 0)


def decoded_ids(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The token ids each later ``tokenizer.decode`` call gets (decoded text need not re-tokenize to them)."""
    seen: list[list[int]] = []
    original = tokenizer.decode

    def record(ids: list[int], **kwargs: Any) -> str:
        seen.append(list(ids))
        return original(ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", record)
    return seen


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(tiny_llama: AdapterHandle,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen = decoded_ids(tiny_llama.tokenizer, monkeypatch)
    batched = generate(tiny_llama.model, tiny_llama.tokenizer, PROMPTS, max_new_tokens=6, batch_size=3)
    single = [generate(tiny_llama.model, tiny_llama.tokenizer, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert batched == single
    assert all(batched) and not any(p.lower() in b for p, b in zip(PROMPTS, batched))  # new tokens only
    assert len(seen) == 6 and all(0 < len(ids) <= 6 for ids in seen)


def test_generation_leaves_the_tokenizer_right_padded(tiny_llama: AdapterHandle) -> None:
    generate(tiny_llama.model, tiny_llama.tokenizer, PROMPTS, max_new_tokens=2, batch_size=2)
    assert tiny_llama.tokenizer.padding_side == "right"


def test_generation_stops_at_end_of_sequence(tiny_llama: AdapterHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = tiny_llama.model, tiny_llama.tokenizer
    seen = decoded_ids(tokenizer, monkeypatch)
    for prompt in PROMPTS:
        generate(model, tokenizer, [prompt], max_new_tokens=6)
    # In a continuation with a token not seen before it, that token becomes an end of sequence.
    prompt, ids, stop = next((p, ids, k) for p, ids in zip(PROMPTS, seen)
                             for k in range(1, len(ids)) if ids[k] not in ids[:k])
    monkeypatch.setattr(model.generation_config, "eos_token_id", [tokenizer.eos_token_id, ids[stop]])
    generate(model, tokenizer, [prompt], max_new_tokens=6)
    assert seen[-1] == ids[:stop]


def test_long_prompts_keep_their_end(tiny_llama: AdapterHandle) -> None:
    model, tokenizer = tiny_llama.model, tiny_llama.tokenizer
    tail = tokenizer.decode(tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"][-8:])
    assert (generate(model, tokenizer, [PROMPTS[2]], max_new_tokens=4, max_prompt_tokens=8)
            == generate(model, tokenizer, [tail], max_new_tokens=4, max_prompt_tokens=8))


def test_evaluate_generation_scores_with_the_configured_metric(tiny_llama: AdapterHandle) -> None:
    cfg = EvalConfig(metric="exact_match", max_new_tokens=3, batch_size=2)
    predictions = generate(tiny_llama.model, tiny_llama.tokenizer, PROMPTS, max_new_tokens=3)
    # The first reference is what the model generates, worded as a GSM8K answer; the others are not.
    references = [f"worked out\n#### {predictions[0]}", "#### 123456", "#### 654321"]
    result = evaluate_generation(tiny_llama, PROMPTS, references, cfg)
    assert result.key == "eval_exact_match" and result.num_examples == 3
    assert result.predictions == predictions
    assert result.score == pytest.approx(1 / 3)


def test_evaluate_generation_on_a_raw_split_takes_its_first_max_examples(tiny_llama: AdapterHandle) -> None:
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS, "response": ["#### 4", "red", "#### 9"]})
    assert eval_prompts(ds, tiny_llama.tokenizer, DataConfig()) == PROMPTS  # the raw prompt column, unrendered
    cfg = EvalConfig(metric="choice_accuracy", max_new_tokens=2, max_examples=2)
    result = evaluate_generation_on(tiny_llama, ds, cfg, DataConfig(max_length=16))
    assert result.num_examples == 2 and 0.0 <= result.score <= 1.0


def test_mismatched_prompts_and_references_are_refused(tiny_llama: AdapterHandle) -> None:
    with pytest.raises(ValueError, match="2 prompts for 1 references"):
        evaluate_generation(tiny_llama, PROMPTS[:2], ["#### 1"], EvalConfig(metric="exact_match"))
