"""fedtune.strategies.fedkseed.strategy: per-seed aggregation, the global history, catch-up and FedKSeed-Pro."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fedtune.strategies.fedkseed.strategy import FedKSeed, FedKSeedPro
from fedtune.strategies.fedkseed.wire import (
    ZEROTH_ORDER_ROUTINE,
    HistoryEntry,
    apply_catch_up,
    decode_round_config,
    encode_steps,
)
from fedtune.strategies.fedkseed.zeroth_order import (
    direction,
    importance_levels,
    probabilities_from_levels,
    replay,
    seed_pool,
    zo_train,
)
from flwr.app import ConfigRecord
from flwr.common import serde

from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.strategy import AdapterSpec, ClientUpdate, build_strategy

A_KEY = "base_model.model.layer.0.query.lora_A.weight"
B_KEY = "base_model.model.layer.0.query.lora_B.weight"
RUN_SEED = 3


def initial_adapter() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {A_KEY: torch.randn(2, 6, generator=generator), B_KEY: torch.zeros(6, 2)}


def strategy(cls: type[FedKSeed] = FedKSeed, **options) -> FedKSeed:
    # A and B both tuned (not the default), so the hand-worked cases cover two tensors.
    options = {"k": 8, "lr": 0.01, "steps": 10, "tune": "adapter", "trainable": [".*"], **options}
    s = cls(**options)
    s.initialize(AdapterSpec(initial=initial_adapter(), rank=2, alpha=4.0, seed=RUN_SEED))
    return s


def reply(node_id: int, history: list[tuple[int, float]], num_examples: int, state_round: int) -> ClientUpdate:
    return ClientUpdate(node_id=node_id, arrays={}, num_examples=num_examples,
                        metrics={**encode_steps(history, state_round=state_round), "train_loss": 1.0})


def raw_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {name: t.detach().contiguous().numpy().tobytes() for name, t in tensors.items()}


# --------------------------------------------------------------------------- hand-worked


def test_hand_worked_aggregation_two_clients_three_seeds_weights_1_and_3() -> None:
    s = strategy()
    s0, s1, s2 = s.pool[0], s.pool[1], s.pool[2]
    # Client 0 (1 example): its scalars summed per seed: s0 -> 1 + 3 = 4, s1 -> 2.
    # Client 1 (3 examples): s1 -> -2, s2 -> 4.
    u0 = reply(0, [(s0, 1.0), (s1, 2.0), (s0, 3.0)], num_examples=1, state_round=0)
    u1 = reply(1, [(s2, 4.0), (s1, -2.0)], num_examples=3, state_round=0)
    metrics = s.aggregate(1, [u0, u1])
    # s0: 1/4 * 4 = 1;  s1: 1/4 * 2 + 3/4 * (-2) = -1;  s2: 3/4 * 4 = 3; in pool order.
    assert s.history == [HistoryEntry(1, s0, 1.0), HistoryEntry(1, s1, -1.0), HistoryEntry(1, s2, 3.0)]
    assert metrics == {"fedkseed_entries": 3.0, "fedkseed_history_length": 3.0,
                       "fedkseed_replies_rejected": 0.0, "fedkseed_skipped_steps": 0.0}
    # The global model is the initial adapter plus the replay of those entries.
    expected = {k: v.clone() for k, v in initial_adapter().items()}
    replay(expected, [(s0, 1.0), (s1, -1.0), (s2, 3.0)], lr=0.01)
    assert raw_bytes(s.global_adapter()) == raw_bytes(expected)


def test_aggregation_does_not_depend_on_the_order_replies_arrive_in() -> None:
    rng = np.random.default_rng(1)
    first, second = strategy(), strategy()
    updates = [reply(c, [(first.pool[int(i)], float(g)) for i, g in zip(rng.integers(0, 8, 10), rng.normal(size=10))],
                     num_examples=int(rng.integers(1, 50)), state_round=0) for c in range(5)]
    first.aggregate(1, updates)
    second.aggregate(1, updates[::-1])
    assert first.history == second.history
    assert raw_bytes(first.global_adapter()) == raw_bytes(second.global_adapter())


def test_uniform_weighting_ignores_example_counts() -> None:
    s = strategy(weighting="uniform")
    s.aggregate(1, [reply(0, [(s.pool[0], 1.0)], 1, 0), reply(1, [(s.pool[0], 3.0)], 3, 0)])
    assert s.history == [HistoryEntry(1, s.pool[0], 2.0)]


def test_seeds_whose_scalars_cancel_leave_no_entry() -> None:
    s = strategy()
    s.aggregate(1, [reply(0, [(s.pool[4], 2.0), (s.pool[4], -2.0), (s.pool[5], 1.0)], 1, 0)])
    assert s.history == [HistoryEntry(1, s.pool[5], 1.0)]


# --------------------------------------------------------------------------- rejected replies


@pytest.mark.parametrize("case, metrics", [
    ("foreign seed", lambda pool: encode_steps([(12345, 1.0)], state_round=0)),
    ("stale state", lambda pool: encode_steps([(pool[0], 1.0)], state_round=3)),
    ("too many steps", lambda pool: encode_steps([(pool[0], 1.0)] * 11, state_round=0)),
    ("no steps record", lambda pool: {"train_loss": 1.0}),
])
def test_a_malformed_reply_is_left_out_and_counted(case, metrics) -> None:
    s = strategy()
    bad = ClientUpdate(node_id=9, arrays={}, num_examples=5, metrics=metrics(s.pool))
    result = s.aggregate(1, [bad, reply(0, [(s.pool[1], 0.5)], 1, 0)])
    assert result["fedkseed_replies_rejected"] == 1.0
    assert s.history == [HistoryEntry(1, s.pool[1], 0.5)]
    assert 9 not in s.last_seen


def test_a_round_with_only_rejected_replies_changes_nothing() -> None:
    s = strategy()
    before = raw_bytes(s.global_adapter())
    result = s.aggregate(1, [ClientUpdate(node_id=0, arrays={}, num_examples=1, metrics={})])
    assert result["fedkseed_entries"] == 0.0 and s.history == []
    assert raw_bytes(s.global_adapter()) == before


# --------------------------------------------------------------------------- catch-up


def linear_client_data(client: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(100 + client)
    x = torch.randn(32, 6, generator=generator)
    y = x @ torch.ones(6, 6) + client
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 32, 8)]


def adapter_loss(params: dict[str, torch.Tensor]):
    def loss_on_batch(batch):
        x, y = batch
        return ((x @ params[A_KEY].T @ params[B_KEY].T + x @ torch.ones(6, 6) * 0.9 - y) ** 2).mean()
    return loss_on_batch


class Client:
    """A client that keeps the global state it last synced to, as the wiring must."""

    def __init__(self, node_id: int) -> None:
        self.node_id = node_id
        self.state = {k: v.clone() for k, v in initial_adapter().items()}
        self.state_round = 0
        self.data = linear_client_data(node_id)

    def train(self, config: dict, server_round: int) -> ClientUpdate:
        # Through a real ConfigRecord, as Flower would carry it.
        wire = serde.config_record_from_proto(serde.config_record_to_proto(ConfigRecord(config)))
        plan = decode_round_config(dict(wire))
        plan.check_fingerprint()
        self.state_round = apply_catch_up(self.state, plan.catch_up, self.state_round, plan.lr)
        working = {k: v.clone() for k, v in self.state.items()}  # the global state stays untouched
        result = zo_train(working, self.data, adapter_loss(working), seed_pool(plan.run_seed, plan.k),
                          plan.probabilities, plan.steps, plan.eps, plan.lr,
                          rng_seed=1000 * server_round + self.node_id)
        metrics = encode_steps(result.history, state_round=self.state_round, skipped=result.skipped)
        return ClientUpdate(node_id=self.node_id, arrays={}, num_examples=32, metrics=metrics)


@pytest.mark.parametrize("cls", [FedKSeed, FedKSeedPro])
def test_a_client_that_skipped_rounds_catches_up_to_the_identical_state(cls: type[FedKSeed]) -> None:
    s = strategy(cls, k=16, steps=12, eps=1e-3, lr=0.002)
    clients = [Client(c) for c in range(3)]
    participants = {1: [0, 1, 2], 2: [0, 1], 3: [0, 1], 4: [0, 2]}  # client 2 misses rounds 2 and 3
    for server_round, ids in participants.items():
        updates = []
        for cid in ids:
            instruction = s.configure_client(server_round, cid)
            assert instruction.arrays == {} and instruction.expects == {}
            assert instruction.routine == ZEROTH_ORDER_ROUTINE
            updates.append(clients[cid].train(dict(instruction.options), server_round))
        if server_round == 4:
            # Before round 4's aggregation both participants hold round 3's global state, bit for bit.
            assert clients[2].state_round == clients[0].state_round == 3
            assert raw_bytes(clients[2].state) == raw_bytes(s.global_adapter()) == raw_bytes(clients[0].state)
        assert s.aggregate(server_round, updates)["fedkseed_replies_rejected"] == 0.0
    assert s.last_seen == {0: 3, 1: 2, 2: 3}
    # Client 1 is two rounds behind; its catch-up brings it to round 4's state too.
    catch_up = s.catch_up(1, server_round=5)
    assert (catch_up.base_round, catch_up.through_round) == (2, 4)
    assert {e.round for e in catch_up.entries} == {3, 4}
    apply_catch_up(clients[1].state, catch_up, clients[1].state_round, s.lr)
    assert raw_bytes(clients[1].state) == raw_bytes(s.global_adapter())
    assert raw_bytes(s.global_adapter()) != raw_bytes(initial_adapter())


def test_an_unseen_client_gets_the_whole_history_up_to_the_previous_round() -> None:
    s = strategy()
    s.aggregate(1, [reply(0, [(s.pool[0], 1.0)], 1, 0)])
    s.aggregate(2, [reply(0, [(s.pool[1], 2.0)], 1, 1)])
    assert s.catch_up(7, server_round=3).entries == tuple(s.history)
    assert s.catch_up(0, server_round=3).entries == (HistoryEntry(2, s.pool[1], 2.0),)
    assert s.catch_up(7, server_round=2).entries == (HistoryEntry(1, s.pool[0], 1.0),)


def test_configure_client_sends_no_arrays_and_only_config_record_values() -> None:
    s = strategy(FedKSeedPro)
    s.aggregate(1, [reply(0, [(s.pool[0], 1.0)], 1, 0)])
    instruction = s.configure_client(2, 5)
    assert instruction.arrays == {}
    record = ConfigRecord(dict(instruction.options))  # raises on anything a ConfigRecord cannot hold
    assert all(not isinstance(v, (torch.Tensor, np.ndarray)) for v in record.values())
    plan = decode_round_config(dict(instruction.options))
    assert (plan.run_seed, plan.k, plan.steps) == (RUN_SEED, 8, 10)
    assert plan.probabilities == pytest.approx(s.sampling_probabilities())
    assert plan.catch_up.entries == (HistoryEntry(1, s.pool[0], 1.0),)


# --------------------------------------------------------------------------- FedKSeed-Pro


def test_pro_probabilities_sum_to_one_and_favour_larger_scalars() -> None:
    s = strategy(FedKSeedPro)
    assert s.sampling_probabilities() is None and s.probability_spread() == 1.0  # no history: uniform
    s0, s1, s2 = s.pool[0], s.pool[1], s.pool[2]
    s.aggregate(1, [reply(0, [(s0, 1.0), (s1, 2.0), (s0, 3.0)], 1, 0), reply(1, [(s2, 4.0), (s1, -2.0)], 3, 0)])
    p = s.sampling_probabilities()
    assert len(p) == 8 and math.fsum(p) == pytest.approx(1.0, abs=1e-12)
    # Mean |g| with the reference code's initial 0.0: s0 (0+1+3)/3, s1 (0+2+2)/3, s2 (0+4)/2, others 0.
    # Min-max: s2 -> 1, s0 = s1 -> 2/3, others -> 0; then softmax.
    z = math.exp(1) + 2 * math.exp(2 / 3) + 5
    assert p[2] == pytest.approx(math.e / z) and p[0] == p[1] == pytest.approx(math.exp(2 / 3) / z)
    assert p[2] > p[0] > p[3] and p[3] == pytest.approx(1 / z)
    assert s.probability_spread() == pytest.approx(math.e)


def test_pro_clips_magnitudes_so_one_spike_does_not_decide() -> None:
    s = strategy(FedKSeedPro, importance_clip=5.0)
    s.aggregate(1, [reply(0, [(s.pool[0], 1e9), (s.pool[1], 4.0), (s.pool[1], 4.0)], 1, 0)])
    p = s.sampling_probabilities()
    # pool[0]: min(1e9, 5) / 2 = 2.5;  pool[1]: 8 / 3 = 2.67: the steady seed ranks first.
    assert p[1] > p[0]


def test_plain_fedkseed_samples_uniformly() -> None:
    s = strategy()
    s.aggregate(1, [reply(0, [(s.pool[0], 5.0)], 1, 0)])
    assert s.sampling_probabilities() is None
    assert "zo.importance" not in s.configure_client(2, 0).options


def test_pro_sends_one_byte_a_seed_and_evaluations_none() -> None:
    s = strategy(FedKSeedPro)
    s.aggregate(1, [reply(0, [(s.pool[0], 1.0), (s.pool[3], 0.25)], 1, 0)])
    config = s.configure_client(2, 0).options
    assert isinstance(config["zo.importance"], bytes) and len(config["zo.importance"]) == s.k
    assert "zo.importance" not in s.configure_evaluation(2, 0).options  # evaluating samples nothing
    with pytest.raises(ValueError, match="must be 8 bytes .* got 3 bytes"):
        decode_round_config({**config, "zo.importance": b"abc"})
    with pytest.raises(ValueError, match="got list"):
        decode_round_config({**config, "zo.importance": [0.125] * 8})


def test_importance_levels_keep_the_papers_probabilities_within_a_fifth_of_a_percent() -> None:
    importance = np.random.default_rng(0).gamma(2.0, size=4096)
    normalised = (importance - importance.min()) / (importance.max() - importance.min())
    exact = np.exp(normalised) / np.exp(normalised).sum()  # the paper's softmax of the min-max norm
    quantised = np.asarray(probabilities_from_levels(importance_levels(importance)))
    assert np.max(np.abs(np.log(quantised / exact))) <= 2 / 510  # each level off by <= 1/510, the sum too
    assert math.fsum(quantised) == pytest.approx(1.0, abs=1e-12)
    assert importance_levels(np.full(5, 3.0)) == bytes(5)  # flat importance: uniform


# --------------------------------------------------------------------------- options and the adapter


def test_both_names_are_registered_and_options_are_checked() -> None:
    assert isinstance(build_strategy("fedkseed", {"k": 16}), FedKSeed)
    pro = build_strategy("fedkseed-pro", {"lr": 1e-3})
    assert isinstance(pro, FedKSeedPro) and pro.pro and pro.hyperparameters()["pro"] is True
    with pytest.raises(ConfigError, match="k=0 must be a positive integer"):
        build_strategy("fedkseed", {"k": 0})
    with pytest.raises(ConfigError, match="strategy.options.pro is not an option of FedKSeedPro"):
        build_strategy("fedkseed-pro", {"pro": False})
    with pytest.raises(ConfigError, match="eps=0.0 must be a positive finite number"):
        build_strategy("fedkseed", {"eps": 0.0})


def test_only_the_trainable_tensors_are_tuned_and_dtypes_are_kept() -> None:
    s = FedKSeed(k=4, lr=0.1, tune="adapter", trainable=["lora_B"])
    initial = {A_KEY: torch.randn(2, 6).to(torch.bfloat16), B_KEY: torch.zeros(6, 2, dtype=torch.bfloat16)}
    s.initialize(AdapterSpec(initial=initial, rank=2, alpha=4.0, seed=0))
    s.aggregate(1, [reply(0, [(s.pool[0], 1.0)], 1, 0)])
    result = s.global_adapter()
    assert result[A_KEY].dtype == result[B_KEY].dtype == torch.bfloat16
    assert torch.equal(result[A_KEY], initial[A_KEY]) and not torch.equal(result[B_KEY], initial[B_KEY])
    with pytest.raises(ValueError, match="matches no tensor that tune='adapter' offers"):
        FedKSeed(tune="adapter", trainable=["nothing"]).initialize(AdapterSpec(initial=initial, rank=2, alpha=4.0))


def test_by_default_adapter_tuning_leaves_the_lora_a_factors_and_full_tuning_takes_everything() -> None:
    head = "base_model.model.classifier.modules_to_save.default.weight"
    initial = {A_KEY: torch.randn(2, 6), B_KEY: torch.zeros(6, 2), head: torch.randn(3, 6),
               "base_model.model.layer.0.query.lora_A.default.weight": torch.randn(2, 6)}
    s = FedKSeed(k=4, lr=0.1, tune="adapter")
    s.initialize(AdapterSpec(initial=initial, rank=2, alpha=4.0, seed=0))
    assert sorted(s._masters) == sorted([B_KEY, head])
    assert FedKSeed(tune="full").trainable == (".*",)
    assert FedKSeed(tune="adapter", trainable=["lora_A"]).trainable == ("lora_A",)  # asked for, so tuned


# --------------------------------------------------------------------------- full-parameter tuning

BASE_KEY = "base_model.model.layer.0.query.base_layer.weight"
HEAD_KEY = "base_model.model.classifier.weight"


def test_full_tuning_tunes_the_base_and_head_not_the_lora_factors() -> None:
    s = FedKSeed(k=4, lr=0.1)  # tune="full" is the default, as in the paper
    assert s.tunes_base_model and not s.supports_quantized_base
    initial = {**initial_adapter(), HEAD_KEY: torch.randn(2, 6)}
    base = {BASE_KEY: torch.randn(6, 6)}
    s.initialize(AdapterSpec(initial=initial, rank=2, alpha=4.0, seed=0, base=base))
    s.aggregate(1, [reply(0, [(s.pool[0], 1.0)], 1, 0)])
    result = s.global_adapter()
    assert set(result) == {A_KEY, B_KEY, HEAD_KEY, BASE_KEY}
    assert not torch.equal(result[BASE_KEY], base[BASE_KEY]) and not torch.equal(result[HEAD_KEY], initial[HEAD_KEY])
    assert torch.equal(result[A_KEY], initial[A_KEY]) and torch.equal(result[B_KEY], initial[B_KEY])
    # Exactly one step along the seed's direction over the tuned tensors: w - lr * g * z.
    z = direction(s.pool[0], {BASE_KEY: (6, 6), HEAD_KEY: (2, 6)})
    torch.testing.assert_close(result[BASE_KEY], base[BASE_KEY] - 0.1 * 1.0 * z[BASE_KEY], rtol=0, atol=1e-6)


def test_full_tuning_refuses_a_quantized_base_and_adapter_tuning_accepts_it() -> None:
    with pytest.raises(ConfigError, match="tune=full perturbs the base weights.*strategy.options.tune=adapter"):
        load_config(None, ["strategy.name=fedkseed", "model.quantization=4bit"])
    load_config(None, ["strategy.name=fedkseed", "model.quantization=4bit", "strategy.options.tune=adapter"])
