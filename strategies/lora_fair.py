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

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
import torch
from fedtune.strategies.aggregation import (
    LORA_A,
    LORA_B,
    Term,
    check_weighting,
    client_weights,
    ideal_terms,
    lora_modules,
    relative_to,
    stacked_gram_norm,
    stacked_terms,
    weighted_average,
)

from fedtune.strategy import (
    AdapterSpec,
    ClientInstruction,
    ClientUpdate,
    Strategy,
    Tensors,
    register_strategy,
    shapes_of,
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
    gram: torch.Tensor = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "gram", self.a_root.T @ self.a_root)  # ĀĀᵀ (r × r)

    @classmethod
    def of(cls, terms: Sequence[Term], b_avg: torch.Tensor, a_avg: torch.Tensor) -> IdealProjection:
        """The ideal ``terms`` (c, B, A) seen through B̄ (m × r) and Ā (r × n), in float64.

        ‖ΔW‖ comes from Gram matrices of the stacked factors (the clients' updates do not
        cancel; :func:`~fedtune.strategies.aggregation.stacked_gram_norm`), FedIT's distance from
        ‖ΔW − B̄·Ā‖² = ‖ΔW‖² − 2·⟨ΔW·Āᵀ, B̄⟩ + ‖B̄·R_aᵀ‖²: accurate to ~1e-8·‖ΔW‖ when FedIT is
        nearly exact (a difference of nearly equal numbers), to float64 rounding otherwise.
        """
        b_avg, a_avg = b_avg.detach().to(torch.float64), a_avg.detach().to(torch.float64)
        b_stack, a_stack = stacked_terms([(c, b.detach(), a.detach()) for c, b, a in terms])
        projected = b_stack @ (a_stack @ a_avg.T)
        a_root = torch.linalg.qr(a_avg.T, mode="r").R
        norm = stacked_gram_norm(b_stack, a_stack)
        fedit_squared = norm ** 2 - 2.0 * float((projected * b_avg).sum()) + float(b_avg.mm(a_root.T).square().sum())
        return cls(projected, a_root, norm, b_avg, max(fedit_squared, 0.0) ** 0.5)

    def objective(self, delta: torch.Tensor, lam: float) -> tuple[float, torch.Tensor]:
        """(1 − cos(ΔW, (B̄ + ΔB)·Ā)) + λ·‖ΔB‖_F and its gradient in ΔB, in closed form.

        With X = B̄ + ΔB, g = ‖X·R_aᵀ‖ and c = ⟨ΔW·Āᵀ, X⟩: ∂/∂X (c / (‖ΔW‖·g)) =
        ΔW·Āᵀ / (‖ΔW‖·g) − c·X·ĀĀᵀ / (‖ΔW‖·g³), and g² = ⟨X·ĀĀᵀ, X⟩: one m×r×r product per
        step. The same value and gradient as autograd on :meth:`cosine_distance` (denominator
        clamped at 1e-300, ‖ΔB‖ smoothed by 1e-300 at 0); :func:`residual_correction` computes
        the same formula in compiled passes.
        """
        x = self.b_avg + delta
        x_gram = x @ self.gram
        got_squared = float(torch.vdot(x_gram.view(-1), x.view(-1)))  # ‖X·Ā‖² = ⟨X·ĀĀᵀ, X⟩
        got_norm = got_squared ** 0.5
        inner = float(torch.vdot(self.projected.view(-1), x.view(-1)))
        scale = self.norm * got_norm
        delta_norm = (float(torch.vdot(delta.view(-1), delta.view(-1))) + 1e-300) ** 0.5
        if scale > 1e-300:
            grad = x_gram.mul_(inner / (scale * got_squared)).sub_(self.projected, alpha=1.0 / scale)
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
        inner = float(((self.projected - self.b_avg @ self.gram) * delta).sum())
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

    Each step costs one m×r×r product (ΔB·ĀĀᵀ, BLAS) and two compiled passes over the m×r
    matrices: one for the three inner products the objective needs, one that forms the
    gradient and takes torch's Adam step (:func:`_gradient_and_adam_step`, equal to
    ``torch.optim.Adam`` to rounding; tested through the dense reference).

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
    # r×m row-major arrays (the transposes of m×r, copied once): elementwise work is
    # layout-blind, and (ΔB·ĀĀᵀ)ᵀ = ĀĀᵀ·ΔBᵀ is the product BLAS runs fastest.
    b_avg, projected = (t.T.contiguous() for t in (target.b_avg, target.projected))
    b_gram = target.gram @ b_avg  # (B̄·ĀĀᵀ)ᵀ, fixed
    delta, delta_gram = torch.zeros_like(b_avg), torch.zeros_like(b_avg)
    first_moment, second_moment = torch.zeros_like(b_avg), torch.zeros_like(b_avg)
    arrays = [t.view(-1).numpy() for t in (b_avg, projected, b_gram, delta, delta_gram)]
    step_size = lr * (float(target.b_avg.square().mean().sqrt()) or 1.0)
    best, best_value = delta.clone(), math.inf
    for step in range(steps + 1):
        torch.mm(target.gram, delta, out=delta_gram)
        got_squared, inner, delta_squared = _objective_sums(*arrays)
        scale = target.norm * got_squared ** 0.5
        delta_norm = (delta_squared + 1e-300) ** 0.5
        value = 1.0 - inner / max(scale, 1e-300) + lam * delta_norm
        if value < best_value:
            best, best_value = delta.clone(), value
        if step == steps:
            break
        # ∂/∂X of −cos: X·ĀĀᵀ·⟨ΔW·Āᵀ, X⟩/(‖ΔW‖·g³) − ΔW·Āᵀ/(‖ΔW‖·g); constant where clamped.
        along_x, along_projected = ((inner / (scale * got_squared), 1.0 / scale) if scale > 1e-300
                                    else (0.0, 1e300))
        _gradient_and_adam_step(*arrays, first_moment.view(-1).numpy(), second_moment.view(-1).numpy(),
                                along_x, along_projected, lam / delta_norm, step + 1, step_size)
    return best.T


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _objective_sums(b_avg: np.ndarray, projected: np.ndarray, b_gram: np.ndarray, delta: np.ndarray,
                    delta_gram: np.ndarray) -> tuple[float, float, float]:  # pragma: no cover (compiled)
    """⟨X·ĀĀᵀ, X⟩, ⟨ΔW·Āᵀ, X⟩ and ⟨ΔB, ΔB⟩ for X = B̄ + ΔB, in one pass."""
    got_squared = inner = delta_squared = 0.0
    for i in range(delta.size):
        x = b_avg[i] + delta[i]
        got_squared += (b_gram[i] + delta_gram[i]) * x
        inner += projected[i] * x
        delta_squared += delta[i] * delta[i]
    return got_squared, inner, delta_squared


_ADAM_BETAS, _ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _gradient_and_adam_step(b_avg: np.ndarray, projected: np.ndarray, b_gram: np.ndarray, delta: np.ndarray,
                            delta_gram: np.ndarray, first_moment: np.ndarray, second_moment: np.ndarray,
                            along_x: float, along_projected: float, along_delta: float, step: int,
                            lr: float) -> None:  # pragma: no cover (compiled)
    """One Adam step on ΔB with the objective's gradient, formed entry by entry.

    gradient = along_x·X·ĀĀᵀ − along_projected·ΔW·Āᵀ + along_delta·ΔB; the update is
    ``torch.optim.Adam``'s (non-amsgrad, no weight decay), operation for operation.
    """
    beta1, beta2 = _ADAM_BETAS
    step_size = lr / (1.0 - beta1 ** step)
    root_correction = (1.0 - beta2 ** step) ** 0.5
    for i in range(delta.size):
        gradient = along_x * (b_gram[i] + delta_gram[i]) - along_projected * projected[i] + along_delta * delta[i]
        first_moment[i] += (1.0 - beta1) * (gradient - first_moment[i])
        second_moment[i] = second_moment[i] * beta2 + (1.0 - beta2) * gradient * gradient
        delta[i] -= step_size * first_moment[i] / (math.sqrt(second_moment[i]) / root_correction + _ADAM_EPS)


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
    averaging_reason = ("it corrects the averaged factors toward Σ p·B·A of every client, which a robust rule or "
                        "server step would undo")

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

    def configure_client(self, server_round: int, node_id: int) -> ClientInstruction:
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
