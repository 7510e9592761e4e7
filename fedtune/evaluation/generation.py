"""Batched greedy generation, and scoring it with a generative metric (``eval.metric``).

Prompts are tokenized as training tokenizes them (special tokens added, cut from the left
to at most ``max_prompt_tokens``), left-padded so that every row's new tokens start at the
same position, and extended greedily until end of sequence or ``max_new_tokens``. Only the
new tokens are decoded. The tokenizer is not changed: training keeps its right padding.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from fedtune.data.prompts import render_prompt, resolve_prompt_format
from fedtune.evaluation.metrics import build_metric, metric_key
from fedtune.models.loading import AdapterHandle
from fedtune.schema import DataConfig, EvalConfig


@dataclass(frozen=True)
class GenerationResult:
    """A generative metric's score on some examples, and what was generated.

    Attributes
    ----------
    key : str
        The run log's key, ``eval_<metric name>``.
    score : float
        The metric's value.
    num_examples : int
        How many examples were generated for and scored.
    predictions : list of str
        The generated text of each example, in order.
    references : list of str
        The reference of each example, in the same order.
    seconds : float
        Time spent generating and scoring.
    """

    key: str
    score: float
    num_examples: int
    predictions: list[str]
    references: list[str]
    seconds: float


def eval_prompts(ds: datasets.Dataset, tokenizer: Any, data_cfg: DataConfig) -> list[str]:
    """The prompt strings the model generates from, rendered as training renders them.

    Each ``prompt`` goes through :func:`~fedtune.data.prompts.render_prompt` in the run's
    ``data.prompt_format`` (``auto`` resolved for ``tokenizer``), with the record's Alpaca
    input where the data set keeps one, so generation sees the prompts training saw.
    """
    prompt_format = resolve_prompt_format(tokenizer, data_cfg.prompt_format, alpaca=data_cfg.alpaca)
    inputs = ds["input"] if "input" in ds.column_names else [None] * len(ds)
    return [render_prompt(tokenizer, str(p), prompt_format, alpaca_input=i) for p, i in zip(ds["prompt"], inputs)]


def _eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int,
             batch_size: int = 16, max_prompt_tokens: int | None = None,
             add_special_tokens: bool = True) -> list[str]:
    """Greedy continuations of ``prompts``, batched with left padding.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM (a PEFT model with its adapter loaded, or a plain transformers model).
    tokenizer
        Its tokenizer; ``pad_token_id`` pads, ``eos_token_id`` (and the model's generation
        config's) ends a continuation.
    prompts : sequence of str
        Rendered prompt strings, one per example.
    max_new_tokens : int
        The most tokens generated per prompt.
    batch_size : int
        Prompts generated for at once (sorted by length first, to pad little).
    max_prompt_tokens : int, optional
        Longer prompts keep their last this many tokens (their end, where the question is
        asked), as training truncates them.
    add_special_tokens : bool
        Whether the tokenizer adds its special tokens (BOS) to each prompt; False for
        chat-rendered prompts, which carry them already.

    Returns
    -------
    list of str
        The decoded new tokens of each prompt, up to (without) the end of sequence, in the
        order of ``prompts``.
    """
    from transformers import GenerationConfig

    model.eval()
    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else pad
    encoded = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        if max_prompt_tokens is not None:
            ids = ids[-max_prompt_tokens:]
        encoded.append(ids or [fallback])
    # Overrides every sampling default the checkpoint ships (temperature, top_p, ...).
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad,
                              eos_token_id=eos, use_cache=True)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            n = len(encoded[i])
            ids[j, width - n:] = torch.tensor(encoded[i])
            mask[j, width - n:] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for j, i in enumerate(rows):
            new = out[j, width:].tolist()
            ends = [k for k, t in enumerate(new) if t in eos]
            outputs[i] = tokenizer.decode(new[:ends[0]] if ends else new, skip_special_tokens=True)
    return outputs


def evaluate_generation(handle: AdapterHandle, prompts: Sequence[str], references: Sequence[str],
                        cfg: EvalConfig, *, max_prompt_tokens: int | None = None,
                        add_special_tokens: bool = True) -> GenerationResult:
    """Generate for every prompt and score the generations against ``references`` with ``cfg.metric``.

    Parameters
    ----------
    handle : AdapterHandle
        The causal LM with the adapter to evaluate loaded.
    prompts, references : sequence of str
        Rendered prompts and their reference responses, one each.
    cfg : EvalConfig
        The metric (a generative one), its options, ``max_new_tokens`` and ``batch_size``.
    max_prompt_tokens, add_special_tokens
        See :func:`generate`.
    """
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts for {len(references)} references; give one each")
    metric = build_metric(cfg.metric, cfg.options)
    start = time.perf_counter()
    predictions = generate(handle.model, handle.tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.batch_size, max_prompt_tokens=max_prompt_tokens,
                           add_special_tokens=add_special_tokens)
    score = metric.compute(predictions, list(references)) if predictions else float("nan")
    return GenerationResult(key=metric_key(metric), score=float(score), num_examples=len(predictions),
                            predictions=predictions, references=list(references), seconds=time.perf_counter() - start)


def evaluate_generation_on(handle: AdapterHandle, ds: datasets.Dataset, eval_cfg: EvalConfig,
                           data_cfg: DataConfig) -> GenerationResult:
    """:func:`evaluate_generation` on a raw ``prompt``/``response`` data set (its first ``eval.max_examples``).

    Prompts are cut to ``data.max_length`` tokens, as in training.
    """
    if eval_cfg.max_examples is not None and len(ds) > eval_cfg.max_examples:
        ds = ds.select(range(eval_cfg.max_examples))
    chat = resolve_prompt_format(handle.tokenizer, data_cfg.prompt_format, alpaca=data_cfg.alpaca) == "chat"
    return evaluate_generation(handle, eval_prompts(ds, handle.tokenizer, data_cfg), [str(r) for r in ds["response"]],
                               eval_cfg, max_prompt_tokens=data_cfg.max_length, add_special_tokens=not chat)


__all__ = ["GenerationResult", "eval_prompts", "evaluate_generation", "evaluate_generation_on", "generate"]
