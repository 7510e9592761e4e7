"""Named plug-ins (strategies, client routines, eval metrics): a checked registry plus import by path.

A built-in registers under its ``name`` with a class decorator when its module is
imported; anything else is named by where it lives, ``package.module:Class`` or
``path/to/file.py:Class``. Importing a module by path registers whatever it decorates,
so a user's file can hold a strategy and the client routine it names.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from fedtune.errors import ConfigError

T = TypeVar("T", bound=type)
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")
BUILT_INS = "fedtune.strategies"  # its import_all() registers every built-in method
# Relative file paths are tried from the current directory, then from here (a checkout
# or a Flower App bundle: where pyproject.toml and examples/ are).
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Registry(Generic[T]):
    """Classes of one kind by name.

    Parameters
    ----------
    kind : str
        What is registered, for messages (``"strategy"``).
    base : type
        The class every entry must subclass.
    key : str
        Where a user names an entry, for messages (``"strategy.name"``).
    decorator : str
        The public registering function, for messages (``"register_strategy"``).
    example : str
        An example path to a user's class, for messages.
    load_built_ins : callable or None
        Imports the modules that register the built-ins; by default :func:`import_built_ins`
        (every built-in method).
    """

    def __init__(self, kind: str, base: type, key: str, *, decorator: str, example: str,
                 load_built_ins: Callable[[], None] | None = None) -> None:
        self.kind, self.base, self.key, self.decorator, self.example = kind, base, key, decorator, example
        self._load_built_ins = load_built_ins if load_built_ins is not None else import_built_ins
        self._entries: dict[str, T] = {}

    def register(self, cls: T) -> T:
        """Class decorator: register ``cls`` under ``cls.name`` (lower case, unique)."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{self.decorator} expects a {self.base.__name__} subclass, got {cls!r}")
        name = getattr(cls, "name", "")
        if not NAME_PATTERN.match(name or ""):
            raise ValueError(f"{cls.__name__}.name={name!r} must be lower-case letters, digits, '-' or '_'")
        if name in self._entries and self._entries[name] is not cls:
            raise ValueError(f"{self.kind} name {name!r} is taken by {self._entries[name].__qualname__}")
        self._entries[name] = cls
        return cls

    def registered(self) -> dict[str, T]:
        """Every registered entry by name, built-ins included."""
        self._load_built_ins()
        return dict(sorted(self._entries.items()))

    def resolve(self, name: str) -> T:
        """A registered name, or ``package.module:Class`` / ``path/to/file.py:Class``."""
        if ":" not in name:
            if name not in self._entries:
                self.registered()
            if name not in self._entries:
                raise ConfigError([f"{self.key}={name!r} is not a registered {self.kind}; use one of "
                                   f"{sorted(self._entries)} or a path like {self.example}"])
            return self._entries[name]
        module_name, _, attr = name.rpartition(":")
        try:
            module = import_by_path(module_name)
        except Exception as e:
            raise ConfigError([f"{self.key}={name!r}: cannot import {module_name!r} ({e}); "
                               "make it importable (pip install it or add it to PYTHONPATH)"]) from e
        cls = getattr(module, attr, None)
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise ConfigError([f"{self.key}={name!r}: {attr!r} in {module_name!r} is not a subclass of "
                               f"{self.base.__module__}.{self.base.__name__}"])
        return cls


def import_built_ins() -> None:
    """Import every built-in method, which registers its strategy and client routines."""
    importlib.import_module(BUILT_INS).import_all()


def strategy_name_problem(name: str) -> str | None:
    """Whether ``strategy.name`` names a known strategy, decided without importing any (no torch).

    Built-in names come from :data:`fedtune.strategies.BUILT_IN`; names registered by other
    code count when the strategy registry is loaded already. Paths are checked when the
    strategy is built.
    """
    if ":" in name:
        return None
    known = set(importlib.import_module(BUILT_INS).BUILT_IN)
    strategy = sys.modules.get("fedtune.strategy")
    if strategy is not None:
        known |= set(strategy._REGISTRY._entries)
    if name in known:
        return None
    return (f"strategy.name={name!r} is not a registered strategy; use one of {sorted(known)} or a path like "
            "mypkg.mymodule:MyStrategy")


def import_by_path(module_name: str) -> Any:
    """Import ``package.module`` or ``path/to/file.py`` (once per file, keyed by its absolute path)."""
    if not module_name.endswith(".py"):
        return importlib.import_module(module_name)
    path = Path(module_name)
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        path = PROJECT_ROOT / path
    path = path.resolve()
    key = "fedtune_user_module_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None or not path.is_file():
        raise ImportError(f"no module at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module
