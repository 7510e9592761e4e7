"""A plug-in's typed options (``strategy.options``, ``eval.options``), read from its constructor.

A method declares its options once, as Python does: keyword arguments of its ``__init__`` with
type annotations and defaults, described in the class docstring's numpy-style ``Parameters``
section. :func:`options_of` reads that declaration (the same for built-ins and users' classes),
:func:`options_dataclass` turns it into a dataclass (as PEFT has one config class per tuner),
:func:`option_problems` checks a config's options against it before any model loads (unknown
keys, wrong types, with the key, the value, the expected type and the help), and
``fedtune strategies NAME`` prints it. A class whose ``__init__`` takes ``**kwargs`` accepts
other keys unchecked; an argument without an annotation accepts any value.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

# An option without a default (a required keyword argument).
REQUIRED = dataclasses.MISSING


@dataclass(frozen=True)
class Option:
    """One option of a plug-in: its name, type annotation, default and help text."""

    name: str
    annotation: Any
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        """The annotation as people write it (``float``, ``int | None``, ``'a' | 'b'``)."""
        return type_name(self.annotation)


def parameter_help(docstring: str) -> dict[str, str]:
    """Each parameter's description from a numpy-style ``Parameters`` section, one line each."""
    lines = inspect.cleandoc(docstring or "").splitlines()
    out: dict[str, str] = {}
    try:
        start = next(i for i, line in enumerate(lines[:-1])
                     if line.strip() == "Parameters" and set(lines[i + 1].strip()) == {"-"}) + 2
    except StopIteration:
        return out
    name = None
    for line in lines[start:]:
        if not line.strip():
            continue
        if not line.startswith((" ", "\t")):
            if re.fullmatch(r"-+", line.strip()) or line.strip() in ("Returns", "Raises", "Attributes", "Notes"):
                break
            name = line.split(":")[0].strip()
            if "," in name:  # "a, b : int" describes both
                for part in name.split(","):
                    out[part.strip()] = ""
                name = name.split(",")[-1].strip()
            out.setdefault(name, "")
            continue
        if name is not None:
            out[name] = f"{out[name]} {line.strip()}".strip()
    return out


def options_of(cls: type) -> list[Option]:
    """The keyword arguments of ``cls.__init__`` as options (``self`` and ``*args``/``**kwargs`` left out)."""
    init = cls.__init__
    if init is object.__init__:  # no constructor of its own: no options
        return []
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: take them as written
        hints = dict(getattr(init, "__annotations__", {}))
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's description wins; an inherited one fills in
        helps.update({k: v for k, v in parameter_help(klass.__dict__.get("__doc__") or "").items() if v})
    out = []
    for p in list(inspect.signature(init).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = REQUIRED if p.default is p.empty else p.default
        out.append(Option(p.name, hints.get(p.name, Any), default, helps.get(p.name, "")))
    return out


def takes_any_keyword(cls: type) -> bool:
    """Whether ``cls.__init__`` has ``**kwargs`` (then unknown option keys pass unchecked)."""
    return cls.__init__ is not object.__init__ and any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())


def options_dataclass(cls: type) -> type:
    """``cls``'s options as a dataclass ``<Class>Options``: fields typed, defaulted, with ``metadata["help"]``."""
    fields = []
    for o in sorted(options_of(cls), key=lambda o: o.default is not REQUIRED):  # required fields first
        spec = dataclasses.field(metadata={"help": o.help}) if o.default is REQUIRED else \
            dataclasses.field(default_factory=lambda d=o.default: d, metadata={"help": o.help})
        fields.append((o.name, o.annotation, spec))
    return dataclasses.make_dataclass(f"{cls.__name__}Options", fields, kw_only=True)


def matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (as YAML gives it: bool, int, float, str, None, list, dict) fits ``annotation``.

    An int is a float; a bool is neither an int nor a float; a list or tuple is a sequence.
    """
    if annotation is Any or annotation is inspect.Parameter.empty or annotation is object:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in get_args(annotation))
    if origin is Literal:
        return value in get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple, set, collections.abc.Sequence, collections.abc.Iterable):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(matches(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    if origin in (dict, collections.abc.Mapping) or annotation in (dict, Mapping):
        return isinstance(value, Mapping)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True  # an annotation fedtune cannot check (a TypeVar, a Protocol): the constructor decides


def type_name(annotation: Any) -> str:
    """``annotation`` as people write it."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return "any"
    if annotation is None or annotation is type(None):
        return "None"
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(annotation))
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    if origin is not None:
        args = ", ".join(type_name(a) for a in get_args(annotation) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]" if args else getattr(origin, "__name__", str(origin))
    return getattr(annotation, "__name__", str(annotation))


_PLAIN = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def expected(annotation: Any) -> str:
    """What a value of ``annotation`` is, in a config's words (``a number``, ``an integer or null``)."""
    if annotation is None:
        return "null"
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(expected(a) for a in get_args(annotation))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(annotation))
    if origin in (list, tuple, set, collections.abc.Sequence, collections.abc.Iterable):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        return f"a list of {type_name(args[0])}" if args else "a list"
    return _PLAIN.get(annotation, type_name(annotation))


def option_problems(cls: type, options: Mapping[str, Any], key: str) -> list[str]:
    """Unknown keys and wrongly typed values of ``options`` for ``cls``, each naming ``key.<option>``.

    Parameters
    ----------
    cls : type
        The plug-in class whose constructor declares the options.
    options : mapping
        The options a config gives it.
    key : str
        Where they are set, for messages (``"strategy.options"``).
    """
    declared = {o.name: o for o in options_of(cls)}
    problems = []
    for name, value in options.items():
        option = declared.get(name)
        if option is None:
            if not takes_any_keyword(cls):
                accepted = list(declared) or "none"
                hint = "; `fedtune strategies NAME` describes them" if key.startswith("strategy.") else ""
                problems.append(f"{key}.{name} is not an option of {cls.__name__} (accepted: {accepted}{hint})")
            continue
        if not matches(value, option.annotation):
            default = "" if option.default is REQUIRED else f", default {option.default!r}"
            about = f": {option.help}" if option.help else ""
            problems.append(f"{key}.{name}={value!r} must be {expected(option.annotation)} "
                            f"({cls.__name__}{default}){about}")
    missing = [o.name for o in declared.values() if o.default is REQUIRED and o.name not in options]
    problems += [f"{key}.{name} is required by {cls.__name__}: set it ({declared[name].type_name})" for name in missing]
    return problems


def build_plugin(cls: type, options: Mapping[str, Any], key: str) -> Any:
    """``cls(**options)``, its options checked first; every problem raised as one :class:`~fedtune.errors.ConfigError`.

    The constructor's own checks (a value out of range) are reported under ``key`` too.
    """
    from fedtune.errors import ConfigError

    problems = option_problems(cls, options, key)
    if problems:
        raise ConfigError(problems)
    try:
        return cls(**dict(options))
    except (TypeError, ValueError) as e:
        raise ConfigError([f"{key} for {cls.__name__}: {e}"]) from e


def describe_options(cls: type) -> list[str]:
    """One line per option: ``name: type = default`` and its help, for ``fedtune strategies NAME``."""
    lines = []
    for o in options_of(cls):
        default = "required" if o.default is REQUIRED else f"= {o.default!r}"
        lines.append(f"{o.name}: {o.type_name} {default}")
        if o.help:
            lines.append(f"    {o.help}")
    return lines


__all__ = ["REQUIRED", "Option", "build_plugin", "describe_options", "expected", "matches", "option_problems", "options_dataclass",
           "options_of", "parameter_help", "type_name"]
