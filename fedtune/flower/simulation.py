"""Run a whole federation on one machine through Flower's Simulation Runtime."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.errors import ConfigError, FedtuneError, RunInterrupted
from fedtune.schema import FedtuneConfig, to_run_config

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

    from fedtune.server.run import RunControl


def simulate(cfg: FedtuneConfig, verbose: bool = False,
             client_app_factory: Callable[[dict[str, Any]], ClientApp] | None = None,
             control: RunControl | None = None) -> Path:
    """Simulate ``cfg.federation.num_clients`` SuperNodes and run every round; return the run directory.

    Server and clients exchange real Flower messages; clients run in Ray worker processes,
    each of which keeps its base model loaded across rounds and virtual clients.

    Parameters
    ----------
    cfg : FedtuneConfig
        The run's configuration.
    verbose : bool
        Show Flower's and Ray's logs (otherwise only fedtune's table and warnings).
    client_app_factory : callable, optional
        Run config -> ClientApp, replacing fedtune's, e.g. to inject faults in tests.
    control : RunControl, optional
        Shared with the ServerApp: set its ``stop`` to end the run (see :mod:`fedtune.server.interrupt`).

    Raises
    ------
    FedtuneError
        Whatever ended the run before its last round (a client's exception, no round
        aggregated, a stop request); no adapter is written then, and the run directory
        keeps its last checkpoint.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from fedtune.flower.client_app import make_client_app
    from fedtune.flower.server_app import make_server_app
    from fedtune.server.run import RunControl

    control = control or RunControl()
    preflight(cfg)
    backend = backend_config(cfg, verbose)
    if control.stop.is_set():
        raise RunInterrupted("stopped before the run started")
    run_config = to_run_config(cfg)
    outcome: dict[str, object] = {}

    server_app = make_server_app(run_config, on_finish=lambda result: outcome.__setitem__("result", result),
                                 control=control)
    client_app = (client_app_factory or make_client_app)(run_config)
    quiet_flower(verbose)
    try:
        with without_run_simulation_deprecation():
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.federation.num_clients,
                           backend_config=backend, verbose_logging=verbose)
    except Exception:
        if not isinstance(outcome.get("result"), BaseException):
            raise  # the runtime itself failed, not the ServerApp
    result = outcome.get("result")
    if isinstance(result, BaseException):
        raise result
    if result is None:
        raise FedtuneError("the simulation ended without finishing the run; rerun with --verbose to see why")
    return Path(str(result))


def backend_config(cfg: FedtuneConfig, verbose: bool = False) -> dict[str, Any]:
    """Flower's Ray backend settings: each client's CPU and GPU share, and which Ray to use.

    ``federation.client_gpus`` (default: one GPU per client when the clients' ``model.device``
    resolves to CUDA here, none otherwise) becomes ``client_resources["num_gpus"]``; Ray then
    runs as many clients at once as the shares fit and shows each only its GPU, so a client's
    ``auto`` or ``cuda`` is its own share. ``federation.ray_address`` attaches to an existing
    Ray cluster instead of starting a private instance sized to this machine.

    Raises
    ------
    ConfigError
        CUDA clients without a GPU share, or GPU shares for clients on the CPU.
    """
    from fedtune.models.devices import resolve_device

    federation = cfg.federation
    on_gpu = resolve_device(cfg.model.device).type == "cuda"  # as this machine sees it
    gpus = federation.client_gpus if federation.client_gpus is not None else (1.0 if on_gpu else 0.0)
    # With a cluster (ray_address), its machines may have GPUs this one lacks: the shares are the user's.
    if federation.ray_address is None and on_gpu and gpus == 0:
        raise ConfigError([f"model.device={cfg.model.device!r} puts clients on a GPU, but federation.client_gpus=0 "
                           "gives them no GPU share; set federation.client_gpus (e.g. 0.5 for two clients per GPU) "
                           "or model.device=cpu"])
    if federation.ray_address is None and not on_gpu and gpus > 0:
        raise ConfigError([f"federation.client_gpus={gpus} reserves GPU shares, but model.device={cfg.model.device!r} "
                           "runs the clients on the CPU here; set federation.client_gpus=0 or model.device=auto"])
    cpus = os.cpu_count() or 1
    if federation.ray_address is not None:
        # Ray refuses resource sizes when it joins a running cluster: the cluster has its own.
        init_args: dict[str, Any] = {"address": federation.ray_address, "log_to_driver": verbose}
    else:
        init_args = {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": verbose}
    return {"client_resources": {"num_cpus": float(min(federation.client_cpus, cpus)), "num_gpus": float(gpus)},
            "init_args": init_args}


def quiet_flower(verbose: bool) -> None:
    """Unless ``verbose``, hide Flower's log: fedtune reports what ended a run, once.

    Flower logs every ClientApp exception with its Ray traceback, once per client and
    round; the ServerApp turns the first into one line (see :mod:`fedtune.flower.strategy_adapter`).
    """
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


# What Flower (1.41, 1.42) logs on every call of run_simulation: a log record, not a Python warning.
RUN_SIMULATION_DEPRECATION = "The `run_simulation` function is deprecated"


class RunSimulationDeprecationFilter(logging.Filter):
    """Drops Flower's one "DEPRECATED FEATURE" record about ``run_simulation``; passes every other record.

    ``fedtune simulate`` calls ``flwr.simulation.run_simulation`` because it is the only
    Flower entry point that runs ServerApp and ClientApp objects in this process (with
    fedtune's ``on_finish`` and :class:`~fedtune.server.run.RunControl`); ``flwr run`` loads the apps
    by name in other processes. The user did not call it, so ``--verbose`` should not tell
    them it is deprecated.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (record.levelno == logging.WARNING and str(record.msg).startswith("DEPRECATED FEATURE:")
                    and len(args) == 1 and str(args[0]).startswith(RUN_SIMULATION_DEPRECATION))


@contextmanager
def without_run_simulation_deprecation() -> Iterator[None]:
    """While in the block, Flower's ``flwr`` logger drops its ``run_simulation`` deprecation record."""
    flower_logger = logging.getLogger("flwr")
    hide = RunSimulationDeprecationFilter()
    flower_logger.addFilter(hide)
    try:
        yield
    finally:
        flower_logger.removeFilter(hide)


def preflight(cfg: FedtuneConfig) -> None:
    """Fail fast, before Ray starts, on a model that cannot be found or data that cannot be read or split."""
    from transformers import AutoConfig

    from fedtune.data import load_splits
    from fedtune.data.partition import partition_dataset
    from fedtune.data.prompts import with_resolved_prompt_format
    from fedtune.errors import ModelLoadError
    from fedtune.models.loading import resolve_model_path
    from fedtune.server.checkpoint import checkpoint_to_resume

    if cfg.output.resume:  # output.dir is then set (a config check)
        # The checkpoint records the resolved prompt format, so compare against that.
        checkpoint_to_resume(with_resolved_prompt_format(cfg), Path(cfg.output.dir))
    path = resolve_model_path(cfg.model.name)
    try:
        AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model.name={cfg.model.name!r}: {str(e).rstrip('.')}. Give a local "
                             "folder, a builtin: model, or a hub id with network access") from e
    pool, _ = load_splits(cfg.data, cfg.model.task, cfg.train.objective)
    with warnings.catch_warnings():
        # flwr-datasets warns on every retry of a Dirichlet draw; the DataError after the last one says it all.
        warnings.filterwarnings("ignore", message="The specified min_partition_size .* was not satisfied",
                                category=UserWarning)
        partition_dataset(pool, cfg.partition, cfg.federation.num_clients)  # e.g. more clients than examples
