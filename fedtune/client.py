"""The client side of a round, without Flower: load, train, evaluate, reply.

One :class:`ClientRuntime` per process and configuration holds the data partitions and
the model, so a process that serves many rounds (and, in simulation, many virtual
clients) loads them once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import datasets
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedtune import protocol
from fedtune.codec import tensor_digest
from fedtune.config import AdapterConfig, FedtuneConfig, ModelConfig
from fedtune.data import load_splits, num_labels, partition_dataset, split_train_eval, tokenize
from fedtune.errors import ConfigError
from fedtune.strategies.fed_sb.lora_sb import (
    CFG_ROUND,
    LORA_SB_INIT_MODE,
    LORA_SB_MODE,
    METRIC_ROUND,
    adopt_frozen,
    init_reply,
    prepare_handle,
)
from fedtune.models import AdapterHandle, get_adapter
from fedtune.privacy import PrivacyLedger, noise_multiplier_for
from fedtune.quantization import bits_of, peak_rss_bytes, weight_bytes
from fedtune.strategies.flora.residual import residual_of, split_residual
from fedtune.strategy import GRADIENT_MODE, select
from fedtune.training import batches, evaluate, steps_per_round, train_adapter, train_adapter_private
from fedtune.strategies.fedkseed.zeroth_order import (
    TUNE_FULL,
    ZEROTH_ORDER_MODE,
    RoundPlan,
    apply_catch_up,
    decode_round_config,
    encode_steps,
    seed_pool,
    tunable_tensors,
    zo_train,
)

# Keys of a client's own state (Flower's context.state) for its privacy ledger.
LEDGER_SIGMAS, LEDGER_RATES, LEDGER_STEPS = "dp.sigmas", "dp.rates", "dp.steps"
LEDGER_SIGMA, LEDGER_RATE = "dp.noise_multiplier", "dp.sample_rate"
INIT_ACCOUNTED = "dp.init_accounted"


def save_ledger(ledger: PrivacyLedger, state: dict[str, Any]) -> None:
    """Write a ledger into a client's state as plain lists (a Flower ConfigRecord holds them)."""
    state[LEDGER_SIGMA], state[LEDGER_RATE] = float(ledger.noise_multiplier), float(ledger.sample_rate)
    state[LEDGER_SIGMAS] = [float(s) for s, _, _ in ledger.history]
    state[LEDGER_RATES] = [float(q) for _, q, _ in ledger.history]
    state[LEDGER_STEPS] = [int(n) for _, _, n in ledger.history]


def load_ledger(state: Mapping[str, Any], delta: float) -> PrivacyLedger:
    ledger = PrivacyLedger(float(state[LEDGER_SIGMA]), float(state[LEDGER_RATE]), delta)
    for sigma, rate, steps in zip(state[LEDGER_SIGMAS], state[LEDGER_RATES], state[LEDGER_STEPS]):
        ledger.step(int(steps), noise_multiplier=float(sigma), sample_rate=float(rate))
    return ledger


# Settings a SuperNode may give its own client in a real deployment, e.g.
# flower-supernode --node-config "partition-id=0 num-partitions=4 model.quantization='4bit' adapter.rank=8"
NODE_CONFIG_KEYS = ("model.quantization", "model.quant_type", "model.double_quant", "model.compute_dtype",
                    "model.gradient_checkpointing", "adapter.rank")


def client_settings(cfg: FedtuneConfig, partition_id: int,
                    node_config: Mapping[str, Any] | None = None) -> tuple[ModelConfig, AdapterConfig]:
    """The model and adapter settings client ``partition_id`` trains with.

    In order: the run's settings, the client's entries of ``model.client_quantization`` and
    ``adapter.client_ranks`` (client i uses entry i % length; simulation), then its node's
    ``model.*`` / ``adapter.*`` keys of :data:`NODE_CONFIG_KEYS` (a real deployment). A bad
    node key or value raises :class:`ConfigError` naming it.
    """
    model = cfg.model.for_client(partition_id)
    adapter = dataclasses.replace(cfg.adapter, rank=cfg.adapter.rank_for(partition_id), client_ranks=None)
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
        if sections["adapter"]:
            adapter = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(adapter), sections["adapter"]))
    except OmegaConfBaseException as e:
        problems.append(f"node_config {given}: {str(e).splitlines()[0]}")
    else:
        problems += [f"node_config: {p}" for p in model.problems() + adapter.problems()]
    if problems:
        raise ConfigError(problems)
    return model, adapter


@dataclass(frozen=True)
class ClientReply:
    """What a client sends back: tensors and metrics (``num_examples`` is the weight)."""

    arrays: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]


class ClientRuntime:
    """Per-process client state for one configuration.

    Parameters
    ----------
    cfg : FedtuneConfig
        The run's configuration.
    run_id : int
        The Flower run this state belongs to (merged residuals do not carry across runs).
    node_config : mapping, optional
        This node's per-node settings (see :func:`client_settings`).
    """

    def __init__(self, cfg: FedtuneConfig, run_id: int = 0, node_config: Mapping[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.run_id = run_id
        self.node_config = dict(node_config or {})
        self._tokenized: dict[int, tuple[datasets.Dataset, datasets.Dataset]] = {}
        self._zo_masters: dict[str, torch.Tensor] | None = None
        self._zo_round = 0

    @cached_property
    def _pool(self) -> tuple[datasets.Dataset, int | None]:
        pool, _ = load_splits(self.cfg.data, self.cfg.model.task)
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

    def _prepare(self, partition_id: int, arrays: Mapping[str, torch.Tensor],
                 config: Mapping[str, Any]) -> tuple[AdapterHandle, float]:
        """Merge residual history, load the server's tensors, check frozen tensors match the server's."""
        handle, load_seconds = self.adapter(partition_id)
        plain, rounds = split_residual(arrays)
        residual = residual_of(handle.model)
        residual.claim(self.run_id)  # merges of an earlier run in this process do not carry over
        residual.catch_up()  # another base of this run in this process may have merged more rounds
        residual.merge_rounds(rounds)
        handle.load(plain)
        digest = config.get(protocol.STRATEGY_PREFIX + protocol.FROZEN_DIGEST)
        if digest is not None:
            pattern = str(config[protocol.STRATEGY_PREFIX + protocol.FROZEN_PATTERN])
            mine = tensor_digest(select(handle.state(), [pattern]))
            if mine != digest:
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
            tok = lambda ds: tokenize(ds, handle.tokenizer, self.cfg.model.task, self.cfg.data.max_length)  # noqa: E731
            self._tokenized[partition_id] = (tok(train), tok(held_out))
        return self._tokenized[partition_id]

    def train(self, partition_id: int, server_round: int, arrays: Mapping[str, torch.Tensor],
              trainable: Sequence[str], mode: str, config: Mapping[str, Any] | None = None,
              state: dict[str, Any] | None = None) -> ClientReply:
        """Run the routine ``mode`` names: load, train the trainable tensors, reply.

        ``state`` is this client's own record across rounds (Flower's ``context.state``, which
        follows the client whichever process serves it): the privacy ledger lives there.
        """
        config = config or {}
        state = {} if state is None else state
        model_cfg, adapter_cfg = self.settings(partition_id)
        if model_cfg.quantization != "none" and config.get(protocol.QUANTIZED_BASE_OK) is False:
            strategy = config.get(protocol.STRATEGY_NAME, "this strategy")
            raise ValueError(f"strategy.name={strategy!r} does not support a quantized base, and this client "
                             f"loads its base as model.quantization={model_cfg.quantization!r}; give it "
                             "model.quantization=none (node config or model.client_quantization)")
        if mode == ZEROTH_ORDER_MODE:
            return self._train_zeroth_order(partition_id, server_round, trainable, config)
        if mode == LORA_SB_INIT_MODE:
            return self._lora_sb_init(partition_id, arrays, config, state)
        if mode not in (GRADIENT_MODE, LORA_SB_MODE):
            raise ValueError(f"client mode {mode!r} is not supported by this fedtune version; known: "
                             f"{[GRADIENT_MODE, LORA_SB_MODE, LORA_SB_INIT_MODE, ZEROTH_ORDER_MODE]}")
        if mode == LORA_SB_MODE:
            handle, _ = self.adapter(partition_id)
            prepare_handle(handle, adapter_cfg.rank)
            adopt_frozen(handle, arrays)  # B and A stay put when later rounds send only R
        handle, load_seconds = self._prepare(partition_id, arrays, config)
        train_ds, _ = self.splits(partition_id)
        names = handle.set_trainable(trainable)
        seed = self.cfg.train.seed + 1000 * server_round + partition_id
        metrics: dict[str, Any] = {}
        if self.cfg.privacy.enabled:
            ledger = self._ledger(state, len(train_ds))
            sigma = ledger.noise_multiplier
            result = train_adapter_private(handle, train_ds, self.cfg.train, clip_norm=self.cfg.privacy.clip_norm,
                                           noise_multiplier=sigma, ledger=ledger, seed=seed)
            save_ledger(ledger, state)
            metrics.update({protocol.DP_EPSILON: ledger.epsilon(), protocol.DP_NOISE_MULTIPLIER: sigma})
        else:
            result = train_adapter(handle, train_ds, self.cfg.train, seed)
        if mode == LORA_SB_MODE:
            metrics[METRIC_ROUND] = float(config[protocol.STRATEGY_PREFIX + CFG_ROUND])
        return ClientReply(
            arrays=handle.tensors(names),
            num_examples=result.num_examples,
            metrics={protocol.TRAIN_LOSS: result.loss, protocol.TRAIN_STEPS: float(result.steps),
                     protocol.TRAIN_SECONDS: result.seconds, protocol.MODEL_LOAD_SECONDS: load_seconds,
                     protocol.LORA_RANK: float(adapter_cfg.rank),
                     protocol.LORA_SCALING: adapter_cfg.alpha / adapter_cfg.rank,
                     protocol.BASE_BITS: float(bits_of(model_cfg)),
                     protocol.BASE_WEIGHT_BYTES: float(weight_bytes(handle.model)),
                     protocol.PEAK_RSS_BYTES: float(peak_rss_bytes()),
                     **metrics},
        )

    # ------------------------------------------------------------------ LoRA-SB (Fed-SB)

    def _lora_sb_init(self, partition_id: int, arrays: Mapping[str, torch.Tensor],
                      config: Mapping[str, Any], state: dict[str, Any]) -> ClientReply:
        """One pass of the federated LoRA-SB initialisation: estimate ΔW_k at W0, reply with its sketch.

        Every pass uses the same examples in the same order (and, under DP, the same noise),
        so all passes sketch one estimate.
        """
        handle, load_seconds = self.adapter(partition_id)
        prepare_handle(handle, self.adapter_config(partition_id).rank)
        handle.load({})  # the untrained model: B = 0, R = I
        train_ds, _ = self.splits(partition_id)
        plain = {k[len(protocol.STRATEGY_PREFIX):]: v for k, v in config.items()
                 if k.startswith(protocol.STRATEGY_PREFIX)}
        seed = self.cfg.train.seed * 1_000_003 + partition_id
        privacy: dict[str, Any] = {}
        ledger = None
        if self.cfg.privacy.enabled:
            ledger = self._ledger(state, len(train_ds), starts_with_init=True)
            privacy = {"clip_norm": self.cfg.privacy.clip_norm, "noise_multiplier": ledger.noise_multiplier,
                       "generator": torch.Generator().manual_seed(seed)}
            if not state.get(INIT_ACCOUNTED):  # one noisy estimate, however many passes read it
                ledger.step(1, sample_rate=1.0)
                state[INIT_ACCOUNTED] = True
                save_ledger(ledger, state)
        start = time.perf_counter()
        out, metrics = init_reply(handle.model, batches(train_ds, self.cfg.train.batch_size,
                                                        handle.tokenizer.pad_token_id, seed, shuffle=False),
                                  plain, arrays, learning_rate=self.cfg.train.learning_rate,
                                  adapter_name=handle.adapter_name, **privacy)
        if ledger is not None:
            metrics[protocol.DP_EPSILON] = ledger.epsilon()
        return ClientReply(arrays=out, num_examples=len(train_ds),
                           metrics={**metrics, protocol.TRAIN_SECONDS: time.perf_counter() - start,
                                    protocol.MODEL_LOAD_SECONDS: load_seconds})

    def _ledger(self, state: Mapping[str, Any], num_examples: int, *, starts_with_init: bool = False) -> PrivacyLedger:
        """This client's privacy ledger, rebuilt from its state (σ for the target ε over the whole run).

        The first call fixes σ: a run that ``starts_with_init`` (Fed-SB) also spends one
        full-batch step on its initialisation estimate, which the calibration includes.
        """
        if LEDGER_SIGMAS in state:
            return load_ledger(state, self.cfg.privacy.delta)
        p = self.cfg.privacy
        rate = min(1.0, self.cfg.train.batch_size / num_examples)
        sigma = p.noise_multiplier
        if sigma is None:
            # Every round's local steps, at most (initialisation rounds train nothing).
            steps = self.cfg.federation.num_rounds * steps_per_round(self.cfg.train, num_examples)
            sigma = noise_multiplier_for(p.target_epsilon, p.delta, rate, steps,
                                         full_batch_steps=1 if starts_with_init else 0)
        return PrivacyLedger(sigma, rate, p.delta)

    def evaluate(self, partition_id: int, arrays: Mapping[str, torch.Tensor], mode: str = GRADIENT_MODE,
                 config: Mapping[str, Any] | None = None, trainable: Sequence[str] = ()) -> ClientReply:
        """Evaluate the server's global model on this client's local eval split."""
        if mode == ZEROTH_ORDER_MODE:
            handle, _ = self._zeroth_order_state(partition_id, config or {}, trainable)
        else:
            handle, _ = self._prepare(partition_id, arrays, config or {})
        _, eval_ds = self.splits(partition_id)
        result = evaluate(handle, eval_ds, self.cfg.train.eval_batch_size)
        return ClientReply(arrays={}, num_examples=int(result["num_examples"]),
                           metrics={protocol.EVAL_LOSS: result["loss"], protocol.EVAL_ACCURACY: result["accuracy"]})



    # ------------------------------------------------------------------ zeroth order (FedKSeed)

    def _zeroth_order_state(self, partition_id: int, config: Mapping[str, Any],
                            trainable: Sequence[str]) -> tuple[AdapterHandle, RoundPlan]:
        """Bring this process's copy of the global tuned tensors up to date; load it into the model.

        The copy (float32 masters and the round they reach) is shared by every virtual
        client this process serves: history it has already replayed is skipped.
        """
        plan = decode_round_config(config, prefix=protocol.STRATEGY_PREFIX)
        plan.check_fingerprint()
        handle, _ = self.adapter(partition_id)
        if self._zo_masters is None:
            tuned = select(tunable_tensors(handle.initial, handle.base_initial() if plan.tune == TUNE_FULL else {},
                                           plan.tune), trainable)
            not_fp32 = [k for k, v in tuned.items() if v.dtype != torch.float32]
            if not tuned or not_fp32:
                raise ValueError(f"zeroth-order tuning needs float32 tensors matching {list(trainable)}; "
                                 f"none match or these are not float32: {not_fp32[:3]} (set model.dtype=float32)")
            self._zo_masters = {k: v.clone() for k, v in sorted(tuned.items())}
        self._zo_round = apply_catch_up(self._zo_masters, plan.catch_up, self._zo_round, plan.lr)
        handle.load(self._zo_masters)
        return handle, plan

    def _train_zeroth_order(self, partition_id: int, server_round: int, trainable: Sequence[str],
                            config: Mapping[str, Any]) -> ClientReply:
        """FedKSeed's local round: τ two-point steps along pool seeds; only (seed, scalar) pairs go back."""
        _, load_seconds = self.adapter(partition_id)  # loads the base once; reported like the gradient path
        handle, plan = self._zeroth_order_state(partition_id, config, trainable)
        train_ds, _ = self.splits(partition_id)
        tunable = {**handle.base_params(), **handle.params}
        params = {k: tunable[k].data for k in self._zo_masters}  # the model reads these in place
        handle.model.eval()  # no dropout: both evaluations of a step must see the same function
        seed = self.cfg.train.seed * 1_000_003 + server_round * 10_007 + partition_id

        @torch.no_grad()
        def loss_on_batch(batch: dict) -> float:
            return float(handle.model(**batch).loss)

        start = time.perf_counter()
        result = zo_train(params, batches(train_ds, self.cfg.train.batch_size, handle.tokenizer.pad_token_id, seed),
                          loss_on_batch, seed_pool(plan.run_seed, plan.k), plan.probabilities, plan.steps,
                          plan.eps, plan.lr, rng_seed=seed)
        return ClientReply(
            arrays={},
            num_examples=len(train_ds),
            metrics={**encode_steps(result.history, state_round=self._zo_round, skipped=result.skipped),
                     protocol.TRAIN_LOSS: result.mean_loss, protocol.TRAIN_STEPS: float(result.steps),
                     protocol.TRAIN_SECONDS: time.perf_counter() - start, protocol.MODEL_LOAD_SECONDS: load_seconds,
                     protocol.BASE_BITS: float(bits_of(self.settings(partition_id)[0])),
                     protocol.BASE_WEIGHT_BYTES: float(weight_bytes(handle.model)),
                     protocol.PEAK_RSS_BYTES: float(peak_rss_bytes())},
        )


_RUNTIMES: dict[tuple, ClientRuntime] = {}


def runtime_for(cfg: FedtuneConfig, run_id: int = 0, node_config: Mapping[str, Any] | None = None) -> ClientRuntime:
    """The process's runtime for ``cfg``, run and node settings (created once, reused by later messages).

    Only the node's ``model.*`` / ``adapter.*`` keys tell runtimes apart: the virtual clients
    a simulation process serves (different ``partition-id``) share one runtime and its data.
    """
    from fedtune.config import to_yaml

    node = {k: v for k, v in (node_config or {}).items() if k.startswith(("model.", "adapter."))}
    key = (to_yaml(cfg), run_id, tuple(sorted((k, str(v)) for k, v in node.items())))
    if key not in _RUNTIMES:
        _RUNTIMES[key] = ClientRuntime(cfg, run_id, node)
    return _RUNTIMES[key]
