"""Dense m×n references for checks on small shapes; the strategies themselves never form them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from fedtune.strategies.aggregation import LORA_A, LORA_B, lora_modules, normalized_weights
from fedtune.strategies.fed_sb.keys import LORA_R


def ideal_updates(
    tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], scalings: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The exact federated update per module: Σ_k p_k · s_k · B_k @ A_k, in float64."""
    probs = normalized_weights(weights)
    out = {}
    for module in lora_modules(tensors[0]):
        acc = None
        for p, s, t in zip(probs, scalings, tensors):
            term = (p * s) * (t[module + LORA_B].to(torch.float64) @ t[module + LORA_A].to(torch.float64))
            acc = term if acc is None else acc + term
        out[module] = acc
    return out


def relative_error(ideal: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> float:
    """‖got − ideal‖_F / ‖ideal‖_F over all modules together (0 when the ideal is zero and got equals it)."""
    num = sum(float((got[m].to(torch.float64) - ideal[m]).pow(2).sum()) for m in ideal)
    den = sum(float(ideal[m].pow(2).sum()) for m in ideal)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return (num / den) ** 0.5


def dense_updates(frozen: Mapping[str, torch.Tensor], r_tensors: Mapping[str, torch.Tensor],
                  scaling: float) -> dict[str, torch.Tensor]:
    """s·B·R·A per module in float64 (``frozen`` holds B and A, ``r_tensors`` holds R).

    The strategy measures from the factors (:func:`~fedtune.strategies.fed_sb.strategy.r_average_error`).
    """
    out = {}
    for module in lora_modules(frozen):
        b, a = frozen[module + LORA_B].to(torch.float64), frozen[module + LORA_A].to(torch.float64)
        out[module] = scaling * (b @ r_tensors[module + LORA_R].to(torch.float64) @ a)
    return out


def dense_cosine_distance(ideal: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """1 − cos(ideal, got), entry by entry."""
    return 1.0 - (ideal * got).sum() / (ideal.norm() * got.norm()).clamp_min(1e-300)


def dense_residual_correction(ideal, b_avg, a_avg, *, lam, steps, lr):
    """LoRA-FAIR's former correction: Adam on the cosine of m×n matrices, best iterate kept."""
    ideal, b_avg, a_avg = (t.detach().to(torch.float64) for t in (ideal, b_avg, a_avg))
    delta = torch.zeros_like(b_avg, requires_grad=True)
    scale = float(b_avg.pow(2).mean().sqrt()) or float(ideal.abs().max()) or 1.0
    optimizer = torch.optim.Adam([delta], lr=lr * scale)

    def objective():
        norm = delta.pow(2).sum().add(1e-300).sqrt()
        return dense_cosine_distance(ideal, (b_avg + delta) @ a_avg) + lam * norm

    with torch.no_grad():
        best, best_value = torch.zeros_like(b_avg), float(objective())
    for _ in range(steps):
        optimizer.zero_grad()
        objective().backward()
        optimizer.step()
        with torch.no_grad():
            current = float(objective())
            if current < best_value:
                best, best_value = delta.detach().clone(), current
    return best
