"""Built-in methods, one folder (or file) each.

Each method keeps everything of its own in its folder: its server strategy, its client
routine, its layers and its wire keys. They are found by name the way a third-party
package's methods are: an entry point in fedtune's ``pyproject.toml``
(``[project.entry-points."fedtune.strategies"]``, :func:`fedtune.registry.plugin_entries`), and
their routines register through the public API a user's method uses
(:func:`fedtune.routine.register_routine`) when their module is imported. This package itself
imports nothing heavy; ``from fedtune.strategies import FedIT`` imports on demand.
"""

from __future__ import annotations

import importlib
from typing import Any


def _built_in() -> dict[str, str]:
    """Class name -> module of every built-in method (this package's entry points)."""
    from fedtune.registry import STRATEGY_GROUP, plugin_entries

    return {target.partition(":")[2]: target.partition(":")[0] for target in plugin_entries(STRATEGY_GROUP).values()
            if target.startswith(f"{__name__}.")}


def import_all() -> None:
    """Import every built-in method, which registers its strategy and client routines."""
    for module in sorted(set(_built_in().values())):
        importlib.import_module(module)


def __getattr__(name: str) -> Any:
    modules = _built_in()
    if name in modules:
        return getattr(importlib.import_module(modules[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["import_all"]
