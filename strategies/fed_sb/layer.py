"""LoRA-SB as a PEFT layer: a trainable r×r matrix R between frozen LoRA factors.

LoRA-SB (Ponkshe, Singhal et al., arXiv:2411.19557; reference code github.com/CERT-Lab/lora-sb)
adapts a weight as W = W0 + s · B · R · A, with B (m×r) and A (r×n) frozen and only R (r×r)
trained (the LoRA-XS architecture).

How it sits on PEFT (0.21): a standard PEFT LoRA of rank r is attached as usual; :func:`attach_r`
adds ``lora_R[adapter]`` (an ``nn.Linear(r, r, bias=False)``) to every LoRA layer and installs
:class:`LoraSBVariant` as that adapter's PEFT *LoRA variant* (the hook PEFT uses for DoRA), so
PEFT's own forward, ``merge``/``unmerge``/``merge_and_unload`` and mixed-adapter batches all go
through s·B·R·A. State-dict names of A and B are unchanged; R is ``<module>.lora_R.weight``.
R starts as the identity, so attaching it does not change what the model computes, and a
plain LoRA adapter loaded into a LoRA-SB layer (R left at its initial identity) computes
exactly what it computes in plain PEFT. :func:`fold_r_into_a` turns LoRA-SB tensors into a
plain PEFT LoRA adapter (A' = R·A, same rank and scaling) that ``PeftModel.from_pretrained``
reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import peft  # noqa: F401  (the package first: peft's submodules import each other through it)
import torch
from fedtune.strategies.fed_sb.keys import LORA_A, LORA_B, LORA_R, R_LAYER
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils.other import transpose
from torch import nn


def _delta_weight(module: LoraLayer, adapter: str) -> torch.Tensor:
    """s·B·R·A in the base layer's weight layout (transposed for ``fan_in_fan_out`` layers)."""
    b = module.lora_B[adapter].weight
    a = module.lora_A[adapter].weight
    r = getattr(module, R_LAYER)[adapter].weight
    compute = torch.float32 if b.dtype in (torch.float16, torch.bfloat16) and b.device.type == "cpu" else b.dtype
    delta = transpose(b.to(compute) @ r.to(compute) @ a.to(compute), module.fan_in_fan_out) * module.scaling[adapter]
    return delta.to(b.dtype)


class LoraSBVariant(LoraVariant):
    """PEFT LoRA variant computing ``result + s · B(R(A(dropout(x))))``, and merging s·B·R·A."""

    def supports_lora_conversion(self) -> bool:
        # PEFT's converter reads get_delta_weight, which knows nothing of R; use fold_r_into_a.
        return False

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to do: :func:`attach_r` creates R after PEFT has built the layer."""

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + _delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += _delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - _delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        lora_r = getattr(module, R_LAYER)[active_adapter]
        dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
        return result + lora_b(lora_r(lora_a(dropout(x)))) * scaling


def lora_layers(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """The model's LoRA layers that carry ``adapter_name``, keyed by module name (the wire prefix).

    Raises
    ------
    ValueError
        When no layer carries the adapter (the message lists the adapters that exist).
    """
    layers = {name: m for name, m in peft_model.named_modules()
              if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    if not layers:
        found = sorted({a for m in peft_model.modules() if isinstance(m, LoraLayer) for a in m.lora_A})
        raise ValueError(f"adapter_name={adapter_name!r} is on no LoRA layer of this model (adapters found: "
                         f"{found or 'none'}); attach a PEFT LoRA adapter first, e.g. with get_peft_model")
    return layers


def _check_supported(name: str, layer: LoraLayer, adapter_name: str) -> None:
    variant = layer.lora_variant.get(adapter_name)
    if variant is not None and not isinstance(variant, LoraSBVariant):
        raise ValueError(f"{name}: adapter {adapter_name!r} already uses the LoRA variant {type(variant).__name__} "
                         "(DoRA, aLoRA, ...); LoRA-SB needs a plain LoRA adapter (use_dora=False)")
    if not isinstance(layer.lora_A[adapter_name], nn.Linear):
        raise TypeError(f"{name}: LoRA-SB supports LoRA on linear layers (nn.Linear, Conv1D), whose lora_A is an "
                        f"nn.Linear; got {type(layer.lora_A[adapter_name]).__name__}. Leave this module out of "
                        "target_modules")
    if layer.lora_bias.get(adapter_name, False):
        raise ValueError(f"{name}: LoRA-SB does not support lora_bias=True; set LoraConfig(lora_bias=False)")


def _freeze_factors(layer: LoraLayer, adapter_name: str) -> None:
    """Keep A and B frozen, also after PEFT's ``set_adapter`` (which re-enables adapter weights)."""
    frozen = dict(layer.frozen_peft_weight_names)
    frozen[adapter_name] = tuple(sorted({*frozen.get(adapter_name, ()), "lora_A", "lora_B"}))
    layer.frozen_peft_weight_names = frozen
    layer.lora_A[adapter_name].requires_grad_(False)
    layer.lora_B[adapter_name].requires_grad_(False)


def attach_r(peft_model: nn.Module, adapter_name: str = "default", rank: int | None = None) -> dict[str, nn.Parameter]:
    """Make ``adapter_name`` a LoRA-SB adapter: add a trainable r×r R between A and B on every layer.

    R starts as the identity (the model computes the same as before), A and B are frozen,
    and the layer's PEFT LoRA variant becomes :class:`LoraSBVariant`. Calling it again
    returns the R already attached.

    Parameters
    ----------
    peft_model : torch.nn.Module
        A PEFT model (or any module) with LoRA layers carrying ``adapter_name``.
    adapter_name : str
        The PEFT adapter to convert.
    rank : int, optional
        The expected LoRA rank; a layer of another rank is an error.

    Returns
    -------
    dict of str to torch.nn.Parameter
        R of every layer, keyed ``<module>.lora_R.weight`` (the wire name; the PEFT parameter is
        ``<module>.lora_R.<adapter>.weight``).
    """
    out = {}
    for name, layer in lora_layers(peft_model, adapter_name).items():
        _check_supported(name, layer, adapter_name)
        r = layer.r[adapter_name]
        if rank is not None and r != rank:
            raise ValueError(f"{name}: adapter {adapter_name!r} has rank {r}, but rank={rank} was asked for; "
                             "build the LoRA adapter with the rank LoRA-SB should use")
        if not hasattr(layer, R_LAYER):
            setattr(layer, R_LAYER, nn.ModuleDict())
            layer.adapter_layer_names = (*layer.adapter_layer_names, R_LAYER)
        r_layers = getattr(layer, R_LAYER)
        if adapter_name not in r_layers:
            weight_a = layer.lora_A[adapter_name].weight
            linear = nn.Linear(r, r, bias=False, device=weight_a.device, dtype=weight_a.dtype)
            with torch.no_grad():
                linear.weight.copy_(torch.eye(r, dtype=weight_a.dtype))
            r_layers[adapter_name] = linear
            layer.lora_variant[adapter_name] = LoraSBVariant()
        _freeze_factors(layer, adapter_name)
        r_layers[adapter_name].weight.requires_grad_(True)
        out[name + LORA_R] = r_layers[adapter_name].weight
    return out


def fold_r_into_a(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA-SB tensors as a plain PEFT LoRA adapter: A' = R·A, R dropped, everything else kept.

    The result has the same rank and scaling, so it loads into a ``LoraConfig`` with the same
    ``r`` and ``lora_alpha`` and computes s·B·(R·A) = s·B·R·A. The product is taken in float64
    and cast to A's dtype. Inputs are not modified.
    """
    out = {k: v for k, v in tensors.items() if not k.endswith(LORA_R)}
    for key, r in tensors.items():
        if not key.endswith(LORA_R):
            continue
        a_key = key[: -len(LORA_R)] + LORA_A
        if a_key not in tensors:
            raise KeyError(f"{key} has no partner {a_key}; fold needs each module's R and A together")
        a = tensors[a_key]
        if r.shape != (a.shape[0], a.shape[0]):
            raise ValueError(f"{key} has shape {tuple(r.shape)}; it must be r×r with r = {a.shape[0]} "
                             f"(rows of {a_key})")
        out[a_key] = (r.detach().to(torch.float64) @ a.detach().to(torch.float64)).to(a.dtype)
    return out


def r_identity(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An identity R for every module that has ``X.lora_A.weight`` (what :func:`attach_r` starts with)."""
    return {k[: -len(LORA_A)] + LORA_R: torch.eye(v.shape[0], dtype=v.dtype)
            for k, v in tensors.items() if k.endswith(LORA_A)}


# --------------------------------------------------------------------------- adapter handles (wiring helpers)


def prepare_handle(handle: Any, rank: int | None = None) -> list[str]:
    """Attach R to an :class:`fedtune.models.loading.AdapterHandle` and register it as an adapter tensor.

    R joins ``handle.params`` (so ``load``/``state``/``set_trainable`` see it) with the
    identity as its initial value. Idempotent. Returns the R wire names.
    """
    r_params = attach_r(handle.model, handle.adapter_name, rank)
    for key, param in r_params.items():
        handle.params[key] = param
        handle.initial.setdefault(key, param.detach().clone())
    return sorted(r_params)


def adopt_frozen(handle: Any, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Make the received B and A the handle's *initial* values, so later loads keep them.

    ``AdapterHandle.load`` resets every tensor it is not given to its initial value; after
    the init round the server sends only R (and the head), so B and A must become the
    initial values. Returns the names adopted.
    """
    adopted = []
    for key, value in tensors.items():
        if key.endswith((LORA_A, LORA_B)) and key in handle.initial:
            if tuple(value.shape) != tuple(handle.initial[key].shape):
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(handle.initial[key].shape)}")
            handle.initial[key] = value.detach().to(handle.initial[key].dtype).clone()
            adopted.append(key)
    return sorted(adopted)
