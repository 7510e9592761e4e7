"""Run a whole federation on one machine through Flower's Simulation Runtime."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from fedtune.config import FedtuneConfig, to_run_config
from fedtune.errors import FedtuneError


def simulate(cfg: FedtuneConfig, verbose: bool = False) -> Path:
    """Simulate ``cfg.federation.num_clients`` SuperNodes and run every round; return the run directory.

    Server and clients exchange real Flower messages; clients run in Ray worker processes,
    each of which keeps its base model loaded across rounds and virtual clients.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from fedtune.flower.client_app import make_client_app
    from fedtune.flower.server_app import make_server_app

    run_config = to_run_config(cfg)
    outcome: dict[str, object] = {}

    server_app = make_server_app(run_config, on_finish=lambda run_dir: outcome.__setitem__("run_dir", run_dir))
    client_app = make_client_app(run_config)
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
    if "run_dir" not in outcome:
        raise FedtuneError("the simulation ended without finishing the run; see the log above for the cause")
    return Path(str(outcome["run_dir"]))
