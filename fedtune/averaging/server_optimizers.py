"""Server optimizers on the round's pseudo-gradient: FedAvgM, FedAdagrad, FedAdam, FedYogi.

With x_t the global tensors before the round and x̄ what the clients' tensors combine to (their
weighted mean, or a robust rule's result), the pseudo-gradient is Δ_t = x̄ − x_t, and

* ``fedavgm`` (Hsu et al. 2019): m_t = β·m_{t−1} + Δ_t, x_{t+1} = x_t + η·m_t; with β = 0 and
  η = 1 it is plain averaging;
* ``fedadagrad``, ``fedadam``, ``fedyogi`` (Reddi et al. 2021, Algorithm 2):
  m_t = β₁·m_{t−1} + (1 − β₁)·Δ_t and x_{t+1} = x_t + η·m_t / (√v_t + τ), with
  v_t = v_{t−1} + Δ_t² (Adagrad), β₂·v_{t−1} + (1 − β₂)·Δ_t² (Adam) or
  v_{t−1} − (1 − β₂)·Δ_t²·sign(v_{t−1} − Δ_t²) (Yogi); v_{−1} = τ², m_{−1} = 0, no bias
  correction, as in the paper.

Moments are kept per tensor name in float64 and go into the server's checkpoint, so a resumed
run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedtune.averaging.mean import Tensors
from fedtune.errors import AggregationError
from fedtune.schema import SERVER_OPTIMIZERS

# η when strategy.server_optimizer.lr is not given: FedAvgM's 1 keeps FedAvg's step; the adaptive
# optimizers move every coordinate by about η a round, so η is of the size of a round's change.
DEFAULT_LR = {"fedavgm": 1.0, "fedadagrad": 1e-2, "fedadam": 1e-2, "fedyogi": 1e-2}


class ServerOptimizer:
    """One of :data:`SERVER_OPTIMIZERS` (but ``none``) with its moments.

    Parameters
    ----------
    name : str
        ``fedavgm``, ``fedadagrad``, ``fedadam`` or ``fedyogi``.
    lr : float, optional
        The server learning rate η (default :data:`DEFAULT_LR`).
    momentum : float
        β (FedAvgM) or β₁ (the adaptive ones).
    beta2 : float
        β₂ of FedAdam and FedYogi.
    tau : float
        τ, the adaptivity (ε-like) constant of the adaptive ones.
    """

    def __init__(self, name: str, lr: float | None = None, momentum: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3) -> None:
        if name not in DEFAULT_LR:
            raise AggregationError(f"server optimizer {name!r} is not one of {SERVER_OPTIMIZERS[1:]}")
        self.name, self.lr = name, DEFAULT_LR[name] if lr is None else float(lr)
        self.momentum, self.beta2, self.tau = float(momentum), float(beta2), float(tau)
        self.m: Tensors = {}
        self.v: Tensors = {}
        self.steps = 0

    def step(self, previous: Mapping[str, torch.Tensor], combined: Mapping[str, torch.Tensor]) -> Tensors:
        """x_{t+1} for every tensor of ``previous`` (x_t), given the clients' combination ``combined`` (x̄)."""
        if set(previous) != set(combined):
            raise AggregationError(f"the server optimizer needs the previous value of every averaged tensor; "
                                   f"got {sorted(set(previous) ^ set(combined))[:3]} on one side only")
        out = {}
        for key, x in previous.items():
            x64 = x.detach().to(torch.float64)
            delta = combined[key].detach().to(torch.float64) - x64
            m = self.m.get(key, torch.zeros_like(delta))
            if self.name == "fedavgm":
                m = self.momentum * m + delta
                new = x64 + self.lr * m
            else:
                m = self.momentum * m + (1 - self.momentum) * delta
                v = self.v.get(key, torch.full_like(delta, self.tau ** 2))
                square = delta.square()
                if self.name == "fedadagrad":
                    v = v + square
                elif self.name == "fedadam":
                    v = self.beta2 * v + (1 - self.beta2) * square
                else:
                    v = v - (1 - self.beta2) * square * torch.sign(v - square)
                self.v[key] = v
                new = x64 + self.lr * m / (v.sqrt() + self.tau)
            self.m[key] = m
            out[key] = new.to(x.dtype)
        self.steps += 1
        return out

    def hyperparameters(self) -> dict[str, Any]:
        out = {"server_optimizer": self.name, "server_lr": self.lr, "server_momentum": self.momentum}
        return out if self.name == "fedavgm" else {**out, "server_beta2": self.beta2, "server_tau": self.tau}

    def state_dict(self) -> dict[str, Any]:
        return {"m": {k: v.clone() for k, v in self.m.items()}, "v": {k: v.clone() for k, v in self.v.items()},
                "steps": self.steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.m = {k: v.clone() for k, v in state["m"].items()}
        self.v = {k: v.clone() for k, v in state["v"].items()}
        self.steps = int(state["steps"])


__all__ = ["DEFAULT_LR", "SERVER_OPTIMIZERS", "ServerOptimizer"]
