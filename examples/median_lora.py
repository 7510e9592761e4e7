"""A custom fedtune strategy, defined outside the package: coordinate-wise median of adapters.

Run it by naming the class in the config, no registration needed::

    fedtune simulate strategy.name=examples/median_lora.py:MedianLoRA strategy.options.trim=0

(or ``strategy.name=mypkg.mymodule:MedianLoRA`` when the module is importable).

The median (Yin et al., ICML 2018, "Byzantine-Robust Distributed Learning") ignores a
minority of arbitrarily bad clients, where the mean is pulled by every one of them. This file
shows how a strategy is written; for the median itself, any averaging strategy takes
``strategy.robust.rule=median`` (:mod:`fedtune.averaging.robust`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedtune.strategy import AdapterSpec, ClientInstruction, ClientUpdate, Strategy, Tensors, shapes_of


class MedianLoRA(Strategy):
    """Coordinate-wise median of every adapter tensor over the round's clients.

    Parameters
    ----------
    trim : int
        Drop this many of the largest and of the smallest values per coordinate before
        taking the median (0 keeps all).
    """

    name = "median-lora"
    summary_line = "coordinate-wise median of LoRA tensors (robust to a minority of bad clients)"

    def __init__(self, *, trim: int = 0) -> None:
        if trim < 0:
            raise ValueError(f"trim={trim} must be >= 0")
        self.trim = trim
        self._global: Tensors = {}

    def initialize(self, spec: AdapterSpec) -> None:
        super().initialize(spec)
        self._global = {k: v.detach().clone() for k, v in spec.initial.items()}

    def configure_client(self, server_round: int, node_id: int) -> ClientInstruction:
        # Send everything, train everything, expect every tensor back with its shape.
        return ClientInstruction(arrays=self._global, trainable=(".*",), expects=shapes_of(self._global))

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        keep = len(updates) - 2 * self.trim
        if keep < 1:
            raise ValueError(f"trim={self.trim} leaves no client out of {len(updates)}")
        new = {}
        for key, old in self._global.items():
            stacked = torch.stack([u.arrays[key].to(torch.float64) for u in updates])
            ordered = stacked.sort(dim=0).values[self.trim: len(updates) - self.trim]
            new[key] = ordered.median(dim=0).values.to(old.dtype)
        self._global = new
        return {"median_clients": float(keep)}

    def global_adapter(self) -> Tensors:
        return dict(self._global)

    def hyperparameters(self) -> dict[str, object]:
        return {"trim": self.trim}
