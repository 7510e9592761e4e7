"""FFA-LoRA: federated LoRA with A frozen, so that averaging is exact.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024
(https://arxiv.org/abs/2403.12313).

Every client starts from the same random A (the PEFT initialisation under the run's seed,
identical everywhere, and checked by digest) and trains only B (and any task head). With A
shared, Σ p_k·s·B_k·A = s·(Σ p_k·B_k)·A: averaging B is exact. A never travels, so the
upload is half of FedIT's LoRA payload.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from fedtune.strategies.aggregation import (
    LORA_A,
    LORA_B,
    check_weighting,
    client_weights,
    normalized_weights,
    relative_to,
)

from fedtune import protocol
from fedtune.protocol import tensor_digest
from fedtune.strategy import (
    AdapterSpec,
    ClientInstruction,
    ClientUpdate,
    Strategy,
    Tensors,
    register_strategy,
    select,
    shapes_of,
)

FROZEN_A = r"\.lora_A\.weight$"
NOT_A = r"^(?!.*\.lora_A\.weight$)"


def shared_a_error(clients: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                   averaged: Mapping[str, torch.Tensor], frozen: Mapping[str, torch.Tensor]) -> float:
    """‖B̄·A − Σ_k p_k·B_k·A‖ / ‖Σ_k p_k·B_k·A‖ over all modules, for the A every client shares.

    With A shared the difference is (B̄ − Σ_k p_k·B_k)·A, and ‖M·A‖ = ‖M·R_aᵀ‖ for the thin QR
    Aᵀ = Q_a·R_a: one n×r QR per module, m×r work per client, no m×n matrix. The scaling s
    cancels in the ratio.
    """
    modules = sorted(k[: -len(LORA_A)] for k in frozen if k.endswith(LORA_A))
    if not modules:
        return float("nan")  # nothing to measure: no LoRA factors
    probs = normalized_weights(weights)
    num = den = 0.0
    for module in modules:
        r_a = torch.linalg.qr(frozen[module + LORA_A].to(torch.float64).T, mode="r").R
        ideal = sum(p * c[module + LORA_B].to(torch.float64) for p, c in zip(probs, clients))
        num += float(torch.linalg.matrix_norm((averaged[module + LORA_B].to(torch.float64) - ideal) @ r_a.T)) ** 2
        den += float(torch.linalg.matrix_norm(ideal @ r_a.T)) ** 2
    return relative_to(num, den)


@register_strategy
class FFALoRA(Strategy):
    """Frozen-A LoRA: clients train B (and the head); the server averages them, weighted by examples.

    Parameters
    ----------
    weighting : {"examples", "uniform"}
        Weight each client by its number of training examples or equally.
    """

    name = "ffa-lora"
    linear_lora_only = True
    summary_line = "frozen shared A, train and average B only (Sun et al. 2024); exact, half the upload"
    averages_updates = True
    supports_client_dp = True

    def __init__(self, *, weighting: str = "examples") -> None:
        self.weighting = check_weighting(weighting)
        self._frozen: Tensors = {}
        self._trained: Tensors = {}

    def initialize(self, spec: AdapterSpec) -> None:
        super().initialize(spec)
        initial = {k: v.detach().clone() for k, v in spec.initial.items()}
        self._frozen = select(initial, [FROZEN_A])
        self._trained = select(initial, [NOT_A])
        self._digest = tensor_digest(self._frozen)

    def configure_client(self, server_round: int, node_id: int) -> ClientInstruction:
        return ClientInstruction(
            arrays=self._trained,
            trainable=(NOT_A,),
            expects=shapes_of(self._trained),
            options={protocol.FROZEN_PATTERN: FROZEN_A, protocol.FROZEN_DIGEST: self._digest},
        )

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        weights = client_weights(updates, self.weighting)
        self._trained = self.average([u.arrays for u in updates], weights, previous=self._trained)
        # Measured, not assumed: float rounding is all that separates it from the ideal.
        return {"aggregation_error": shared_a_error([u.arrays for u in updates], weights, self._trained, self._frozen)}

    def global_adapter(self) -> Tensors:
        return {**self._frozen, **self._trained}

    def hyperparameters(self) -> dict[str, object]:
        return {"weighting": self.weighting, "frozen_tensors": len(self._frozen)}


__all__ = ["FFALoRA"]
