"""Server checkpoints: atomic writes, strategy state round trips, resume refusals, update norms."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtune.strategies import FedIT, FLoRA, LoRAFAIR
from fedtune.strategies.fedkseed.strategy import FedKSeed

from fedtune.config import load_config, to_yaml
from fedtune.errors import CheckpointError, ConfigError
from fedtune.flower.strategy_adapter import change_norm
from fedtune.server.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    checkpoint_to_resume,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from tests.strategies.test_exact_strategies import spec, updates


def checkpoint(round_: int = 1, state: dict | None = None, cfg_yaml: str = "") -> Checkpoint:
    return Checkpoint(round=round_, config_yaml=cfg_yaml, strategy_state=state or {"x": torch.arange(3)},
                      metrics=[{"round": 0}, {"round": round_}], rejected=[{"round": 1, "reason": "r"}],
                      rng=rng_state())


def test_checkpoint_round_trips_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, checkpoint(2))
    back = load_checkpoint(tmp_path)
    assert back is not None and back.round == 2
    assert torch.equal(back.strategy_state["x"], torch.arange(3))
    assert back.metrics[-1] == {"round": 2} and back.rejected[0]["reason"] == "r"
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, checkpoint(1))
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint(tmp_path, checkpoint(2, state={"unpicklable": lambda: None}))
    back = load_checkpoint(tmp_path)
    assert back is not None and back.round == 1
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


class _Runs:
    """Unpickling this calls ``open(path, "w")``: what a crafted checkpoint could do instead of loading."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_crafted_checkpoint_is_refused_before_anything_in_it_runs(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, checkpoint(1))
    marker = tmp_path / "ran"
    payload = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
    payload["strategy_state"]["x"] = _Runs(marker)
    torch.save(payload, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match="not a checkpoint fedtune can load safely: it holds io.open,.*"
                                              "nothing in it ran"):
        load_checkpoint(tmp_path)
    assert not marker.exists()


def test_numpy_state_round_trips_under_the_safe_load(tmp_path: Path) -> None:
    state = {"array": np.arange(4, dtype=np.uint32), "scalar": np.float64(0.5), "generator":
             np.random.default_rng(3).bit_generator.state, "nested": [(1, b"x", {2, 3}), None, torch.float16]}
    save_checkpoint(tmp_path, checkpoint(1, state=state))
    back = load_checkpoint(tmp_path).strategy_state
    assert back["array"].dtype == np.uint32 and np.array_equal(back["array"], state["array"])
    assert back["scalar"] == 0.5 and back["generator"] == state["generator"] and back["nested"] == state["nested"]


def test_a_state_the_safe_load_would_refuse_fails_at_saving_and_says_where(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"checkpoint\['strategy_state'\]\['extra'\]\[1\]: pathlib\.\w*Path"):
        save_checkpoint(tmp_path, checkpoint(1, state={"extra": [1, tmp_path]}))
    assert list(tmp_path.iterdir()) == []


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(tmp_path) is None


def test_rng_state_restores_every_generator() -> None:
    state = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first


@pytest.mark.parametrize("make", [FedIT, FLoRA, LoRAFAIR])
def test_a_restored_strategy_continues_exactly_like_the_original(make) -> None:
    original = make()
    original.initialize(spec())
    original.aggregate(1, updates([4, 4, 4], [3, 1, 2], seed=1))
    restored = make()
    restored.load_state_dict(original.state_dict())
    for s in (original, restored):  # the same second round on both
        s.aggregate(2, updates([4, 4, 4], [1, 2, 5], seed=2))
    a, b = original.global_adapter(), restored.global_adapter()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if isinstance(original, FLoRA):
        x, y = original.merged_rounds(), restored.merged_rounds()
        assert x.keys() == y.keys() and all(torch.equal(f, g) for v in x for m in x[v]
                                            for f, g in zip(x[v][m], y[v][m]))


@pytest.mark.parametrize("make", [FedIT, FLoRA, LoRAFAIR, lambda: FedKSeed(k=16, steps=4, tune="adapter")])
def test_a_strategy_state_goes_through_the_safe_load(make, tmp_path: Path) -> None:
    strategy = make()
    strategy.initialize(spec())
    save_checkpoint(tmp_path, checkpoint(1, state=strategy.state_dict()))
    restored = make()
    restored.load_state_dict(load_checkpoint(tmp_path).strategy_state)
    a, b = strategy.global_adapter(), restored.global_adapter()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fedkseeds_history_after_a_round_goes_through_the_safe_load(tmp_path: Path) -> None:
    from tests.strategies.test_fedkseed import reply, strategy

    original = strategy()
    pool = original.pool
    original.aggregate(1, [reply(0, [(pool[0], 1.0), (pool[1], 2.0)], 1, 0), reply(1, [(pool[2], 4.0)], 3, 0)])
    assert original.history
    save_checkpoint(tmp_path, checkpoint(1, state=original.state_dict()))
    restored = strategy()
    restored.load_state_dict(load_checkpoint(tmp_path).strategy_state)
    assert restored.history == original.history and type(restored.history[0]) is type(original.history[0])
    assert original.configure_client(2, 7).options == restored.configure_client(2, 7).options


def test_the_state_is_a_copy_not_a_view() -> None:
    strategy = FedIT()
    strategy.initialize(spec())
    state = strategy.state_dict()
    strategy.aggregate(1, updates([4, 4], [1, 1]))
    restored = FedIT()
    restored.load_state_dict(state)
    key = next(k for k in restored.global_adapter() if "lora_B" in k)
    assert torch.count_nonzero(restored.global_adapter()[key]) == 0  # still the initial (zero) B


def test_fedkseed_seed_history_survives_the_round_trip() -> None:
    original = FedKSeed(k=16, steps=4, tune="adapter")
    original.initialize(spec())
    restored = FedKSeed(k=16, steps=4, tune="adapter")
    restored.load_state_dict(original.state_dict())
    assert original.configure_client(1, 7).options == restored.configure_client(1, 7).options


def test_resume_refuses_a_changed_setting_and_names_it(tmp_path: Path) -> None:
    cfg = load_config(None, [f"output.dir={tmp_path}", "output.resume=true"])
    save_checkpoint(tmp_path, checkpoint(1, cfg_yaml=to_yaml(cfg)))
    longer = load_config(None, [f"output.dir={tmp_path}", "output.resume=true", "federation.num_rounds=9"])
    assert checkpoint_to_resume(longer, tmp_path).round == 1  # running longer is allowed
    changed = load_config(None, [f"output.dir={tmp_path}", "output.resume=true", "train.learning_rate=0.5",
                                 "adapter.rank=2"])
    with pytest.raises(ConfigError) as err:
        checkpoint_to_resume(changed, tmp_path)
    text = str(err.value)
    assert "train.learning_rate=0.5" in text and "adapter.rank=2" in text


def test_a_checkpoint_from_before_prompt_formats_resumes_with_the_format_it_ran(tmp_path: Path) -> None:
    """Old checkpoints hold no data.prompt_format: they ran alpaca (data.alpaca) or plain prompts."""
    lm = [f"output.dir={tmp_path}", "output.resume=true", "model.task=causal-lm", "data.alpaca=true"]
    for extra, prompt_format in (([], "auto"), (lm, "alpaca")):
        cfg = load_config(None, [f"output.dir={tmp_path}", "output.resume=true", *extra,
                                 f"data.prompt_format={prompt_format}"])
        old = to_yaml(cfg).replace(f"  prompt_format: {prompt_format}\n", "")
        assert "prompt_format" not in old
        save_checkpoint(tmp_path, checkpoint(1, cfg_yaml=old))
        assert checkpoint_to_resume(cfg, tmp_path).round == 1
    chat = load_config(None, [*lm, "data.prompt_format=chat"])
    with pytest.raises(ConfigError, match="data.prompt_format='chat' differs from the checkpointed run's 'alpaca'"):
        checkpoint_to_resume(chat, tmp_path)


def test_settings_added_since_a_checkpoint_ran_as_their_defaults(tmp_path: Path) -> None:
    base = [f"output.dir={tmp_path}", "output.resume=true", "adapter.client_ranks=[4,8]", "strategy.name=flora"]
    cfg = load_config(None, base)
    old = to_yaml(cfg).replace("  alpha_per_rank: false\n", "")
    assert "alpha_per_rank" not in old
    save_checkpoint(tmp_path, checkpoint(1, cfg_yaml=old))
    assert checkpoint_to_resume(cfg, tmp_path).round == 1
    with pytest.raises(ConfigError, match="adapter.alpha_per_rank=True differs from the checkpointed run's False"):
        checkpoint_to_resume(load_config(None, [*base, "adapter.alpha_per_rank=true"]), tmp_path)
    # Where a run computes and what it scores besides the loss may change on resume.
    moved = load_config(None, [*base, "model.device=cpu", "eval.max_new_tokens=16"])
    assert checkpoint_to_resume(moved, tmp_path).round == 1


def test_a_private_run_with_a_target_epsilon_resumes_only_with_its_number_of_rounds(tmp_path: Path) -> None:
    private = ["privacy.enabled=true", "privacy.target_epsilon=4", "strategy.name=fedit", "federation.num_rounds=5"]
    cfg = load_config(None, [f"output.dir={tmp_path}", "output.resume=true", *private])
    save_checkpoint(tmp_path, checkpoint(1, cfg_yaml=to_yaml(cfg)))
    assert checkpoint_to_resume(cfg, tmp_path).round == 1
    longer = load_config(None, [f"output.dir={tmp_path}", "output.resume=true", *private, "federation.num_rounds=8"])
    with pytest.raises(ConfigError, match="privacy.target_epsilon=4.0 calibrated the noise to that many rounds"):
        checkpoint_to_resume(longer, tmp_path)


def test_resume_needs_a_run_directory() -> None:
    with pytest.raises(ConfigError, match="output.resume=true needs output.dir"):
        load_config(None, ["output.resume=true"])


def test_update_norm_by_hand() -> None:
    sent = {"a": torch.tensor([1.0, 2.0]), "b": torch.zeros(2, 2)}
    reply = {"a": torch.tensor([4.0, 6.0]), "b": torch.zeros(2, 2), "head": torch.tensor([12.0])}
    # (3, 4) changed in "a", "b" unchanged, "head" was not sent: counted whole.
    assert change_norm(reply, sent) == pytest.approx((9 + 16 + 144) ** 0.5, rel=1e-15)
