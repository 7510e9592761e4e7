"""Merged updates kept beside the base weights, at full precision.

Strategies that merge each round's update into the model (FLoRA) cannot write it into the
base weights when those are quantized (the update is far below the quantization step) and
should not on a base model that a process shares between virtual clients. Instead each
adapted layer gets a dense float32 delta ΔW, added to its output by a forward hook:
``y = layer(x) + x @ ΔWᵀ``. The base weights stay untouched and the merge is exact up to
float32 rounding, whatever the base's dtype or quantization.

Updates travel as low-rank factors named ``residual.<round>.<module>.lora_A.weight`` /
``...lora_B.weight`` with ΔW_round = B @ A (any scaling already folded into A); a process
applies each round once, in order, and records the last round it merged.

A process may hold several bases of one run (clients with different quantizations): each
has its own residual, and one that falls behind starts from the most advanced residual of
the same run in the process (:meth:`Residual.catch_up`), so the process as a whole needs
each round once, as with a single base.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping

import torch

from fedtune.errors import InvalidUpdateError
from fedtune.models import extension

PREFIX = "residual."
_KEY = re.compile(r"^residual\.(\d+)\.(.+)\.lora_([AB])\.weight$")


def residual_key(server_round: int, module: str, factor: str) -> str:
    """The wire name of one factor (``"A"`` or ``"B"``) of round ``server_round``'s merged update."""
    return f"{PREFIX}{server_round}.{module}.lora_{factor}.weight"


def split_residual(arrays: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """Separate adapter tensors from residual factors, grouped by round and module."""
    plain: dict[str, torch.Tensor] = {}
    factors: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, value in arrays.items():
        if not key.startswith(PREFIX):
            plain[key] = value
            continue
        match = _KEY.match(key)
        if match is None:
            raise InvalidUpdateError(f"{key!r} is not a residual factor name ({PREFIX}<round>.<module>.lora_A.weight)")
        factors.setdefault(int(match[1]), {}).setdefault(match[2], {})[match[3]] = value
    rounds = {}
    for server_round, modules in factors.items():
        for module, pair in modules.items():
            if set(pair) != {"A", "B"}:
                raise InvalidUpdateError(f"round {server_round}, {module}: residual needs both lora_A and lora_B")
            if pair["B"].shape[1] != pair["A"].shape[0]:
                raise InvalidUpdateError(f"round {server_round}, {module}: B {tuple(pair['B'].shape)} and "
                                         f"A {tuple(pair['A'].shape)} do not multiply")
        rounds[server_round] = {m: (p["A"], p["B"]) for m, p in modules.items()}
    return plain, rounds


class Residual:
    """Dense deltas added to the outputs of named linear layers of one model.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose layers get the deltas (a PEFT model; module names as in its state dict).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.deltas: dict[str, torch.Tensor] = {}
        self.version = 0
        self.owner: object = None
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def claim(self, owner: object) -> None:
        """Start from nothing when a new owner (a new run) uses this model; keep state otherwise."""
        if owner != self.owner:
            self.clear()
            self.owner = owner

    def catch_up(self) -> int:
        """Copy the merges of the most advanced residual of the same owner in this process.

        Another base of the same run (another quantization) has merged the same rounds from
        the same factors in the same order, so its deltas are bitwise those this one would
        compute. Returns the version reached.
        """
        if self.owner is None:
            return self.version
        ahead = max((r for r in list(_ALL) if r is not self and r.owner == self.owner and r.version > self.version),
                    key=lambda r: r.version, default=None)
        if ahead is not None:
            self.set(ahead.deltas, ahead.version)  # add() copies each delta
        return self.version

    def _install(self, module_name: str) -> None:
        layer = self.model.get_submodule(module_name)

        def add_delta(_: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            delta = self.deltas[module_name]
            return output + torch.nn.functional.linear(args[0].to(delta.dtype), delta).to(output.dtype)

        self._hooks[module_name] = layer.register_forward_hook(add_delta)

    def add(self, module_name: str, delta: torch.Tensor) -> None:
        """Add a dense delta (out_features × in_features) to a layer, accumulating in float32."""
        delta = delta.detach().to(torch.float32)
        if module_name in self.deltas:
            if self.deltas[module_name].shape != delta.shape:
                raise InvalidUpdateError(f"{module_name}: delta {tuple(delta.shape)} does not match "
                                         f"{tuple(self.deltas[module_name].shape)}")
            self.deltas[module_name] += delta
        else:
            self.deltas[module_name] = delta.clone()
            self._install(module_name)

    def set(self, deltas: Mapping[str, torch.Tensor], version: int) -> None:
        """Replace every delta (the server sets the exact global state this way)."""
        self.clear()
        for name, delta in deltas.items():
            self.add(name, delta)
        self.version = version

    def merge_rounds(self, rounds: Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]]) -> list[int]:
        """Merge every round after :attr:`version`, in order; return the rounds merged.

        Rounds at or before the current version were merged already and are skipped. A gap
        (round ``version + 2`` without ``version + 1``) is an error: the server must send
        the whole history this process has not seen.
        """
        merged = []
        for server_round in sorted(rounds):
            if server_round <= self.version:
                continue
            if server_round != self.version + 1:
                raise InvalidUpdateError(f"residual history jumps from round {self.version} to {server_round}; "
                                         "the server must send every round this process has not merged")
            for module, (a, b) in rounds[server_round].items():
                self.add(module, b.to(torch.float64) @ a.to(torch.float64))
            self.version = server_round
            merged.append(server_round)
        return merged

    def clear(self) -> None:
        for hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()
        self.deltas.clear()
        self.version = 0


_ALL: weakref.WeakSet[Residual] = weakref.WeakSet()  # every residual of this process
EXTENSION_KEY = "flora.residual"


def residual_of(model: torch.nn.Module) -> Residual:
    """The model's residual (created on first use; shared by every adapter on that model)."""
    residual = extension(model, EXTENSION_KEY, Residual)
    _ALL.add(residual)
    return residual
