"""Client-level DP (DP-FedAvg): clipping, noise, the fixed denominator, the ledger, and which methods take it."""

from __future__ import annotations

import math

import pytest
import torch

from fedtune.averaging import averaging_in_effect, build_averaging
from fedtune.averaging.client_dp import ClientLevelDP, client_dp_of, noised_update
from fedtune.averaging.mean import update_norm
from fedtune.config import load_config
from fedtune.errors import AggregationError, ConfigError
from tests.test_privacy import gaussian_mechanism_epsilon

PREVIOUS = {"a": torch.tensor([1.0, 1.0], dtype=torch.float64), "b": torch.tensor([0.0], dtype=torch.float64)}


def client(delta_a: list[float], delta_b: float) -> dict[str, torch.Tensor]:
    return {"a": PREVIOUS["a"] + torch.tensor(delta_a, dtype=torch.float64),
            "b": PREVIOUS["b"] + torch.tensor([delta_b], dtype=torch.float64)}


def test_each_update_is_clipped_and_the_sum_divided_by_the_clients_per_round() -> None:
    dp = ClientLevelDP(clip_norm=1.0, noise_multiplier=0.0, clients_per_round=2, sample_rate=1.0, delta=1e-5)
    big, small = client([0.0, 2.0], 0.0), client([0.3, 0.0], 0.4)  # norms 2 (clipped to 1) and 0.5
    out, metrics = dp.combine([big, small], PREVIOUS, server_round=1)
    assert out["a"].tolist() == pytest.approx([1.0 + 0.3 / 2, 1.0 + 1.0 / 2])
    assert out["b"].tolist() == pytest.approx([0.4 / 2])
    assert metrics["dp_clients_clipped"] == 1.0 and metrics["dp_client_epsilon"] == math.inf  # z = 0: no privacy


def test_the_servers_noise_has_std_z_times_s_over_m_and_comes_from_the_seed_and_round() -> None:
    previous = {"w": torch.zeros(40_000, dtype=torch.float64)}
    dp = ClientLevelDP(clip_norm=0.5, noise_multiplier=1.0, clients_per_round=4, sample_rate=0.4, delta=1e-5, seed=3)
    updates = [{"w": torch.zeros(40_000, dtype=torch.float64)}] * 4
    first, _ = dp.combine(updates, previous, server_round=1)
    assert float(first["w"].std()) == pytest.approx(1.0 * 0.5 / 4, rel=0.02)
    again = ClientLevelDP(0.5, 1.0, 4, 0.4, 1e-5, seed=3).combine(updates, previous, server_round=1)[0]
    assert torch.equal(first["w"], again["w"])
    assert not torch.equal(first["w"], dp.combine(updates, previous, server_round=2)[0]["w"])


def test_epsilon_after_rounds_of_every_client_is_the_exact_gaussian_mechanisms() -> None:
    """With every client in every round, r rounds of z are one Gaussian mechanism with μ = √r / z."""
    dp = ClientLevelDP(clip_norm=1.0, noise_multiplier=2.0, clients_per_round=3, sample_rate=1.0, delta=1e-5)
    updates = [client([0.1, 0.0], 0.0)] * 3
    for rnd in range(1, 6):
        _, metrics = dp.combine(updates, PREVIOUS, server_round=rnd)
        exact = gaussian_mechanism_epsilon(1e-5, math.sqrt(rnd) / 2.0)
        assert exact <= metrics["dp_client_epsilon"] <= exact + 1e-4


def test_the_ledger_comes_back_from_the_checkpoint_state() -> None:
    dp = ClientLevelDP(1.0, 1.2, 2, 0.5, 1e-5)
    for rnd in (1, 2, 3):
        dp.combine([client([0.1, 0.0], 0.0)] * 2, PREVIOUS, server_round=rnd)
    restored = ClientLevelDP(1.0, 1.2, 2, 0.5, 1e-5)
    restored.load_state_dict(dp.state_dict())
    assert restored.ledger.steps == 3 and restored.ledger.epsilon() == dp.ledger.epsilon()


def test_clients_that_add_their_own_noise_send_clipped_noisy_updates_the_server_only_averages() -> None:
    sent = {"w": torch.zeros(20_000)}
    trained = {"w": torch.full((20_000,), 0.1)}  # norm 14.1: clipped to 1
    a, b = noised_update(sent, trained, 1.0, 0.5), noised_update(sent, trained, 1.0, 0.5)
    assert float((a["w"] - 1.0 / math.sqrt(20_000)).std()) == pytest.approx(0.5, rel=0.03)
    assert not torch.equal(a["w"], b["w"])  # the OS's randomness: the server cannot regenerate it
    dp = ClientLevelDP(1.0, 0.5, 2, 1.0, 1e-5, noise_on="clients")
    out, metrics = dp.combine([a, b], {"w": sent["w"]}, server_round=1)
    torch.testing.assert_close(out["w"], (a["w"] + b["w"]) / 2)
    assert "dp_clients_clipped" not in metrics


def test_a_strategy_call_goes_through_dp_and_needs_the_previous_value() -> None:
    dp = ClientLevelDP(1.0, 0.0, 2, 1.0, 1e-5)
    averaging = build_averaging(dp=dp)
    with averaging_in_effect(averaging, [0, 1], server_round=1):
        with pytest.raises(AggregationError, match="needs the previous global tensors"):
            averaging([client([0.1, 0.0], 0.0)] * 2, [5.0, 1.0])
    with averaging_in_effect(averaging, [0, 1], server_round=1):
        out = averaging([client([0.2, 0.0], 0.0), client([0.0, 0.0], 0.0)], [5.0, 1.0], PREVIOUS)
    assert out["a"].tolist() == pytest.approx([1.1, 1.0])  # every client weighted alike, whatever its examples
    assert "dp_client_epsilon" in averaging.metrics


def test_the_noise_is_calibrated_to_the_target_over_the_runs_rounds_and_sampling() -> None:
    cfg = load_config(None, ["privacy.enabled=true", "privacy.level=client", "privacy.target_epsilon=4",
                             "federation.num_clients=10", "federation.fraction_train=0.3", "federation.num_rounds=20"])
    dp = client_dp_of(cfg)
    assert dp.clients_per_round == 3 and dp.ledger.sample_rate == pytest.approx(0.3)
    for _ in range(20):
        dp.ledger.step(1)
    assert 3.98 <= dp.ledger.epsilon() <= 4.0


def test_methods_whose_replies_are_not_one_averaged_update_refuse_client_level_dp() -> None:
    for name, reason in (("flora", "stacks every client's factors"), ("fed-sb", "initialisation rounds"),
                         ("fedkseed", "one scalar per seed and step")):
        with pytest.raises(ConfigError, match=f"{reason}.*use one of \\['fedit', 'ffa-lora'\\]"):
            load_config(None, ["privacy.enabled=true", "privacy.level=client", "privacy.noise_multiplier=1",
                               f"strategy.name={name}"])
    with pytest.raises(ConfigError, match="use strategy.robust.rule=mean"):
        load_config(None, ["privacy.enabled=true", "privacy.level=client", "privacy.noise_multiplier=1",
                           "strategy.robust.rule=median"])
    with pytest.raises(ConfigError, match="privacy.level='user' must be one of"):
        load_config(None, ["privacy.level=user"])


def test_update_norm_spans_every_tensor() -> None:
    assert update_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}) == 5.0


def test_example_level_dp_with_a_method_that_is_not_dp_sgd_names_the_methods_that_are() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, ["privacy.enabled=true", "privacy.noise_multiplier=1", "strategy.name=fedkseed"])
    message = "\n".join(excinfo.value.problems)
    able = message.split("use a gradient-trained strategy, one of ", 1)[1].split("]", 1)[0]
    assert "'fedit'" in able and "'fed-sb'" in able and "fedkseed" not in able
