"""Client routines: what a client does with one instruction, as named plug-ins.

A strategy's :class:`~fedtune.strategy.ClientInstruction` names a routine; the ClientApp
looks it up here and runs it. A routine is the client half of a method, as the strategy is
its server half:

* it subclasses :class:`ClientRoutine` (or :class:`GradientRoutine`, which most LoRA
  methods refine by overriding one step), sets ``name`` and registers with
  :func:`register_routine`;
* :meth:`ClientRoutine.train` gets a :class:`ClientJob` (the instruction's tensors, trainable
  patterns and options, and this client's :class:`ClientState`) and returns a
  :class:`~fedtune.client.runtime.ClientReply`; :meth:`ClientRoutine.evaluate` scores the global
  model on the client's local eval split;
* the client it is built with (a :class:`ClientContext`: fedtune's
  :class:`~fedtune.client.runtime.ClientRuntime`) gives it the client's model, data and settings.

One routine object is made per runtime (a process and configuration) and reused by every
round and virtual client that process serves, so its attributes are a per-process cache.
What must follow *one client* from round to round (a personal adapter, control variates,
a privacy ledger) goes in :class:`ClientState`.

A routine defined in a user's module registers when that module is imported: the ClientApp
imports the module of a ``strategy.name`` given by path before it looks the routine up, so
a strategy and its routine in one file (see ``examples/fedprox.py``) run in a simulation
and on a real SuperNode without touching fedtune.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import datasets
import torch

from fedtune import protocol
from fedtune.client.ledger import client_ledger, save_ledger
from fedtune.client.training import TrainResult, train_adapter, train_adapter_private
from fedtune.models.loading import AdapterHandle
from fedtune.objectives import Objective
from fedtune.registry import Registry
from fedtune.schema import AdapterConfig, FedtuneConfig

Value = bool | int | float | str | list[int] | list[float] | list[str]


@dataclass(frozen=True)
class ClientReply:
    """What a client sends back: tensors and metrics (``num_examples`` is its weight)."""

    arrays: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, Any]


@dataclass
class ClientState:
    """What one client keeps from round to round, whichever process serves it.

    ``values`` holds scalars and lists of them, ``tensors`` named tensors. Flower's
    ``context.state`` carries both between the rounds of one Flower run (in simulation and
    on a SuperNode, across ClientApp processes). A routine changes them in place; what it
    leaves here is stored after the round.
    """

    values: dict[str, Value] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientJob:
    """One instruction for one client, as its routine sees it.

    Parameters
    ----------
    partition_id : int
        Which client this is (its data partition).
    server_round : int
        The round the instruction belongs to.
    arrays : dict of str to Tensor
        The tensors the server sent.
    trainable : tuple of str
        Regular expressions over adapter tensor names: what to train (and send back).
    options : dict of str to value
        The strategy's settings for this instruction (``ClientInstruction.options``).
    state : ClientState
        This client's own state.
    """

    partition_id: int
    server_round: int
    arrays: Mapping[str, torch.Tensor]
    trainable: tuple[str, ...]
    options: Mapping[str, Any]
    state: ClientState


class ClientContext(Protocol):
    """What a routine may ask of the client it runs in (fedtune's :class:`~fedtune.client.runtime.ClientRuntime`).

    Attributes
    ----------
    cfg : FedtuneConfig
        The run's configuration.
    objective : Objective
        The training loss (SFT, classification or DPO) and its batching.
    """

    cfg: FedtuneConfig
    objective: Objective

    def adapter_config(self, partition_id: int) -> AdapterConfig:
        """The LoRA settings of this client (its rank where ranks differ)."""

    def adapter(self, partition_id: int = 0) -> tuple[AdapterHandle, float]:
        """The client's model with a fresh adapter, and the seconds it took to get it."""

    def prepare(self, job: ClientJob) -> tuple[AdapterHandle, float]:
        """The model with the job's tensors loaded and its trainable patterns set, and the seconds taken."""

    def splits(self, partition_id: int) -> tuple[datasets.Dataset, datasets.Dataset]:
        """The client's training and local evaluation examples."""

    def evaluate_local(self, partition_id: int, handle: AdapterHandle) -> ClientReply:
        """Loss and metrics of ``handle`` on the client's local evaluation split."""

    def resource_metrics(self, partition_id: int, handle: AdapterHandle) -> dict[str, float]:
        """Memory and device figures the client reports with its reply."""

    def training_metrics(self, partition_id: int, handle: AdapterHandle, result: TrainResult) -> dict[str, float]:
        """A training reply's metrics: loss, steps, examples, seconds and resources."""


class ClientRoutine(ABC):
    """Base class of every client routine.

    Parameters
    ----------
    client : ClientContext
        The client's model, data and settings (one runtime per process and configuration).
    """

    name: ClassVar[str] = ""
    # Whether train() applies DP-SGD when privacy.enabled; a client refuses to run one that does not.
    supports_privacy: ClassVar[bool] = False

    def __init__(self, client: ClientContext) -> None:
        self.client = client

    @abstractmethod
    def train(self, job: ClientJob) -> ClientReply:
        """Train as the instruction says and return the reply (tensors, examples, metrics)."""

    def evaluate(self, job: ClientJob) -> ClientReply:
        """Score the global model on this client's local eval split (default: load the arrays sent)."""
        handle, _ = self.client.prepare(job)
        return self.client.evaluate_local(job.partition_id, handle)


class GradientRoutine(ClientRoutine):
    """AdamW (DP-SGD under ``privacy.enabled``) on the trainable tensors; the default routine.

    Subclasses refine one step: :meth:`load` (what the model holds before training and
    evaluating), :meth:`regularizer` (a term added to the loss) or :meth:`reply` (what goes
    back).
    """

    name = protocol.DEFAULT_ROUTINE
    supports_privacy = True
    # Full-batch steps the method spends besides local training (privacy calibration).
    full_batch_steps: ClassVar[int] = 0

    def load(self, job: ClientJob) -> tuple[AdapterHandle, float]:
        """Put the server's tensors into this client's model; return it and the seconds it took."""
        return self.client.prepare(job)

    def regularizer(self, job: ClientJob, handle: AdapterHandle) -> Callable[[], torch.Tensor] | None:
        """A term added to every batch's loss (none by default)."""
        return None

    def train(self, job: ClientJob) -> ClientReply:
        handle, load_seconds = self.load(job)
        names = handle.set_trainable(job.trainable)
        result, metrics = self.fit(job, handle)
        return self.reply(job, handle, names, result, {**metrics, protocol.MODEL_LOAD_SECONDS: load_seconds})

    def evaluate(self, job: ClientJob) -> ClientReply:
        handle, _ = self.load(job)
        return self.client.evaluate_local(job.partition_id, handle)

    def fit(self, job: ClientJob, handle: AdapterHandle) -> tuple[TrainResult, dict[str, float]]:
        """One local round on the client's training split; DP-SGD (with its ledger) under privacy."""
        cfg = self.client.cfg
        train_ds, _ = self.client.splits(job.partition_id)
        seed = cfg.train.seed + 1000 * job.server_round + job.partition_id
        if not cfg.privacy.example_level:
            return train_adapter(handle, train_ds, cfg.train, seed, self.regularizer(job, handle),
                                 objective=self.client.objective), {}
        ledger = client_ledger(cfg, job.state.values, len(train_ds), full_batch_steps=self.full_batch_steps)
        sigma = ledger.noise_multiplier
        result = train_adapter_private(handle, train_ds, cfg.train, clip_norm=cfg.privacy.clip_norm,
                                       noise_multiplier=sigma, ledger=ledger, seed=seed)
        save_ledger(ledger, job.state.values)
        return result, {protocol.DP_EPSILON: ledger.epsilon(), protocol.DP_NOISE_MULTIPLIER: sigma}

    def reply(self, job: ClientJob, handle: AdapterHandle, names: list[str], result: TrainResult,
              metrics: dict[str, float]) -> ClientReply:
        """The trained tensors and the round's metrics."""
        return ClientReply(arrays=handle.tensors(names), num_examples=result.num_examples,
                           metrics={**self.client.training_metrics(job.partition_id, handle, result), **metrics})


# --------------------------------------------------------------------------- registry

_REGISTRY: Registry[type[ClientRoutine]] = Registry(
    "client routine", ClientRoutine, "ClientInstruction.routine", decorator="register_routine",
    example="mypkg.mymodule:MyRoutine")


def register_routine(cls: type[ClientRoutine]) -> type[ClientRoutine]:
    """Class decorator that registers a client routine under ``cls.name``."""
    return _REGISTRY.register(cls)


def registered_routines() -> dict[str, type[ClientRoutine]]:
    """Registered client routines by name, the built-ins included."""
    return _REGISTRY.registered()


def resolve_routine(name: str) -> type[ClientRoutine]:
    """A registered routine name, or ``package.module:Class`` / ``path/to/file.py:Class``."""
    return _REGISTRY.resolve(name)


register_routine(GradientRoutine)


__all__ = [
    "ClientContext",
    "ClientJob",
    "ClientReply",
    "ClientRoutine",
    "ClientState",
    "GradientRoutine",
    "register_routine",
    "registered_routines",
    "resolve_routine",
]
