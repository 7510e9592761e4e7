"""LoRA-FAIR from the factors against the dense m×n computation it replaced.

The dense reference (``dense_reference.py``) is the former implementation: ΔW = Σ p_k·B_k·A_k formed in
float64 and the cosine taken entry by entry. The factored objective, its gradient, the ΔB
that Adam finds and the metrics must agree with it on small shapes.
"""

from __future__ import annotations

import pytest
import torch
from fedtune.strategies.lora_fair import IdealProjection, LoRAFAIR, residual_correction

from fedtune.strategy import AdapterSpec, ClientUpdate
from tests.strategies.dense_reference import dense_cosine_distance, dense_residual_correction

# (m, n, r, clients)
SHAPES = [(12, 10, 4, 3), (40, 24, 8, 4), (7, 30, 3, 2), (16, 5, 8, 5)]


def clients(m: int, n: int, r: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    probs = (weights / weights.sum()).tolist()
    factors = [(torch.randn(m, r, generator=gen, dtype=torch.float64) * 0.1,
                torch.randn(r, n, generator=gen, dtype=torch.float64)) for _ in range(k)]
    terms = [(p, b, a) for p, (b, a) in zip(probs, factors)]
    b_avg = sum(p * b for p, b, _ in terms)
    a_avg = sum(p * a for p, _, a in terms)
    ideal = sum(p * b @ a for p, b, a in terms)
    return terms, b_avg, a_avg, ideal


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("m,n,r,k", SHAPES)
def test_objective_and_gradient_equal_the_dense_ones(m: int, n: int, r: int, k: int) -> None:
    terms, b_avg, a_avg, ideal = clients(m, n, r, k, seed=m + n)
    target = IdealProjection.of(terms, b_avg, a_avg)
    assert target.norm == pytest.approx(float(ideal.norm()), rel=1e-12)
    x = (b_avg + 0.05 * torch.randn(m, r, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    values, grads = [], []
    for cosine in (lambda x: target.cosine_distance(x), lambda x: dense_cosine_distance(ideal, x @ a_avg)):
        x_ = x.clone().requires_grad_(True)
        value = cosine(x_) + 0.01 * x_.norm()
        value.backward()
        values.append(float(value.detach()))
        grads.append(x_.grad)
    assert values[0] == pytest.approx(values[1], rel=1e-10)
    assert rel(grads[0], grads[1]) <= 1e-10
    assert target.fedit_distance == pytest.approx(float((ideal - b_avg @ a_avg).norm()), rel=1e-12)
    delta = (x - b_avg).requires_grad_(True)  # the optimiser's closed form against autograd on the dense cosine
    want = dense_cosine_distance(ideal, (b_avg + delta) @ a_avg) + 0.01 * delta.norm()
    want.backward()
    value, grad = target.objective(delta.detach(), 0.01)
    assert value == pytest.approx(float(want.detach()), rel=1e-12)
    assert rel(grad, delta.grad) <= 1e-10
    assert target.distance(x) == pytest.approx(float((ideal - x @ a_avg).norm()), rel=1e-12)


@pytest.mark.parametrize("m,n,r,k", SHAPES)
@pytest.mark.parametrize("lam", [0.0, 0.01])
def test_the_correction_equals_the_dense_one(m: int, n: int, r: int, k: int, lam: float) -> None:
    terms, b_avg, a_avg, ideal = clients(m, n, r, k, seed=3 * m + n)
    got = residual_correction(IdealProjection.of(terms, b_avg, a_avg), lam=lam, steps=50, lr=0.05)
    want = dense_residual_correction(ideal, b_avg, a_avg, lam=lam, steps=50, lr=0.05)
    assert float(want.norm()) > 0
    assert rel(got, want) <= 1e-12


def test_a_zero_b_average_is_left_as_the_dense_version_leaves_it() -> None:
    # At B̄ = 0 the cosine's gradient is ~1e300 (its denominator is clamped at 1e-300), so
    # Adam's second moment overflows and both versions stay at ΔB = 0.
    terms, _, a_avg, ideal = clients(12, 10, 4, 3, seed=5)
    b_avg = torch.zeros(12, 4, dtype=torch.float64)
    got = residual_correction(IdealProjection.of(terms, b_avg, a_avg), lam=0.01, steps=20, lr=0.05)
    want = dense_residual_correction(ideal, b_avg, a_avg, lam=0.01, steps=20, lr=0.05)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- the strategy's metrics


MODULES = ("layer0.q", "layer1.v")


def adapter_updates(m: int, n: int, r: int, k: int, seed: int) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(k):
        arrays = {"head.weight": torch.randn(3, 4, generator=gen)}
        for module in MODULES:
            arrays[f"{module}.lora_A.weight"] = torch.randn(r, n, generator=gen)
            arrays[f"{module}.lora_B.weight"] = torch.randn(m, r, generator=gen) * 0.1
        out.append(ClientUpdate(node_id=i, arrays=arrays, num_examples=10 * (i + 1), metrics={}))
    return out


def dense_metrics(updates: list[ClientUpdate]) -> dict[str, float]:
    """The former LoRAFAIR.aggregate's metrics, every product formed as an m×n matrix."""
    total = sum(u.num_examples for u in updates)
    probs = [u.num_examples / total for u in updates]
    squares = {"ideal": 0.0, "fedit": 0.0, "fair": 0.0}
    cos_fedit = cos_fair = 0.0
    for module in MODULES:
        a_avg, b_avg = (sum(p * u.arrays[f"{module}.lora_{f}.weight"].double() for p, u in zip(probs, updates))
                        .float().double() for f in "AB")  # the strategy averages, then casts to float32
        ideal = sum(p * u.arrays[f"{module}.lora_B.weight"].double() @ u.arrays[f"{module}.lora_A.weight"].double()
                    for p, u in zip(probs, updates))
        corrected = b_avg + dense_residual_correction(ideal, b_avg, a_avg, lam=0.01, steps=50, lr=0.05)
        fedit, fair = b_avg @ a_avg, corrected @ a_avg
        squares["ideal"] += float(ideal.pow(2).sum())
        squares["fedit"] += float((fedit - ideal).pow(2).sum())
        squares["fair"] += float((fair - ideal).pow(2).sum())
        cos_fedit += float(dense_cosine_distance(ideal, fedit))
        cos_fair += float(dense_cosine_distance(ideal, fair))
    error_fedit = (squares["fedit"] / squares["ideal"]) ** 0.5
    error_fair = (squares["fair"] / squares["ideal"]) ** 0.5
    return {"aggregation_error": error_fair, "fedit_aggregation_error": error_fedit,
            "error_removed": 1.0 - error_fair / error_fedit,
            "cosine_distance": cos_fair / len(MODULES), "fedit_cosine_distance": cos_fedit / len(MODULES)}


@pytest.mark.parametrize("m,n,r,k", SHAPES)
def test_the_metrics_equal_the_dense_ones(m: int, n: int, r: int, k: int) -> None:
    updates = adapter_updates(m, n, r, k, seed=m * n)
    strategy = LoRAFAIR()
    strategy.initialize(AdapterSpec(initial={key: torch.zeros_like(v) for key, v in updates[0].arrays.items()},
                                    rank=r, alpha=2.0 * r, seed=0))
    got, want = strategy.aggregate(1, updates), dense_metrics(updates)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
