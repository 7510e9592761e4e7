"""The weighted mean every averaging strategy starts from, accumulated in float64."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedtune.errors import AggregationError

Tensors = dict[str, torch.Tensor]


def normalized_weights(weights: Sequence[float]) -> list[float]:
    """Weights scaled to sum to one; negative or all-zero weights are an error."""
    values = [float(w) for w in weights]
    if not values:
        raise AggregationError("no updates to aggregate")
    if any(w < 0 or w != w for w in values):
        raise AggregationError(f"weights must be non-negative numbers, got {values}")
    total = sum(values)
    if total <= 0:
        raise AggregationError(f"weights sum to {total}; at least one client needs a positive weight")
    return [w / total for w in values]


def check_same_keys(tensors: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Raise :class:`AggregationError` unless every mapping has the keys and shapes of the first."""
    keys = set(tensors[0])
    for i, t in enumerate(tensors[1:], start=1):
        if set(t) != keys:
            diff = sorted(keys.symmetric_difference(t))[:3]
            raise AggregationError(f"update {i} has different keys from update 0 (e.g. {diff})")
        for key, ref in tensors[0].items():
            if t[key].shape != ref.shape:
                raise AggregationError(f"{key}: shape {tuple(t[key].shape)} differs from {tuple(ref.shape)}")


def weighted_average(tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> Tensors:
    """Σ_k p_k · T_k for every key, with p the normalised weights.

    All mappings must have the same keys and shapes. The sum is accumulated in float64
    and cast back to the first input's dtype.
    """
    probs = normalized_weights(weights)
    if len(probs) != len(tensors):
        raise AggregationError(f"{len(tensors)} updates but {len(probs)} weights")
    check_same_keys(tensors)
    out = {}
    for key in tensors[0]:
        ref = tensors[0][key]
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for p, t in zip(probs, tensors):
            acc += p * t[key].detach().to(torch.float64)
        out[key] = acc.to(ref.dtype)
    return out


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """‖Δ‖, the L2 norm over every tensor of ``update`` together, accumulated in float64."""
    return sum(float(v.detach().to(torch.float64).square().sum()) for v in update.values()) ** 0.5


__all__ = ["Tensors", "check_same_keys", "normalized_weights", "update_norm", "weighted_average"]
