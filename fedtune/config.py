"""Load and check a run's configuration: the schema (:mod:`fedtune.schema`) and the plug-ins it names.

Three ways in, one validation:

* :func:`load_config` reads a YAML file and ``key=value`` overrides (the CLI, scripts);
* :func:`config_from_run_config` reads Flower's flat ``run_config`` (``flwr run``, the apps);
* both end in :func:`build_config`, which reports *every* problem at once, with the key,
  the value and the fix, before anything heavy (a model, a data set) is touched.

Besides the schema's own checks, :func:`build_config` asks the plug-ins: whether
``eval.metric`` is a metric and takes ``eval.options``, whether ``output.trackers`` names
trackers whose libraries are installed, whether ``strategy.name`` is a strategy and, when the
rest is valid, the strategy itself (its options, the settings it cannot run with). The schema
module imports none of them, so this module sits above the plug-ins and nothing below imports
it. The schema's names are re-exported here, so ``from fedtune.config import FedtuneConfig``
keeps working.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from fedtune.errors import ConfigError
from fedtune.evaluation.metrics import metric_problems
from fedtune.registry import strategy_name_problem
from fedtune.reporting.trackers import missing_library_problems, tracker_name_problems
from fedtune.schema import (
    DEFAULT_METRIC,
    AdapterConfig,
    DataConfig,
    EvalConfig,
    FederationConfig,
    FedtuneConfig,
    ModelConfig,
    OutputConfig,
    PartitionConfig,
    PrivacyConfig,
    StrategyConfig,
    TrainConfig,
    check_schema,
    flatten,
    parse_overrides,
    problem_key,
    read_config,
    read_run_config,
    to_run_config,
    to_yaml,
)


def plugin_problems(cfg: FedtuneConfig, *, server: bool = True) -> list[str]:
    """What the plug-ins a config names say about it: the metric, the trackers, the strategy's name.

    ``server`` adds the server's own needs: the trackers' libraries (only the server logs to
    them). The strategy itself is built by :func:`build_config`, once everything else is valid.
    """
    problems = metric_problems(cfg.eval.metric, cfg.eval.options) if cfg.eval.metric else []
    problems += tracker_name_problems(cfg.output.trackers)
    if server:
        problems += missing_library_problems(cfg.output.trackers)
        problems += [p for p in [strategy_name_problem(cfg.strategy.name)] if p]
    return problems


def build_config(data: Mapping[str, Any], *, check_strategy: bool = True) -> FedtuneConfig:
    """Validate a nested mapping against the schema and its plug-ins and return the typed config.

    Every problem (unknown keys, wrong types, bad values, unknown plug-ins) is collected and
    raised together as one :class:`ConfigError`. With ``check_strategy`` (the server's and the
    CLI's checks), an unknown strategy name and a tracker whose library is not installed are
    among them; the strategy itself (its options, the settings it cannot run with) is built and
    checked once the rest is valid, since that imports it and torch with it. Clients pass
    ``check_strategy=False``: the server has checked the run before any client got it.
    """
    cfg, problems = check_schema(data)
    problems += plugin_problems(cfg, server=check_strategy)
    if check_strategy and not problems:
        # The strategy is built (its module imported, torch with it) only for an otherwise
        # valid config: a typo is reported in a blink, and the strategy's own checks see
        # well-formed settings.
        from fedtune.strategy import strategy_problems

        problems += strategy_problems(cfg)
    if problems:
        raise ConfigError(in_schema_order(problems))
    return cfg


def in_schema_order(problems: list[str]) -> list[str]:
    """``problems`` sorted by the schema position of the key each starts with (stable; unknown keys last)."""

    def position(problem: str) -> tuple[int, ...]:
        key = problem_key(problem)
        schema: Any = FedtuneConfig
        out = []
        for part in key.split("."):
            names = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []
            if part not in names:
                out.append(len(names))
                break
            out.append(names.index(part))
            schema = dataclasses.fields(schema)[names.index(part)].type
            schema = getattr(sys.modules[FedtuneConfig.__module__], schema, None) if isinstance(schema, str) else schema
        return tuple(out)

    return sorted(problems, key=position)


def load_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = (),
                *, check_strategy: bool = True) -> FedtuneConfig:
    """Read a YAML config (the embedded default when ``path`` is None) plus overrides, and check it."""
    return build_config(read_config(path, overrides), check_strategy=check_strategy)


def config_from_run_config(run_config: Mapping[str, Any], *, check_strategy: bool = True) -> FedtuneConfig:
    """Flower's flat ``run_config`` as a checked config (:func:`fedtune.schema.read_run_config`)."""
    return build_config(read_run_config(run_config), check_strategy=check_strategy)


__all__ = [
    "DEFAULT_METRIC",
    "AdapterConfig",
    "DataConfig",
    "EvalConfig",
    "FederationConfig",
    "FedtuneConfig",
    "ModelConfig",
    "OutputConfig",
    "PartitionConfig",
    "PrivacyConfig",
    "StrategyConfig",
    "TrainConfig",
    "build_config",
    "config_from_run_config",
    "flatten",
    "load_config",
    "parse_overrides",
    "plugin_problems",
    "to_run_config",
    "to_yaml",
]
