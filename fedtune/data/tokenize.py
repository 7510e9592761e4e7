"""Turn examples into model inputs: padded batches with labels (response-only loss for LMs)."""

from __future__ import annotations

from typing import Any

import datasets
import torch

from fedtune.data.prompts import render_prompt, response_suffix

IGNORE_INDEX = -100


def tokenize(ds: datasets.Dataset, tokenizer: Any, task: str, max_length: int,
             prompt_format: str = "plain") -> datasets.Dataset:
    """Add ``input_ids`` and ``labels`` columns; for causal LMs the prompt's labels are ignored.

    Parameters
    ----------
    ds : datasets.Dataset
        ``text``/``label`` rows (classification) or ``prompt``/``response`` rows, with
        ``input`` for Alpaca records (causal LM).
    tokenizer : transformers tokenizer
    task : str
        ``classification`` or ``causal-lm``.
    max_length : int
        Longest sequence; a long causal-LM prompt loses its start first.
    prompt_format : str, default "plain"
        ``chat``, ``alpaca`` or ``plain`` (resolved, see :mod:`fedtune.data.prompts`):
        the prompt is rendered by :func:`~fedtune.data.prompts.render_prompt`, and the
        labels are the response followed by :func:`~fedtune.data.prompts.response_suffix`.
    """
    if task == "classification":
        def encode(batch: dict) -> dict:
            enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
            return {"input_ids": enc["input_ids"], "labels": batch["label"]}
    else:
        end = response_suffix(tokenizer, prompt_format)
        has_input = "input" in ds.column_names

        def encode(batch: dict) -> dict:
            ids, labels = [], []
            inputs = batch["input"] if has_input else [None] * len(batch["prompt"])
            for prompt, alpaca_input, response in zip(batch["prompt"], inputs, batch["response"]):
                p = prompt_ids(tokenizer, prompt, prompt_format, alpaca_input)
                r = tokenizer(response + end, add_special_tokens=False)["input_ids"]
                seq, seq_labels = join_prompt_response(p, r, max_length, len(r))
                ids.append(seq)
                labels.append(seq_labels)
            return {"input_ids": ids, "labels": labels}

    return ds.map(encode, batched=True, remove_columns=ds.column_names)


def prompt_ids(tokenizer: Any, prompt: str, prompt_format: str, alpaca_input: str | None = None) -> list[int]:
    """The token ids of ``prompt`` rendered in ``prompt_format`` (see :func:`render_prompt`)."""
    text = render_prompt(tokenizer, prompt, prompt_format, alpaca_input=alpaca_input)
    # A rendered chat prompt already holds the template's special tokens (BOS included).
    return tokenizer(text, add_special_tokens=prompt_format != "chat")["input_ids"]


def join_prompt_response(prompt: list[int], response: list[int], max_length: int,
                         kept_response: int) -> tuple[list[int], list[int]]:
    """Prompt then response, at most ``max_length`` ids, and labels that ignore the prompt.

    The prompt loses its start first, so that ``kept_response`` response tokens fit (but
    keeps at least half of ``max_length``); a pair's two responses pass the longer one's
    length, so both see the same prompt.
    """
    room = max(max_length - kept_response, max_length // 2)
    prompt = prompt[-room:] if room > 0 else []
    return (prompt + response)[:max_length], ([IGNORE_INDEX] * len(prompt) + response)[:max_length]


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of tokenized rows into a batch."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    seq_labels = isinstance(rows[0]["labels"], list)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long) if seq_labels else None
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        mask[i, :n] = 1
        if labels is not None:
            labels[i, :n] = torch.tensor(row["labels"])
    if labels is None:
        labels = torch.tensor([r["labels"] for r in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
