"""Run a whole federation on one machine through Flower's Simulation Runtime."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.config import FedtuneConfig, to_run_config
from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp


def simulate(cfg: FedtuneConfig, verbose: bool = False,
             client_app_factory: Callable[[dict[str, Any]], ClientApp] | None = None) -> Path:
    """Simulate ``cfg.federation.num_clients`` SuperNodes and run every round; return the run directory.

    Server and clients exchange real Flower messages; clients run in Ray worker processes,
    each of which keeps its base model loaded across rounds and virtual clients.
    ``client_app_factory`` (run config -> ClientApp) replaces fedtune's ClientApp, e.g. to
    wrap it with fault injection in tests.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from fedtune.flower.client_app import make_client_app
    from fedtune.flower.server_app import make_server_app

    preflight(cfg)
    run_config = to_run_config(cfg)
    outcome: dict[str, object] = {}

    server_app = make_server_app(run_config, on_finish=lambda result: outcome.__setitem__("result", result))
    client_app = (client_app_factory or make_client_app)(run_config)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.ERROR)
    cpus = os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": min(cfg.federation.client_cpus, cpus), "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": verbose},
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*run_simulation.*deprecated.*")
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_clients,
                       backend_config=backend_config, verbose_logging=verbose)
    result = outcome.get("result")
    if isinstance(result, BaseException):
        raise result
    if result is None:
        raise FedtuneError("the simulation ended without finishing the run; rerun with --verbose to see why")
    return Path(str(result))


def preflight(cfg: FedtuneConfig) -> None:
    """Fail fast, before Ray starts, on a model that cannot be found or data that cannot be read."""
    from transformers import AutoConfig

    from fedtune.checkpoint import checkpoint_to_resume
    from fedtune.data import load_splits
    from fedtune.errors import ModelLoadError
    from fedtune.models import resolve_model_path

    if cfg.output.resume:  # output.dir is then set (a config check)
        checkpoint_to_resume(cfg, Path(cfg.output.dir))
    path = resolve_model_path(cfg.model.name)
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model.name={cfg.model.name!r}: {e}. Give a local folder, a builtin: "
                             "model, or a hub id with network access") from e
    load_splits(cfg.data, cfg.model.task)
