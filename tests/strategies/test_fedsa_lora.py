"""FedSA-LoRA: A and the head averaged and shared, each client's B kept in its own state."""

from __future__ import annotations

import pytest
import torch
from fedtune.strategies.fedsa_lora import FedSALoRA

from fedtune.client.runtime import ClientRuntime
from fedtune.config import load_config
from fedtune.routine import ClientState
from fedtune.strategy import AdapterSpec, ClientUpdate, check_update

A, B, HEAD = "q.lora_A.weight", "q.lora_B.weight", "classifier.weight"


def spec() -> AdapterSpec:
    return AdapterSpec(initial={A: torch.ones(2, 5), B: torch.zeros(4, 2), HEAD: torch.zeros(3, 4)}, rank=2, alpha=4.0)


def client(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(2, 5, generator=g), B: torch.randn(4, 2, generator=g), HEAD: torch.randn(3, 4, generator=g)}


def test_a_and_the_head_are_averaged_and_no_b_is_ever_sent() -> None:
    s = FedSALoRA()
    s.initialize(spec())
    first = s.configure_client(1, 7)
    assert set(first.arrays) == {A, HEAD} and first.routine == "fedsa-lora"
    assert set(first.expects) == {A, B, HEAD}  # B comes back for the server's own model (upload_b)
    replies = [client(1), client(2)]
    s.aggregate(1, [ClientUpdate(i, r, n, {}) for i, (r, n) in enumerate(zip(replies, [1, 3]))])
    second = s.configure_client(2, 7)
    assert set(second.arrays) == {A, HEAD}
    for key in (A, HEAD):  # hand-worked weights 1/4 and 3/4
        assert torch.allclose(second.arrays[key], 0.25 * replies[0][key] + 0.75 * replies[1][key], atol=1e-7)
    glob = s.global_adapter()  # the server's model: Ā with the average of the B's
    assert torch.allclose(glob[B], 0.25 * replies[0][B] + 0.75 * replies[1][B], atol=1e-7)
    assert set(s.configure_evaluation(2, 7).arrays) == {A, HEAD}


def test_without_upload_b_clients_send_only_a_and_the_server_b_stays_initial() -> None:
    s = FedSALoRA(upload_b=False)
    s.initialize(spec())
    instruction = s.configure_client(1, 0)
    assert set(instruction.expects) == {A, HEAD}
    reply = {k: v for k, v in client(3).items() if k != B}
    check_update(reply, instruction.expects)
    s.aggregate(1, [ClientUpdate(0, reply, 5, {})])
    assert torch.equal(s.global_adapter()[B], torch.zeros(4, 2))


def test_no_lora_b_is_refused() -> None:
    with pytest.raises(ValueError, match="fedsa-lora needs LoRA B tensors"):
        FedSALoRA().initialize(AdapterSpec(initial={HEAD: torch.zeros(3, 4)}, rank=2, alpha=4.0))


@pytest.mark.parametrize("upload_b", [True, False])
def test_each_client_keeps_its_own_b_across_rounds(tiny_bert: str, upload_b: bool) -> None:
    """Round 2 starts from the client's own B of round 1 and the server's averaged A."""
    cfg = load_config(None, [f"model.name={tiny_bert}", "strategy.name=fedsa-lora",
                             f"strategy.options.upload_b={str(upload_b).lower()}", "data.max_examples=96",
                             "federation.num_clients=2", "train.local_steps=2", "train.learning_rate=1e-2",
                             "data.max_length=24", "adapter.rank=2"])
    runtime = ClientRuntime(cfg, run_id=hash(("fedsa", upload_b)))
    handle, _ = runtime.adapter(0)
    s = FedSALoRA(upload_b=upload_b)
    s.initialize(AdapterSpec(initial=dict(handle.initial), rank=2, alpha=cfg.adapter.alpha))
    states = [ClientState(), ClientState()]
    for server_round in (1, 2):
        updates = []
        for cid in (0, 1):
            instruction = s.configure_client(server_round, cid)
            config = {f"strategy.{k}": v for k, v in instruction.options.items()}
            if server_round == 2:  # what the routine loads: the server's A with this client's own B
                job = runtime.job(cid, server_round, instruction.arrays, instruction.trainable, config, states[cid])
                loaded, _ = runtime.routine(instruction.routine).load(job)
                state = loaded.state()
                assert all(torch.equal(state[k], v) for k, v in states[cid].tensors.items())
                assert all(torch.equal(state[k], v) for k, v in instruction.arrays.items())
            reply = runtime.train(cid, server_round, instruction.arrays, instruction.trainable, instruction.routine,
                                  config, states[cid])
            check_update(reply.arrays, instruction.expects)
            personal = states[cid].tensors
            assert personal and all(".lora_B." in k for k in personal)
            updates.append(ClientUpdate(cid, reply.arrays, reply.num_examples, reply.metrics))
        s.aggregate(server_round, updates)
    assert any(not torch.equal(states[0].tensors[k], states[1].tensors[k]) for k in states[0].tensors)
    # Evaluation uses the personal model: loading for client 0 puts its own B in the model.
    evaluation = s.configure_evaluation(3, 0)
    runtime.evaluate(0, evaluation.arrays, evaluation.routine,
                     {f"strategy.{k}": v for k, v in evaluation.options.items()}, state=states[0])
    loaded = handle.state()
    assert all(torch.equal(loaded[k], states[0].tensors[k]) for k in states[0].tensors)
