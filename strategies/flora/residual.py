"""Merged updates kept beside the base weights: a frozen low-rank branch per adapted layer.

Strategies that merge each round's update into the model (FLoRA) cannot write it into the
base weights when those are quantized (the update is far below the quantization step) and
should not on a base model that a process shares between virtual clients. Instead each
adapted layer gets a frozen branch holding ΔW = Σ_rounds B_round·A_round, added to its
output by a forward hook: ``y = layer(x) + (x @ Aᵀ) @ Bᵀ``. The base weights stay untouched
and the merge is exact up to float32 rounding, whatever the base's dtype or quantization.

The branch keeps the factors themselves, concatenated (rank R = Σ of the merged ranks),
while that is the smaller exact form, R·(m + n) < m·n; from there on it holds ΔW densely
(:class:`MergedDelta`). Exact re-compression would not help: an SVD of the factors can only
drop zero singular values, and a sum of independently trained LoRAs has full rank until
min(m, n); a rank-R m×n matrix has R·(m + n − R) degrees of freedom, so near the break-even
rank no exact form is smaller than the dense one. Memory per layer is
4·min(R·(m + n), m·n) bytes.

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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

from fedtune.errors import InvalidUpdateError
from fedtune.models.loading import extension

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


class MergedDelta:
    """ΔW (m×n) of one layer, as concatenated factors B·A while they are smaller, then dense.

    Parameters
    ----------
    shape : tuple of int
        (out_features, in_features) of the layer.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.a = torch.zeros(0, shape[1])  # R×n, float32
        self.b = torch.zeros(shape[0], 0)  # m×R
        self.dense: torch.Tensor | None = None  # m×n once the factors would be larger

    @property
    def rank(self) -> int:
        """Columns of the factored form (min(m, n) once dense)."""
        return min(self.shape) if self.dense is not None else self.a.shape[0]

    @property
    def nbytes(self) -> int:
        held = [self.dense] if self.dense is not None else [self.a, self.b]
        return sum(t.numel() * t.element_size() for t in held)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """ΔW += B·A for factors B (m×r) and A (r×n)."""
        if b.shape[0] != self.shape[0] or a.shape[1] != self.shape[1] or a.shape[0] != b.shape[1]:
            raise InvalidUpdateError(f"factors B {tuple(b.shape)} · A {tuple(a.shape)} do not give a "
                                     f"{self.shape[0]}×{self.shape[1]} update")
        a, b = (t.detach().to(device=self.a.device, dtype=torch.float32) for t in (a, b))
        m, n = self.shape
        if self.dense is None and (self.rank + a.shape[0]) * (m + n) < m * n:
            self.a, self.b = torch.cat([self.a, a]), torch.cat([self.b, b], dim=1)
            return
        if self.dense is None:  # the break-even rank: from here on the dense form is the smaller one
            self.dense = (self.b.to(torch.float64) @ self.a.to(torch.float64)).to(torch.float32)
            self.a, self.b = self.a[:0], self.b[:, :0]
        self.dense += (b.to(torch.float64) @ a.to(torch.float64)).to(torch.float32)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x·ΔWᵀ for inputs x (…×n), in float32."""
        x = x.to(torch.float32)
        if self.dense is not None:
            return torch.nn.functional.linear(x, self.dense)
        return torch.nn.functional.linear(torch.nn.functional.linear(x, self.a), self.b)

    def to_dense(self) -> torch.Tensor:
        """ΔW as one m×n float64 matrix (for tests and inspection; never on the training path)."""
        if self.dense is not None:
            return self.dense.to(torch.float64)
        return self.b.to(torch.float64) @ self.a.to(torch.float64)

    def copy(self) -> MergedDelta:
        twin = MergedDelta(self.shape)
        twin.a, twin.b = self.a.clone(), self.b.clone()
        twin.dense = None if self.dense is None else self.dense.clone()
        return twin


class Residual:
    """Merged updates added to the outputs of named linear layers of one model.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose layers get the updates (a PEFT model; module names as in its state dict).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.deltas: dict[str, MergedDelta] = {}
        self.version = 0
        self.owner: object = None
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._suspended = False

    @property
    def nbytes(self) -> int:
        """Memory the merged updates take, in bytes."""
        return sum(d.nbytes for d in self.deltas.values())

    def claim(self, owner: object) -> None:
        """Start from nothing when a new owner (a new run) uses this model; keep state otherwise."""
        if owner != self.owner:
            self.clear()
            self.owner = owner

    def catch_up(self) -> int:
        """Copy the merges of the most advanced residual of the same owner in this process.

        Another base of the same run (another quantization) has merged the same rounds from
        the same factors in the same order, so its state is bitwise the one this residual
        would compute. Returns the version reached.
        """
        if self.owner is None:
            return self.version
        ahead = max((r for r in list(_ALL) if r is not self and r.owner == self.owner and r.version > self.version),
                    key=lambda r: r.version, default=None)
        if ahead is not None:
            self.clear()
            for name, delta in ahead.deltas.items():
                self._install(name, delta.copy())
            self.version = ahead.version
        return self.version

    def _delta_for(self, module_name: str) -> MergedDelta:
        if module_name in self.deltas:
            return self.deltas[module_name]
        layer = self.model.get_submodule(module_name)
        if not hasattr(layer, "in_features"):
            raise InvalidUpdateError(f"{module_name} is a {type(layer).__name__}, not a linear layer; "
                                     "merged updates apply to linear layers only")
        delta = MergedDelta((layer.out_features, layer.in_features))
        device = next((p.device for p in layer.parameters()), None)
        if device is not None:
            delta.a, delta.b = delta.a.to(device), delta.b.to(device)
        return self._install(module_name, delta)

    def _install(self, module_name: str, delta: MergedDelta) -> MergedDelta:
        def add_delta(_: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._suspended:
                return output
            return output + delta.apply(args[0]).to(output.dtype)

        self._hooks[module_name] = self.model.get_submodule(module_name).register_forward_hook(add_delta)
        self.deltas[module_name] = delta
        return delta

    def add(self, module_name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Merge ΔW = B·A into a layer (factors B of out_features × r, A of r × in_features)."""
        self._delta_for(module_name).add(a, b)

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
                self.add(module, a, b)
            self.version = server_round
            merged.append(server_round)
        return merged

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """The layers compute without the merged updates inside it (the pretrained base, e.g. DPO's reference)."""
        before, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = before

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
