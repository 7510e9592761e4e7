"""FedKSeed's client half: catch up on the global (seed, scalar) history, then τ zeroth-order steps."""

from __future__ import annotations

import time

import torch
from fedtune.strategies.fedkseed.wire import (
    ZEROTH_ORDER_ROUTINE,
    RoundPlan,
    apply_catch_up,
    decode_round_config,
    encode_steps,
)
from fedtune.strategies.fedkseed.zeroth_order import TUNE_FULL, seed_pool, tunable_tensors, zo_train

from fedtune import protocol
from fedtune.client.training import batches
from fedtune.models.devices import device_of, to_device
from fedtune.models.loading import AdapterHandle
from fedtune.routine import ClientJob, ClientReply, ClientRoutine, register_routine
from fedtune.strategy import select


@register_routine
class ZerothOrderRoutine(ClientRoutine):
    """τ two-point steps along pool seeds; only (seed, scalar) pairs go back.

    The float32 copy of the global tuned tensors (and the round it reaches) is kept per
    process and shared by every virtual client that process serves: history it has already
    replayed is skipped.
    """

    name = ZEROTH_ORDER_ROUTINE

    def __init__(self, client) -> None:
        super().__init__(client)
        self._masters: dict[str, torch.Tensor] | None = None
        self._round = 0

    def _global_state(self, job: ClientJob) -> tuple[AdapterHandle, RoundPlan]:
        """Bring this process's copy of the global tuned tensors up to date; load it into the model."""
        plan = decode_round_config(job.options)
        plan.check_fingerprint()
        handle, _ = self.client.adapter(job.partition_id)
        if self._masters is None:
            base = handle.base_initial() if plan.tune == TUNE_FULL else {}
            tuned = select(tunable_tensors(handle.initial, base, plan.tune), job.trainable)
            not_fp32 = [k for k, v in tuned.items() if v.dtype != torch.float32]
            if not tuned or not_fp32:
                raise ValueError(f"zeroth-order tuning needs float32 tensors matching {list(job.trainable)}; "
                                 f"none match or these are not float32: {not_fp32[:3]} (set model.dtype=float32)")
            self._masters = {k: v.clone() for k, v in sorted(tuned.items())}
        self._round = apply_catch_up(self._masters, plan.catch_up, self._round, plan.lr)
        handle.load(self._masters)
        return handle, plan

    def evaluate(self, job: ClientJob) -> ClientReply:
        handle, _ = self._global_state(job)
        return self.client.evaluate_local(job.partition_id, handle)

    def train(self, job: ClientJob) -> ClientReply:
        cfg = self.client.cfg
        _, load_seconds = self.client.adapter(job.partition_id)  # loads the base once; reported like gradients
        handle, plan = self._global_state(job)
        train_ds, _ = self.client.splits(job.partition_id)
        tunable = {**handle.base_params(), **handle.params}
        params = {k: tunable[k].data for k in self._masters}  # the model reads these in place
        handle.model.eval()  # no dropout: both evaluations of a step must see the same function
        seed = cfg.train.seed * 1_000_003 + job.server_round * 10_007 + job.partition_id

        device = device_of(handle.model)

        objective, pad_id = self.client.objective, handle.tokenizer.pad_token_id

        @torch.no_grad()
        def loss_on_batch(batch: dict) -> float:
            return float(objective.loss(handle.model, to_device(batch, device), pad_id))

        start = time.perf_counter()
        result = zo_train(params, batches(train_ds, cfg.train.batch_size, pad_id, seed, objective=objective),
                          loss_on_batch, seed_pool(plan.run_seed, plan.k), plan.probabilities, plan.steps,
                          plan.eps, plan.lr, rng_seed=seed)
        return ClientReply(
            arrays={},
            num_examples=len(train_ds),
            metrics={**encode_steps(result.history, state_round=self._round, skipped=result.skipped),
                     protocol.TRAIN_LOSS: result.mean_loss, protocol.TRAIN_STEPS: float(result.steps),
                     protocol.TRAIN_SECONDS: time.perf_counter() - start, protocol.MODEL_LOAD_SECONDS: load_seconds,
                     **self.client.resource_metrics(job.partition_id, handle)},
        )
