"""FlexLoRA's client half: keep the leading r_k SVD components of the global update, then train."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from fedtune.strategies.aggregation import LORA_A, LORA_B

from fedtune.models.loading import AdapterHandle
from fedtune.routine import ClientJob, GradientRoutine, register_routine

FLEXLORA_ROUTINE = "flexlora"


@register_routine
class FlexLoRARoutine(GradientRoutine):
    """Gradient training from the rank-r_k truncation of the global update.

    The server sends B = U·Σ and A = Vᵀ of the global update (components in decreasing
    order of singular value, product B·A with no scaling). A client of rank r_k keeps the
    first r_k components, which is the best rank-r_k approximation (Eckart–Young), and
    divides B by its own scaling s_k = α / r_k so that s_k·B·A is that approximation.
    """

    name = FLEXLORA_ROUTINE

    def load(self, job: ClientJob) -> tuple[AdapterHandle, float]:
        adapter = self.client.adapter_config(job.partition_id)
        arrays = client_factors(job.arrays, rank=adapter.rank, scaling=adapter.alpha / adapter.rank)
        return self.client.prepare(dataclasses.replace(job, arrays=arrays))


def client_factors(arrays: Mapping[str, torch.Tensor], *, rank: int, scaling: float) -> dict[str, torch.Tensor]:
    """The first ``rank`` components of the server's factors, B divided by the client's ``scaling``.

    Other tensors (a task head) pass through unchanged.
    """
    out = {}
    for key, value in arrays.items():
        if key.endswith((LORA_A, LORA_B)):
            sent = value.shape[0 if key.endswith(LORA_A) else 1]
            if sent < rank:
                raise ValueError(f"{key} carries {sent} components but this client trains rank {rank}; "
                                 "set adapter.rank to the largest client rank")
        if key.endswith(LORA_A):
            out[key] = value[:rank].clone()
        elif key.endswith(LORA_B):
            out[key] = value[:, :rank] / scaling
        else:
            out[key] = value
    return out
