"""Simulated attackers (fedtune.client.attacks): what they send, who attacks, and that deployments refuse them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedtune.client.attacks import attacked_reply, flipped_labels
from fedtune.client.runtime import ClientRuntime
from fedtune.config import load_config, to_run_config
from fedtune.errors import ConfigError
from fedtune.flower.server_app import server_config
from fedtune.schema import AttackConfig

SENT = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([0.5])}
TRAINED = {"w": torch.tensor([1.5, 1.0]), "h": torch.tensor([0.75]), "fresh": torch.tensor([3.0])}


def test_sign_flip_and_scale_by_hand() -> None:
    flipped = attacked_reply(AttackConfig(kind="sign-flip", clients=[0]), SENT, TRAINED, seed=0)
    assert flipped["w"].tolist() == [0.5, 3.0] and flipped["h"].tolist() == [0.25]
    assert flipped["fresh"].tolist() == [-3.0]  # not sent: counted from zero
    strong = attacked_reply(AttackConfig(kind="sign-flip", clients=[0], scale=4.0), SENT, TRAINED, seed=0)
    assert strong["w"].tolist() == [-1.0, 6.0]
    scaled = attacked_reply(AttackConfig(kind="scale", clients=[0]), SENT, TRAINED, seed=0)
    assert scaled["w"].tolist() == [6.0, -8.0] and scaled["h"].tolist() == [3.0]


def test_noise_replaces_the_update_reproducibly() -> None:
    attack = AttackConfig(kind="noise", clients=[0], noise_std=2.0)
    big = {"w": torch.zeros(20_000)}
    a, b = attacked_reply(attack, big, big, seed=7), attacked_reply(attack, big, big, seed=7)
    assert torch.equal(a["w"], b["w"])
    assert float(a["w"].std()) == pytest.approx(2.0, rel=0.03)
    assert not torch.equal(a["w"], attacked_reply(attack, big, big, seed=8)["w"])


def test_label_flip_maps_y_to_c_minus_one_minus_y() -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 3]})
    assert flipped_labels(ds, 4)["label"] == [3, 2, 0]


def test_an_attacking_client_sends_ten_times_its_update_and_the_others_do_not(tiny_bert: str) -> None:
    common = [f"model.name={tiny_bert}", "data.max_examples=48", "data.max_length=16", "train.local_steps=2",
              "federation.num_clients=2"]
    honest = ClientRuntime(load_config(None, common), run_id=21)
    hostile = ClientRuntime(load_config(None, [*common, "attack.kind=scale", "attack.clients=[1]"]), run_id=22)
    initial = dict(honest.adapter(0)[0].initial)
    for partition, factor in ((0, 1.0), (1, 10.0)):
        sent = {k: v.clone() for k, v in initial.items()}
        a = honest.train(partition, 1, sent, [".*"], "gradient")
        b = hostile.train(partition, 1, sent, [".*"], "gradient")
        for key in a.arrays:
            torch.testing.assert_close(b.arrays[key] - sent[key], factor * (a.arrays[key] - sent[key]),
                                       rtol=1e-5, atol=1e-7)


def test_attack_settings_are_checked_with_the_rest() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["attack.kind=flip", "attack.scale=0", "federation.num_clients=4"])
    assert "attack.kind='flip' is not an attack" in str(err.value) and "attack.scale=0" in str(err.value)
    with pytest.raises(ConfigError, match=r"attack.clients=\[1, 9\]: \[9\] are not partition ids"):
        load_config(None, ["attack.kind=scale", "attack.clients=[1,9]", "federation.num_clients=4"])
    with pytest.raises(ConfigError, match="names no attacker"):
        load_config(None, ["attack.kind=noise"])
    with pytest.raises(ConfigError, match="label-flip flips class labels"):
        load_config(None, ["attack.kind=label-flip", "attack.clients=[0]", "model.task=causal-lm",
                           "model.name=builtin:SmolLM2-135M-Instruct", "data.source=generated:topics"],
                    check_strategy=False)


def test_a_deployment_refuses_simulated_attackers_before_anything_is_sent() -> None:
    cfg = load_config(None, ["attack.kind=sign-flip", "attack.clients=[0]"])
    not_a_simulation = SimpleNamespace()
    with pytest.raises(ConfigError, match="runs only in a simulation"):
        server_config(not_a_simulation, to_run_config(cfg))
