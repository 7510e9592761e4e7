"""Experiment trackers: a run's hyperparameters, per-round metrics and final adapter, sent to TensorBoard or MLflow.

Opt-in through ``output.trackers`` (``[tensorboard]``, ``[mlflow]`` or both); each needs
its optional extra (``pip install 'fedtune[tensorboard]'``, ``'fedtune[mlflow]'``), and a
missing one is a configuration problem reported before any model loads.

What is logged, by every tracker:

* hyperparameters, once: the resolved configuration flattened to dotted keys
  (``train.learning_rate``), lists and ``strategy.options`` as JSON text;
* metrics, every round, with step = round: each numeric value of the round's
  ``metrics.jsonl`` row, under the same key (``eval_accuracy``, ``bytes_up``...); null,
  non-finite and non-numeric values (``strategy``, ``client_resources``) are left out;
* the exported adapter folder (``adapter/``, or ``model/``) as an artifact, when the run finished.

A resumed run (or a rerun into the same ``output.dir``) logs the earlier rounds of
``metrics.jsonl`` again first, so each tracker run holds the whole history: TensorBoard
hides the earlier attempt's events from step 0 on (``purge_step``), MLflow starts a new run.

A tracker that fails while the run goes on (a tracking server gone away) is reported in one
warning and not called again; the run continues, and ``metrics.jsonl`` still has every round.
A tracker that cannot start fails the run before its first round.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fedtune.errors import FedtuneError

if TYPE_CHECKING:
    from fedtune.schema import FedtuneConfig

log = logging.getLogger("fedtune.reporting.trackers")

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlflow"  # the default MLflow store: mlflow/mlflow.db and mlflow/artifacts/
SQLITE = "sqlite:///"
# name -> (module that must be importable, the extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow")}


class TrackerError(FedtuneError):
    """A tracker could not start (its store or server refused), so the run does not either."""


class Tracker(Protocol):
    """What a run tells an experiment tracker; :func:`open_trackers` builds them from the config."""

    name: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Hyperparameters, once, before any metric: dotted keys to scalar values."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """One round's numeric metrics; ``step`` is the round."""

    def log_artifact(self, path: Path) -> None:
        """A folder the run produced (the exported adapter), once, at the end."""

    def close(self, success: bool) -> None:
        """End the tracker's run; ``success`` is False when the run failed or was stopped."""


def tracker_name_problems(names: Sequence[str]) -> list[str]:
    """Unknown or repeated names in ``output.trackers`` (no import: cheap enough for every config check)."""
    out = []
    for name in names:
        if name not in TRACKERS:
            close = difflib.get_close_matches(str(name), list(TRACKERS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            out.append(f"output.trackers has {name!r}, which is not a tracker{hint}; use {' or '.join(TRACKERS)}")
    out += [f"output.trackers lists {name!r} twice; list it once"
            for name in sorted(set(names)) if list(names).count(name) > 1]
    return out


def missing_library_problems(names: Sequence[str]) -> list[str]:
    """One problem per tracker in ``names`` whose library is not installed, naming the extra that installs it."""
    out = []
    for name in names:
        if name in TRACKERS and importlib.util.find_spec(TRACKERS[name][0]) is None:
            module, extra = TRACKERS[name]
            out.append(f"output.trackers has {name!r}, but {module} is not installed; install it with "
                       f"pip install 'fedtune[{extra}]', or remove {name!r} from output.trackers")
    return out


def numeric_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The values of a ``metrics.jsonl`` row that a tracker logs: finite numbers, ``round`` aside."""
    return {k: float(v) for k, v in row.items()
            if k != "round" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def flat_params(cfg: FedtuneConfig) -> dict[str, Any]:
    """The resolved configuration as dotted keys to str, int, float or bool (lists, dicts, None as JSON)."""
    from omegaconf import OmegaConf

    from fedtune.schema import flatten

    tree = OmegaConf.to_container(OmegaConf.structured(cfg))
    assert isinstance(tree, dict)
    return {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v) for k, v in flatten(tree).items()}


class TensorBoardTracker:
    """Event files in ``log_dir`` (``tensorboard --logdir runs`` shows every run), written by torch's SummaryWriter.

    Hyperparameters go to TensorBoard's HParams plugin; TensorBoard keeps no artifacts, so the
    adapter's path is recorded as the text summary ``adapter``.
    """

    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step=0: events an earlier attempt wrote into this folder are hidden; the
        # rounds this run keeps are logged again (see the module docstring).
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=0)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Written into this run's own event file (SummaryWriter.add_hparams would start a sub-run).
        for summary in hparams(dict(params), {}):
            self.writer.file_writer.add_summary(summary)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, v in metrics.items():
            self.writer.add_scalar(key, v, global_step=step)
        self.writer.flush()

    def log_artifact(self, path: Path) -> None:
        self.writer.add_text("adapter", str(Path(path).resolve()))

    def close(self, success: bool) -> None:
        self.writer.close()


class MlflowTracker:
    """One MLflow run per fedtune run (named after the run directory), through ``mlflow.MlflowClient``.

    Parameters
    ----------
    tracking_uri : str
        Any MLflow tracking URI (``http://host:5000``, ``sqlite:///path/mlflow.db``, ``databricks``).
    experiment : str
        The experiment's name; created when missing (with ``artifact_location`` when given).
    run_name : str
        The MLflow run's name.
    artifact_location : str, optional
        Where a new experiment keeps its artifacts (fedtune's default store: inside the run directory).
    """

    name = "mlflow"
    _PARAMS_PER_CALL = 100  # MLflow's log_batch limit
    _MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter's value

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, artifact_location: str | None = None,
                 tags: Mapping[str, str] | None = None) -> None:
        from mlflow import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # not "Creating initial MLflow database tables"
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # MLflow's SQL store uses an SQLAlchemy loader that SQLAlchemy 2.1 deprecates: MLflow's to change.
        warnings.filterwarnings("ignore", message="The ``noload`` loader strategy is deprecated",
                                category=DeprecationWarning)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found is not None
                         else self.client.create_experiment(experiment, artifact_location=artifact_location))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {})).info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[: self._MAX_PARAM_LENGTH]) for k, v in params.items()]
        for start in range(0, len(items), self._PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=items[start:start + self._PARAMS_PER_CALL])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path=Path(path).name)

    def close(self, success: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if success else "FAILED")


class Trackers:
    """Every tracker of a run behind one interface; one that fails is warned about once and dropped.

    Parameters
    ----------
    trackers : sequence of Tracker
        Empty: every call does nothing.
    """

    def __init__(self, trackers: Sequence[Tracker] = ()) -> None:
        self.trackers = list(trackers)
        self._closed = False

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker must not end a run that is otherwise fine
                self.trackers.remove(tracker)
                log.warning("output.trackers: %s failed in %s (%s: %s); it logs nothing more in this run, "
                            "metrics.jsonl has every round", tracker.name, method, type(e).__name__, e)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._each("log_params", params)

    def log_metrics(self, step: int, row: Mapping[str, Any]) -> None:
        """Log the numeric values of a ``metrics.jsonl`` row (see :func:`numeric_metrics`)."""
        metrics = numeric_metrics(row)
        if metrics:
            self._each("log_metrics", step, metrics)

    def log_artifact(self, path: Path) -> None:
        if Path(path).exists():
            self._each("log_artifact", Path(path))

    def close(self, success: bool) -> None:
        """End every tracker's run (only the first call counts)."""
        if not self._closed:
            self._closed = True
            self._each("close", success)


def open_trackers(cfg: FedtuneConfig, run_dir: Path, rows: Sequence[Mapping[str, Any]] = ()) -> Trackers:
    """The trackers ``cfg.output.trackers`` names, with the hyperparameters and ``rows`` (earlier rounds) logged.

    Raises
    ------
    ConfigError
        A tracker's library is not installed.
    TrackerError
        A tracker could not start (e.g. its tracking server refused); nothing has run yet.
    """
    from fedtune.errors import ConfigError

    names = list(cfg.output.trackers)
    if not names:
        return Trackers()
    problems = missing_library_problems(names)
    if problems:
        raise ConfigError(problems)
    run_dir = Path(run_dir)
    opened: list[Tracker] = []
    for name in names:
        try:
            if name == "tensorboard":
                opened.append(TensorBoardTracker(run_dir / TENSORBOARD_DIR))
            else:
                opened.append(_open_mlflow(cfg, run_dir))
        except Exception as e:
            Trackers(opened).close(success=False)
            raise TrackerError(f"output.trackers: {name} could not start ({type(e).__name__}: {e}); check "
                               f"{_settings_of(name)} or remove {name!r} from output.trackers") from e
    trackers = Trackers(opened)
    trackers.log_params(flat_params(cfg))
    for row in rows:
        trackers.log_metrics(int(row["round"]), row)
    return trackers


def _open_mlflow(cfg: FedtuneConfig, run_dir: Path) -> MlflowTracker:
    uri = cfg.output.mlflow_uri
    if not uri:
        store = (run_dir / MLFLOW_DIR).resolve()
        store.mkdir(parents=True, exist_ok=True)
        uri = f"{SQLITE}{store / 'mlflow.db'}"
    # MLflow would put a new experiment's artifacts in ./mlruns of whatever the current directory
    # is; on a SQLite store they go beside the database (a tracking server chooses its own).
    artifacts = None
    if uri.startswith(SQLITE):
        artifacts = (Path(uri.removeprefix(SQLITE)).resolve().parent / "artifacts").as_uri()
    tags = {"fedtune.run_dir": str(run_dir.resolve()), "fedtune.strategy": cfg.strategy.name}
    return MlflowTracker(uri, cfg.output.mlflow_experiment, run_dir.name, artifact_location=artifacts, tags=tags)


def _settings_of(name: str) -> str:
    return "output.mlflow_uri and output.mlflow_experiment" if name == "mlflow" else "that the run directory is writable"


__all__ = ["MLFLOW_DIR", "TENSORBOARD_DIR", "TRACKERS", "MlflowTracker", "TensorBoardTracker", "Tracker",
           "TrackerError", "Trackers", "flat_params", "missing_library_problems", "numeric_metrics",
           "open_trackers", "tracker_name_problems"]
