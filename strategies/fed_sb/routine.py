"""Fed-SB's client half: the federated LoRA-SB initialisation pass, then training R only."""

from __future__ import annotations

import time

import torch
from fedtune.strategies.fed_sb.init import init_reply
from fedtune.strategies.fed_sb.keys import (
    CFG_INIT_ESTIMATOR,
    CFG_INIT_LEARNING_RATE,
    CFG_INIT_ROUNDS,
    CFG_INIT_WARMUP_RATIO,
    CFG_ROUND,
    LORA_SB_INIT_ROUTINE,
    LORA_SB_ROUTINE,
    METRIC_INIT_STEP_RELATIVE,
    METRIC_ROUND,
)
from fedtune.strategies.fed_sb.layer import adopt_frozen, lora_layers, prepare_handle

from fedtune import protocol
from fedtune.client.ledger import client_ledger, save_ledger
from fedtune.client.training import TrainResult, batches, steps_per_round
from fedtune.models.loading import AdapterHandle
from fedtune.routine import ClientJob, ClientReply, ClientRoutine, GradientRoutine, register_routine

# State value: the client's noisy initialisation estimate is accounted once, however many passes read it.
INIT_ACCOUNTED = "fed_sb.dp_init_accounted"


def official_init_learning_rate(learning_rate: float, warmup_ratio: float, training_steps: int) -> float:
    """η of LoRA-SB's initial step as the reference code sets it: lr / (warmup_ratio · total steps).

    The reference estimates the first update with the learning rate the warmup would reach
    at its first step, ``eff_lr = lr / (warmup_ratio · total_training_steps)``.
    """
    return learning_rate / (warmup_ratio * max(training_steps, 1))


def adapted_weight_rms(handle: AdapterHandle) -> float:
    """RMS of the base weights under the adapter's LoRA layers (float64)."""
    total, count = 0.0, 0
    for layer in lora_layers(handle.model, handle.adapter_name).values():
        weight = layer.get_base_layer().weight.detach()
        total += float(weight.to(torch.float64).square().sum())
        count += weight.numel()
    return (total / max(count, 1)) ** 0.5


@register_routine
class LoraSBRoutine(GradientRoutine):
    """AdamW (or DP-SGD) on R and the head, with the server's frozen B and A."""

    name = LORA_SB_ROUTINE
    full_batch_steps = 1  # the initialisation estimate, in the privacy calibration

    def load(self, job: ClientJob) -> tuple[AdapterHandle, float]:
        handle, _ = self.client.adapter(job.partition_id)
        prepare_handle(handle, self.client.adapter_config(job.partition_id).rank)
        adopt_frozen(handle, job.arrays)  # B and A stay put when later rounds send only R
        return self.client.prepare(job)

    def reply(self, job: ClientJob, handle: AdapterHandle, names: list[str], result: TrainResult,
              metrics: dict[str, float]) -> ClientReply:
        return super().reply(job, handle, names, result, {**metrics, METRIC_ROUND: float(job.options[CFG_ROUND])})


@register_routine
class LoraSBInitRoutine(ClientRoutine):
    """One pass of the federated LoRA-SB initialisation: estimate ΔW_k at W0, reply with its sketch.

    Every pass uses the same examples in the same order (and, under DP, the same noise),
    so all passes sketch one estimate.
    """

    name = LORA_SB_INIT_ROUTINE
    supports_privacy = True  # the estimate is clipped and noised, and accounted once

    def train(self, job: ClientJob) -> ClientReply:
        cfg = self.client.cfg
        handle, load_seconds = self.client.adapter(job.partition_id)
        prepare_handle(handle, self.client.adapter_config(job.partition_id).rank)
        handle.load({})  # the untrained model: B = 0, R = I
        train_ds, _ = self.client.splits(job.partition_id)
        seed = cfg.train.seed * 1_000_003 + job.partition_id
        privacy: dict = {}
        ledger = None
        if cfg.privacy.example_level:
            values = job.state.values
            ledger = client_ledger(cfg, values, len(train_ds), full_batch_steps=LoraSBRoutine.full_batch_steps)
            privacy = {"clip_norm": cfg.privacy.clip_norm, "noise_multiplier": ledger.noise_multiplier,
                       "generator": torch.Generator().manual_seed(seed)}
            if not values.get(INIT_ACCOUNTED):  # one noisy estimate, however many passes read it
                ledger.step(1, sample_rate=1.0)
                values[INIT_ACCOUNTED] = True
                save_ledger(ledger, values)
        start = time.perf_counter()
        rate = float(job.options.get(CFG_INIT_LEARNING_RATE) or official_init_learning_rate(
            cfg.train.learning_rate, float(job.options.get(CFG_INIT_WARMUP_RATIO, 0.06)),
            max(1, cfg.federation.num_rounds - int(job.options.get(CFG_INIT_ROUNDS, 1)))
            * steps_per_round(cfg.train, len(train_ds))))
        objective, pad_id = self.client.objective, handle.tokenizer.pad_token_id
        out, metrics = init_reply(handle.model, batches(train_ds, cfg.train.batch_size, pad_id, seed, shuffle=False,
                                                        objective=objective),
                                  {**job.options, CFG_INIT_LEARNING_RATE: rate}, job.arrays, learning_rate=rate,
                                  adapter_name=handle.adapter_name,
                                  batch_loss=lambda model, batch: objective.loss(model, batch, pad_id), **privacy)
        if job.options.get(CFG_INIT_ESTIMATOR, "adam") == "adam":  # −η·sign(G) moves every entry by η
            metrics[METRIC_INIT_STEP_RELATIVE] = rate / adapted_weight_rms(handle)
        if ledger is not None:
            metrics[protocol.DP_EPSILON] = ledger.epsilon()
        return ClientReply(arrays=out, num_examples=len(train_ds),
                           metrics={**metrics, protocol.TRAIN_SECONDS: time.perf_counter() - start,
                                    protocol.MODEL_LOAD_SECONDS: load_seconds})
