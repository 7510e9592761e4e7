"""The strategy interface: what the server sends, what each client trains, how replies merge.

A strategy is a plain Python object: tensors in, tensors out. It never sees a Flower
message; :mod:`fedtune.flower.strategy_adapter` adapts every strategy to Flower once. The round
loop (sampling, sending, waiting, evaluating, logging) belongs to the framework, so a
strategy fills in three things:

* :meth:`Strategy.configure_client` returns a :class:`ClientInstruction` per sampled client:
  the tensors to load, which adapter tensors to train (and so send back), and the client
  routine to run;
* :meth:`Strategy.aggregate` turns validated :class:`ClientUpdate` objects into the next
  global state, without mutating them;
* :meth:`Strategy.global_adapter` gives the adapter tensors to evaluate and save.

Built-in strategies register by name with :func:`register_strategy`; any other class is
named by a dotted path, ``package.module:ClassName``.
"""

from __future__ import annotations

import copy
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedtune import protocol
from fedtune.averaging import average
from fedtune.errors import ConfigError, InvalidUpdateError
from fedtune.options import build_plugin
from fedtune.registry import STRATEGY_GROUP, Registry
from fedtune.schema import to_yaml

if TYPE_CHECKING:
    from fedtune.models.loading import AdapterHandle
    from fedtune.schema import FedtuneConfig

Tensors = dict[str, torch.Tensor]
Scalar = bool | int | float | str
# What a Flower ConfigRecord / MetricRecord holds: scalars and lists of them.
Value = Scalar | list[int] | list[float] | list[str]


@dataclass(frozen=True)
class AdapterSpec:
    """What the server knows about the adapter before round 1.

    Parameters
    ----------
    initial : dict of str to Tensor
        The adapter tensors of a freshly initialised client, keyed by their PEFT
        state-dict names (the names used on the wire and in ``adapter_model.safetensors``).
    rank, alpha : int, float
        LoRA rank and alpha; the scaling applied to ``B @ A`` is ``alpha / rank``.
    seed : int
        The run's seed, for strategies that derive shared random state from it.
    base : dict of str to Tensor
        The base model's own weights (pretrained), given only to a strategy whose
        ``tunes_base_model`` is true.
    """

    initial: Mapping[str, torch.Tensor]
    rank: int
    alpha: float
    seed: int = 0
    base: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class ClientInstruction:
    """What one client is told to do in one round.

    Parameters
    ----------
    arrays : dict of str to Tensor
        Tensors the client loads into its adapter before training. Adapter tensors not
        named here are reset to their (seeded, identical everywhere) initial values.
    trainable : tuple of str
        Regular expressions over adapter tensor names: the tensors the client trains.
        Everything else stays frozen.
    expects : dict of str to tuple of int
        The names and shapes the server will accept back (-1 accepts any size in that
        dimension, e.g. the rank of a client-chosen LoRA rank); a reply with other keys or
        shapes is rejected before aggregation.
    routine : str
        The client routine that carries it out (:mod:`fedtune.routine`): a registered name
        (``"gradient"``, AdamW on the trainable tensors, by default) or a
        ``module:Class`` path.
    options : dict of str to scalar or list
        Method-specific settings for the client's routine, which reads them as
        :attr:`fedtune.routine.ClientJob.options` (sent under the ``strategy.`` prefix).
    """

    arrays: Mapping[str, torch.Tensor]
    trainable: tuple[str, ...]
    expects: Mapping[str, tuple[int, ...]]
    routine: str = protocol.DEFAULT_ROUTINE
    options: Mapping[str, Value] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientUpdate:
    """A validated reply from one client.

    ``node_id`` is Flower's id of the client's node (what :meth:`Strategy.configure_client` was
    given for it); the data partition the client trained on, the ``partition_id`` its routine
    saw, is ``metrics[fedtune.protocol.PARTITION_ID]``.
    """

    node_id: int
    arrays: Mapping[str, torch.Tensor]
    num_examples: int
    metrics: Mapping[str, Value] = field(default_factory=dict)


class Strategy(ABC):
    """Base class of every aggregation strategy: the server half of a method.

    Subclasses set ``name`` and ``summary_line``, take keyword-only constructor options
    (they come from ``strategy.options`` in the config) and implement the abstract methods.
    The client half is a :class:`~fedtune.routine.ClientRoutine` that the strategy's
    instructions name.

    Capabilities, checked by the framework before anything loads (every one has a safe
    default; a method declares what it does differently):

    ``accepts_mixed_ranks``
        Clients may train different LoRA ranks (``adapter.client_ranks``) in one run.
    ``supports_privacy``
        The method's client routines run DP-SGD under ``privacy.enabled``.
    ``supports_quantized_base``
        Clients may train on a bitsandbytes-quantized base; ``quantized_base_reason``
        says why not, for the start-up error.
    ``linear_lora_only``
        Aggregation handles linear LoRA pairs only: LoRA on an embedding is refused at
        start-up instead of being averaged inexactly.
    ``tunes_base_model``
        The global model includes the base model's own weights (full-parameter tuning):
        the server passes them in :attr:`AdapterSpec.base` and saves a whole model.
    ``averages_updates``
        The global state is a weighted average of client tensors, computed with
        :meth:`average` (passing the previous value): ``strategy.robust`` and
        ``strategy.server_optimizer`` apply. ``averaging_reason`` says why not, for the
        start-up error.
    ``supports_client_dp``
        Everything a client sends goes through :meth:`average`, so clipping and noising it
        there (``privacy.level: client``) protects the client's whole dataset;
        ``client_dp_reason`` says why not.

    Hooks with a default: :meth:`configure_evaluation`, :meth:`load_global` (what the
    server's model holds), :meth:`export_adapter` (the saved adapter, when it is not
    :meth:`global_adapter`), :meth:`config_problems`, :meth:`state_dict`.
    """

    name: ClassVar[str] = ""
    summary_line: ClassVar[str] = ""
    accepts_mixed_ranks: ClassVar[bool] = False
    supports_privacy: ClassVar[bool] = True
    supports_quantized_base: ClassVar[bool] = True
    quantized_base_reason: ClassVar[str] = ""
    linear_lora_only: ClassVar[bool] = False
    tunes_base_model: bool = False  # an instance attribute where an option decides it
    averages_updates: ClassVar[bool] = False
    averaging_reason: ClassVar[str] = ""
    supports_client_dp: ClassVar[bool] = False
    client_dp_reason: ClassVar[str] = ""

    def initialize(self, spec: AdapterSpec) -> None:
        """Receive the initial adapter before round 1. Called once, on the server."""
        self.spec = spec

    @abstractmethod
    def configure_client(self, server_round: int, node_id: int) -> ClientInstruction:
        """Return the instruction for one sampled client in ``server_round``.

        ``node_id`` is Flower's id of the client's node, stable within a run; it is not the
        data partition the client's routine sees (``ClientJob.partition_id``), which the reply
        reports (:class:`ClientUpdate`).
        """

    @abstractmethod
    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        """Fold the round's valid updates into the global state; return strategy metrics."""

    @abstractmethod
    def global_adapter(self) -> Tensors:
        """The adapter tensors (PEFT state-dict names) that represent the global model."""

    def average(self, tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                previous: Mapping[str, torch.Tensor] | None = None) -> Tensors:
        """The clients' ``tensors`` combined as the run says: the weighted mean, a robust rule
        (``strategy.robust``) or DP-FedAvg (``privacy.level: client``), then a server optimizer's
        step from ``previous`` (``strategy.server_optimizer``). Call it once per aggregation with
        every averaged tensor; see :func:`fedtune.averaging.average`."""
        return average(tensors, weights, previous)

    def configure_evaluation(self, server_round: int, node_id: int) -> ClientInstruction:
        """What a client loads to evaluate the global model (default: the global adapter).

        Only ``arrays``, ``routine`` and ``options`` are used: nothing is trained or sent back.
        """
        return ClientInstruction(arrays=self.global_adapter(), trainable=(), expects={})

    def load_global(self, handle: AdapterHandle) -> None:
        """Put the global model into the server's model ``handle`` (to evaluate or save it).

        The default loads :meth:`global_adapter`. A method whose global model holds more
        than adapter tensors (e.g. updates merged beside the base) overrides this.
        """
        handle.load(self.global_adapter())

    def export_adapter(self) -> ExportedAdapter | None:
        """The final model as one PEFT LoRA adapter, when it differs from :meth:`global_adapter`."""
        return None

    def config_problems(self, cfg: FedtuneConfig) -> list[str]:
        """Problems with this strategy in this configuration (checked before anything loads)."""
        return []

    def hyperparameters(self) -> dict[str, Any]:
        """Every hyperparameter in use, for the start-up log line."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything the strategy holds, for the server's checkpoint after each round.

        The default copies the instance's attributes (tensors, numpy arrays, plain
        Python); override this and :meth:`load_state_dict` if the strategy holds
        something that cannot be pickled, such as an open file or a model.
        """
        return copy.deepcopy(vars(self))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on resume, instead of :meth:`initialize`)."""
        vars(self).clear()
        vars(self).update(copy.deepcopy(dict(state)))


@dataclass(frozen=True)
class ExportedAdapter:
    """A PEFT LoRA adapter of some rank (e.g. the stacked updates of every round)."""

    tensors: Mapping[str, torch.Tensor]
    rank: int
    alpha: float


# --------------------------------------------------------------------------- helpers


def select(tensors: Mapping[str, torch.Tensor], patterns: Sequence[str]) -> Tensors:
    """The entries of ``tensors`` whose name matches any of the regular expressions."""
    compiled = [re.compile(p) for p in patterns]
    return {k: v for k, v in tensors.items() if any(c.search(k) for c in compiled)}


def shapes_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def check_update(arrays: Mapping[str, torch.Tensor], expects: Mapping[str, tuple[int, ...]]) -> None:
    """Raise :class:`InvalidUpdateError` naming what is wrong with a reply, if anything."""
    missing = sorted(set(expects) - set(arrays))
    extra = sorted(set(arrays) - set(expects))
    if missing or extra:
        raise InvalidUpdateError(f"wrong keys: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                                 f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for key, shape in expects.items():
        got = tuple(arrays[key].shape)
        if len(got) != len(shape) or any(e not in (-1, g) for e, g in zip(shape, got)):
            wildcard = " (-1: any size)" if -1 in shape else ""
            raise InvalidUpdateError(f"{key} has shape {got}, expected {tuple(shape)}{wildcard}")
        if not arrays[key].is_floating_point():
            raise InvalidUpdateError(f"{key} has dtype {arrays[key].dtype}, expected a floating point tensor")
        if not torch.isfinite(arrays[key]).all():
            raise InvalidUpdateError(f"{key} contains NaN or infinite values")


# --------------------------------------------------------------------------- registry

_REGISTRY: Registry[type[Strategy]] = Registry("strategy", Strategy, "strategy.name", decorator="register_strategy",
                                               example="mypkg.mymodule:MyStrategy", group=STRATEGY_GROUP)


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator that registers a strategy under ``cls.name``."""
    return _REGISTRY.register(cls)


def registered_strategies() -> dict[str, type[Strategy]]:
    """Every strategy by name: entry points of ``fedtune.strategies`` (the built-ins and installed packages'),
    and classes registered with :func:`register_strategy`."""
    return _REGISTRY.registered()


def strategies_where(capable: Callable[[type[Strategy]], bool]) -> list[str]:
    """The names of the registered strategies for which ``capable(cls)`` holds, sorted (for messages)."""
    return sorted(name for name, cls in registered_strategies().items() if capable(cls))


def resolve_strategy(name: str) -> type[Strategy]:
    """A registered name, or ``package.module:Class`` / ``path/to/file.py:Class``."""
    return _REGISTRY.resolve(name)


def build_strategy(name: str, options: Mapping[str, Any]) -> Strategy:
    """Instantiate a strategy; unknown or wrongly typed options raise :class:`ConfigError` naming them.

    A strategy's options are its constructor's keyword arguments (types, defaults) described in
    its docstring's ``Parameters`` (:mod:`fedtune.options`).
    """
    return build_plugin(resolve_strategy(name), options, "strategy.options")


# The strategy the last successful config check built, by the config it checked: the run of that
# config takes it (strategy_for), so a server process builds its strategy once.
_checked: dict[str, Strategy] = {}


def strategy_for(cfg: FedtuneConfig) -> Strategy:
    """The strategy of a run of ``cfg``: the one its config check built in this process, else a new one."""
    strategy = _checked.pop(to_yaml(cfg), None)
    return strategy if strategy is not None else build_strategy(cfg.strategy.name, cfg.strategy.options)


def strategy_problems(cfg: FedtuneConfig) -> list[str]:
    """Problems with ``cfg.strategy``, as config problem strings (empty when fine).

    A config checked fine before in this process, whose strategy no run has taken yet, is not
    checked again.
    """
    key = to_yaml(cfg)
    if key in _checked:
        return []
    try:
        strategy = build_strategy(cfg.strategy.name, cfg.strategy.options)
    except ConfigError as e:
        return e.problems
    problems = strategy.config_problems(cfg)
    if cfg.privacy.example_level and not strategy.supports_privacy:
        able = strategies_where(lambda c: c.supports_privacy)
        problems.append(f"privacy.enabled=true with strategy.name={cfg.strategy.name!r}: its client routine is "
                        f"not DP-SGD; use a gradient-trained strategy, one of {able}")
    if cfg.privacy.client_level and not strategy.supports_client_dp:
        able = strategies_where(lambda c: c.supports_client_dp)
        why = strategy.client_dp_reason or strategy.averaging_reason
        reason = f" ({why})" if why else ""
        problems.append(f"privacy.level=client with strategy.name={cfg.strategy.name!r}: DP-FedAvg clips and noises "
                        f"each client's update where the server averages it, and not all that this method's "
                        f"clients send is such an update{reason}; use one of {able}, or privacy.level=example")
    if cfg.privacy.client_level and cfg.strategy.robust.rule != "mean":
        problems.append(f"privacy.level=client with strategy.robust.rule={cfg.strategy.robust.rule!r}: DP-FedAvg's "
                        "noise is calibrated to a sum of clipped updates; use strategy.robust.rule=mean (clipping "
                        "already bounds what one client can do)")
    changed = cfg.strategy.averaging_changed()
    if changed and not strategy.averages_updates:
        able = strategies_where(lambda c: c.averages_updates)
        reason = f" ({strategy.averaging_reason})" if strategy.averaging_reason else ""
        problems.append(f"{' and '.join(changed)} {'are' if len(changed) > 1 else 'is'} for strategies whose global "
                        f"state is an average of client tensors; strategy.name={cfg.strategy.name!r} is not one"
                        f"{reason}. Use one of {able}, or leave strategy.robust.rule=mean and "
                        "strategy.server_optimizer.name=none")
    problems += krum_problems(cfg)
    ranks = cfg.adapter.client_ranks
    if ranks and len(set(ranks)) > 1 and not strategy.accepts_mixed_ranks:
        mixed = strategies_where(lambda c: c.accepts_mixed_ranks)
        problems.append(f"adapter.client_ranks={list(ranks)} mixes ranks, which strategy.name={cfg.strategy.name!r} "
                        f"cannot aggregate; use one rank or a strategy that accepts mixed ranks: {mixed}")
    quantized = cfg.model.quantized_anywhere()
    if quantized and not strategy.supports_quantized_base:
        where = ", ".join(f"model.{key}={getattr(cfg.model, key)!r}"
                          for key in ("quantization", "client_quantization", "server_quantization")
                          if getattr(cfg.model, key) not in (None, "none"))
        able = strategies_where(lambda c: c.supports_quantized_base)
        reason = f" ({strategy.quantized_base_reason})" if strategy.quantized_base_reason else ""
        problems.append(f"{where} puts strategy.name={cfg.strategy.name!r} on a {'/'.join(quantized)} base, which "
                        f"it does not support{reason}; use model.quantization=none or a strategy that supports "
                        f"quantized bases: {able}")
    if not problems:
        _checked.clear()
        _checked[key] = strategy
    return problems


def krum_problems(cfg: FedtuneConfig) -> list[str]:
    """Krum needs n ≥ 2f + 3 clients a round (Blanchard et al. 2017), Multi-Krum's ``select`` at most n."""
    robust, fed = cfg.strategy.robust, cfg.federation
    if robust.rule not in ("krum", "multi-krum"):
        return []
    drawn = fed.clients_per_round()
    out = []
    if drawn < 2 * robust.byzantine + 3:
        out.append(f"strategy.robust.rule={robust.rule!r} with strategy.robust.byzantine={robust.byzantine} needs at "
                   f"least 2f + 3 = {2 * robust.byzantine + 3} clients a round; this run draws {drawn}: lower "
                   "byzantine or draw more clients")
    if robust.select is not None and robust.select > drawn:
        out.append(f"strategy.robust.select={robust.select} exceeds the {drawn} clients drawn a round")
    return out


__all__ = [
    "AdapterSpec",
    "ClientInstruction",
    "ClientUpdate",
    "ExportedAdapter",
    "Strategy",
    "build_strategy",
    "check_update",
    "register_strategy",
    "registered_strategies",
    "resolve_strategy",
    "select",
    "shapes_of",
    "strategies_where",
]
