"""Built-in methods, one folder (or file) each.

Each method keeps everything of its own in its folder: its server strategy, its client
routine, its layers and its wire keys. They register through the same public API a user's
method uses (:func:`fedtune.strategy.register_strategy`, :func:`fedtune.routine.register_routine`)
when their module is imported: :func:`import_all` does that for every built-in. This package
itself imports nothing heavy, so a config's ``strategy.name`` can be checked against
:data:`BUILT_IN` without torch; ``from fedtune.strategies import FedIT`` imports on demand.
"""

from __future__ import annotations

import importlib
from typing import Any

# Registered name -> (module in this package, class).
BUILT_IN: dict[str, tuple[str, str]] = {
    "fed-sb": ("fed_sb", "FedSB"),
    "fedit": ("fedit", "FedIT"),
    "fedkseed": ("fedkseed", "FedKSeed"),
    "fedkseed-pro": ("fedkseed", "FedKSeedPro"),
    "fedsa-lora": ("fedsa_lora", "FedSALoRA"),
    "ffa-lora": ("ffa_lora", "FFALoRA"),
    "flexlora": ("flexlora", "FlexLoRA"),
    "flora": ("flora", "FLoRA"),
    "lora-fair": ("lora_fair", "LoRAFAIR"),
}
_CLASSES = {cls: module for module, cls in BUILT_IN.values()}


def import_all() -> None:
    """Import every built-in method, which registers its strategy and client routines."""
    for module in sorted({module for module, _ in BUILT_IN.values()}):
        importlib.import_module(f"{__name__}.{module}")


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_CLASSES) + ["BUILT_IN", "import_all"]
