"""LoRA-FAIR: FedAvg of A and B plus a server-side residual correction of B.

Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025 (https://arxiv.org/abs/2411.14961).

The server averages Ā = Σ p_k·A_k and B̄ = Σ p_k·B_k as FedIT does, computes the ideal
update ΔW = Σ p_k·B_k·A_k, and finds a residual ΔB that minimises

    (1 − cos(ΔW, (B̄ + ΔB)·Ā)) + λ·‖ΔB‖_F        (λ = 0.01 in the paper)

by a few gradient steps. Clients start the next round from B̄ + ΔB and Ā, so communication
is the same as FedIT's. Every round reports the relative error of FedIT's and of the
corrected product against the ideal, and the share of FedIT's error the correction removed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.strategy import (
    AdapterSpec,
    ClientInstruction,
    ClientUpdate,
    Strategy,
    Tensors,
    register_strategy,
    shapes_of,
)
from fedtune.strategies.aggregation import check_weighting, client_weights, LORA_A, LORA_B, ideal_updates, lora_modules, relative_error, weighted_average


def cosine_distance(ideal: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """1 − cos between two matrices seen as vectors (0 when they point the same way)."""
    return 1.0 - (ideal * got).sum() / (ideal.norm() * got.norm()).clamp_min(1e-300)


def residual_correction(ideal: torch.Tensor, b_avg: torch.Tensor, a_avg: torch.Tensor, *, lam: float,
                        steps: int, lr: float) -> torch.Tensor:
    """ΔB minimising (1 − cos(ideal, (B̄ + ΔB)·Ā)) + λ·‖ΔB‖_F, found by Adam from ΔB = 0.

    Runs in float64 and returns the best iterate seen (never worse than ΔB = 0). ``lr`` is
    relative to the RMS of B̄, so the step size follows the scale of the factors.

    Parameters
    ----------
    ideal : Tensor
        Σ p_k·B_k·A_k (m × n).
    b_avg, a_avg : Tensor
        B̄ (m × r) and Ā (r × n).
    lam : float
        Weight of the norm penalty λ.
    steps : int
        Gradient steps.
    lr : float
        Adam step size as a fraction of RMS(B̄).
    """
    ideal, b_avg, a_avg = (t.detach().to(torch.float64) for t in (ideal, b_avg, a_avg))
    delta = torch.zeros_like(b_avg, requires_grad=True)
    scale = float(b_avg.pow(2).mean().sqrt()) or float(ideal.abs().max()) or 1.0
    optimizer = torch.optim.Adam([delta], lr=lr * scale)

    def objective() -> torch.Tensor:
        norm = delta.pow(2).sum().add(1e-300).sqrt()  # differentiable at ΔB = 0
        return cosine_distance(ideal, (b_avg + delta) @ a_avg) + lam * norm

    with torch.no_grad():
        best, best_value = torch.zeros_like(b_avg), float(objective())
    for _ in range(steps):
        optimizer.zero_grad()
        value = objective()
        value.backward()
        optimizer.step()
        with torch.no_grad():
            current = float(objective())
            if current < best_value:
                best, best_value = delta.detach().clone(), current
    return best


@register_strategy
class LoRAFAIR(Strategy):
    """FedIT averaging with a server-side correction ΔB of B̄ toward the ideal update.

    Parameters
    ----------
    lam : float
        λ, the weight of ‖ΔB‖ in the objective (0.01 in the paper).
    steps : int
        Server gradient steps per adapted matrix and round.
    lr : float
        Adam step size, relative to the RMS of B̄.
    weighting : {"examples", "uniform"}
        p_k proportional to examples, or equal.
    """

    name = "lora-fair"
    linear_lora_only = True
    summary_line = "FedAvg of A and B plus a server residual correction of B (Bian et al. 2025)"

    def __init__(self, *, lam: float = 0.01, steps: int = 50, lr: float = 0.05, weighting: str = "examples") -> None:
        if lam < 0:
            raise ValueError(f"lam={lam} must be >= 0 (the paper uses 0.01)")
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        if lr <= 0:
            raise ValueError(f"lr={lr} must be positive, e.g. 0.05")
        self.lam, self.steps, self.lr, self.weighting = lam, steps, lr, check_weighting(weighting)
        self._global: Tensors = {}

    def initialize(self, spec: AdapterSpec) -> None:
        super().initialize(spec)
        self._global = {k: v.detach().clone() for k, v in spec.initial.items()}

    def configure_client(self, server_round: int, client_id: int) -> ClientInstruction:
        return ClientInstruction(arrays=self._global, trainable=(".*",), expects=shapes_of(self._global))

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        weights = client_weights(updates, self.weighting)
        tensors = [u.arrays for u in updates]
        averaged = weighted_average(tensors, weights)
        # One scaling for every client: it cancels in both the cosine and the relative error.
        ideal = ideal_updates(tensors, weights, [1.0] * len(tensors))
        fedit, fair = {}, {}
        cos_fedit = cos_fair = 0.0
        for module in lora_modules(averaged):
            a, b = averaged[module + LORA_A].to(torch.float64), averaged[module + LORA_B].to(torch.float64)
            delta = residual_correction(ideal[module], b, a, lam=self.lam, steps=self.steps, lr=self.lr)
            corrected = b + delta
            averaged[module + LORA_B] = corrected.to(averaged[module + LORA_B].dtype)
            fedit[module], fair[module] = b @ a, corrected @ a
            cos_fedit += float(cosine_distance(ideal[module], fedit[module]))
            cos_fair += float(cosine_distance(ideal[module], fair[module]))
        self._global = averaged
        error_fedit, error_fair = relative_error(ideal, fedit), relative_error(ideal, fair)
        modules = max(len(fedit), 1)
        return {
            "aggregation_error": error_fair,
            "fedit_aggregation_error": error_fedit,
            "error_removed": 1.0 - error_fair / error_fedit if error_fedit > 0 else 0.0,
            "cosine_distance": cos_fair / modules,
            "fedit_cosine_distance": cos_fedit / modules,
        }

    def global_adapter(self) -> Tensors:
        return dict(self._global)

    def hyperparameters(self) -> dict[str, object]:
        return {"lam": self.lam, "steps": self.steps, "lr": self.lr, "weighting": self.weighting}


__all__ = ["LoRAFAIR", "residual_correction"]
