"""Local training and evaluation of an adapter on one client's data."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import torch
from torch.utils.data import DataLoader

from fedtune.data.tokenize import collate
from fedtune.models.devices import device_of, to_device
from fedtune.models.loading import AdapterHandle
from fedtune.objectives import SUPERVISED, Objective
from fedtune.privacy import PrivacyLedger, dp_step, model_loss_fn, poisson_batch
from fedtune.reporting.progress import local_steps
from fedtune.schema import TrainConfig


@dataclass(frozen=True)
class TrainResult:
    """What one client's local training produced besides the tensors."""

    loss: float
    num_examples: int
    steps: int
    seconds: float


def batches(ds: datasets.Dataset, batch_size: int, pad_id: int, seed: int, shuffle: bool = True,
            objective: Objective = SUPERVISED) -> DataLoader:
    """Padded training batches of ``objective``, shuffled in an order fixed by ``seed`` (or in data order)."""
    return objective.loader(ds, batch_size, pad_id, shuffle=shuffle, seed=seed)


def train_adapter(handle: AdapterHandle, train_ds: datasets.Dataset, cfg: TrainConfig, seed: int,
                  regularizer: Callable[[], torch.Tensor] | None = None,
                  objective: Objective = SUPERVISED) -> TrainResult:
    """AdamW on the adapter tensors that have ``requires_grad``; deterministic in ``seed``.

    Runs ``cfg.local_steps`` optimizer steps when set, else ``cfg.local_epochs`` passes, on
    ``objective``'s loss (supervised fine-tuning by default, DPO on preference pairs).
    ``regularizer`` (e.g. FedProx's proximal term) is added to every micro-batch's loss
    before the backward pass. Returns the mean training (objective) loss over the micro-batches seen.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)  # dropout
    params = [p for p in handle.params.values() if p.requires_grad]
    if not params:
        raise ValueError("no adapter tensor is trainable; the strategy's `trainable` patterns matched nothing")
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    pad_id = handle.tokenizer.pad_token_id
    loader = objective.loader(train_ds, cfg.batch_size, pad_id, shuffle=True, seed=seed)
    total_steps = steps_per_round(cfg, len(train_ds))
    report = local_steps(total_steps)
    device = device_of(handle.model)
    handle.model.train()
    start = time.perf_counter()
    steps, micro, loss_sum, loss_count = 0, 0, 0.0, 0
    optimizer.zero_grad(set_to_none=True)
    while steps < total_steps:
        for batch in loader:
            loss = objective.loss(handle.model, to_device(batch, device), pad_id)
            total = loss + regularizer() if regularizer is not None else loss
            (total / cfg.gradient_accumulation).backward()
            loss_sum += float(loss.detach())
            loss_count += 1
            micro += 1
            if micro % cfg.gradient_accumulation == 0:
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
                report.advance()
                if steps >= total_steps:
                    break
    handle.model.eval()
    return TrainResult(loss=loss_sum / max(loss_count, 1), num_examples=len(train_ds), steps=steps,
                       seconds=time.perf_counter() - start)


def train_adapter_private(handle: AdapterHandle, train_ds: datasets.Dataset, cfg: TrainConfig, *,
                          clip_norm: float, noise_multiplier: float, ledger: PrivacyLedger, seed: int) -> TrainResult:
    """DP-SGD with AdamW on the trainable adapter tensors; every step is recorded in ``ledger``.

    Each step draws a Poisson batch (rate q = batch_size / examples), clips every example's
    gradient to ``clip_norm``, adds N(0, (noise_multiplier·clip_norm)²) to the sum and divides
    by the expected batch size (:func:`fedtune.privacy.dp_step`). Gradient-norm clipping of
    the ordinary loop is not applied: the per-example clipping replaces it.
    """
    params = {name: p for name, p in handle.model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("no adapter tensor is trainable; the strategy's `trainable` patterns matched nothing")
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout, as in train_adapter: a rerun or a resumed round draws the same masks
    per_example_loss = model_loss_fn(handle.model)
    n = len(train_ds)
    steps = steps_per_round(cfg, n)
    report = local_steps(steps)
    rate = min(1.0, cfg.batch_size / n)
    device = device_of(handle.model)
    handle.model.train()
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        rows = [train_ds[int(i)] for i in poisson_batch(n, rate, generator)]
        batch = to_device(collate(rows, handle.tokenizer.pad_token_id), device) if rows else {}
        grads = dp_step(params, per_example_loss, batch, clip_norm, noise_multiplier, generator,
                        expected_batch_size=cfg.batch_size)
        for name, param in params.items():
            param.grad = grads[name]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ledger.step(1, noise_multiplier=noise_multiplier, sample_rate=rate)
        report.advance()
        if rows:
            with torch.no_grad():
                losses.append(float(handle.model(**batch).loss))
    handle.model.eval()
    return TrainResult(loss=sum(losses) / max(len(losses), 1), num_examples=n, steps=steps,
                       seconds=time.perf_counter() - start)


def steps_per_round(cfg: TrainConfig, num_examples: int) -> int:
    """Optimizer steps one local round takes (``local_steps``, or epochs over the batches)."""
    per_epoch = max(1, math.ceil(math.ceil(num_examples / cfg.batch_size) / cfg.gradient_accumulation))
    return cfg.local_steps or cfg.local_epochs * per_epoch
