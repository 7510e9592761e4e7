"""Preference pairs (``train.objective: dpo``): records of a prompt, a chosen and a rejected response.

A record's prompt comes from ``data.prompt_column`` (or, with ``data.alpaca``, from its
``instruction`` and ``input``), its responses from ``data.chosen_column`` and
``data.rejected_column``. The standardized rows hold ``prompt`` (and ``input``), ``chosen``,
``rejected`` and ``response`` (the chosen one, the reference generation metrics score against).
Every record is checked as it is read: a missing column or an empty response is reported
with the file, the record and the column, before any model loads.

Tokenized, a pair is two sequences that share the prompt: ``chosen_input_ids``/``chosen_labels``
and ``rejected_input_ids``/``rejected_labels``, labels on the response tokens only.
"""

from __future__ import annotations

from typing import Any

import datasets
import torch

from fedtune.data.checks import is_blank
from fedtune.data.prompts import join_alpaca, response_suffix
from fedtune.data.tokenize import collate, join_prompt_response, prompt_ids
from fedtune.errors import DataError
from fedtune.schema import DataConfig

SIDES = ("chosen", "rejected")


def standardize_pairs(ds: datasets.Dataset, cfg: DataConfig, source: str) -> datasets.Dataset:
    """Preference records as ``prompt``/``chosen``/``rejected``/``response`` rows (and ``input``, ``group``).

    Raises
    ------
    DataError
        Naming ``source``, the missing columns and the ones there are; or the first record
        (counted from 0, in file order) whose prompt or response is empty, and its column.
    """
    prompt_columns = ["instruction"] if cfg.alpaca else [cfg.prompt_column]
    columns = {"chosen": cfg.chosen_column, "rejected": cfg.rejected_column}
    needed = [*prompt_columns, *columns.values()] + ([cfg.group_column] if cfg.group_column else [])
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        keys = "data.chosen_column/rejected_column" + ("" if cfg.alpaca else "/prompt_column")
        raise DataError(f"{source!r} has no column(s) {missing} for preference pairs; it has {ds.column_names}. "
                        f"Set {keys}, or give records with a prompt, a chosen and a rejected response")
    for index, row in enumerate(ds.select_columns([*prompt_columns, *columns.values()])):
        for column, value in row.items():
            if is_blank(value):
                what = "prompt" if column in prompt_columns else "response"
                raise DataError(f"{source!r}, record {index} (counting from 0), column {column!r}: the {what} is "
                                f"empty ({value!r}); every preference pair needs a prompt and two non-empty "
                                "responses: fix or drop that record")
    has_input = cfg.alpaca and "input" in ds.column_names

    def convert(row: dict) -> dict:
        extra = str(row.get("input") or "").strip() if has_input else ""
        prompt = join_alpaca(str(row["instruction"]).strip(), extra) if cfg.alpaca else str(row[cfg.prompt_column])
        out = {"prompt": prompt, "chosen": str(row[columns["chosen"]]).strip(),
               "rejected": str(row[columns["rejected"]]).strip()}
        out["response"] = out["chosen"]
        if cfg.alpaca:
            out["input"] = extra
        if cfg.group_column is not None:
            out["group"] = str(row[cfg.group_column])
        return out

    return ds.map(convert, remove_columns=ds.column_names)


def tokenize_pairs(ds: datasets.Dataset, tokenizer: Any, max_length: int, prompt_format: str) -> datasets.Dataset:
    """``chosen_input_ids``/``chosen_labels`` and ``rejected_input_ids``/``rejected_labels`` per pair.

    Both sequences start with the same prompt (truncated from the left for the longer
    response) and end with the format's end of turn; the labels ignore the prompt.
    """
    end = response_suffix(tokenizer, prompt_format)
    has_input = "input" in ds.column_names

    def encode(batch: dict) -> dict:
        out: dict[str, list] = {f"{side}_{key}": [] for side in SIDES for key in ("input_ids", "labels")}
        inputs = batch["input"] if has_input else [None] * len(batch["prompt"])
        for prompt, alpaca_input, chosen, rejected in zip(batch["prompt"], inputs, batch["chosen"], batch["rejected"]):
            p = prompt_ids(tokenizer, prompt, prompt_format, alpaca_input)
            responses = {side: tokenizer(text + end, add_special_tokens=False)["input_ids"]
                         for side, text in zip(SIDES, (chosen, rejected))}
            kept = max(len(r) for r in responses.values())
            for side, response in responses.items():
                ids, labels = join_prompt_response(p, response, max_length, kept)
                out[f"{side}_input_ids"].append(ids)
                out[f"{side}_labels"].append(labels)
        return out

    return ds.map(encode, batched=True, remove_columns=ds.column_names)


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of pairs: ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels`` and the same for rejected.

    The two sides are padded separately, so a batch splits into single pairs along dim 0.
    """
    batch = {}
    for side in SIDES:
        padded = collate([{"input_ids": r[f"{side}_input_ids"], "labels": r[f"{side}_labels"]} for r in rows], pad_id)
        batch.update({f"{side}_{key}": value for key, value in padded.items()})
    return batch


__all__ = ["SIDES", "collate_pairs", "standardize_pairs", "tokenize_pairs"]
