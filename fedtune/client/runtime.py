"""The client side of a round, without Flower: load, train, evaluate, reply.

One :class:`ClientRuntime` per process and configuration holds the data partitions and
the model, so a process that serves many rounds (and, in simulation, many virtual
clients) loads them once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import datasets
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedtune import __version__, protocol
from fedtune.averaging.client_dp import client_dp_of, noised_update
from fedtune.client.attacks import attacked_reply, flipped_labels
from fedtune.client.training import TrainResult
from fedtune.data import load_splits, num_labels, partition_dataset, resolve_prompt_format, split_train_eval
from fedtune.errors import ConfigError
from fedtune.evaluation.generation import evaluate_generation_on
from fedtune.evaluation.metrics import is_generative
from fedtune.models.devices import device_of
from fedtune.models.loading import AdapterHandle, claim_extensions, get_adapter
from fedtune.models.quantization import bits_of, peak_rss_bytes, weight_bytes
from fedtune.objectives import Objective, evaluate, objective_of
from fedtune.protocol import tensor_digest
from fedtune.registry import import_by_path
from fedtune.routine import ClientJob, ClientReply, ClientRoutine, ClientState, resolve_routine
from fedtune.schema import AdapterConfig, FedtuneConfig, ModelConfig, to_yaml
from fedtune.strategy import select

# Settings a SuperNode may give its own client in a real deployment, e.g.
# flower-supernode --node-config "partition-id=0 num-partitions=4 model.quantization='4bit' model.device='cuda:1'"
NODE_CONFIG_KEYS = ("model.quantization", "model.quant_type", "model.double_quant", "model.compute_dtype",
                    "model.gradient_checkpointing", "model.device", "adapter.rank")


def client_settings(cfg: FedtuneConfig, partition_id: int,
                    node_config: Mapping[str, Any] | None = None) -> tuple[ModelConfig, AdapterConfig]:
    """The model and adapter settings client ``partition_id`` trains with.

    In order: the run's settings, the client's entries of ``model.client_quantization`` and
    ``adapter.client_ranks`` (client i uses entry i % length; simulation), then its node's
    ``model.*`` / ``adapter.*`` keys of :data:`NODE_CONFIG_KEYS` (a real deployment). A bad
    node key or value raises :class:`ConfigError` naming it.
    """
    model = cfg.model.for_client(partition_id)
    adapter = cfg.adapter
    given = {k: v for k, v in (node_config or {}).items() if k.startswith(("model.", "adapter."))}
    problems = [f"node_config {k}={v!r} cannot be set per node; per-node keys are {list(NODE_CONFIG_KEYS)}"
                for k, v in given.items() if k not in NODE_CONFIG_KEYS]
    sections: dict[str, dict[str, Any]] = {"model": {}, "adapter": {}}
    for key, value in given.items():
        if key in NODE_CONFIG_KEYS:
            section, leaf = key.split(".", 1)
            sections[section][leaf] = value
    try:
        if sections["model"]:
            model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(model), sections["model"]))
        if sections["adapter"]:  # the node's rank is this client's: it replaces adapter.client_ranks
            node_adapter = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(adapter), sections["adapter"]))
            adapter = dataclasses.replace(adapter, client_ranks=[node_adapter.rank])
        adapter = adapter.for_client(partition_id)
    except OmegaConfBaseException as e:
        problems.append(f"node_config {given}: {str(e).splitlines()[0]}")
    else:
        problems += [f"node_config: {p}" for p in model.problems() + adapter.problems()]
    if problems:
        raise ConfigError(problems)
    return model, adapter


class ClientRuntime:
    """Per-process client state for one configuration.

    Parameters
    ----------
    cfg : FedtuneConfig
        The run's configuration.
    run_id : int
        The Flower run this state belongs to (model extensions of another run are dropped).
    node_config : mapping, optional
        This node's per-node settings (see :func:`client_settings`).
    """

    def __init__(self, cfg: FedtuneConfig, run_id: int = 0, node_config: Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.node_config = dict(node_config or {})
        self._tokenized: dict[int, tuple[datasets.Dataset, datasets.Dataset]] = {}
        self._held_out: dict[int, datasets.Dataset] = {}  # raw eval splits, for generation
        self._routines: dict[str, ClientRoutine] = {}

    @cached_property
    def objective(self) -> Objective:
        """What local training minimises (``train.objective``)."""
        return objective_of(self.cfg.train)

    @cached_property
    def _pool(self) -> tuple[datasets.Dataset, int | None]:
        pool, _ = load_splits(self.cfg.data, self.cfg.model.task, self.cfg.train.objective)
        labels = num_labels(pool) if self.cfg.model.task == "classification" else None
        return pool, labels

    @cached_property
    def _partitions(self) -> list[datasets.Dataset]:
        pool, _ = self._pool
        return partition_dataset(pool, self.cfg.partition, self.cfg.federation.num_clients)

    def settings(self, partition_id: int) -> tuple[ModelConfig, AdapterConfig]:
        """This client's model settings (its quantization) and adapter settings (its rank)."""
        return client_settings(self.cfg, partition_id, self.node_config)

    def adapter_config(self, partition_id: int) -> AdapterConfig:
        """This client's adapter settings (its own rank when ``adapter.client_ranks`` is set)."""
        return self.settings(partition_id)[1]

    def adapter(self, partition_id: int = 0) -> tuple[AdapterHandle, float]:
        """The model with this client's adapter (loaded on first use) and the seconds it took."""
        start = time.perf_counter()
        model_cfg, adapter_cfg = self.settings(partition_id)
        handle = get_adapter(model_cfg, adapter_cfg, self._pool[1], self.cfg.seed)
        return handle, time.perf_counter() - start

    def prepare(self, job: ClientJob) -> tuple[AdapterHandle, float]:
        """This client's model with the server's tensors loaded; the seconds the model took to get.

        Model extensions of an earlier run in this process (e.g. a method's merged updates)
        are dropped first. When the instruction carries a frozen-tensor digest
        (:data:`~fedtune.protocol.FROZEN_DIGEST`), the client checks it holds exactly the
        server's frozen tensors.
        """
        handle, load_seconds = self.adapter(job.partition_id)
        claim_extensions(handle.model, self.run_id)
        handle.load(job.arrays)
        digest = job.options.get(protocol.FROZEN_DIGEST)
        if digest is not None:
            pattern = str(job.options[protocol.FROZEN_PATTERN])
            if tensor_digest(select(handle.state(), [pattern])) != digest:
                raise ValueError(f"this client's frozen tensors ({pattern!r}) differ from the server's; every "
                                 "party must build the adapter with the same model, adapter config and seed")
        return handle, load_seconds

    def splits(self, partition_id: int) -> tuple[datasets.Dataset, datasets.Dataset]:
        """This client's tokenized local train and eval splits."""
        if not 0 <= partition_id < self.cfg.federation.num_clients:
            raise ValueError(f"partition-id={partition_id} is outside 0..{self.cfg.federation.num_clients - 1}")
        if partition_id not in self._tokenized:
            handle, _ = self.adapter(partition_id)  # its tokenizer; loads no other client's base
            train, held_out = split_train_eval(self._partitions[partition_id], self.cfg.data.eval_fraction,
                                               self.cfg.data.seed + partition_id)
            if self.cfg.attack.kind == "label-flip" and self.cfg.attack.attacks(partition_id):
                train = flipped_labels(train, num_labels(self._partitions[partition_id]))  # a simulated attacker
            data = self.cfg.data
            fmt = resolve_prompt_format(handle.tokenizer, data.prompt_format, alpaca=data.alpaca)
            tok = lambda ds: self.objective.tokenize(ds, handle.tokenizer, self.cfg.model.task, data.max_length, fmt)
            self._tokenized[partition_id] = (tok(train), tok(held_out))
            self._held_out[partition_id] = held_out
        return self._tokenized[partition_id]

    def evaluate_local(self, partition_id: int, handle: AdapterHandle) -> ClientReply:
        """Loss and accuracy of ``handle``'s model on this client's local eval split.

        With a generative ``eval.metric`` and ``eval.clients``, also the metric's score on
        the split's generations (:data:`~fedtune.protocol.EVAL_GENERATIVE`) and how many
        examples it covers.
        """
        _, eval_ds = self.splits(partition_id)
        result = evaluate(handle, eval_ds, self.cfg.train.eval_batch_size, objective=self.objective)
        metrics = {protocol.EVAL_LOSS: result["loss"], protocol.EVAL_ACCURACY: result["accuracy"]}
        if self.cfg.eval.clients and is_generative(self.cfg.eval.metric) and len(self._held_out[partition_id]):
            generated = evaluate_generation_on(handle, self._held_out[partition_id], self.cfg.eval, self.cfg.data)
            metrics |= {protocol.EVAL_GENERATIVE: generated.score,
                        protocol.EVAL_GENERATIVE_EXAMPLES: float(generated.num_examples)}
        return ClientReply(arrays={}, num_examples=int(result["num_examples"]), metrics=metrics)

    def resource_metrics(self, partition_id: int, handle: AdapterHandle) -> dict[str, float]:
        """Bits per base weight, the base's memory and the process's peak memory so far (and GPU's)."""
        metrics = {protocol.BASE_BITS: float(bits_of(self.settings(partition_id)[0])),
                   protocol.BASE_WEIGHT_BYTES: float(weight_bytes(handle.model)),
                   protocol.PEAK_RSS_BYTES: float(peak_rss_bytes())}
        device = device_of(handle.model)
        if device.type == "cuda":
            metrics[protocol.PEAK_GPU_BYTES] = float(torch.cuda.max_memory_allocated(device))
        return metrics

    def training_metrics(self, partition_id: int, handle: AdapterHandle, result: TrainResult) -> dict[str, float]:
        """The metrics every gradient-trained reply carries: loss, steps, time, rank, resources."""
        adapter_cfg = self.adapter_config(partition_id)
        return {protocol.TRAIN_LOSS: result.loss, protocol.TRAIN_STEPS: float(result.steps),
                protocol.TRAIN_SECONDS: result.seconds, protocol.LORA_RANK: float(adapter_cfg.rank),
                protocol.LORA_SCALING: adapter_cfg.alpha / adapter_cfg.rank,
                **self.resource_metrics(partition_id, handle)}

    @cached_property
    def client_noise_multiplier(self) -> float:
        """z of DP-FedAvg for ``noise_on: clients``: the configured one, or the server's calibration."""
        return client_dp_of(self.cfg).noise_multiplier

    def routine(self, name: str) -> ClientRoutine:
        """The routine ``name`` (made once per runtime).

        A name not registered yet may come from the run's own strategy module
        (``strategy.name`` given by path): that module is imported first, which registers
        the routines it defines.
        """
        if name not in self._routines:
            strategy = self.cfg.strategy.name
            if ":" in strategy and ":" not in name:
                import_by_path(strategy.rpartition(":")[0])
            try:
                cls = resolve_routine(name)
            except ConfigError as e:  # one line for the server's log, not a config report or a chain
                raise ValueError("; ".join(e.problems) + f"; this client runs fedtune {__version__}") from None
            self._routines[name] = cls(self)
        return self._routines[name]

    def job(self, partition_id: int, server_round: int, arrays: Mapping[str, torch.Tensor], trainable: Sequence[str],
            config: Mapping[str, Any], state: ClientState | None) -> ClientJob:
        """A routine's view of one message: ``config`` is the message's config record."""
        options = {k[len(protocol.STRATEGY_PREFIX):]: v for k, v in config.items()
                   if k.startswith(protocol.STRATEGY_PREFIX)}
        return ClientJob(partition_id=partition_id, server_round=server_round, arrays=dict(arrays),
                         trainable=tuple(trainable), options=options, state=state or ClientState())

    def train(self, partition_id: int, server_round: int, arrays: Mapping[str, torch.Tensor],
              trainable: Sequence[str], routine: str, config: Mapping[str, Any] | None = None,
              state: ClientState | None = None) -> ClientReply:
        """Run the routine the instruction names on this client and return its reply.

        ``config`` is the message's config record; ``state`` this client's own state
        (Flower's ``context.state``), changed in place by the routine.
        """
        config = config or {}
        model_cfg, _ = self.settings(partition_id)
        if model_cfg.quantization != "none" and config.get(protocol.QUANTIZED_BASE_OK) is False:
            raise ValueError(f"strategy.name={self.cfg.strategy.name!r} does not support a quantized base, and this client "
                             f"loads its base as model.quantization={model_cfg.quantization!r}; give it "
                             "model.quantization=none (node config or model.client_quantization)")
        job = self.job(partition_id, server_round, arrays, trainable, config, state)
        runner = self.routine(routine)
        if self.cfg.privacy.example_level and not runner.supports_privacy:
            raise ValueError(f"privacy.enabled=true but client routine {routine!r} does not apply DP-SGD; use a "
                             "method whose routine does, or set privacy.enabled=false")
        reply = runner.train(job)
        privacy = self.cfg.privacy
        if privacy.client_level and privacy.noise_on == "clients":  # DP-FedAvg with the noise added here
            noised = noised_update(job.arrays, reply.arrays, privacy.clip_norm, self.client_noise_multiplier)
            reply = dataclasses.replace(reply, arrays=noised)
        if self.cfg.attack.attacks(partition_id):  # a simulated attacker (refused outside simulations)
            seed = self.cfg.seed * 1_000_003 + server_round * 1_009 + partition_id
            reply = dataclasses.replace(reply, arrays=attacked_reply(self.cfg.attack, job.arrays, reply.arrays, seed))
        return reply

    def evaluate(self, partition_id: int, arrays: Mapping[str, torch.Tensor], routine: str = protocol.DEFAULT_ROUTINE,
                 config: Mapping[str, Any] | None = None, trainable: Sequence[str] = (),
                 server_round: int = 0, state: ClientState | None = None) -> ClientReply:
        """Evaluate the server's global model on this client's local eval split."""
        job = self.job(partition_id, server_round, arrays, trainable, config or {}, state)
        return self.routine(routine).evaluate(job)


_RUNTIMES: dict[tuple, ClientRuntime] = {}


def runtime_for(cfg: FedtuneConfig, run_id: int = 0, node_config: Mapping[str, Any] | None = None, *,
                config_key: str | None = None) -> ClientRuntime:
    """The process's runtime for ``cfg``, run and node settings (created once, reused by later messages).

    Only the node's ``model.*`` / ``adapter.*`` keys tell runtimes apart: the virtual clients
    a simulation process serves (different ``partition-id``) share one runtime and its data.
    ``config_key`` stands for ``cfg`` where the caller has one (the ClientApp's: the run config
    ``cfg`` was read from); else ``cfg``'s YAML is the key.
    """
    node = {k: v for k, v in (node_config or {}).items() if k.startswith(("model.", "adapter."))}
    key = (config_key or to_yaml(cfg), run_id, tuple(sorted((k, str(v)) for k, v in node.items())))
    if key not in _RUNTIMES:
        _RUNTIMES[key] = ClientRuntime(cfg, run_id, node)
    return _RUNTIMES[key]
