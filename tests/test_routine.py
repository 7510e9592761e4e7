"""Client routines: the registry, a user's routine from a file, FedProx's proximal term."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import fedtune.routine as routine_module
from fedtune.client.runtime import ClientRuntime
from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.routine import ClientRoutine, GradientRoutine, register_routine, registered_routines, resolve_routine

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    copy = dict(routine_module._REGISTRY._entries)
    monkeypatch.setattr(routine_module._REGISTRY, "_entries", copy)
    return copy


def test_built_in_routines_register_through_the_public_api() -> None:
    assert {"gradient", "flora", "lora-sb", "lora-sb-init", "zeroth-order", "fedsa-lora", "flexlora"} <= set(
        registered_routines())
    assert resolve_routine("gradient") is GradientRoutine


def test_a_duplicate_name_is_refused(registry: dict) -> None:
    class Other(GradientRoutine):
        name = "gradient"

    with pytest.raises(ValueError, match="client routine name 'gradient' is taken by GradientRoutine"):
        register_routine(Other)
    with pytest.raises(TypeError, match="register_routine expects a ClientRoutine subclass"):
        register_routine(dict)


def test_an_unknown_routine_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"ClientInstruction.routine='nope' is not a registered client routine; "
                                          r"use one of \[.*'gradient'"):
        resolve_routine("nope")


def test_a_user_routine_comes_from_the_file_named_by_strategy_name(tiny_bert: str, tmp_path: Path,
                                                                  registry: dict) -> None:
    """The client imports the strategy's file before looking the routine up: nothing registered by hand."""
    registry.pop("fedprox", None)  # another test may have run the example in this process
    copy = tmp_path / "fedprox_copy.py"  # a path not imported before: its module runs and registers here
    copy.write_text((EXAMPLES / "fedprox.py").read_text())
    # As on a client: the config is read without building the strategy.
    cfg = load_config(None, [f"model.name={tiny_bert}", f"strategy.name={copy}:FedProx",
                             "data.max_examples=48", "train.local_steps=1", "data.max_length=16"], check_strategy=False)
    runtime = ClientRuntime(cfg, run_id=11)
    assert "fedprox" not in registry
    routine = runtime.routine("fedprox")
    assert isinstance(routine, ClientRoutine) and type(routine).__name__ == "ProximalRoutine"
    assert runtime.routine("fedprox") is routine  # one per runtime


def test_fedprox_adds_mu_over_two_times_the_squared_distance(tiny_bert: str) -> None:
    from fedtune.registry import import_by_path
    from fedtune.routine import ClientJob, ClientState

    fedprox = import_by_path(str(EXAMPLES / "fedprox.py"))
    cfg = load_config(None, [f"model.name={tiny_bert}", "data.max_examples=48", "data.max_length=16"])
    runtime = ClientRuntime(cfg, run_id=12)
    job = ClientJob(partition_id=0, server_round=1, arrays={}, trainable=(r"lora_B",), options={fedprox.MU: 0.5},
                    state=ClientState())
    handle, _ = runtime.prepare(job)
    handle.set_trainable(job.trainable)
    proximal = fedprox.ProximalRoutine(runtime).regularizer(job, handle)
    assert float(proximal().detach()) == 0.0  # at the global model
    trained = {k: p for k, p in handle.params.items() if p.requires_grad}
    with torch.no_grad():
        for p in trained.values():
            p.add_(0.1)
    expected = 0.5 * 0.5 * sum(p.numel() * 0.01 for p in trained.values())
    assert abs(float(proximal().detach()) - expected) < 1e-5 * expected
    # the gradient of the term is mu * (w - w_global)
    value = proximal()
    value.backward()
    for p in trained.values():
        assert torch.allclose(p.grad, torch.full_like(p, 0.5 * 0.1), atol=1e-6)
        p.grad = None
    no_term = ClientJob(partition_id=0, server_round=1, arrays={}, trainable=(), options={fedprox.MU: 0.0},
                        state=ClientState())
    assert fedprox.ProximalRoutine(runtime).regularizer(no_term, handle) is None


USER_ROUTINE = '''
from fedtune.routine import ClientReply, ClientRoutine, register_routine
from fedtune.strategies.fedit import FedIT
from fedtune.strategy import ClientInstruction


@register_routine
class Constant(ClientRoutine):
    """Replies with the server's tensors plus one, and counts its rounds in the client's state."""

    name = "plus-one"

    def train(self, job):
        job.state.values["rounds"] = int(job.state.values.get("rounds", 0)) + 1
        return ClientReply(arrays={k: v + 1 for k, v in job.arrays.items()}, num_examples=1,
                           metrics={"rounds": float(job.state.values["rounds"])})


class PlusOne(FedIT):
    name = "plus-one"

    def configure_client(self, server_round, node_id):
        plain = super().configure_client(server_round, node_id)
        return ClientInstruction(arrays=plain.arrays, trainable=plain.trainable, expects=plain.expects,
                                 routine="plus-one")
'''


def test_state_written_by_a_routine_comes_back_next_round(tiny_bert: str, tmp_path: Path, registry: dict) -> None:
    from fedtune.routine import ClientState

    module = tmp_path / "plus_one.py"
    module.write_text(textwrap.dedent(USER_ROUTINE))
    cfg = load_config(None, [f"model.name={tiny_bert}", f"strategy.name={module}:PlusOne", "data.max_examples=48"])
    runtime = ClientRuntime(cfg, run_id=13)
    state = ClientState()
    for server_round in (1, 2, 3):
        reply = runtime.train(0, server_round, {"x": torch.zeros(2)}, (".*",), "plus-one", {}, state)
        assert reply.metrics["rounds"] == server_round and torch.equal(reply.arrays["x"], torch.ones(2))
    assert state.values == {"rounds": 3}
