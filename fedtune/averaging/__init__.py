"""How a round's client tensors become the global ones: weighted mean, robust rule, server optimizer.

A strategy whose global state is an average of client tensors (FedIT's adapter, FFA-LoRA's B,
Fed-SB's R, FedSA-LoRA's A) declares ``averages_updates = True`` and computes that average with
:meth:`fedtune.strategy.Strategy.average`. Under the run's settings the framework makes that one
call apply ``strategy.robust`` (median, trimmed mean, Krum: :mod:`fedtune.averaging.robust`) or
client-level DP (``privacy.level: client``: :mod:`fedtune.averaging.client_dp`) in place of the
mean, then ``strategy.server_optimizer`` (FedAvgM, FedAdam, ...:
:mod:`fedtune.averaging.server_optimizers`) to the step from the previous global value. Outside a
run (a unit test calling ``aggregate``) it is the plain weighted mean.

May import: :mod:`fedtune.errors`, :mod:`fedtune.privacy` (the ledger), :mod:`fedtune.protocol`
(LoRA's tensor names) and :mod:`fedtune.schema` (the config's vocabularies); it names no method.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from fedtune.averaging.client_dp import ClientLevelDP
from fedtune.averaging.mean import Tensors, normalized_weights, weighted_average
from fedtune.averaging.robust import ROBUST_RULES, RobustRule, factor_deviation
from fedtune.averaging.server_optimizers import DEFAULT_LR, SERVER_OPTIMIZERS, ServerOptimizer
from fedtune.errors import AggregationError

log = logging.getLogger("fedtune.server.run")


class Averaging:
    """The run's averaging: a robust rule, then optionally a server optimizer.

    ``client_ids`` (set by the framework before each aggregation) name the clients in the
    order their tensors are given, for the log line of the clients a rule left out; ``metrics``
    holds what the last call measured, for the run log.
    """

    def __init__(self, rule: RobustRule | None = None, optimizer: ServerOptimizer | None = None,
                 dp: ClientLevelDP | None = None) -> None:
        self.rule = rule or RobustRule()
        self.optimizer = optimizer
        self.dp = dp
        self.server_round = 0
        self.client_ids: list[int] = []
        self.metrics: dict[str, float] = {}
        self.calls = 0

    @property
    def is_plain(self) -> bool:
        return self.rule.name == "mean" and self.optimizer is None and self.dp is None

    def __call__(self, tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                 previous: Mapping[str, torch.Tensor] | None = None) -> Tensors:
        if self.calls and not self.is_plain:  # a second call would step the optimizer or the ledger twice
            raise AggregationError("Strategy.average was called twice in one aggregation under "
                                   "strategy.robust, strategy.server_optimizer or client-level privacy; average every "
                                   "tensor in one call")
        self.calls += 1
        if self.dp is not None:  # DP-FedAvg: clipped, noised, every client weighted alike
            combined, measured = self.dp.combine(tensors, previous, self.server_round)
            self.metrics.update(measured)
            kept = list(range(len(tensors)))
        else:
            combined, kept = self.rule.combine(tensors, weights)
        if self.rule.name != "mean":
            self.metrics["robust_clients_kept"] = float(len(kept))
            left_out = [self.client_ids[i] if i < len(self.client_ids) else i
                        for i in range(len(tensors)) if i not in kept]
            if self.rule.name in ("krum", "multi-krum") and left_out:
                log.info("%s left out client(s) %s of %d", self.rule.name, left_out, len(tensors))
            deviation = factor_deviation(self.rule, tensors, combined)
            if deviation is not None:
                self.metrics["robust_factor_deviation"] = deviation
        if self.optimizer is None:
            return combined
        if previous is None:
            raise AggregationError(f"strategy.server_optimizer={self.optimizer.name!r} needs the previous global "
                                   "tensors: the strategy must pass previous= to Strategy.average")
        stepped = self.optimizer.step(previous, combined)
        self.metrics["server_step_norm"] = sum(float((stepped[k].double() - previous[k].double()).square().sum())
                                               for k in stepped) ** 0.5
        return stepped

    def hyperparameters(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.rule.name != "mean":
            out["robust"] = self.rule.name
            out.update({"trimmed-mean": {"robust_trim": self.rule.trim},
                        "krum": {"robust_byzantine": self.rule.byzantine},
                        "multi-krum": {"robust_byzantine": self.rule.byzantine,
                                       "robust_select": self.rule.select}}.get(self.rule.name, {}))
        out.update(self.dp.hyperparameters() if self.dp else {})
        return {**out, **(self.optimizer.hyperparameters() if self.optimizer else {})}

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"optimizer": self.optimizer.state_dict()} if self.optimizer else {}
        return {**out, "client_dp": self.dp.state_dict()} if self.dp else out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.optimizer is not None and state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        if self.dp is not None and state.get("client_dp"):
            self.dp.load_state_dict(state["client_dp"])


_ACTIVE: ContextVar[Averaging | None] = ContextVar("fedtune_averaging", default=None)


@contextmanager
def averaging_in_effect(averaging: Averaging, client_ids: Sequence[int] = (), server_round: int = 0) -> Iterator[Averaging]:
    """Make :func:`average` use ``averaging`` inside the block (one aggregation, of ``server_round``)."""
    averaging.client_ids, averaging.metrics, averaging.calls = list(client_ids), {}, 0
    averaging.server_round = server_round
    token = _ACTIVE.set(averaging)
    try:
        yield averaging
    finally:
        _ACTIVE.reset(token)


def average(tensors: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
            previous: Mapping[str, torch.Tensor] | None = None) -> Tensors:
    """The clients' ``tensors`` combined under the run's averaging (the weighted mean outside a run).

    Parameters
    ----------
    tensors : sequence of dict
        One mapping per client, all with the same keys and shapes.
    weights : sequence of float
        The clients' weights (examples, or 1 each), used by the mean and Multi-Krum.
    previous : dict, optional
        The global value of the same tensors before this round: a server optimizer steps
        from it. Averaging strategies pass it.
    """
    active = _ACTIVE.get()
    return weighted_average(tensors, weights) if active is None else active(tensors, weights, previous)


def build_averaging(rule: str = "mean", trim: float = 0.1, byzantine: int = 1, select: int | None = None,
                    optimizer: str = "none", lr: float | None = None, momentum: float = 0.9, beta2: float = 0.99,
                    tau: float = 1e-3, dp: ClientLevelDP | None = None) -> Averaging:
    """The :class:`Averaging` that ``strategy.robust``, ``strategy.server_optimizer`` and client-level
    ``privacy`` describe."""
    return Averaging(RobustRule(rule, trim, byzantine, select),
                     None if optimizer == "none" else ServerOptimizer(optimizer, lr, momentum, beta2, tau), dp)


__all__ = ["DEFAULT_LR", "ROBUST_RULES", "SERVER_OPTIMIZERS", "Averaging", "ClientLevelDP", "RobustRule", "ServerOptimizer",
           "average", "averaging_in_effect", "build_averaging", "normalized_weights", "weighted_average"]
