"""Where models run: resolving ``model.device`` and moving batches there.

The CPU is the default and the test path. ``auto`` picks the first CUDA device the process
sees, so one setting serves a laptop, a GPU server and a simulation whose Ray workers each
see their own GPU share. Aggregation never runs here: strategies receive tensors from the
wire, on the CPU, and aggregate them in float64 there.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtune.errors import ModelLoadError


def resolve_device(spec: str) -> torch.device:
    """The torch device for a ``model.device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Raises
    ------
    ModelLoadError
        CUDA asked for where this process sees no GPU, or a GPU index it does not have.
    """
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device.index or 0
    if index >= count:
        seen = f"sees {count} GPU(s)" if count else "sees no GPU (torch.cuda.is_available() is False)"
        raise ModelLoadError(f"model.device={spec!r}, but this process {seen}; use model.device=auto or cpu, "
                             "or a GPU index below the count")
    return torch.device("cuda", index)


def device_of(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without any)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch's tensors on ``device`` (the same tensors when they are there already)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


__all__ = ["device_of", "resolve_device", "to_device"]
