"""FLoRA: exact aggregation of heterogeneous-rank LoRA by stacking.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous
Low-Rank Adaptations", NeurIPS 2024 (https://arxiv.org/abs/2409.05976).

Each client k trains a fresh LoRA of its own rank r_k (scaling s_k = α / r_k). The server
stacks the factors, A = [p_1·s_1·A_1; …; p_K·s_K·A_K] (rows) and B = [B_1, …, B_K]
(columns), so that B·A = Σ_k p_k·s_k·B_k·A_k exactly, with no cross terms. The stacked
update is merged into the model and every client starts the next round from a fresh LoRA
(A random, B zero) on the merged model; the client draws it
(:func:`~fedtune.strategies.flora.routine.draw_fresh_lora`), new for every round and client.

Merging: the merged updates are kept beside the base weights as a frozen low-rank branch
(:mod:`fedtune.strategies.flora.residual`), never written into them, so nothing is lost on a
quantized base. The download carries the stacked factors, Σ_k r_k·(m + n) numbers per adapted
matrix: it grows with the number of clients. A client that missed rounds receives every stack
it has not merged (the server sends the history since the oldest round any known client saw).

Costs, per adapted m×n matrix, after T rounds with ranks r_k (R_t = Σ_k r_k in round t):
the server keeps every round's stack, Σ_t R_t·(m + n) float32 numbers (it never forms B·A,
except one module at a time when a model is loaded for evaluation); a client holds
min(Σ_t R_t·(m + n), m·n) float32 numbers beside its base (factored below the break-even rank,
dense above it) and downloads R_t·(m + n) numbers per round it has not merged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from fedtune.strategies.aggregation import (
    LORA_A,
    LORA_B,
    Stack,
    Term,
    average_non_lora,
    check_weighting,
    client_scalings,
    client_weights,
    ideal_terms,
    is_lora_key,
    low_rank_norm,
    relative_to,
    stack_factors,
)
from fedtune.strategies.flora.residual import residual_key, residual_of
from fedtune.strategies.flora.routine import FLORA_ROUTINE

from fedtune.models.loading import AdapterHandle
from fedtune.strategy import (
    AdapterSpec,
    ClientInstruction,
    ClientUpdate,
    ExportedAdapter,
    Strategy,
    Tensors,
    register_strategy,
    select,
    shapes_of,
)


def stack_error(ideal: dict[str, list[Term]], stack: Stack) -> float:
    """‖B_stack·A_stack − Σ_k c_k·B_k·A_k‖ / ‖Σ_k c_k·B_k·A_k‖ over all modules, from the factors.

    Block k of the stack is (B̂_k, Â_k) with Â_k = c_k·A_k rounded to the stack's dtype, so
    the difference is Σ_k B̂_k·(c_k·A_k − Â_k) + (B_k − B̂_k)·c_k·A_k: each client's rounding.
    The second term is dropped only where B̂_k and B_k are bitwise equal; then neither norm
    is a difference of nearly equal matrices, so both come from Gram matrices sharing BᵀB
    (‖B·E‖² = ⟨BᵀB, E·Eᵀ⟩: GEMMs instead of QRs).
    """
    num = den = 0.0
    for module, terms in ideal.items():
        a_stack, b_stack = (t.to(torch.float64) for t in stack[module])
        scaled = torch.cat([c * a.to(torch.float64) for c, _, a in terms])
        clients_b = torch.cat([b.to(torch.float64) for _, b, _ in terms], dim=1)
        if torch.equal(clients_b, b_stack):
            gram_b = b_stack.T @ b_stack
            rounding = scaled - a_stack
            num += max(float((gram_b * (rounding @ rounding.T)).sum()), 0.0)
            den += max(float((gram_b * (scaled @ scaled.T)).sum()), 0.0)
        else:
            num += low_rank_norm([(1.0, b_stack, scaled - a_stack), (1.0, clients_b - b_stack, scaled)]) ** 2
            den += low_rank_norm([(1.0, clients_b, scaled)]) ** 2
    return relative_to(num, den)


@register_strategy
class FLoRA(Strategy):
    """Stack every client's LoRA (any ranks), merge the stack into the model, restart LoRA.

    Parameters
    ----------
    weighting : {"examples", "uniform"}
        p_k proportional to each client's training examples, or equal.
    """

    name = "flora"
    linear_lora_only = True
    summary_line = "stack heterogeneous-rank LoRA factors, merge exactly (Wang et al. 2024)"
    accepts_mixed_ranks = True
    averaging_reason = ("it stacks every client's factors into one larger-rank update: nothing is averaged, so "
                        "there is no mean to replace and no pseudo-gradient to step on")

    def __init__(self, *, weighting: str = "examples") -> None:
        self.weighting = check_weighting(weighting)
        # Merge number v (1, 2, ...) -> stacked factors; a round with no valid reply merges nothing.
        self._stacks: list[Stack] = []
        self._seen: dict[int, int] = {}  # client -> merges it had when last told to train
        self._head: Tensors = {}

    def initialize(self, spec: AdapterSpec) -> None:
        super().initialize(spec)
        self._fresh = {k: v.detach().clone() for k, v in spec.initial.items() if is_lora_key(k)}
        self._head = {k: v.detach().clone() for k, v in spec.initial.items() if not is_lora_key(k)}

    def _history_for(self, node_id: int) -> Tensors:
        """Every merge after the oldest one any known client (or this new one) has seen.

        A client process may serve several clients (simulation) or be a new process
        (restart), so the history reaches back to the least up-to-date client; a process
        skips the merges it has already applied.
        """
        oldest = min([self._seen.get(node_id, 0), *self._seen.values()])
        out = {}
        for version in range(oldest + 1, len(self._stacks) + 1):
            for module, (a, b) in self._stacks[version - 1].items():
                out[residual_key(version, module, "A")] = a
                out[residual_key(version, module, "B")] = b
        return out

    def configure_client(self, server_round: int, node_id: int) -> ClientInstruction:
        arrays = {**self._head, **self._history_for(node_id)}
        self._seen[node_id] = len(self._stacks)
        expects = {**shapes_of(self._head)}
        for key, value in self._fresh.items():
            # The client picks its own rank: any number of rows of A / columns of B.
            expects[key] = (-1, value.shape[1]) if key.endswith(LORA_A) else (value.shape[0], -1)
        return ClientInstruction(arrays=arrays, trainable=(".*",), expects=expects, routine=FLORA_ROUTINE)

    def configure_evaluation(self, server_round: int, node_id: int) -> ClientInstruction:
        return ClientInstruction(arrays={**self._head, **self._history_for(node_id)}, trainable=(), expects={},
                                 routine=FLORA_ROUTINE)

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        weights = client_weights(updates, self.weighting)
        scalings = client_scalings(updates)
        lora = [select(u.arrays, [r"\.lora_[AB]\.weight$"]) for u in updates]
        stack = stack_factors(lora, weights, scalings)
        self._stacks.append(stack)
        self._head = average_non_lora([u.arrays for u in updates], weights)
        ranks = [u.arrays[next(k for k in u.arrays if k.endswith(LORA_A))].shape[0] for u in updates]
        return {"aggregation_error": stack_error(ideal_terms(lora, weights, scalings), stack),
                "stacked_rank": float(sum(ranks))}

    def global_adapter(self) -> Tensors:
        return {**self._fresh, **self._head}

    def merged_rounds(self) -> dict[int, Stack]:
        """Every merge so far by number (1, 2, …): per module the stacked factors (A, B), B·A its update."""
        return {version: stack for version, stack in enumerate(self._stacks, start=1)}

    def load_global(self, handle: AdapterHandle) -> None:
        residual = residual_of(handle.model)
        residual.clear()
        residual.merge_rounds(self.merged_rounds())
        handle.load(self.global_adapter())

    def export_adapter(self) -> ExportedAdapter | None:
        """Every round's stack side by side: one LoRA of rank Σ_rounds Σ_k r_k, scaling 1."""
        if not self._stacks:
            return None
        tensors = dict(self._head)
        for module in self._stacks[0]:
            tensors[module + LORA_A] = torch.cat([stack[module][0] for stack in self._stacks], dim=0)
            tensors[module + LORA_B] = torch.cat([stack[module][1] for stack in self._stacks], dim=1)
        rank = next(t.shape[0] for k, t in tensors.items() if k.endswith(LORA_A))
        return ExportedAdapter(tensors=tensors, rank=rank, alpha=float(rank))

    def hyperparameters(self) -> dict[str, object]:
        return {"weighting": self.weighting}


__all__ = ["FLoRA", "stack_factors"]
