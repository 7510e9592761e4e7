"""A method with both halves, defined outside fedtune: FedProx on LoRA.

Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020: each client
minimises its loss plus (μ/2)·‖w − w_global‖² over the tensors it trains, which keeps its
local steps near the global model on skewed data. The server half is FedIT's averaging;
the client half is a routine that adds the proximal term. Run it by path, nothing to
install or register in fedtune::

    fedtune simulate strategy.name=examples/fedprox.py:FedProx strategy.options.mu=0.01

The ClientApp imports this file (named by ``strategy.name``) before it looks up the routine
``fedprox``, in a simulation and on a real SuperNode alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from fedtune.strategies.fedit import FedIT

from fedtune.models.loading import AdapterHandle
from fedtune.routine import ClientJob, GradientRoutine, register_routine
from fedtune.strategy import ClientInstruction

ROUTINE = "fedprox"
MU = "fedprox.mu"  # instruction option: the proximal weight μ


@register_routine
class ProximalRoutine(GradientRoutine):
    """Gradient training with the proximal term (μ/2)·Σ‖w − w_global‖² over the trained tensors."""

    name = ROUTINE

    def regularizer(self, job: ClientJob, handle: AdapterHandle) -> Callable[[], torch.Tensor] | None:
        mu = float(job.options[MU])
        if mu == 0.0:
            return None
        trained = {k: p for k, p in handle.params.items() if p.requires_grad}
        anchor = {k: p.detach().clone() for k, p in trained.items()}  # the global model, as loaded

        def proximal() -> torch.Tensor:
            return 0.5 * mu * sum((p - anchor[k]).square().sum() for k, p in trained.items())

        return proximal


class FedProx(FedIT):
    """FedIT's averaging; clients train with FedProx's proximal term.

    Parameters
    ----------
    mu : float
        The proximal weight μ (0 is FedIT).
    weighting : {"examples", "uniform"}
        As in FedIT.
    """

    name = "fedprox"
    summary_line = "FedAvg of LoRA with a proximal term on the clients (Li et al. 2020)"

    def __init__(self, *, mu: float = 0.01, weighting: str = "examples") -> None:
        if not mu >= 0:
            raise ValueError(f"mu={mu} must be >= 0, e.g. 0.01")
        super().__init__(weighting=weighting)
        self.mu = float(mu)

    def configure_client(self, server_round: int, node_id: int) -> ClientInstruction:
        plain = super().configure_client(server_round, node_id)
        return ClientInstruction(arrays=plain.arrays, trainable=plain.trainable, expects=plain.expects,
                                 routine=ROUTINE, options={MU: self.mu})

    def hyperparameters(self) -> dict[str, object]:
        return {**super().hyperparameters(), "mu": self.mu}
