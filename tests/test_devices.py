"""fedtune.models.devices and the device settings: model.device, client GPU shares, a Ray cluster address."""

from __future__ import annotations

import pytest
import torch

from fedtune.client.training import train_adapter
from fedtune.config import AdapterConfig, DataConfig, FedtuneConfig, ModelConfig, TrainConfig
from fedtune.data import load_splits, tokenize
from fedtune.errors import ConfigError, ModelLoadError
from fedtune.flower.simulation import backend_config
from fedtune.models.devices import device_of, resolve_device, to_device
from fedtune.models.loading import clear_model_cache, get_adapter

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_auto_is_cuda_where_there_is_a_gpu_and_the_cpu_elsewhere() -> None:
    assert resolve_device("auto") == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@needs_no_gpu
@pytest.mark.parametrize("spec", ["cuda", "cuda:3"])
def test_cuda_without_a_gpu_is_refused_naming_the_setting_and_the_fix(spec: str) -> None:
    with pytest.raises(ModelLoadError, match=rf"model.device='{spec}'.*sees no GPU.*auto or cpu"):
        resolve_device(spec)


def test_a_bad_device_is_a_config_problem() -> None:
    problems = ModelConfig(device="gpu").problems()
    assert problems == ["model.device='gpu' is not a device; use auto, cpu, cuda or cuda:N"]
    assert ModelConfig(device="cuda:1").problems() == []


def test_to_device_keeps_cpu_tensors_as_they_are() -> None:
    batch = {"input_ids": torch.arange(6).reshape(2, 3)}
    moved = to_device(batch, torch.device("cpu"))
    assert moved["input_ids"] is batch["input_ids"]
    assert device_of(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(torch.nn.ReLU()) == torch.device("cpu")


def _trained_state(device: str) -> dict[str, torch.Tensor]:
    clear_model_cache()
    handle = get_adapter(ModelConfig(device=device), AdapterConfig(), 4, seed=0)
    pool, _ = load_splits(DataConfig(max_examples=64, max_test_examples=8), "classification")
    handle.load({})
    handle.set_trainable([".*"])
    train_adapter(handle, tokenize(pool, handle.tokenizer, "classification", 32),
                  TrainConfig(local_steps=3, batch_size=8, learning_rate=1e-2), seed=0)
    state = handle.state()
    clear_model_cache()
    return state


@needs_no_gpu
def test_on_a_cpu_machine_auto_trains_bitwise_as_cpu() -> None:
    auto, cpu = _trained_state("auto"), _trained_state("cpu")
    assert all(torch.equal(auto[k], cpu[k]) for k in cpu)
    assert all(v.device.type == "cpu" for v in cpu.values())


# --------------------------------------------------------------------------- simulation resources


def config(**federation: object) -> FedtuneConfig:
    cfg = FedtuneConfig()
    for key, value in federation.items():
        setattr(cfg.federation, key, value)
    return cfg


@needs_no_gpu
def test_cpu_clients_get_no_gpu_share_and_a_private_ray_sized_to_the_machine() -> None:
    backend = backend_config(config(client_cpus=1.0))
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert backend["init_args"]["num_cpus"] >= 1 and "address" not in backend["init_args"]


@needs_no_gpu
def test_gpu_shares_for_cpu_clients_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"federation.client_gpus=0.5 reserves GPU shares.*model.device='auto'"):
        backend_config(config(client_gpus=0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_client_gpus_reach_flowers_client_resources_on_a_gpu_machine() -> None:
    assert backend_config(config())["client_resources"]["num_gpus"] == 1.0
    assert backend_config(config(client_gpus=0.25))["client_resources"]["num_gpus"] == 0.25
    with pytest.raises(ConfigError, match="client_gpus=0 gives them no GPU share"):
        backend_config(config(client_gpus=0.0))


def test_a_ray_cluster_address_replaces_the_private_instance_and_keeps_the_shares_given() -> None:
    backend = backend_config(config(ray_address="127.0.0.1:6379", client_gpus=0.5, client_cpus=1.0))
    assert backend["init_args"] == {"address": "127.0.0.1:6379", "log_to_driver": False}
    assert backend["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.5}


def test_simulate_hands_the_shares_to_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.simulation

    from fedtune.errors import FedtuneError
    from fedtune.flower.simulation import simulate

    seen: dict[str, object] = {}
    monkeypatch.setattr(flwr.simulation, "run_simulation", lambda **kwargs: seen.update(kwargs))
    cfg = config(ray_address="127.0.0.1:1", client_gpus=0.5, num_clients=2)
    with pytest.raises(FedtuneError, match="ended without finishing"):
        simulate(cfg)
    assert seen["backend_config"]["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    assert seen["num_supernodes"] == 2
