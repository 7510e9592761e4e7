"""FlexLoRA: heterogeneous LoRA ranks, aggregated as one full update and redistributed by SVD.

Bai, Chen, Ding, Zhou, Li, Li, "Federated Fine-tuning of Large Language Models under
Heterogeneous Tasks and Client Resources", NeurIPS 2024 (https://arxiv.org/abs/2402.11505).

Each client k trains LoRA of its own rank r_k (scaling s_k = α / r_k). The server forms the
full-size update ΔW = Σ_k p_k·s_k·B_k·A_k and gives every client its best rank-r_k
approximation by truncated SVD, ΔW ≈ U_r·Σ_r·V_rᵀ with B = U_r·Σ_r and A = V_rᵀ (the
paper's split). Clients of high rank keep more of the aggregate; none is limited to the
smallest rank.

Low-rank all the way: ΔW is never formed. The SVD comes from the stacked factors (QR of
each stack, then the SVD of a Σ r_k × Σ r_k core; :func:`~fedtune.strategies.aggregation.truncated_product`),
so the server holds O(Σ r_k·(m + n)) numbers per module. The server sends the top
``adapter.rank`` components once, the same message to every client; a client of rank r_k
keeps the first r_k (the routine), so ``adapter.rank`` must be the largest client rank.
The server's own model (central evaluation, saved adapter) is the rank-``adapter.rank``
truncation; ``truncation_error`` reports ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F from the singular values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from fedtune.strategies.aggregation import (
    LORA_A,
    LORA_B,
    average_non_lora,
    check_weighting,
    client_scalings,
    client_weights,
    is_lora_key,
    lora_modules,
    stack_factors,
    truncated_product,
)
from fedtune.strategies.flexlora.routine import FLEXLORA_ROUTINE

from fedtune.strategy import (
    AdapterSpec,
    ClientInstruction,
    ClientUpdate,
    Strategy,
    Tensors,
    register_strategy,
    select,
)

if TYPE_CHECKING:
    from fedtune.schema import FedtuneConfig


@register_strategy
class FlexLoRA(Strategy):
    """Aggregate Σ p_k·s_k·B_k·A_k from the factors; redistribute its truncated SVD.

    Parameters
    ----------
    weighting : {"examples", "uniform"}
        p_k proportional to each client's training examples, or equal.
    """

    name = "flexlora"
    summary_line = "full update Σ p·s·B·A, truncated SVD per client rank (Bai et al. 2024); from the factors"
    linear_lora_only = True
    accepts_mixed_ranks = True
    averaging_reason = ("its global update is a truncated SVD of Σ p·s·B·A, not an average of the tensors "
                        "clients send")

    def __init__(self, *, weighting: str = "examples") -> None:
        self.weighting = check_weighting(weighting)
        self._global: Tensors = {}

    def initialize(self, spec: AdapterSpec) -> None:
        super().initialize(spec)
        initial = {k: v.detach().clone() for k, v in spec.initial.items()}
        self._modules = lora_modules(initial)
        if not self._modules:
            raise ValueError("flexlora needs LoRA adapter tensors (X.lora_A.weight / X.lora_B.weight)")
        # Round 1: PEFT's initial A and B = 0, unscaled (B·A is the update itself).
        self._global = initial

    def config_problems(self, cfg: FedtuneConfig) -> list[str]:
        ranks = cfg.adapter.client_ranks or []
        if ranks and max(ranks) > cfg.adapter.rank:
            return [f"adapter.client_ranks={list(ranks)} has a rank above adapter.rank={cfg.adapter.rank}; flexlora "
                    f"sends adapter.rank components, so set adapter.rank={max(ranks)} (the largest client rank)"]
        return []

    def configure_client(self, server_round: int, node_id: int) -> ClientInstruction:
        expects = {k: ((-1, v.shape[1]) if k.endswith(LORA_A) else (v.shape[0], -1)) if is_lora_key(k) else tuple(v.shape)
                   for k, v in self._global.items()}
        return ClientInstruction(arrays=self._global, trainable=(".*",), expects=expects, routine=FLEXLORA_ROUTINE)

    def configure_evaluation(self, server_round: int, node_id: int) -> ClientInstruction:
        return ClientInstruction(arrays=self._global, trainable=(), expects={}, routine=FLEXLORA_ROUTINE)

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        weights = client_weights(updates, self.weighting)
        scalings = client_scalings(updates)
        lora = [select(u.arrays, [r"\.lora_[AB]\.weight$"]) for u in updates]
        dtype = self._global[self._modules[0] + LORA_A].dtype
        out, kept, total = {}, 0.0, 0.0
        for module in lora_modules(lora[0]):  # one module's float64 stack at a time
            a_stack, b_stack = stack_factors(lora, weights, scalings, torch.float64, [module])[module]
            r = self.spec.rank
            b, a, s = truncated_product(a_stack, b_stack, r)
            kept += float(s[:r].square().sum())
            total += float(s.square().sum())
            if b.shape[1] < r:  # the aggregate has lower rank than adapter.rank: pad with zero components
                b = torch.cat([b, b.new_zeros(b.shape[0], r - b.shape[1])], dim=1)
                a = torch.cat([a, a.new_zeros(r - a.shape[0], a.shape[1])], dim=0)
            out[module + LORA_B], out[module + LORA_A] = b.to(dtype), a.to(dtype)
        self._global = {**out, **average_non_lora([u.arrays for u in updates], weights)}
        error = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
        return {"truncation_error": error, "aggregate_rank": float(a_stack.shape[0])}

    def global_adapter(self) -> Tensors:
        """The rank-``adapter.rank`` truncation, with B scaled for the server's s = α / rank."""
        scaling = self.spec.scaling
        return {k: (v / scaling if k.endswith(LORA_B) else v) for k, v in self._global.items()}

    def hyperparameters(self) -> dict[str, object]:
        return {"weighting": self.weighting}


__all__ = ["FlexLoRA"]
