"""fedtune.data.prompts: chat, alpaca and plain prompts, what ends a response, and the label mask."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pytest

from fedtune.config import DataConfig, FedtuneConfig, ModelConfig
from fedtune.data.loading import load_splits
from fedtune.data.prompts import (
    render_prompt,
    resolve_prompt_format,
    response_suffix,
    with_resolved_prompt_format,
)
from fedtune.data.tokenize import IGNORE_INDEX, tokenize
from fedtune.errors import ConfigError, ModelLoadError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SMOLLM2 = "builtin:SmolLM2-135M-Instruct"
# SmolLM2-Instruct's template, written out by hand: its default system turn, the user's turn, and
# the assistant's turn opened.
SMOLLM2_CHAT = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                "<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(autouse=True)
def quiet_datasets() -> Any:
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def smollm2() -> Any:
    """SmolLM2-135M-Instruct's tokenizer (the first use converts the packaged GGUF once, ~20 s)."""
    from fedtune.models.loading import load_tokenizer

    try:
        return load_tokenizer(ModelConfig(name=SMOLLM2, task="causal-lm"))
    except ModelLoadError as e:
        pytest.skip(f"{SMOLLM2} is not available: {e}")


@pytest.fixture(scope="module")
def minilm() -> Any:
    """A tokenizer without a chat template (MiniLM's WordPiece), from an installed package."""
    from fedtune.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig())


def old_alpaca_prompt(row: dict) -> str:
    """The prompt text fedtune built from an Alpaca record before prompt formats (loading.py)."""
    extra = str(row.get("input") or "").strip()
    return ("### Instruction:\n{instruction}\n{input_block}\n### Response:\n"
            .format(instruction=str(row["instruction"]).strip(),
                    input_block=f"\n### Input:\n{extra}\n" if extra else ""))


# --------------------------------------------------------------------------- chat


def test_chat_prompt_for_smollm2_is_its_template(smollm2: Any) -> None:
    prompt = "What is 2 + 3?\n\nAnswer briefly."
    assert render_prompt(smollm2, prompt, "chat") == SMOLLM2_CHAT.format(prompt=prompt)


def test_chat_response_ends_with_the_templates_end_of_turn(smollm2: Any) -> None:
    assert response_suffix(smollm2, "chat") == "<|im_end|>"
    assert response_suffix(smollm2, "alpaca") == response_suffix(smollm2, "plain") == smollm2.eos_token


def test_chat_labels_are_the_response_and_the_end_of_turn(smollm2: Any) -> None:
    prompt, response = "Name a primary colour.", "Blue is one."
    ds = datasets.Dataset.from_dict({"prompt": [prompt], "response": [response]})
    row = tokenize(ds, smollm2, "causal-lm", max_length=128, prompt_format="chat")[0]
    rendered = SMOLLM2_CHAT.format(prompt=prompt)
    n_prompt = len(smollm2(rendered, add_special_tokens=False)["input_ids"])
    assert row["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    labelled = row["labels"][n_prompt:]
    assert IGNORE_INDEX not in labelled and labelled == row["input_ids"][n_prompt:]
    assert smollm2.decode(labelled) == response + "<|im_end|>"
    # The template's special tokens appear once each: none was added a second time.
    assert smollm2.decode(row["input_ids"]) == rendered + response + "<|im_end|>"
    assert row["input_ids"][0] == smollm2.convert_tokens_to_ids("<|im_start|>")


def test_chat_keeps_the_response_and_truncates_the_prompt_from_the_left(smollm2: Any) -> None:
    ds = datasets.Dataset.from_dict({"prompt": [" ".join(["word"] * 80)], "response": ["the end"]})
    row = tokenize(ds, smollm2, "causal-lm", max_length=32, prompt_format="chat")[0]
    r = smollm2("the end<|im_end|>", add_special_tokens=False)["input_ids"]
    assert len(row["input_ids"]) == 32
    assert row["labels"] == [IGNORE_INDEX] * (32 - len(r)) + r
    # The assistant's turn opening survives; the system turn is what was cut.
    assert smollm2.decode(row["input_ids"]).endswith("<|im_start|>assistant\nthe end<|im_end|>")


# --------------------------------------------------------------------------- alpaca and plain


ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "1 2", "output": "3"},
    {"instruction": " Say hello. ", "input": "", "output": " hello "},
    {"instruction": "Summarise.", "input": "First part.\n\nSecond part.", "output": "Parts."},
    # An instruction holding a blank line: the kept input field still renders it exactly.
    {"instruction": "Read this.\n\nThen answer.", "input": "", "output": "ok"},
    {"instruction": "Read this.\n\nThen answer.", "input": "The text.", "output": "ok"},
]


def rendered_alpaca(path: Path, tokenizer: Any) -> tuple[list[str], datasets.Dataset]:
    train, _ = load_splits(DataConfig(source=str(path), alpaca=True), "causal-lm")
    return [render_prompt(tokenizer, r["prompt"], "alpaca", alpaca_input=r["input"]) for r in train], train


def test_alpaca_format_is_the_old_text_byte_for_byte(tmp_path: Path, minilm: Any) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA_ROWS))
    texts, train = rendered_alpaca(path, minilm)
    assert texts == [old_alpaca_prompt(r) for r in ALPACA_ROWS]
    assert texts[0] == "### Instruction:\nAdd the numbers.\n\n### Input:\n1 2\n\n### Response:\n"
    # And so are the tokens: what tokenize gave before, old prompt + response + eos.
    rows = tokenize(train, minilm, "causal-lm", max_length=64, prompt_format="alpaca")
    for row, old in zip(rows, ALPACA_ROWS):
        p = minilm(old_alpaca_prompt(old), add_special_tokens=True)["input_ids"]
        r = minilm(str(old["output"]).strip() + (minilm.eos_token or ""), add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == p + r and row["labels"] == [IGNORE_INDEX] * len(p) + r


def test_alpaca_format_of_the_shared_instruction_set_is_the_old_text(shared_data: Path, minilm: Any) -> None:
    path = shared_data / "instructions" / "instruction-data.json"
    records = json.loads(path.read_text())
    texts, train = rendered_alpaca(path, minilm)
    assert texts == [old_alpaca_prompt(r) for r in records]
    # Without the input field the first blank line splits: the same text for this set, whose
    # instructions hold no blank line.
    assert [render_prompt(minilm, p, "alpaca") for p in train["prompt"]] == texts


def test_alpaca_without_its_input_field_splits_at_the_first_blank_line(minilm: Any) -> None:
    assert (render_prompt(minilm, "Translate.\n\nBonjour\n\nmonde", "alpaca")
            == "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\nmonde\n\n### Response:\n")
    assert render_prompt(minilm, "Say hi.", "alpaca") == "### Instruction:\nSay hi.\n\n### Response:\n"
    with pytest.raises(ValueError, match="is not the end of the prompt"):
        render_prompt(minilm, "Say hi.", "alpaca", alpaca_input="other")


def test_plain_is_the_prompt_as_it_is(minilm: Any) -> None:
    assert render_prompt(minilm, "Q: 2+2?\n\nA:", "plain") == "Q: 2+2?\n\nA:"
    with pytest.raises(ValueError, match="resolve 'auto'"):
        render_prompt(minilm, "x", "auto")


# --------------------------------------------------------------------------- auto and the run's config


def test_auto_is_chat_for_a_chat_model(smollm2: Any) -> None:
    assert resolve_prompt_format(smollm2, "auto") == "chat"
    assert resolve_prompt_format(smollm2, "auto", alpaca=True) == "chat"
    assert resolve_prompt_format(smollm2, "alpaca", alpaca=True) == "alpaca"


def test_auto_without_a_chat_template_is_the_old_behaviour(minilm: Any) -> None:
    assert not minilm.chat_template
    assert resolve_prompt_format(minilm, "auto", alpaca=True) == "alpaca"
    assert resolve_prompt_format(minilm, "auto", alpaca=False) == "plain"
    with pytest.raises(ConfigError, match="has no chat template"):
        resolve_prompt_format(minilm, "chat")
    with pytest.raises(ConfigError, match="data.prompt_format='nope'"):
        resolve_prompt_format(minilm, "nope")


def test_the_run_config_holds_the_resolved_format(minilm: Any) -> None:
    cfg = FedtuneConfig()
    assert with_resolved_prompt_format(cfg, minilm) is cfg  # classification has no prompts
    lm = FedtuneConfig(model=ModelConfig(task="causal-lm"), data=DataConfig(alpaca=True))
    resolved = with_resolved_prompt_format(lm, minilm)
    assert resolved.data.prompt_format == "alpaca" and lm.data.prompt_format == "auto"
    assert with_resolved_prompt_format(resolved, minilm) == resolved
