"""FedSA-LoRA: selective aggregation, A shared and averaged, B personal.

Guo, Zeng, Wang, Fan, Wang, Qu, "Selective Aggregation for Low-Rank Adaptation in
Federated Learning", ICLR 2025 (https://openreview.net/forum?id=iX3uESGdsO).

The paper's analysis: A learns what is general across clients, B what is specific to each.
Every client trains both, the server averages only the A matrices (and any task head) and
sends them back; each client keeps its own B from round to round (its
:class:`~fedtune.routine.ClientState`), so each client's model W0 + s·B_k·Ā is personal.

The server's own model, for its central evaluation and the saved adapter, is Ā with the
weighted average of the clients' B (the paper's global model). For that, clients also send
their B (``upload_b=True``, the default); the server never sends a B back. With
``upload_b=False`` a client sends only A and the head (the paper's upload, half of FedIT's
for square layers); the server's B then stays at its initial value, so its central
evaluation shows the shared part only and the clients' personal evaluations are the
metric that counts.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedtune.strategies.aggregation import check_weighting, client_weights, weighted_average
from fedtune.strategies.fedsa_lora.keys import FEDSA_ROUTINE, OPT_PERSONAL, OPT_UPLOAD_PERSONAL, PERSONAL_B

from fedtune.strategy import (
    AdapterSpec,
    ClientInstruction,
    ClientUpdate,
    Strategy,
    Tensors,
    register_strategy,
    select,
    shapes_of,
)


@register_strategy
class FedSALoRA(Strategy):
    """Average A (and the head) across clients; every client keeps its own B.

    Parameters
    ----------
    weighting : {"examples", "uniform"}
        p_k proportional to each client's training examples, or equal.
    upload_b : bool
        Clients also send their B, which the server averages into its own (evaluation and
        saved) model and never sends back. False: only A and the head travel up.
    """

    name = "fedsa-lora"
    summary_line = "average A, keep each client's B personal (Guo et al. 2025); personal eval per client"
    averages_updates = True
    client_dp_reason = "its personal B are trained on each client's data and, with upload_b, sent unnoised"

    def __init__(self, *, weighting: str = "examples", upload_b: bool = True) -> None:
        self.weighting = check_weighting(weighting)
        self.upload_b = bool(upload_b)
        self._shared: Tensors = {}
        self._personal_mean: Tensors = {}

    def initialize(self, spec: AdapterSpec) -> None:
        super().initialize(spec)
        initial = {k: v.detach().clone() for k, v in spec.initial.items()}
        self._personal_mean = select(initial, [PERSONAL_B])
        if not self._personal_mean:
            raise ValueError("fedsa-lora needs LoRA B tensors (X.lora_B.weight) in the adapter")
        self._shared = {k: v for k, v in initial.items() if k not in self._personal_mean}

    def _instruction(self, trainable: tuple[str, ...], expects: Tensors) -> ClientInstruction:
        return ClientInstruction(arrays=self._shared, trainable=trainable, expects=shapes_of(expects),
                                 routine=FEDSA_ROUTINE,
                                 options={OPT_PERSONAL: PERSONAL_B, OPT_UPLOAD_PERSONAL: self.upload_b})

    def configure_client(self, server_round: int, node_id: int) -> ClientInstruction:
        back = {**self._shared, **self._personal_mean} if self.upload_b else self._shared
        return self._instruction((".*",), back)

    def configure_evaluation(self, server_round: int, node_id: int) -> ClientInstruction:
        return self._instruction((), {})

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        weights = client_weights(updates, self.weighting)
        self._shared = self.average([{k: u.arrays[k] for k in self._shared} for u in updates], weights,
                                    previous=self._shared)
        if self.upload_b:
            self._personal_mean = weighted_average([{k: u.arrays[k] for k in self._personal_mean}
                                                    for u in updates], weights)
        return {}

    def global_adapter(self) -> Tensors:
        return {**self._shared, **self._personal_mean}

    def hyperparameters(self) -> dict[str, object]:
        return {"weighting": self.weighting, "upload_b": self.upload_b}


__all__ = ["FedSALoRA"]
