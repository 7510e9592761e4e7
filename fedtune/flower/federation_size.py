"""How many clients a federation has: ``federation.num_clients`` when the run sets it, else Flower's.

``flwr run .`` simulates as many SuperNodes as Flower's ``num-supernodes`` (2 for a fresh
``FLWR_HOME``), while the schema's default is 4 clients. A run config that does not set
``federation.num_clients`` takes the federation's size instead: the ServerApp counts the
simulated SuperNodes, each ClientApp reads ``num-partitions`` from its node config. A run
config that does set it must match, or the run stops before any model loads, naming both.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from fedtune.errors import ConfigError
from fedtune.schema import PROJECT_ROOT, RUN_CONFIG_FILE_KEY, RUN_CONFIG_OVERRIDES_KEY, parse_overrides

NUM_CLIENTS_KEY = "federation.num_clients"


def _sets_in_tree(tree: Any) -> bool:
    return isinstance(tree, Mapping) and isinstance(tree.get("federation"), Mapping) \
        and "num_clients" in tree["federation"]


def _config_file_sets(config_file: str) -> bool:
    path = Path(config_file)
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path  # as fedtune.config.config_from_run_config resolves it
    if not path.is_file():
        return False
    return _sets_in_tree(OmegaConf.to_container(OmegaConf.load(path)))


def sets_num_clients(run_config: Mapping[str, Any]) -> bool:
    """Whether ``run_config`` sets ``federation.num_clients``: as a key, in ``overrides`` or in ``config-file``.

    A run config that cannot be read counts as not setting it; reading it as a
    configuration then reports what is wrong with it.
    """
    flat = dict(run_config)
    config_file = str(flat.pop(RUN_CONFIG_FILE_KEY, "") or "")
    overrides = str(flat.pop(RUN_CONFIG_OVERRIDES_KEY, "") or "")
    if any(key.replace("-", "_") == NUM_CLIENTS_KEY for key in flat):
        return True
    try:
        return _sets_in_tree(parse_overrides(shlex.split(overrides))) or \
            (bool(config_file) and _config_file_sets(config_file))
    except Exception:  # noqa: BLE001 - config_from_run_config reports it with the fix
        return False


def with_federation_size(run_config: Mapping[str, Any], size: int) -> dict[str, Any]:
    """``run_config``, plus ``federation.num_clients=size`` unless it sets the key itself."""
    out = dict(run_config)
    if not sets_num_clients(out):
        out[NUM_CLIENTS_KEY] = int(size)
    return out


def check_federation_size(num_clients: int, num_nodes: int) -> None:
    """Raise :class:`~fedtune.errors.ConfigError` naming both numbers unless they are equal."""
    if num_clients != num_nodes:
        raise ConfigError([(
            f"federation.num_clients={num_clients} but Flower simulates {num_nodes} SuperNodes "
            f"(num-supernodes={num_nodes}); make them equal: leave federation.num_clients unset to use "
            f"num-supernodes, or run `flwr run . --federation-config \"num-supernodes={num_clients}\"`")])


def count_simulated_nodes(grid: Any, settle: float = 0.5, timeout: float = 30.0) -> int:
    """The number of SuperNodes the simulation registered, once it has stopped changing.

    Flower's Simulation Runtime registers every node right after it starts the ServerApp;
    wait until the count is non-zero and unchanged for ``settle`` seconds.
    """
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while True:
        count = len(list(grid.get_node_ids()))
        now = time.monotonic()
        if count != last:
            last, since = count, now
        elif count and now - since >= settle:
            return count
        if now > deadline:
            return count
        time.sleep(0.05)


def is_simulation(grid: Any) -> bool:
    """Whether ``grid`` is the Simulation Runtime's in-memory grid (all nodes are simulated)."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return isinstance(getattr(grid, "inner", grid), InMemoryGrid)
