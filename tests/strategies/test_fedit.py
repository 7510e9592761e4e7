"""fedtune.strategies.fedit (FedIT) and fedtune.strategies.aggregation (weighted averages in float64)."""

from __future__ import annotations

import pytest
import torch
from fedtune.strategies.aggregation import normalized_weights, weighted_average
from fedtune.strategies.fedit import FedIT

from fedtune.errors import AggregationError
from fedtune.strategy import AdapterSpec, ClientUpdate

A_KEY = "base_model.model.layer.0.query.lora_A.weight"
B_KEY = "base_model.model.layer.0.query.lora_B.weight"


def fedit(initial: dict[str, torch.Tensor], **options: str) -> FedIT:
    strategy = FedIT(**options)
    strategy.initialize(AdapterSpec(initial=initial, rank=2, alpha=4.0))
    return strategy


def update(node_id: int, arrays: dict[str, torch.Tensor], num_examples: int) -> ClientUpdate:
    return ClientUpdate(node_id=node_id, arrays=arrays, num_examples=num_examples)


def two_by_two(values: list[list[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


# --------------------------------------------------------------------------- hand-worked


def test_hand_worked_weighted_average() -> None:
    initial = {A_KEY: torch.zeros(2, 2), B_KEY: torch.zeros(2, 2)}
    strategy = fedit(initial)
    u1 = update(0, {A_KEY: two_by_two([[1, 2], [3, 4]]), B_KEY: two_by_two([[0, 0], [4, 8]])}, num_examples=1)
    u2 = update(1, {A_KEY: two_by_two([[5, 6], [7, 8]]), B_KEY: two_by_two([[4, -4], [0, 0]])}, num_examples=3)
    metrics = strategy.aggregate(1, [u1, u2])
    result = strategy.global_adapter()
    # (1 * [[1,2],[3,4]] + 3 * [[5,6],[7,8]]) / 4
    assert torch.equal(result[A_KEY], two_by_two([[4, 5], [6, 7]]))
    # (1 * [[0,0],[4,8]] + 3 * [[4,-4],[0,0]]) / 4
    assert torch.equal(result[B_KEY], two_by_two([[3, -3], [1, 2]]))
    assert result[A_KEY].dtype == torch.float32
    # B̄Ā = [[-6,-6],[16,19]]; ideal 1/4·B1A1 + 3/4·B2A2 = 1/4·[[0,0],[28,40]] + 3/4·[[-8,-8],[0,0]]
    # = [[-6,-6],[7,10]]; difference [[0,0],[9,9]]: relative error sqrt(162 / 221).
    assert metrics == {"aggregation_error": pytest.approx((162 / 221) ** 0.5, rel=1e-12)}


def test_uniform_weighting_ignores_example_counts() -> None:
    strategy = fedit({A_KEY: torch.zeros(2, 2)}, weighting="uniform")
    u1 = update(0, {A_KEY: two_by_two([[1, 2], [3, 4]])}, num_examples=1)
    u2 = update(1, {A_KEY: two_by_two([[5, 6], [7, 8]])}, num_examples=3)
    strategy.aggregate(1, [u1, u2])
    # (A1 + A2) / 2, not (A1 + 3 A2) / 4
    assert torch.equal(strategy.global_adapter()[A_KEY], two_by_two([[3, 4], [5, 6]]))
    assert strategy.hyperparameters() == {"weighting": "uniform"}


def test_examples_weighting_is_the_default() -> None:
    assert FedIT().hyperparameters() == {"weighting": "examples"}


def test_unknown_weighting_is_rejected() -> None:
    with pytest.raises(ValueError, match="weighting='median'"):
        FedIT(weighting="median")


def test_fedit_is_registered_by_name() -> None:
    from fedtune.strategy import registered_strategies

    assert registered_strategies()["fedit"] is FedIT


# --------------------------------------------------------------------------- configure_client


def test_configure_client_sends_the_global_adapter_and_trains_everything() -> None:
    initial = {A_KEY: torch.randn(2, 8), B_KEY: torch.zeros(8, 2)}
    strategy = fedit(initial)
    instruction = strategy.configure_client(1, node_id=3)
    assert set(instruction.arrays) == {A_KEY, B_KEY}
    assert torch.equal(instruction.arrays[A_KEY], initial[A_KEY])
    assert instruction.trainable == (".*",)
    assert instruction.expects == {A_KEY: (2, 8), B_KEY: (8, 2)}
    assert instruction.routine == "gradient"


def test_initialize_copies_the_initial_tensors() -> None:
    initial = {A_KEY: torch.ones(2, 2)}
    strategy = fedit(initial)
    initial[A_KEY].add_(5)  # the caller changes its tensors afterwards
    assert torch.equal(strategy.global_adapter()[A_KEY], torch.ones(2, 2))


def test_after_aggregation_clients_receive_the_new_global() -> None:
    strategy = fedit({A_KEY: torch.zeros(2, 2)})
    strategy.aggregate(1, [update(0, {A_KEY: torch.full((2, 2), 7.0)}, 10)])
    assert torch.equal(strategy.configure_client(2, 0).arrays[A_KEY], torch.full((2, 2), 7.0))


# --------------------------------------------------------------------------- edge cases


def test_one_client_returns_exactly_its_tensors() -> None:
    g = torch.Generator().manual_seed(0)
    arrays = {A_KEY: torch.randn(4, 16, generator=g), B_KEY: torch.randn(16, 4, generator=g).to(torch.bfloat16)}
    strategy = fedit({k: torch.zeros_like(v) for k, v in arrays.items()})
    strategy.aggregate(1, [update(0, arrays, num_examples=37)])
    result = strategy.global_adapter()
    for key in arrays:
        assert result[key].dtype == arrays[key].dtype
        assert torch.equal(result[key], arrays[key])


def test_zero_weight_client_has_no_influence() -> None:
    g = torch.Generator().manual_seed(1)
    kept = {A_KEY: torch.randn(3, 5, generator=g)}
    ignored = {A_KEY: torch.randn(3, 5, generator=g) * 1e6}
    strategy = fedit({A_KEY: torch.zeros(3, 5)})
    strategy.aggregate(1, [update(0, kept, 12), update(1, ignored, 0)])
    assert torch.equal(strategy.global_adapter()[A_KEY], kept[A_KEY])


def test_all_zero_weights_are_an_aggregation_error() -> None:
    strategy = fedit({A_KEY: torch.zeros(2, 2)})
    with pytest.raises(AggregationError, match="positive weight"):
        strategy.aggregate(1, [update(0, {A_KEY: torch.ones(2, 2)}, 0), update(1, {A_KEY: torch.ones(2, 2)}, 0)])


def test_negative_weight_is_an_aggregation_error() -> None:
    strategy = fedit({A_KEY: torch.zeros(2, 2)})
    with pytest.raises(AggregationError, match="non-negative"):
        strategy.aggregate(1, [update(0, {A_KEY: torch.ones(2, 2)}, 5), update(1, {A_KEY: torch.ones(2, 2)}, -1)])


def test_no_updates_is_an_aggregation_error() -> None:
    with pytest.raises(AggregationError, match="no updates"):
        fedit({A_KEY: torch.zeros(2, 2)}).aggregate(1, [])


@pytest.mark.parametrize("bad", [[1.0, float("nan")], [1.0, -0.5]])
def test_normalized_weights_rejects_nan_and_negative(bad: list[float]) -> None:
    with pytest.raises(AggregationError):
        normalized_weights(bad)


def test_normalized_weights_sum_to_one() -> None:
    assert normalized_weights([1, 3]) == [0.25, 0.75]


def test_mismatched_keys_are_an_aggregation_error() -> None:
    strategy = fedit({A_KEY: torch.zeros(2, 2), B_KEY: torch.zeros(2, 2)})
    full = {A_KEY: torch.ones(2, 2), B_KEY: torch.ones(2, 2)}
    with pytest.raises(AggregationError, match="different keys") as excinfo:
        strategy.aggregate(1, [update(0, full, 1), update(1, {A_KEY: torch.ones(2, 2)}, 1)])
    assert B_KEY in str(excinfo.value)


def test_mismatched_shapes_are_an_aggregation_error() -> None:
    strategy = fedit({A_KEY: torch.zeros(2, 2)})
    with pytest.raises(AggregationError) as excinfo:
        strategy.aggregate(1, [update(0, {A_KEY: torch.ones(2, 2)}, 1), update(1, {A_KEY: torch.ones(2, 3)}, 1)])
    assert A_KEY in str(excinfo.value) and "(2, 3)" in str(excinfo.value)


def test_weights_and_updates_must_have_the_same_length() -> None:
    with pytest.raises(AggregationError, match="2 updates but 3 weights"):
        weighted_average([{"a": torch.ones(1)}, {"a": torch.ones(1)}], [1, 1, 1])


def test_inputs_are_not_mutated_and_outputs_do_not_alias_them() -> None:
    g = torch.Generator().manual_seed(2)
    inputs = [{A_KEY: torch.randn(4, 4, generator=g, dtype=dtype), B_KEY: torch.randn(4, 4, generator=g, dtype=dtype)}
              for dtype in (torch.float64, torch.float64, torch.float64)]
    before = [{k: v.clone() for k, v in t.items()} for t in inputs]
    strategy = fedit({k: torch.zeros_like(v) for k, v in inputs[0].items()})
    updates = [update(i, t, num_examples=i + 1) for i, t in enumerate(inputs)]
    strategy.aggregate(1, updates)
    for t, b in zip(inputs, before):
        for key in t:
            assert torch.equal(t[key], b[key])
    # One float64 client: the result must still be a new tensor, not the client's own.
    strategy.aggregate(2, updates[:1])
    strategy.global_adapter()[A_KEY].add_(1.0)
    assert torch.equal(inputs[0][A_KEY], before[0][A_KEY])


# --------------------------------------------------------------------------- float64 accumulation


def test_float16_inputs_are_accumulated_in_float64() -> None:
    # Weights 2,1,1 -> p = 0.5, 0.25, 0.25 (exact in binary). The exact average is
    # 0.5 * 2^-12 + 0.25 * 8192 - 0.25 * 8192 = 2^-13, which float16 represents exactly.
    # Accumulating in float16 or float32, 2048 + 2^-13 rounds back to 2048 (float32 keeps
    # only 2^-12 at 2048), so the small term is lost and the result would be 0.
    values = [2.0**-12, 8192.0, -8192.0]
    tensors = [{"w": torch.full((3,), v, dtype=torch.float16)} for v in values]
    out = weighted_average(tensors, [2, 1, 1])["w"]
    assert out.dtype == torch.float16
    assert torch.equal(out, torch.full((3,), 2.0**-13, dtype=torch.float16))
    # The same sum accumulated in float32 loses the term: the case does discriminate.
    acc32 = torch.zeros(3, dtype=torch.float32)
    for p, t in zip([0.5, 0.25, 0.25], tensors):
        acc32 += p * t["w"].to(torch.float32)
    assert torch.equal(acc32, torch.zeros(3))


def test_thousand_float16_inputs_average_like_the_float64_reference() -> None:
    # 1000 clients with equal weights. The fp16 of 1/1000, averaged, must come back exactly:
    # each term is ~1e-6, and summing 1000 of them in float16 drifts by many ulps.
    v = torch.tensor(1 / 1000, dtype=torch.float16)
    same = [{"w": v.expand(8).clone()} for _ in range(1000)]
    assert torch.equal(weighted_average(same, [1.0] * 1000)["w"], v.expand(8))

    g = torch.Generator().manual_seed(0)
    random = [{"w": torch.randn(64, generator=g).to(torch.float16)} for _ in range(1000)]
    out = weighted_average(random, [1.0] * 1000)["w"]
    reference = torch.stack([t["w"] for t in random]).to(torch.float64).mean(0).to(torch.float16)
    # Exact: the float64 error (~1e-16 relative) is far below float16's half ulp (~5e-4 relative),
    # and with this fixed seed no element sits on a float16 rounding tie.
    assert torch.equal(out, reference)
    naive = torch.zeros(64, dtype=torch.float16)
    for t in random:
        naive += t["w"] / 1000
    assert not torch.equal(naive, reference)  # float16 accumulation would fail this test


# --------------------------------------------------------------------------- FedIT's documented inexactness


def lora_pair(g: torch.Generator, rank: int = 4, d_in: int = 16, d_out: int = 12) -> dict[str, torch.Tensor]:
    return {A_KEY: torch.randn(rank, d_in, generator=g, dtype=torch.float64),
            B_KEY: torch.randn(d_out, rank, generator=g, dtype=torch.float64)}


def test_fedit_is_inexact_for_several_clients() -> None:
    g = torch.Generator().manual_seed(3)
    clients = [lora_pair(g) for _ in range(3)]
    examples = [10, 20, 30]
    strategy = fedit({k: torch.zeros_like(v) for k, v in clients[0].items()})
    strategy.aggregate(1, [update(i, c, n) for i, (c, n) in enumerate(zip(clients, examples))])
    glob = strategy.global_adapter()
    product_of_averages = glob[B_KEY] @ glob[A_KEY]
    p = [n / sum(examples) for n in examples]
    average_of_products = sum(pk * c[B_KEY] @ c[A_KEY] for pk, c in zip(p, clients))
    relative_error = (product_of_averages - average_of_products).norm() / average_of_products.norm()
    # Independent random factors: the cross terms p_j p_k B_j A_k do not cancel, so the error is
    # of order one; 1e-3 is far above float64 rounding (~1e-15).
    assert relative_error > 1e-3
    # Sanity: the averaged factors themselves are exact weighted means.
    assert torch.allclose(glob[A_KEY], sum(pk * c[A_KEY] for pk, c in zip(p, clients)), rtol=0, atol=1e-12)


def test_fedit_is_exact_for_one_client() -> None:
    g = torch.Generator().manual_seed(4)
    client = lora_pair(g)
    strategy = fedit({k: torch.zeros_like(v) for k, v in client.items()})
    strategy.aggregate(1, [update(0, client, 50)])
    glob = strategy.global_adapter()
    assert torch.equal(glob[B_KEY] @ glob[A_KEY], client[B_KEY] @ client[A_KEY])


def test_factor_average_error_from_the_factors_equals_the_dense_computation() -> None:
    """The factored metric against the dense one (m×n per module) on small shapes, and at 0."""
    from fedtune.strategies.aggregation import factor_average_error, gram_norm, low_rank_norm

    from tests.strategies.dense_reference import ideal_updates, relative_error

    g = torch.Generator().manual_seed(3)
    clients = []
    for _ in range(3):
        tensors = {}
        for i in range(2):
            tensors[f"m{i}.lora_A.weight"] = torch.randn(3, 7, generator=g)
            tensors[f"m{i}.lora_B.weight"] = torch.randn(9, 3, generator=g)
        clients.append(tensors)
    weights = [1.0, 2.0, 5.0]
    averaged = weighted_average(clients, weights)
    ideal = ideal_updates(clients, weights, [1.0] * 3)
    dense = relative_error(ideal, {f"m{i}": averaged[f"m{i}.lora_B.weight"].double()
                                   @ averaged[f"m{i}.lora_A.weight"].double() for i in range(2)})
    assert abs(factor_average_error(clients, weights, averaged) - dense) < 1e-12 * max(dense, 1.0)
    # One client: the average is exact, and the factored difference is float64 rounding, not cancellation.
    assert factor_average_error(clients[:1], [1.0], clients[0]) < 1e-15
    b, a = torch.randn(9, 3, generator=g, dtype=torch.float64), torch.randn(3, 7, generator=g, dtype=torch.float64)
    assert abs(low_rank_norm([(2.0, b, a)]) - float((2 * b @ a).norm())) < 1e-12 * float((b @ a).norm())
    terms = [(0.5, b, a), (2.0, torch.randn(9, 2, generator=g, dtype=torch.float64),
                           torch.randn(2, 7, generator=g, dtype=torch.float64))]
    dense_sum = sum(c * bt @ at for c, bt, at in terms)
    assert gram_norm(terms) == pytest.approx(float(dense_sum.norm()), rel=1e-12)
