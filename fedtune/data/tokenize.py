"""Turn examples into model inputs: padded batches with labels (response-only loss for LMs)."""

from __future__ import annotations

from typing import Any

import datasets
import torch

IGNORE_INDEX = -100


def tokenize(ds: datasets.Dataset, tokenizer: Any, task: str, max_length: int) -> datasets.Dataset:
    """Add ``input_ids`` and ``labels`` columns; for causal LMs the prompt's labels are ignored."""
    if task == "classification":
        def encode(batch: dict) -> dict:
            enc = tokenizer(batch["text"], truncation=True, max_length=max_length)
            return {"input_ids": enc["input_ids"], "labels": batch["label"]}
    else:
        eos = tokenizer.eos_token or ""

        def encode(batch: dict) -> dict:
            ids, labels = [], []
            for prompt, response in zip(batch["prompt"], batch["response"]):
                p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
                r = tokenizer(response + eos, add_special_tokens=False)["input_ids"]
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
