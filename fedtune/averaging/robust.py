"""Robust replacements for the weighted mean: coordinate-wise median, trimmed mean, (Multi-)Krum.

Each rule maps the clients' tensors (one mapping per client, the same keys) to one mapping:

* ``median``: the coordinate-wise median (Yin et al. 2018), the mean of the two middle values
  for an even number of clients; unweighted.
* ``trimmed-mean``: per coordinate, drop the ``trim`` fraction of lowest and of highest values
  (⌊trim·n⌋ each) and average the rest (Yin et al. 2018); unweighted.
* ``krum`` / ``multi-krum`` (Blanchard et al. 2017): score each client by the summed squared
  distance to its n − f − 2 nearest others (f = ``byzantine``); Krum keeps the best one,
  Multi-Krum the ``select`` best (default n − f) and takes their weighted mean.

Krum's distances are between what the clients' updates do to the model: for a LoRA pair
``X.lora_A.weight`` / ``X.lora_B.weight`` the distance of the products,
‖B_i·A_i − B_j·A_j‖²_F = ‖B_iA_i‖² + ‖B_jA_j‖² − 2·Σ (B_iᵀB_j) ∘ (A_iA_jᵀ), from r×r Gram
matrices, never an m×n matrix; for every other tensor the plain Euclidean distance.

A coordinate-wise rule applied to factors is not the rule applied to their product: the median
of the B's times the median of the A's is not the median of the B·A's. :func:`factor_deviation`
measures by how much, module by module (the one place an m×n matrix is formed, one module at a
time), for the run log.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedtune.averaging.mean import Tensors, check_same_keys, weighted_average
from fedtune.errors import AggregationError
from fedtune.protocol import LORA_A, LORA_B, lora_modules
from fedtune.schema import ROBUST_RULES

# factor_deviation forms each module's m×n products for every client: skipped above this many numbers.
DEVIATION_LIMIT = 2**26


@dataclass(frozen=True)
class RobustRule:
    """One of :data:`ROBUST_RULES` with its parameters (``strategy.robust`` in the config)."""

    name: str = "mean"
    trim: float = 0.1
    byzantine: int = 1
    select: int | None = None

    def combine(self, tensors: Sequence[Mapping[str, torch.Tensor]],
                weights: Sequence[float]) -> tuple[Tensors, list[int]]:
        """The combined tensors and the positions of the clients that count in them."""
        if self.name not in ROBUST_RULES:
            raise AggregationError(f"strategy.robust.rule={self.name!r} is not one of {ROBUST_RULES}")
        check_same_keys(tensors)
        everyone = list(range(len(tensors)))
        if self.name == "mean":
            return weighted_average(tensors, weights), everyone
        if self.name == "median":
            return coordinate_median(tensors), everyone
        if self.name == "trimmed-mean":
            cut = math.floor(self.trim * len(tensors))
            return trimmed_mean(tensors, cut), everyone[cut:len(tensors) - cut]
        m = 1 if self.name == "krum" else (self.select or len(tensors) - self.byzantine)
        kept = krum_select(pairwise_sq_distances(tensors), self.byzantine, max(1, min(m, len(tensors))))
        return weighted_average([tensors[i] for i in kept], [weights[i] for i in kept]), kept


def _stacked(tensors: Sequence[Mapping[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([t[key].detach().to(torch.float64) for t in tensors])


def coordinate_median(tensors: Sequence[Mapping[str, torch.Tensor]]) -> Tensors:
    """Per coordinate, the median over clients (the mean of the two middle values when n is even)."""
    n, out = len(tensors), {}
    for key, ref in tensors[0].items():
        ordered = _stacked(tensors, key).sort(dim=0).values
        out[key] = ((ordered[(n - 1) // 2] + ordered[n // 2]) / 2).to(ref.dtype)
    return out


def trimmed_mean(tensors: Sequence[Mapping[str, torch.Tensor]], cut: int) -> Tensors:
    """Per coordinate, the mean over clients after dropping the ``cut`` lowest and ``cut`` highest values."""
    n = len(tensors)
    if n - 2 * cut < 1:
        raise AggregationError(f"trimmed mean: trimming {cut} from each end of {n} updates leaves none; "
                               "lower strategy.robust.trim or sample more clients")
    return {key: _stacked(tensors, key).sort(dim=0).values[cut:n - cut].mean(dim=0).to(ref.dtype)
            for key, ref in tensors[0].items()}


def pairwise_sq_distances(tensors: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """n×n squared distances between the clients' updates (LoRA pairs by their products, from Grams)."""
    n = len(tensors)
    modules = lora_modules(tensors[0])
    paired = {m + s for m in modules for s in (LORA_A, LORA_B)}
    distances = torch.zeros(n, n, dtype=torch.float64)

    def add(inner: torch.Tensor) -> None:
        sq = inner.diagonal()
        distances.add_(sq[:, None] + sq[None, :] - 2 * inner)

    for module in modules:
        a, b = _stacked(tensors, module + LORA_A), _stacked(tensors, module + LORA_B)  # n×r×k, n×m×r
        gram_b = torch.einsum("imr,jms->ijrs", b, b)
        gram_a = torch.einsum("irk,jsk->ijrs", a, a)
        add((gram_b * gram_a).sum(dim=(2, 3)))
    for key in tensors[0]:
        if key not in paired:
            flat = _stacked(tensors, key).reshape(n, -1)
            add(flat @ flat.T)
    return distances.clamp_(min=0.0)


def krum_select(distances: torch.Tensor, byzantine: int, keep: int) -> list[int]:
    """Positions of the ``keep`` clients with the lowest Krum scores (ties: the earlier client), in order."""
    n = distances.shape[0]
    neighbours = max(1, n - byzantine - 2)
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1:]])
        scores.append(float(others.sort().values[:neighbours].sum()) if n > 1 else 0.0)
    ranked = sorted(range(n), key=lambda i: (scores[i], i))
    return sorted(ranked[:keep])


def factor_deviation(rule: RobustRule, tensors: Sequence[Mapping[str, torch.Tensor]],
                     combined: Mapping[str, torch.Tensor]) -> float | None:
    """‖B̃·Ã − rule(B_k·A_k)‖ / ‖rule(B_k·A_k)‖ over the LoRA modules, for a coordinate-wise rule.

    How far the rule applied to each factor lands from the rule applied to the clients' products
    (zero for the mean of one client; the mean's own gap is the strategy's ``aggregation_error``).
    None for other rules, or when a module's products would exceed :data:`DEVIATION_LIMIT` numbers.
    """
    if rule.name not in ("median", "trimmed-mean"):
        return None
    modules = lora_modules(tensors[0])
    num, den = 0.0, 0.0
    for module in modules:
        b0, a0 = tensors[0][module + LORA_B], tensors[0][module + LORA_A]
        if len(tensors) * b0.shape[0] * a0.shape[1] > DEVIATION_LIMIT:
            return None
        products = [{"p": t[module + LORA_B].to(torch.float64) @ t[module + LORA_A].to(torch.float64)}
                    for t in tensors]
        reference = (coordinate_median(products) if rule.name == "median"
                     else trimmed_mean(products, math.floor(rule.trim * len(tensors))))["p"]
        got = combined[module + LORA_B].to(torch.float64) @ combined[module + LORA_A].to(torch.float64)
        num += float((got - reference).square().sum())
        den += float(reference.square().sum())
    if not modules:
        return None
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


__all__ = ["ROBUST_RULES", "RobustRule", "coordinate_median", "factor_deviation", "krum_select",
           "pairwise_sq_distances", "trimmed_mean"]
