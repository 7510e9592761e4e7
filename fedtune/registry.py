"""Named plug-ins (strategies, client routines, eval metrics): entry points, a checked registry, import by path.

Strategies and metrics are found by name through Python entry points, the way a third-party
package ships a method: ``[project.entry-points."fedtune.strategies"]`` (and
``"fedtune.metrics"``) in its ``pyproject.toml``, ``name = "package.module:Class"``. fedtune's
own built-ins are declared the same way in fedtune's ``pyproject.toml``. Run from a checkout or
a Flower App bundle, the ``pyproject.toml`` beside this package is read for fedtune's own, so
the methods that come with the code are the ones found (:func:`plugin_entries`).

A class also registers under its ``name`` with a class decorator when its module is imported
(client routines are found that way: a method's module registers its routine); anything else is
named by where it lives, ``package.module:Class`` or ``path/to/file.py:Class``. Importing a
module by path registers whatever it decorates, so a user's file can hold a strategy and the
client routine it names.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

import tomllib

from fedtune.errors import ConfigError

T = TypeVar("T", bound=type)
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")
# Entry-point groups: name = "package.module:Class".
STRATEGY_GROUP = "fedtune.strategies"
METRIC_GROUP = "fedtune.metrics"
# Relative file paths are tried from the current directory, then from here (a checkout
# or a Flower App bundle: where pyproject.toml and examples/ are).
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def _own_entries() -> dict[str, dict[str, str]] | None:
    """fedtune's own entry points from the ``pyproject.toml`` beside this package (a checkout, an app bundle)."""
    path = PROJECT_ROOT / "pyproject.toml"
    if not path.is_file():
        return None
    project = tomllib.loads(path.read_text()).get("project", {})
    if project.get("name") != "fedtune":
        return None
    return {group: dict(entries) for group, entries in project.get("entry-points", {}).items()}


def plugin_entries(group: str) -> dict[str, str]:
    """Every plug-in of ``group`` by name: ``"package.module:Class"``, without importing any.

    Installed distributions' entry points, with fedtune's own read from the ``pyproject.toml``
    beside this package when there is one (so a checkout finds the methods it has, whatever
    fedtune is installed). A name a third-party package declares again does not replace fedtune's.
    """
    own = _own_entries()
    found: dict[str, str] = dict(own.get(group, {})) if own is not None else {}
    for name, value, dist in _installed_entries(group):
        if own is not None and dist == "fedtune":
            continue  # this checkout's own list stands for the installed one
        found.setdefault(name, value)
    return dict(sorted(found.items()))


@functools.cache
def _installed_entries(group: str) -> tuple[tuple[str, str, str | None], ...]:
    """(name, target, distribution) of every installed entry point of ``group``, scanned once per process."""
    return tuple((e.name, e.value, e.dist.name if e.dist is not None else None)
                 for e in importlib.metadata.entry_points(group=group))


def load_entry(group: str, name: str) -> type:
    """The class entry point ``name`` of ``group`` names (importing its module registers what it decorates)."""
    target = plugin_entries(group)[name]
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


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
    group : str or None
        The entry-point group whose plug-ins are found by name (``"fedtune.strategies"``); None
        for a registry filled by decorators only.
    load_all : callable or None
        Imports every module that registers entries; by default :func:`import_all_methods`
        (every method's module, which registers its strategy and client routines).
    """

    def __init__(self, kind: str, base: type, key: str, *, decorator: str, example: str, group: str | None = None,
                 load_all: Callable[[], None] | None = None) -> None:
        self.kind, self.base, self.key, self.decorator, self.example = kind, base, key, decorator, example
        self.group = group
        self._load_all = load_all if load_all is not None else import_all_methods
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
        """Every entry by name, each plug-in's module imported."""
        self._load_all()
        if self.group:
            for name in plugin_entries(self.group):
                if name not in self._entries:
                    self._entries[name] = self._load(name)  # under the entry point's name
        return dict(sorted(self._entries.items()))

    def _load(self, name: str) -> T:
        assert self.group is not None
        try:
            cls = load_entry(self.group, name)
        except Exception as e:
            target = plugin_entries(self.group)[name]
            raise ConfigError([f"{self.key}={name!r}: its entry point {target!r} (group {self.group!r}) cannot be "
                               f"loaded ({type(e).__name__}: {e}); reinstall the package that declares it"]) from e
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise ConfigError([f"{self.key}={name!r}: its entry point names {cls!r}, not a subclass of "
                               f"{self.base.__module__}.{self.base.__name__}"])
        return cls

    def resolve(self, name: str) -> T:
        """A name (registered or an entry point), or ``package.module:Class`` / ``path/to/file.py:Class``."""
        if ":" not in name:
            if name not in self._entries and self.group and name in plugin_entries(self.group):
                self._entries[name] = self._load(name)  # under the entry point's name
            if name not in self._entries:
                self.registered()
            if name not in self._entries:
                raise ConfigError([f"{self.key}={name!r} is not a registered {self.kind}; use one of "
                                   f"{sorted(self._entries)} or a path like {self.example} or "
                                   f"path/to/file.py:{self.example.rpartition(':')[2]}"])
            return self._entries[name]
        return self.resolve_path(name)

    def resolve_path(self, name: str) -> T:
        """``package.module:Class`` or ``path/to/file.py:Class``."""
        module_name, _, attr = name.rpartition(":")
        try:
            module = import_by_path(module_name)
        except Exception as e:
            raise ConfigError([f"{self.key}={name!r}: cannot import {module_name!r} ({e}); "
                               "make it importable (pip install it or add it to PYTHONPATH)"]) from e
        cls = getattr(module, attr, None)
        if cls is None:
            found = sorted(n for n, v in vars(module).items()
                           if isinstance(v, type) and issubclass(v, self.base) and v is not self.base
                           and v.__module__ == module.__name__)
            raise ConfigError([f"{self.key}={name!r}: {module_name!r} has no {attr!r}; the "
                               f"{self.base.__name__} classes defined there: {found or 'none'}"])
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise ConfigError([f"{self.key}={name!r}: {attr!r} in {module_name!r} is not a subclass of "
                               f"{self.base.__module__}.{self.base.__name__}"])
        return cls


def import_all_methods() -> None:
    """Import every method's module (entry points of ``fedtune.strategies``), which registers its routines."""
    for name in plugin_entries(STRATEGY_GROUP):
        load_entry(STRATEGY_GROUP, name)


def strategy_name_problem(name: str) -> str | None:
    """Whether ``strategy.name`` names a known strategy, decided without importing any (no torch).

    Entry points of ``fedtune.strategies`` (fedtune's and installed packages') count, and names
    registered by other code when the strategy registry is loaded already. Paths are checked
    when the strategy is built.
    """
    if ":" in name:
        if not name.rpartition(":")[2] or not name.rpartition(":")[0]:
            return (f"strategy.name={name!r} needs the class after a colon: path/to/file.py:MyStrategy or "
                    "mypkg.mymodule:MyStrategy")
        return None
    known = set(plugin_entries(STRATEGY_GROUP))
    strategy = sys.modules.get("fedtune.strategy")
    if strategy is not None:
        known |= set(strategy._REGISTRY._entries)
    if name in known:
        return None
    hint = ("; a file needs the class after a colon: path/to/file.py:MyStrategy" if name.endswith(".py") else
            " or a path: path/to/file.py:MyStrategy or mypkg.mymodule:MyStrategy")
    return f"strategy.name={name!r} is not a registered strategy; use one of {sorted(known)}{hint}"


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
