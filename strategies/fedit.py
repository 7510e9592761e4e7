"""FedIT: federated instruction tuning with LoRA, by plain FedAvg of A and B.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024 (https://arxiv.org/abs/2305.05644).

Every client trains the whole adapter (LoRA A and B, plus any task head PEFT keeps
trainable); the server averages each tensor separately, weighted by examples.
This is inexact: Σ p_k·B_k · Σ p_k·A_k ≠ Σ p_k·B_k·A_k. It is the baseline that the
exact strategies are compared with.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.strategies.aggregation import check_weighting, client_weights, factor_average_error

from fedtune.strategy import (
    AdapterSpec,
    ClientInstruction,
    ClientUpdate,
    Strategy,
    Tensors,
    register_strategy,
    shapes_of,
)


@register_strategy
class FedIT(Strategy):
    """FedAvg of every adapter tensor, weighted by the number of training examples.

    Parameters
    ----------
    weighting : {"examples", "uniform"}
        Weight each client by its number of training examples (the paper) or equally.
    """

    name = "fedit"
    summary_line = "FedAvg of LoRA A and B separately (Zhang et al. 2024); inexact baseline"
    averages_updates = True
    supports_client_dp = True

    def __init__(self, *, weighting: str = "examples") -> None:
        self.weighting = check_weighting(weighting)
        self._global: Tensors = {}

    def initialize(self, spec: AdapterSpec) -> None:
        super().initialize(spec)
        self._global = {k: v.detach().clone() for k, v in spec.initial.items()}

    def configure_client(self, server_round: int, node_id: int) -> ClientInstruction:
        return ClientInstruction(
            arrays=self._global,
            trainable=(".*",),
            expects=shapes_of(self._global),
        )

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        weights = client_weights(updates, self.weighting)
        self._global = self.average([u.arrays for u in updates], weights, previous=self._global)
        return {"aggregation_error": factor_average_error([u.arrays for u in updates], weights, self._global)}

    def global_adapter(self) -> Tensors:
        return dict(self._global)

    def hyperparameters(self) -> dict[str, object]:
        return {"weighting": self.weighting}


__all__ = ["FedIT"]

