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
        # A rendered chat prompt already holds the template's special tokens (BOS included).
        special = prompt_format != "chat"
        has_input = "input" in ds.column_names

        def encode(batch: dict) -> dict:
            ids, labels = [], []
            inputs = batch["input"] if has_input else [None] * len(batch["prompt"])
            for prompt, alpaca_input, response in zip(batch["prompt"], inputs, batch["response"]):
                text = render_prompt(tokenizer, prompt, prompt_format, alpaca_input=alpaca_input)
                p = tokenizer(text, add_special_tokens=special)["input_ids"]
                r = tokenizer(response + end, add_special_tokens=False)["input_ids"]
                # Keep the response: truncate the prompt from the left first.
                room = max(max_length - len(r), max_length // 2)
                p = p[-room:] if room > 0 else []
                seq = (p + r)[:max_length]
                ids.append(seq)
                labels.append(([IGNORE_INDEX] * len(p) + r)[:max_length])
            return {"input_ids": ids, "labels": labels}

    return ds.map(encode, batched=True, remove_columns=ds.column_names)


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
