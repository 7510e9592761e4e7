"""DPO: the arithmetic by hand and against TRL, the reference model, preference data, configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import datasets
import pytest
import torch

from fedtune.config import AdapterConfig, DataConfig, ModelConfig, load_config
from fedtune.data import load_splits
from fedtune.data.preference import collate_pairs, tokenize_pairs
from fedtune.data.tokenize import IGNORE_INDEX
from fedtune.errors import ConfigError, DataError
from fedtune.models.loading import AdapterHandle, base_model_only, get_adapter
from fedtune.objectives import DirectPreference, objective_of
from fedtune.objectives.dpo import batch_terms, dpo_terms, sequence_logps

PAIRS = [
    {"instruction": "What is two plus two?", "input": "", "chosen": "Four.", "rejected": "Obviously four, duh."},
    {"instruction": "Name a colour.", "input": "", "chosen": "Blue is a colour.", "rejected": "Whatever. Red."},
    {"instruction": "Translate to French.", "input": "Good morning", "chosen": "Bonjour.", "rejected": "Figure it out."},
    {"instruction": "Give a synonym of happy.", "input": "", "chosen": "Content.", "rejected": "Look it up yourself."},
]


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_folder: str) -> tuple[str, AdapterHandle]:
    """The tiny Llama with LoRA on q/v."""
    handle = get_adapter(ModelConfig(name=tiny_llama_folder, task="causal-lm"),
                         AdapterConfig(rank=4, target_modules=["q_proj", "v_proj"]), None, 0)
    return tiny_llama_folder, handle


def perturb_b(handle: AdapterHandle, scale: float = 0.5, seed: int = 0) -> None:
    """Give the adapter non-zero B factors, so the policy differs from the reference."""
    gen = torch.Generator().manual_seed(seed)
    handle.load({k: scale * torch.randn(v.shape, generator=gen) for k, v in handle.initial.items() if "lora_B" in k})


def pair_batch(handle: AdapterHandle, rows: list[dict] = PAIRS, max_length: int = 48) -> dict[str, torch.Tensor]:
    ds = datasets.Dataset.from_list([{"prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""),
                                      "input": r["input"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                     for r in rows])
    tokens = tokenize_pairs(ds, handle.tokenizer, max_length, "alpaca")
    return collate_pairs(list(tokens), handle.tokenizer.pad_token_id)


# --------------------------------------------------------------------------- the arithmetic by hand


def test_dpo_terms_by_hand() -> None:
    # Δ = (−1 − (−2)) − (−3 − (−2)) = 1 − (−1) = 2; β = 0.5: β·Δ = 1.
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-1.0, -3.0, -2.0, -2.0))
    terms = dpo_terms(pc, pr, rc, rr, beta=0.5)
    assert float(terms.losses) == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-15)  # −log σ(1)
    assert (float(terms.chosen_rewards), float(terms.rejected_rewards)) == (0.5, -0.5)
    assert float(dpo_terms(pc, pr, rc, rr, beta=0.5, loss="hinge").losses) == 0.0  # max(0, 1 − 1)
    assert float(dpo_terms(pc, pr, rc, rr, beta=0.25, loss="hinge").losses) == 0.5  # max(0, 1 − 0.5)
    # The policy equal to the reference: Δ = 0, the loss log 2, both rewards 0.
    assert float(dpo_terms(pc, pr, pc, pr, beta=0.1).losses) == pytest.approx(math.log(2), abs=1e-15)
    with pytest.raises(ValueError, match="loss='ipo' must be 'sigmoid' or 'hinge'"):
        dpo_terms(pc, pr, rc, rr, beta=0.1, loss="ipo")


def test_sequence_logps_sums_the_labelled_tokens_only() -> None:
    # Vocabulary of 3; logits at position t predict the label at t + 1.
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, IGNORE_INDEX]])  # token 1 after position 0 (p 0.25), 2 after 1 (p 0.1)
    assert float(sequence_logps(logits, labels)) == pytest.approx(math.log(0.25) + math.log(0.1), abs=1e-6)
    assert float(sequence_logps(logits, torch.full((1, 4), IGNORE_INDEX))) == 0.0


# --------------------------------------------------------------------------- against TRL


@pytest.mark.parametrize("loss", ["sigmoid", "hinge"])
def test_loss_and_gradient_equal_trls(tmp_path: Path, loss: str) -> None:
    """TRL's DPOTrainer and fedtune on the same batch and LoRA model: the loss and every LoRA gradient."""
    trl = pytest.importorskip("trl", reason="TRL is a test dependency (pip install -e '.[dev]')")
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedtune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig())
    tokenizer.eos_token = "[SEP]"
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    records = [{"prompt": r["instruction"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
               for r in PAIRS]
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(records), beta=0.3,
                         loss_type=[loss], report_to=[], use_cpu=True, max_length=64)
    trainer = trl.DPOTrainer(model=base, args=args, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=tokenizer,
                             peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model = trainer.model  # a PeftModel with a new adapter: TRL's reference is the base, adapter disabled
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    inputs = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    # The same token sequences as fedtune's pair batch: labels on the completion tokens only.
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
    half = len(labels) // 2
    batch = {f"{side}_{key}": value[rows] for side, rows in (("chosen", slice(0, half)), ("rejected", slice(half, None)))
             for key, value in (("input_ids", inputs["input_ids"]), ("attention_mask", inputs["attention_mask"]),
                                ("labels", labels))}
    ours = DirectPreference(beta=0.3, loss=loss).loss(model, batch, tokenizer.pad_token_id)
    ours.backward()
    torch.testing.assert_close(ours.detach(), trl_loss.detach(), rtol=1e-6, atol=1e-7)
    for name, grad in trl_grads.items():  # float rounding, relative to the tensor's largest entry
        scale = float(grad.abs().max())
        assert scale > 0
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-5, atol=1e-5 * scale)
    rewards = batch_terms(model, batch, 0.3, loss, tokenizer.pad_token_id).chosen_rewards
    assert float(rewards.abs().min()) > 1e-3  # the policy is away from the reference


# --------------------------------------------------------------------------- the reference model


def test_the_reference_is_the_base_without_adapter_or_merged_updates(tiny_llama) -> None:
    from fedtune.strategies.flora.residual import residual_of

    _, handle = tiny_llama
    batch = pair_batch(handle)
    handle.load({})
    with torch.no_grad():
        pristine = handle.model(input_ids=batch["chosen_input_ids"]).logits
    perturb_b(handle)
    name = "base_model.model.model.layers.0.self_attn.v_proj"
    residual = residual_of(handle.model)
    residual.claim("test-dpo-reference")
    gen = torch.Generator().manual_seed(3)
    residual.add(name, 0.3 * torch.randn(4, 32, generator=gen), 0.3 * torch.randn(32, 4, generator=gen))
    try:
        with torch.no_grad():
            policy = handle.model(input_ids=batch["chosen_input_ids"]).logits
            with base_model_only(handle.model):
                reference = handle.model(input_ids=batch["chosen_input_ids"]).logits
            after = handle.model(input_ids=batch["chosen_input_ids"]).logits
    finally:
        residual.clear()
        handle.load({})
    assert not torch.allclose(policy, pristine, atol=1e-4)
    torch.testing.assert_close(reference, pristine, rtol=0, atol=0)  # bitwise: nothing of the adapter or residual
    torch.testing.assert_close(after, policy, rtol=0, atol=0)  # both come back


def test_an_untrained_adapter_scores_log_two_and_no_preference(tiny_llama) -> None:
    _, handle = tiny_llama
    handle.load({})
    terms = batch_terms(handle.model, pair_batch(handle), beta=0.1, pad_id=handle.tokenizer.pad_token_id)
    torch.testing.assert_close(terms.losses, torch.full((len(PAIRS),), math.log(2)))
    assert torch.equal(terms.chosen_rewards, torch.zeros(len(PAIRS)))


def test_evaluation_is_the_mean_of_the_batch_terms(tiny_llama) -> None:
    _, handle = tiny_llama
    perturb_b(handle, seed=4)
    objective = DirectPreference(beta=0.2)
    ds = datasets.Dataset.from_list([{"prompt": r["instruction"], "input": r["input"], "chosen": r["chosen"],
                                      "rejected": r["rejected"]} for r in PAIRS])
    tokens = tokenize_pairs(ds, handle.tokenizer, 48, "plain")
    scores = objective.evaluate(handle.model, tokens, 3, handle.tokenizer.pad_token_id, "causal-lm")
    terms = batch_terms(handle.model, collate_pairs(list(tokens), handle.tokenizer.pad_token_id), 0.2,
                        pad_id=handle.tokenizer.pad_token_id)
    margin = terms.chosen_rewards - terms.rejected_rewards
    handle.load({})
    assert scores["num_examples"] == len(PAIRS)
    assert scores["loss"] == pytest.approx(float(terms.losses.mean()), rel=1e-5)
    assert scores["accuracy"] == pytest.approx(float((margin > 0).double().mean()))
    assert scores["reward_margin"] == pytest.approx(float(margin.mean()), rel=1e-5, abs=1e-7)
    assert scores["chosen_reward"] - scores["rejected_reward"] == pytest.approx(scores["reward_margin"], abs=1e-6)
    likelihood = (terms.chosen_logps > terms.rejected_logps).double().mean()
    assert scores["likelihood_accuracy"] == pytest.approx(float(likelihood))


# --------------------------------------------------------------------------- data


def write(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records))
    return path


def test_preference_records_load_with_the_chosen_response_as_reference(tmp_path: Path) -> None:
    path = write(tmp_path / "pairs.json", PAIRS)
    train, _ = load_splits(DataConfig(source=str(path), alpaca=True), "causal-lm", "dpo")
    assert sorted(train.column_names) == ["chosen", "input", "prompt", "rejected", "response"]
    row = train[2]
    assert row["prompt"] == "Translate to French.\n\nGood morning" and row["input"] == "Good morning"
    assert row["response"] == row["chosen"] == "Bonjour." and row["rejected"] == "Figure it out."
    renamed = [{"q": r["instruction"], "good": r["chosen"], "bad": r["rejected"]} for r in PAIRS]
    train, _ = load_splits(DataConfig(source=str(write(tmp_path / "renamed.json", renamed)), prompt_column="q",
                                      chosen_column="good", rejected_column="bad"), "causal-lm", "dpo")
    assert train[0]["prompt"] == "What is two plus two?" and train[0]["rejected"] == "Obviously four, duh."


def test_a_missing_rejected_column_names_the_file_and_the_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "no_rejected.json", [{k: v for k, v in r.items() if k != "rejected"} for r in PAIRS])
    with pytest.raises(DataError, match=r"no_rejected.json' has no column\(s\) \['rejected'\] for preference "
                                        r"pairs; it has .*Set data.chosen_column/rejected_column"):
        load_splits(DataConfig(source=str(path), alpaca=True), "causal-lm", "dpo")


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_an_empty_response_names_the_file_the_record_and_the_column(tmp_path: Path, bad: str | None) -> None:
    records = [dict(r) for r in PAIRS]
    records[2]["rejected"] = bad
    path = write(tmp_path / "pairs.json", records)
    with pytest.raises(DataError, match=r"pairs.json', record 2 \(counting from 0\), column 'rejected': the response "
                                        r"is empty"):
        load_splits(DataConfig(source=str(path), alpaca=True), "causal-lm", "dpo")


def test_a_record_without_the_rejected_key_is_an_empty_response(tmp_path: Path) -> None:
    records = [dict(r) for r in PAIRS]
    del records[1]["rejected"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(DataError, match=r"record 1 \(counting from 0\), column 'rejected'"):
        load_splits(DataConfig(source=str(path), alpaca=True), "causal-lm", "dpo")


def test_a_pair_shares_its_prompt_and_labels_only_the_responses(tiny_llama) -> None:
    _, handle = tiny_llama
    long_prompt = "Explain this. " + "word " * 60
    ds = datasets.Dataset.from_list([{"prompt": long_prompt, "chosen": "Short.", "rejected": "A much longer answer "
                                      "that takes many more tokens than the chosen one does."}])
    row = tokenize_pairs(ds, handle.tokenizer, 40, "plain")[0]
    prompts = []
    for side in ("chosen", "rejected"):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert len(ids) == len(labels) <= 40
        start = next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)
        assert all(v != IGNORE_INDEX for v in labels[start:]) and labels[start:] == ids[start:]
        prompts.append(ids[:start])
    assert prompts[0] == prompts[1]  # truncated once, for the longer response
    batch = collate_pairs([row, row], handle.tokenizer.pad_token_id)
    assert batch["chosen_input_ids"].shape[0] == batch["rejected_labels"].shape[0] == 2


# --------------------------------------------------------------------------- configuration


def test_dpo_settings_are_checked_with_the_rest_of_the_config() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.objective=ppo", "train.dpo.beta=0", "train.dpo.loss=ipo"], check_strategy=False)
    assert any("train.objective='ppo' is not an objective; use one of ('sft', 'dpo')" in p for p in e.value.problems)
    assert any("train.dpo.beta=0.0 must be positive" in p for p in e.value.problems)
    assert any("train.dpo.loss='ipo' is not a DPO loss" in p for p in e.value.problems)
    with pytest.raises(ConfigError, match="train.objective=dpo needs model.task=causal-lm"):
        load_config(None, ["train.objective=dpo"], check_strategy=False)
    with pytest.raises(ConfigError, match="train.objective=dpo with privacy.enabled=true"):
        load_config(None, ["train.objective=dpo", "model.task=causal-lm", "privacy.enabled=true"],
                    check_strategy=False)
    cfg = load_config(None, ["train.objective=dpo", "model.task=causal-lm", "train.dpo.beta=0.5",
                             "train.dpo.loss=hinge"], check_strategy=False)
    objective = objective_of(cfg.train)
    assert isinstance(objective, DirectPreference) and (objective.beta, objective.loss_type) == (0.5, "hinge")


def test_fedkseed_refuses_dpo_when_it_tunes_the_base_model() -> None:
    with pytest.raises(ConfigError, match="train.objective=dpo with strategy.options.tune=full"):
        load_config(None, ["train.objective=dpo", "model.task=causal-lm", "strategy.name=fedkseed"])
    load_config(None, ["train.objective=dpo", "model.task=causal-lm", "strategy.name=fedkseed",
                       "strategy.options.tune=adapter"])
