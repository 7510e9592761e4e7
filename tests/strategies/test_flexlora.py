"""FlexLoRA: factored SVD against the dense one, exactness when ranks fit, each client's truncation."""

from __future__ import annotations

import pytest
import torch
from fedtune.strategies.aggregation import truncated_svd
from fedtune.strategies.flexlora import FlexLoRA
from fedtune.strategies.flexlora.routine import client_factors

from fedtune import protocol
from fedtune.config import load_config
from fedtune.strategy import AdapterSpec, ClientUpdate
from tests.strategies.dense_reference import ideal_updates

M, N = 12, 9
MODULE = "layer"
A, B = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight"
# Products of float32 factors, compared in float64: float32 rounding of the stored factors.
TOL = 1e-5


def lora(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(rank, N, generator=g), B: torch.randn(M, rank, generator=g), "head.weight": torch.randn(3, 4, generator=g)}


def strategy(rank: int, alpha: float = 8.0) -> FlexLoRA:
    s = FlexLoRA()
    s.initialize(AdapterSpec(initial={A: torch.randn(rank, N), B: torch.zeros(M, rank), "head.weight": torch.zeros(3, 4)},
                             rank=rank, alpha=alpha))
    return s


def update(cid: int, tensors: dict[str, torch.Tensor], examples: int, alpha: float = 8.0) -> ClientUpdate:
    rank = tensors[A].shape[0]
    return ClientUpdate(cid, tensors, examples, {protocol.LORA_SCALING: alpha / rank, protocol.LORA_RANK: float(rank)})


def dense(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return b.double() @ a.double()


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


@pytest.mark.parametrize("m,n,total", [(12, 9, 5), (7, 30, 7), (40, 6, 10)])
def test_factored_svd_equals_the_dense_svd(m: int, n: int, total: int) -> None:
    g = torch.Generator().manual_seed(m * n)
    a_stack, b_stack = torch.randn(total, n, generator=g, dtype=torch.float64), torch.randn(m, total, generator=g,
                                                                                          dtype=torch.float64)
    for rank in (1, 3, total):
        u, s, vh = truncated_svd(a_stack, b_stack, rank)
        du, ds, dvh = torch.linalg.svd(b_stack @ a_stack)
        k = min(rank, total, m, n)
        assert torch.allclose(s, ds[:k], rtol=1e-10, atol=1e-12)
        assert torch.allclose((u * s) @ vh, (du[:, :k] * ds[:k]) @ dvh[:k], atol=1e-10)  # signs may differ per factor


def test_hand_worked_single_client() -> None:
    """One rank-1 client: B = [1, 0]ᵀ, A = [[2, 0, ...]], s = 2, so ΔW has one singular value 4."""
    s = FlexLoRA()
    s.initialize(AdapterSpec(initial={A: torch.zeros(1, 3), B: torch.zeros(2, 1)}, rank=1, alpha=1.0))
    b = torch.tensor([[1.0], [0.0]])
    a = torch.tensor([[2.0, 0.0, 0.0]])
    metrics = s.aggregate(1, [ClientUpdate(0, {A: a, B: b}, 10, {protocol.LORA_SCALING: 2.0})])
    sent = s.configure_client(2, 0).arrays
    assert torch.allclose(dense(sent[B], sent[A]), torch.tensor([[4.0, 0, 0], [0, 0, 0]], dtype=torch.float64))
    assert abs(float(sent[B].abs().max()) - 4.0) < 1e-6 and abs(float(sent[A].abs().max()) - 1.0) < 1e-6
    assert metrics["truncation_error"] == 0.0


def test_exact_when_the_ranks_fit_in_adapter_rank() -> None:
    """Σ r_k ≤ adapter.rank: the server's B·A is Σ p_k·s_k·B_k·A_k itself."""
    s = strategy(rank=8)
    clients = [lora(2, 1), lora(3, 2), lora(1, 3)]
    examples = [10, 30, 60]
    s.aggregate(1, [update(i, t, e) for i, (t, e) in enumerate(zip(clients, examples))])
    sent = s.configure_client(2, 0).arrays
    ideal = ideal_updates(clients, examples, [8.0 / t[A].shape[0] for t in clients])[MODULE]
    assert rel(dense(sent[B], sent[A]), ideal) < TOL
    glob = s.global_adapter()  # the server's own model, scaled for s = alpha / rank
    assert rel(s.spec.scaling * dense(glob[B], glob[A]), ideal) < TOL
    assert torch.allclose(sent["head.weight"], sum(e * t["head.weight"] for t, e in zip(clients, examples)) / 100,
                          atol=1e-6)


def test_each_client_keeps_its_best_rank_r_approximation() -> None:
    s = strategy(rank=6)
    clients = [lora(4, 5), lora(6, 6), lora(2, 7)]
    s.aggregate(1, [update(i, t, 1) for i, t in enumerate(clients)])
    sent = s.configure_client(2, 0).arrays
    ideal = ideal_updates(clients, [1, 1, 1], [8.0 / t[A].shape[0] for t in clients])[MODULE]
    du, ds, dvh = torch.linalg.svd(ideal)
    for rank in (1, 2, 4, 6):
        mine = client_factors(sent, rank=rank, scaling=8.0 / rank)
        assert mine[A].shape == (rank, N) and mine[B].shape == (M, rank)
        best = (du[:, :rank] * ds[:rank]) @ dvh[:rank]  # Eckart–Young
        assert rel((8.0 / rank) * dense(mine[B], mine[A]), best) < TOL
    # truncation_error: what rank 6 leaves out of the rank-12 aggregate, from the singular values
    metrics = s.aggregate(2, [update(i, t, 1) for i, t in enumerate(clients)])
    expected = float(ds[6:].square().sum().sqrt() / ds.square().sum().sqrt())
    assert abs(metrics["truncation_error"] - expected) < 1e-6 and metrics["aggregate_rank"] == 12


def test_an_aggregate_of_lower_rank_is_padded_with_zero_components() -> None:
    s = strategy(rank=8)
    s.aggregate(1, [update(0, lora(2, 9), 5)])
    sent = s.configure_client(2, 0).arrays
    assert sent[A].shape == (8, N) and sent[B].shape == (M, 8)
    assert torch.count_nonzero(sent[B][:, 2:]) == 0 and torch.count_nonzero(sent[A][2:]) == 0


def test_a_client_of_higher_rank_than_sent_is_refused() -> None:
    with pytest.raises(ValueError, match="carries 4 components but this client trains rank 6; set adapter.rank"):
        client_factors({A: torch.zeros(4, N), B: torch.zeros(M, 4)}, rank=6, scaling=1.0)


def test_config_needs_adapter_rank_at_least_every_client_rank() -> None:
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"adapter.client_ranks=\[4, 16\] has a rank above adapter.rank=8"):
        load_config(None, ["strategy.name=flexlora", "adapter.client_ranks=[4,16]", "adapter.rank=8"])
    load_config(None, ["strategy.name=flexlora", "adapter.client_ranks=[4,16]", "adapter.rank=16"])


def test_the_server_never_holds_a_dense_update() -> None:
    """State after aggregation: factors of adapter.rank only (m×r and r×n), no m×n tensor."""
    s = strategy(rank=4)
    s.aggregate(1, [update(i, lora(4, i), 1) for i in range(3)])
    shapes = {tuple(v.shape) for v in s.state_dict()["_global"].values()}
    assert (M, N) not in shapes and {(M, 4), (4, N)} <= shapes


def test_truncated_product_equals_the_truncated_svd_and_survives_a_rank_deficient_stack() -> None:
    from fedtune.strategies.aggregation import truncated_product

    gen = torch.Generator().manual_seed(4)
    a_part, b_part = torch.randn(3, 9, generator=gen, dtype=torch.float64), torch.randn(11, 3, generator=gen, dtype=torch.float64)
    a_stack = torch.cat([a_part, torch.randn(2, 9, generator=gen, dtype=torch.float64), a_part])
    b_stack = torch.cat([b_part, torch.randn(11, 2, generator=gen, dtype=torch.float64), b_part], dim=1)  # rank 5 of 8
    for rank in (2, 5, 7):
        u, s, vh = truncated_svd(a_stack, b_stack, rank)
        b, a, singular = truncated_product(a_stack, b_stack, rank)
        torch.testing.assert_close(b @ a, (u * s) @ vh, rtol=0, atol=1e-12)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert torch.equal(singular[: s.shape[0]], s) or torch.allclose(singular[: s.shape[0]], s, rtol=1e-14)
    _, a, _ = truncated_product(a_stack, b_stack, 7)
    assert a[5:].abs().max() == 0  # the product has rank 5: the rest are zero rows, not noise divided by ~0
    torch.testing.assert_close(a[:5] @ a[:5].T, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-10)
