"""Tensor math shared by the strategies: weighted averages accumulated in float64.

Every function here is pure: it reads its inputs and returns new tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedtune import protocol
from fedtune.averaging.mean import normalized_weights, weighted_average
from fedtune.errors import AggregationError
from fedtune.protocol import LORA_A, LORA_B
from fedtune.strategy import ClientUpdate

WEIGHTINGS = ("examples", "uniform")


def check_weighting(weighting: str) -> str:
    """The ``weighting`` option every strategy takes: by training examples (FedAvg) or equal."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r} must be one of {WEIGHTINGS}")
    return weighting


def client_weights(updates: Sequence[ClientUpdate], weighting: str) -> list[float]:
    """Each update's weight: its number of training examples, or 1 for ``uniform``."""
    return [float(u.num_examples) if weighting == "examples" else 1.0 for u in updates]


def client_scalings(updates: Sequence[ClientUpdate]) -> list[float]:
    """Each update's LoRA scaling s_k = α / r_k, as its client reported it (mixed-rank methods need it)."""
    missing = [u.node_id for u in updates if protocol.LORA_SCALING not in u.metrics]
    if missing:
        raise AggregationError(f"clients {missing} did not report {protocol.LORA_SCALING}")
    return [float(u.metrics[protocol.LORA_SCALING]) for u in updates]



def lora_modules(tensors: Mapping[str, torch.Tensor], *, strict: bool = True) -> list[str]:
    """Names of the LoRA-adapted modules (``X`` for each ``X.lora_A.weight``/``X.lora_B.weight`` pair).

    With ``strict``, a factor without its partner is an error; otherwise it is left out.
    """
    unpaired = protocol.unpaired_lora_modules(tensors)
    if unpaired and strict:
        raise AggregationError(f"LoRA tensors without their partner for modules {unpaired[:3]}")
    return protocol.lora_modules(tensors)


def is_lora_key(key: str) -> bool:
    return key.endswith(LORA_A) or key.endswith(LORA_B)


Stack = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A_stack, B_stack)


def stack_factors(tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], scalings: Sequence[float],
                  dtype: torch.dtype = torch.float32, modules: Sequence[str] | None = None) -> Stack:
    """Stack client factors so that B_stack @ A_stack = Σ_k p_k·s_k·B_k·A_k.

    Parameters
    ----------
    tensors : sequence of dict
        Each client's adapter tensors (``X.lora_A.weight`` of shape r_k×n and
        ``X.lora_B.weight`` of shape m×r_k for every module X); ranks may differ.
    weights : sequence of float
        Non-negative client weights (normalised to p_k).
    scalings : sequence of float
        Each client's LoRA scaling s_k = α_k / r_k, folded into its rows of A.

    dtype : torch.dtype
        The stacks' dtype (products are formed in float64 first).
    modules : sequence of str, optional
        Stack only these modules (all by default); one at a time keeps memory to one module's stack.

    Returns
    -------
    dict
        Per module, ``(A_stack, B_stack)`` with Σ_k r_k rows / columns.
    """
    probs = normalized_weights(weights)
    modules = lora_modules(tensors[0]) if modules is None else modules
    stack = {}
    for module in modules:
        a_parts, b_parts = [], []
        for k, (p, s, t) in enumerate(zip(probs, scalings, tensors)):
            if module + LORA_A not in t:
                raise AggregationError(f"client {k} has no LoRA factors for {module}")
            a, b = t[module + LORA_A].to(torch.float64), t[module + LORA_B].to(torch.float64)
            if a.shape[0] != b.shape[1]:
                raise AggregationError(f"client {k}, {module}: A {tuple(a.shape)} and B {tuple(b.shape)} differ in rank")
            a_parts.append((p * s) * a)
            b_parts.append(b)
        stack[module] = (torch.cat(a_parts, dim=0).to(dtype), torch.cat(b_parts, dim=1).to(dtype))
    return stack


def truncated_svd(a_stack: torch.Tensor, b_stack: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-``rank`` SVD of B_stack @ A_stack, from the factors: never an m×n matrix.

    With B_stack (m×R) = Q_b·R_b and A_stackᵀ (n×R) = Q_a·R_a (Householder QR), the product
    is Q_b·(R_b·R_aᵀ)·Q_aᵀ, so the SVD of the small core gives it (Halko, Martinsson and
    Tropp 2011, section 5). Q_b and Q_a are never formed: their reflectors are applied to
    the kept singular vectors only (LAPACK's ormqr). O((m + n)·R²) time, O((m + n)·R)
    memory, in float64.

    Returns
    -------
    u, s, vh : Tensor
        m×k, k and k×n with k = min(rank, R, m, n); singular values in decreasing order.
    """
    b_reflectors, b_tau = torch.geqrf(b_stack.to(torch.float64))
    a_reflectors, a_tau = torch.geqrf(a_stack.to(torch.float64).T.contiguous())
    r_b = b_reflectors[: b_tau.shape[0]].triu()
    r_a = a_reflectors[: a_tau.shape[0]].triu()
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.shape[0])
    u = _apply_q(b_reflectors, b_tau, u_core[:, :k])
    v = _apply_q(a_reflectors, a_tau, vh_core[:k].T)
    return u, s[:k], v.T


def truncated_product(a_stack: torch.Tensor, b_stack: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factors b (m×k) and a (k×n) with b·a the top-``rank`` truncation of B_stack @ A_stack.

    As :func:`truncated_svd`, through the SVD U_c·S·V_cᵀ of the core R_b·R_aᵀ, but neither Q
    is applied: b = U·S = B_stack·R_aᵀ·V_c and a = Vᵀ = S⁻¹·U_cᵀ·R_b·A_stack, two small
    GEMMs after two QRs that form only R. Rows of a whose singular value is zero to float64
    precision (s ≤ s₁·max(m, n, R)·ε) are zero, as are the matching columns of b.

    Returns
    -------
    b, a, s : Tensor
        m×k, k×n and every singular value of the product (decreasing), float64.
    """
    b_stack, a_stack = b_stack.to(torch.float64), a_stack.to(torch.float64)
    r_b = torch.linalg.qr(b_stack, mode="r").R
    r_a = torch.linalg.qr(a_stack.T, mode="r").R
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T)
    k = min(rank, s.shape[0])
    tolerance = float(s[0]) * max(*b_stack.shape, a_stack.shape[1]) * torch.finfo(torch.float64).eps if k else 0.0
    kept = (s[:k] > tolerance).to(torch.float64)
    b = (b_stack @ (r_a.T @ vh_core[:k].T)) * kept
    a = (kept / s[:k].clamp_min(tolerance or 1.0))[:, None] * (u_core[:, :k].T @ r_b) @ a_stack
    return b, a, s


def _apply_q(reflectors: torch.Tensor, tau: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """Q·[small; 0] for the Q of a Householder QR (``torch.geqrf``), without forming Q."""
    padded = small.new_zeros(reflectors.shape[0], small.shape[1])
    padded[: small.shape[0]] = small
    return torch.ormqr(reflectors, tau, padded)


def average_non_lora(
    tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Weighted average of the tensors that are not LoRA factors (e.g. a task head)."""
    rest = [{k: v for k, v in t.items() if not is_lora_key(k)} for t in tensors]
    return weighted_average(rest, weights) if rest and rest[0] else {}


Term = tuple[float, torch.Tensor, torch.Tensor]  # (c, B, A): the low-rank matrix c·B·A


def low_rank_norm(terms: Sequence[Term]) -> float:
    """‖Σ_i c_i·B_i·A_i‖_F from the factors, never an m×n matrix (float64).

    With B = [c_1·B_1, …] (m×R) = Q_b·R_b and Aᵀ = [A_1; …]ᵀ (n×R) = Q_a·R_a (thin QRs),
    ‖B·A‖_F = ‖R_b·R_aᵀ‖_F since Q_b and Q_a have orthonormal columns: O((m + n)·R) memory,
    O((m + n)·R²) time. The QR is backward stable, so a difference of nearly equal terms (an
    exact method's error) is not lost to cancellation, as it would be in a sum of Gram products.
    """
    return prefix_norms(terms, [len(terms)])[0]


def gram_norm(terms: Sequence[Term]) -> float:
    """‖Σ_i c_i·B_i·A_i‖_F from Gram matrices: ‖B·A‖² = ⟨BᵀB, A·Aᵀ⟩ (two GEMMs, float64).

    About twice as fast as :func:`low_rank_norm`'s QRs, and as accurate for a sum whose terms
    do not cancel (clients' updates); use :func:`low_rank_norm` for a difference of nearly
    equal terms, where the Gram products would lose the result to cancellation.
    """
    return stacked_gram_norm(*stacked_terms(terms))


def stacked_gram_norm(b: torch.Tensor, a: torch.Tensor) -> float:
    """‖B·A‖_F = ⟨BᵀB, A·Aᵀ⟩^½ for stacked factors (:func:`stacked_terms`); see :func:`gram_norm`."""
    return max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0) ** 0.5


def prefix_norms(terms: Sequence[Term], heads: Sequence[int]) -> list[float]:
    """‖Σ_{i<h} c_i·B_i·A_i‖_F for each h in ``heads``, from one pair of QRs of all the factors.

    The R factor of a matrix's first columns is the leading block of the R factor of the whole
    (the first columns of a QR are a QR of those columns), so one factorisation serves every
    prefix of the terms.
    """
    b, a = stacked_terms(terms)
    r_b = torch.linalg.qr(b, mode="r").R  # min(m, R)×R, upper triangular; Q is never formed
    r_a = torch.linalg.qr(a.T, mode="r").R  # min(n, R)×R
    ends = [0, *(int(bt.shape[1]) for _, bt, _ in terms)]
    columns = [sum(ends[: h + 1]) for h in heads]
    return [float(torch.linalg.matrix_norm(r_b[:, :c] @ r_a[:, :c].T)) for c in columns]


def stacked_terms(terms: Sequence[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    """[c_1·B_1, c_2·B_2, …] (m×R) and [A_1; A_2; …] (R×n) in float64: B·A = Σ_i c_i·B_i·A_i."""
    b = torch.cat([c * bt.to(torch.float64) for c, bt, _ in terms], dim=1)
    a = torch.cat([at.to(torch.float64) for _, _, at in terms], dim=0)
    return b, a


def relative_to(squared: float, reference_squared: float) -> float:
    """√(squared / reference_squared): 0 when both are zero, inf when only the reference is."""
    if reference_squared == 0.0:
        return 0.0 if squared == 0.0 else float("inf")
    return (squared / reference_squared) ** 0.5


def factored_relative_error(ideal: Mapping[str, Sequence[Term]], got: Mapping[str, Sequence[Term]]) -> float:
    """‖got − ideal‖_F / ‖ideal‖_F over all modules, each side a sum of low-rank terms c·B·A.

    One module at a time, through :func:`prefix_norms`, so memory is O((m + n)·R) for the
    largest module, never m×n. 0 when the ideal is zero and got equals it, inf when only the
    ideal is zero.
    """
    num = den = 0.0
    for module, ideal_terms in ideal.items():
        got_terms = [(-c, b, a) for c, b, a in got[module]]
        heads = [len(ideal_terms), len(ideal_terms) + len(got_terms)]
        ideal_norm, difference = prefix_norms([*ideal_terms, *got_terms], heads)
        num += difference ** 2
        den += ideal_norm ** 2
    return relative_to(num, den)


def ideal_terms(tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                scalings: Sequence[float], modules: Sequence[str] | None = None) -> dict[str, list[Term]]:
    """Σ_k p_k·s_k·B_k·A_k per module as its terms, for :func:`factored_relative_error`."""
    probs = normalized_weights(weights)
    modules = lora_modules(tensors[0]) if modules is None else modules
    return {m: [(p * s, t[m + LORA_B], t[m + LORA_A]) for p, s, t in zip(probs, scalings, tensors)] for m in modules}


def factor_average_error(
    tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], averaged: Mapping[str, torch.Tensor]
) -> float:
    """‖B̄Ā − Σ p_k B_k A_k‖ / ‖Σ p_k B_k A_k‖: how far averaging the factors is from the ideal.

    Every client has the same scaling here, so it cancels in the ratio. NaN when the
    tensors hold no complete A/B pair. Computed from the factors, one module at a time
    (:func:`factored_relative_error`).
    """
    modules = lora_modules(averaged, strict=False)
    if not modules:
        return float("nan")  # nothing to measure: no complete A/B pair
    ideal = ideal_terms(tensors, weights, [1.0] * len(tensors), modules)
    got = {m: [(1.0, averaged[m + LORA_B], averaged[m + LORA_A])] for m in modules}
    return factored_relative_error(ideal, got)
