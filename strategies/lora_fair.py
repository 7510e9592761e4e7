"""LoRA-FAIR: FedAvg of A and B plus a server-side residual correction of B.

Bian et al., "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization
Refinement", ICCV 2025 (https://arxiv.org/abs/2411.14961).

The server averages Ā = Σ p_k·A_k and B̄ = Σ p_k·B_k as FedIT does, and finds a residual ΔB
that minimises, against the ideal update ΔW = Σ p_k·B_k·A_k,

    (1 − cos(ΔW, (B̄ + ΔB)·Ā)) + λ·‖ΔB‖_F        (λ = 0.01 in the paper)

by a few gradient steps. Clients start the next round from B̄ + ΔB and Ā, so communication
is the same as FedIT's. Every round reports the relative error of FedIT's and of the
corrected product against the ideal, and the share of FedIT's error the correction removed.

Everything is computed from the factors, one module at a time, never as an m×n matrix: with
X = B̄ + ΔB (m×r), ⟨ΔW, X·Ā⟩ = ⟨ΔW·Āᵀ, X⟩ where ΔW·Āᵀ = Σ p_k·B_k·(A_k·Āᵀ) is m×r, and
‖X·Ā‖_F = ‖X·R_aᵀ‖_F for the thin QR Āᵀ = Q_a·R_a. Memory is O(K·r·(m + n)) for K clients.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
from fedtune.strategies.aggregation import (
    LORA_A,
    LORA_B,
    Term,
    check_weighting,
    client_weights,
    gram_norm,
    ideal_terms,
    lora_modules,
    relative_to,
    weighted_average,
)


@dataclass(frozen=True)
class IdealProjection:
    """What the cosine and the distance to ΔW = Σ c_k·B_k·A_k need for products X·Ā, all r-sized.

    Attributes
    ----------
    projected : Tensor
        ΔW·Āᵀ = Σ c_k·B_k·(A_k·Āᵀ) (m × r), so that ⟨ΔW, X·Ā⟩ = ⟨projected, X⟩.
    a_root : Tensor
        R_a of the thin QR Āᵀ = Q_a·R_a, so that ‖X·Ā‖_F = ‖X·R_aᵀ‖_F.
    norm : float
        ‖ΔW‖_F.
    b_avg : Tensor
        B̄ (m × r), float64.
    fedit_distance : float
        ‖ΔW − B̄·Ā‖_F, FedIT's error.
    """

    projected: torch.Tensor
    a_root: torch.Tensor
    norm: float
    b_avg: torch.Tensor
    fedit_distance: float

    @classmethod
    def of(cls, terms: Sequence[Term], b_avg: torch.Tensor, a_avg: torch.Tensor) -> IdealProjection:
        """The ideal ``terms`` (c, B, A) seen through B̄ (m × r) and Ā (r × n), in float64.

        ‖ΔW‖ comes from Gram matrices of the stacked factors (the clients' updates do not
        cancel; :func:`~fedtune.strategies.aggregation.gram_norm`), FedIT's distance from
        ‖ΔW − B̄·Ā‖² = ‖ΔW‖² − 2·⟨ΔW·Āᵀ, B̄⟩ + ‖B̄·R_aᵀ‖²: accurate to ~1e-8·‖ΔW‖ when FedIT is
        nearly exact (a difference of nearly equal numbers), to float64 rounding otherwise.
        """
        b_avg, a_avg = b_avg.detach().to(torch.float64), a_avg.detach().to(torch.float64)
        projected = sum(c * (b.detach().to(torch.float64) @ (a.detach().to(torch.float64) @ a_avg.T))
                        for c, b, a in terms)
        a_root = torch.linalg.qr(a_avg.T, mode="r").R
        norm = gram_norm(terms)
        fedit_squared = norm ** 2 - 2.0 * float((projected * b_avg).sum()) + float(b_avg.mm(a_root.T).square().sum())
        return cls(projected, a_root, norm, b_avg, max(fedit_squared, 0.0) ** 0.5)

    def objective(self, delta: torch.Tensor, lam: float) -> tuple[float, torch.Tensor]:
        """(1 − cos(ΔW, (B̄ + ΔB)·Ā)) + λ·‖ΔB‖_F and its gradient in ΔB, in closed form.

        With X = B̄ + ΔB, g = ‖X·R_aᵀ‖ and c = ⟨ΔW·Āᵀ, X⟩: ∂/∂X (c / (‖ΔW‖·g)) =
        ΔW·Āᵀ / (‖ΔW‖·g) − c·X·ĀĀᵀ / (‖ΔW‖·g³). The same value and gradient as autograd on
        :meth:`cosine_distance` (denominator clamped at 1e-300, ‖ΔB‖ smoothed by 1e-300 at 0)
        at half its cost, which the server pays for every step of every module.
        """
        x = self.b_avg + delta
        projected_x = x @ self.a_root.T
        got_norm = float(torch.linalg.vector_norm(projected_x))
        inner = float(torch.vdot(self.projected.view(-1), x.view(-1)))
        scale = self.norm * got_norm
        delta_norm = (float(torch.vdot(delta.view(-1), delta.view(-1))) + 1e-300) ** 0.5
        if scale > 1e-300:
            grad = torch.addmm(self.projected, projected_x, self.a_root, beta=-1.0 / scale,
                               alpha=inner / (scale * got_norm ** 2))
        else:  # the clamped denominator is constant there
            grad = self.projected * (-1.0 / 1e-300)
        grad.add_(delta, alpha=lam / delta_norm)
        return 1.0 - inner / max(scale, 1e-300) + lam * delta_norm, grad

    def cosine_distance(self, x: torch.Tensor) -> torch.Tensor:
        """1 − cos(ΔW, X·Ā) for X (m × r), differentiable in X (0 when they point the same way)."""
        inner = (self.projected * x).sum()
        got_norm = torch.linalg.matrix_norm(x @ self.a_root.T)
        return 1.0 - inner / (self.norm * got_norm).clamp_min(1e-300)

    def distance(self, x: torch.Tensor) -> float:
        """‖ΔW − X·Ā‖_F for X = B̄ + ΔB, from FedIT's distance and r-sized products.

        ‖D − ΔB·Ā‖² = ‖D‖² − 2·⟨D, ΔB·Ā⟩ + ‖ΔB·Ā‖² with D = ΔW − B̄·Ā and
        ⟨D, ΔB·Ā⟩ = ⟨ΔW·Āᵀ − B̄·ĀĀᵀ, ΔB⟩; no cancellation unless the correction removes
        nearly all of FedIT's error.
        """
        delta = x.detach().to(torch.float64) - self.b_avg
        gram = self.a_root.T @ self.a_root  # ĀĀᵀ
        inner = float(((self.projected - self.b_avg @ gram) * delta).sum())
        squared = self.fedit_distance ** 2 - 2.0 * inner + float(torch.linalg.matrix_norm(delta @ self.a_root.T)) ** 2
        return max(squared, 0.0) ** 0.5


def residual_correction(target: IdealProjection, *, lam: float, steps: int, lr: float) -> torch.Tensor:
    """ΔB minimising (1 − cos(ΔW, (B̄ + ΔB)·Ā)) + λ·‖ΔB‖_F, found by Adam from ΔB = 0.

    ΔW, B̄ and Ā enter through ``target`` only, so the objective and its gradient
    (:meth:`IdealProjection.objective`) are computed on m×r and r×r matrices. Runs in float64
    and returns the best iterate seen (never worse than ΔB = 0). ``lr`` is relative to the
    RMS of B̄, so the step size follows the scale of the factors. At B̄ = 0 the cosine's
    gradient (~1e300, its denominator clamped) overflows Adam's second moment and ΔB stays
    0, as it did when the objective was computed densely.

    Parameters
    ----------
    target : IdealProjection
        ΔW = Σ p_k·B_k·A_k projected onto products with Ā, and B̄.
    lam : float
        Weight of the norm penalty λ.
    steps : int
        Gradient steps.
    lr : float
        Adam step size as a fraction of RMS(B̄).

    Returns
    -------
    Tensor
        ΔB (m × r), float64.
    """
    delta = torch.zeros_like(target.b_avg)
    scale = float(target.b_avg.square().mean().sqrt()) or 1.0
    optimizer = torch.optim.Adam([delta], lr=lr * scale, fused=True)
    value, grad = target.objective(delta, lam)
    best, best_value = delta.clone(), value
    for _ in range(steps):
        delta.grad = grad
        optimizer.step()
        value, grad = target.objective(delta, lam)
        if value < best_value:
            best, best_value = delta.clone(), value
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
        modules = lora_modules(averaged)
        # One scaling for every client: it cancels in both the cosine and the relative error.
        ideal = ideal_terms(tensors, weights, [1.0] * len(tensors), modules)
        ideal_sq = fedit_sq = fair_sq = 0.0
        cos_fedit = cos_fair = 0.0
        for module in modules:
            a, b = averaged[module + LORA_A].to(torch.float64), averaged[module + LORA_B].to(torch.float64)
            target = IdealProjection.of(ideal[module], b, a)
            corrected = b + residual_correction(target, lam=self.lam, steps=self.steps, lr=self.lr)
            averaged[module + LORA_B] = corrected.to(averaged[module + LORA_B].dtype)
            ideal_sq += target.norm ** 2
            fedit_sq += target.fedit_distance ** 2
            fair_sq += target.distance(corrected) ** 2
            cos_fedit += float(target.cosine_distance(b))
            cos_fair += float(target.cosine_distance(corrected))
        self._global = averaged
        error_fedit, error_fair = (relative_to(squared, ideal_sq) for squared in (fedit_sq, fair_sq))
        count = max(len(modules), 1)
        return {
            "aggregation_error": error_fair,
            "fedit_aggregation_error": error_fedit,
            "error_removed": 1.0 - error_fair / error_fedit if error_fedit > 0 else 0.0,
            "cosine_distance": cos_fair / count,
            "fedit_cosine_distance": cos_fedit / count,
        }

    def global_adapter(self) -> Tensors:
        return dict(self._global)

    def hyperparameters(self) -> dict[str, object]:
        return {"lam": self.lam, "steps": self.steps, "lr": self.lr, "weighting": self.weighting}


__all__ = ["IdealProjection", "LoRAFAIR", "residual_correction"]
