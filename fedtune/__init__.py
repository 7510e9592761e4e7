"""fedtune: federated fine-tuning of language models with LoRA and Flower.

The built-in methods live in the repository's top-level ``strategies/`` folder, one folder
or file per method, and import as :mod:`fedtune.strategies`. An installed fedtune has them
at ``fedtune/strategies`` (setuptools' ``package-dir`` maps the folder there). Run from a
checkout or from a Flower App bundle, where ``fedtune/`` and ``strategies/`` sit side by
side, :class:`_CheckoutStrategies` maps the folder beside this package, so that the
``fedtune`` that was imported always comes with its own methods.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent
_CHECKOUT_STRATEGIES = _HERE.parent / "strategies"


class _CheckoutStrategies(importlib.abc.MetaPathFinder):
    """Finds ``fedtune.strategies`` in the ``strategies/`` folder beside this package."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != f"{__name__}.strategies":
            return None
        return importlib.util.spec_from_file_location(
            fullname, _CHECKOUT_STRATEGIES / "__init__.py", submodule_search_locations=[str(_CHECKOUT_STRATEGIES)])


if not (_HERE / "strategies").is_dir() and (_CHECKOUT_STRATEGIES / "__init__.py").is_file():
    if not any(isinstance(f, _CheckoutStrategies) for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutStrategies())
