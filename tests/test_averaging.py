"""fedtune.averaging: robust rules and server optimizers against hand-worked cases and dense references."""

from __future__ import annotations

import math

import pytest
import torch
from fedtune.strategies import FedIT

from fedtune.averaging import Averaging, average, averaging_in_effect, build_averaging
from fedtune.averaging.robust import (
    RobustRule,
    coordinate_median,
    factor_deviation,
    krum_select,
    pairwise_sq_distances,
    trimmed_mean,
)
from fedtune.averaging.server_optimizers import ServerOptimizer
from fedtune.config import load_config
from fedtune.errors import AggregationError, ConfigError
from fedtune.strategy import ClientUpdate, strategy_problems
from tests.strategies.test_exact_strategies import spec, updates

A, B = "m.lora_A.weight", "m.lora_B.weight"


def scalars(*values: float) -> list[dict[str, torch.Tensor]]:
    return [{"x": torch.tensor([v], dtype=torch.float64)} for v in values]


def lora_clients(n: int, seed: int = 0, m: int = 6, r: int = 2, k: int = 5) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{A: torch.randn(r, k, generator=g, dtype=torch.float64), B: torch.randn(m, r, generator=g, dtype=torch.float64),
             "head": torch.randn(3, generator=g, dtype=torch.float64)} for _ in range(n)]


# --------------------------------------------------------------------------- robust rules


def test_median_by_hand_odd_and_even() -> None:
    assert coordinate_median(scalars(5, 1, 100))["x"].item() == 5
    assert coordinate_median(scalars(4, 1, 100, 2))["x"].item() == 3  # (2 + 4) / 2


def test_trimmed_mean_by_hand() -> None:
    assert trimmed_mean(scalars(1, 2, 3, 4, 1000), 1)["x"].item() == 3  # (2 + 3 + 4) / 3
    assert trimmed_mean(scalars(1, 2, 3, 4, 1000), 0)["x"].item() == 202
    with pytest.raises(AggregationError, match="leaves none"):
        trimmed_mean(scalars(1, 2), 1)


def test_rules_work_per_coordinate_and_keep_the_dtype() -> None:
    tensors = [{"w": torch.tensor([[1.0, 9.0], [0.0, 5.0]])}, {"w": torch.tensor([[2.0, 7.0], [-3.0, 5.0]])},
               {"w": torch.tensor([[3.0, 8.0], [30.0, 5.0]])}]
    median = coordinate_median(tensors)["w"]
    assert median.dtype == torch.float32 and median.tolist() == [[2.0, 8.0], [0.0, 5.0]]


def test_krum_distances_from_the_factors_equal_the_dense_distances() -> None:
    clients = lora_clients(5)
    got = pairwise_sq_distances(clients)
    dense = [torch.cat([(c[B] @ c[A]).flatten(), c["head"]]) for c in clients]
    want = torch.stack([torch.stack([(x - y).square().sum() for y in dense]) for x in dense])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_krum_scores_by_hand() -> None:
    # Points 0, 1, 2 on a line and 10 far off; n = 4, f = 1 -> each scores its n - f - 2 = 1 nearest.
    clients = scalars(0, 1, 2, 10)
    distances = pairwise_sq_distances(clients)
    assert distances[0].tolist() == [0, 1, 4, 100]
    assert krum_select(distances, byzantine=1, keep=1) == [0]  # scores 1, 1, 1, 64: ties go to the earlier
    assert krum_select(distances, byzantine=1, keep=3) == [0, 1, 2]


def test_multi_krum_leaves_out_the_scaled_attackers_and_averages_the_rest_by_weight() -> None:
    honest = lora_clients(6, seed=1)
    attackers = [{k: -10 * v for k, v in c.items()} for c in lora_clients(2, seed=2)]
    clients = honest[:3] + attackers + honest[3:]
    weights = [1.0, 2.0, 3.0, 1.0, 1.0, 4.0, 5.0, 6.0]
    combined, kept = RobustRule("multi-krum", byzantine=2, select=6).combine(clients, weights)
    assert kept == [0, 1, 2, 5, 6, 7]
    total = sum(weights[i] for i in kept)
    for key in combined:
        want = sum(weights[i] * clients[i][key] for i in kept) / total
        torch.testing.assert_close(combined[key], want)


def test_factor_deviation_is_zero_for_identical_clients_and_matches_a_dense_median() -> None:
    same = lora_clients(1) * 3
    rule = RobustRule("median")
    assert factor_deviation(rule, same, coordinate_median(same)) == pytest.approx(0.0, abs=1e-12)
    clients = lora_clients(3, seed=4)
    combined = coordinate_median(clients)
    products = torch.stack([c[B] @ c[A] for c in clients])
    reference = products.median(dim=0).values  # odd n: the middle value
    want = float((combined[B] @ combined[A] - reference).norm() / reference.norm())
    assert factor_deviation(rule, clients, combined) == pytest.approx(want, rel=1e-12)
    assert want > 0.05  # the median of factors is not the median of products
    assert factor_deviation(RobustRule("krum"), clients, combined) is None


# --------------------------------------------------------------------------- server optimizers


def test_fedavgm_without_momentum_at_rate_one_is_plain_averaging() -> None:
    opt = ServerOptimizer("fedavgm", lr=1.0, momentum=0.0)
    previous = {"x": torch.tensor([1.0, -2.0])}
    combined = {"x": torch.tensor([1.5, 0.25])}
    assert torch.equal(opt.step(previous, combined)["x"], combined["x"])


def test_fedavgm_by_hand() -> None:
    opt = ServerOptimizer("fedavgm", lr=0.5, momentum=0.9)
    x = {"x": torch.tensor([0.0], dtype=torch.float64)}
    x = opt.step(x, {"x": x["x"] + 1.0})  # m = 1, x = 0.5
    assert x["x"].item() == 0.5
    x = opt.step(x, {"x": x["x"] + 2.0})  # m = 0.9 + 2 = 2.9, x = 0.5 + 1.45
    assert x["x"].item() == pytest.approx(1.95, abs=1e-15)


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_adaptive_optimizers_by_hand_over_two_rounds(name: str) -> None:
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    opt = ServerOptimizer(name, lr=eta, momentum=b1, beta2=b2, tau=tau)
    x, m, v = 0.0, 0.0, tau ** 2
    state = {"x": torch.tensor([x], dtype=torch.float64)}
    for delta in (0.5, -0.2):
        m = b1 * m + (1 - b1) * delta
        if name == "fedadagrad":
            v = v + delta ** 2
        elif name == "fedadam":
            v = b2 * v + (1 - b2) * delta ** 2
        else:
            v = v - (1 - b2) * delta ** 2 * math.copysign(1.0, v - delta ** 2)
        x = x + eta * m / (math.sqrt(v) + tau)
        state = opt.step(state, {"x": state["x"] + delta})
        assert state["x"].item() == pytest.approx(x, rel=1e-12)
    assert opt.steps == 2


def test_yogi_grows_v_more_slowly_than_adam_after_a_large_step() -> None:
    deltas = [1.0, 0.01, 0.01]
    finals = {}
    for name in ("fedadam", "fedyogi"):
        opt, state = ServerOptimizer(name, lr=0.1), {"x": torch.zeros(1, dtype=torch.float64)}
        for d in deltas:
            state = opt.step(state, {"x": state["x"] + d})
        finals[name] = opt.v["x"].item()
    assert finals["fedyogi"] > finals["fedadam"]  # Yogi's v decays additively, Adam's multiplicatively


def test_an_optimizer_restored_from_its_state_continues_bit_for_bit() -> None:
    g = torch.Generator().manual_seed(0)
    steps = [{"x": torch.randn(4, generator=g)} for _ in range(4)]
    a = ServerOptimizer("fedadam", lr=0.05)
    xa = {"x": torch.zeros(4)}
    for s in steps[:2]:
        xa = a.step(xa, {"x": xa["x"] + s["x"]})
    b = ServerOptimizer("fedadam", lr=0.05)
    b.load_state_dict(a.state_dict())
    xb = {"x": xa["x"].clone()}
    for s in steps[2:]:
        xa = a.step(xa, {"x": xa["x"] + s["x"]})
        xb = b.step(xb, {"x": xb["x"] + s["x"]})
    assert torch.equal(xa["x"], xb["x"])


# --------------------------------------------------------------------------- in a strategy


def fedit_round(averaging: Averaging | None, clients: list[dict[str, torch.Tensor]]) -> FedIT:
    strategy = FedIT()
    strategy.initialize(spec())
    ups = [ClientUpdate(node_id=i, arrays=c, num_examples=i + 1) for i, c in enumerate(clients)]
    if averaging is None:
        strategy.aggregate(1, ups)
    else:
        with averaging_in_effect(averaging, list(range(len(ups)))):
            strategy.aggregate(1, ups)
    return strategy


def test_fedit_averages_through_the_rule_in_effect_and_plainly_outside_a_run() -> None:
    clients = [u.arrays for u in updates([4, 4, 4], [1, 2, 3], seed=3)]
    plain = fedit_round(None, clients).global_adapter()
    mean = fedit_round(build_averaging(), clients).global_adapter()
    median = fedit_round(build_averaging("median"), clients).global_adapter()
    want = coordinate_median(clients)
    assert all(torch.equal(plain[k], mean[k]) for k in plain)
    assert all(torch.equal(median[k], want[k]) for k in want)


def test_a_server_optimizer_steps_from_the_previous_global_state() -> None:
    clients = [u.arrays for u in updates([4, 4], [1, 1], seed=5)]
    strategy = FedIT()
    strategy.initialize(spec())
    before = strategy.global_adapter()
    averaging = build_averaging(optimizer="fedavgm", lr=2.0, momentum=0.0)
    ups = [ClientUpdate(node_id=i, arrays=c, num_examples=1) for i, c in enumerate(clients)]
    with averaging_in_effect(averaging, [0, 1]):
        metrics = strategy.aggregate(1, ups)
    after = strategy.global_adapter()
    for key in after:  # η = 2: twice the mean's step
        torch.testing.assert_close(after[key], before[key] + 2 * ((clients[0][key] + clients[1][key]) / 2 - before[key]))
    assert "aggregation_error" in metrics and averaging.metrics["server_step_norm"] > 0


def test_averaging_twice_in_one_aggregation_or_without_the_previous_value_is_an_error() -> None:
    clients = scalars(1, 2)
    with averaging_in_effect(build_averaging("median"), [0, 1]):
        average(clients, [1, 1])
        with pytest.raises(AggregationError, match="called twice"):
            average(clients, [1, 1])
    with averaging_in_effect(build_averaging(optimizer="fedadam"), [0, 1]):
        with pytest.raises(AggregationError, match="needs the previous global tensors"):
            average(clients, [1, 1])


# --------------------------------------------------------------------------- configuration


def test_methods_that_do_not_average_refuse_robust_rules_and_server_optimizers_with_the_reason() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["strategy.name=flora", "strategy.server_optimizer.name=fedadam",
                           "strategy.robust.rule=median"])
    [problem] = err.value.problems
    assert "strategy.robust.rule='median' and strategy.server_optimizer.name='fedadam' are for strategies" in problem
    assert "stacks every client's factors" in problem and "'fed-sb', 'fedit', 'fedsa-lora', 'ffa-lora'" in problem
    cfg = load_config(None, ["strategy.name=ffa-lora", "strategy.server_optimizer.name=fedyogi"])
    assert strategy_problems(cfg) == []


def test_krum_needs_2f_plus_3_clients_a_round() -> None:
    with pytest.raises(ConfigError, match="needs at least 2f \\+ 3 = 7 clients a round; this run draws 6"):
        load_config(None, ["strategy.robust.rule=krum", "strategy.robust.byzantine=2", "federation.num_clients=6"])


def test_bad_averaging_settings_are_reported_together() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["strategy.robust.rule=mode", "strategy.robust.trim=0.5",
                           "strategy.server_optimizer.name=sgd", "strategy.server_optimizer.tau=0"])
    text = str(err.value)
    for part in ("strategy.robust.rule='mode'", "strategy.robust.trim=0.5", "strategy.server_optimizer.name='sgd'",
                 "strategy.server_optimizer.tau=0"):
        assert part in text
