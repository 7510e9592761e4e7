"""Experiment trackers with the real libraries: what a run logs is read back with TensorBoard's and MLflow's own readers."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from fedtune.config import FedtuneConfig, load_config
from fedtune.errors import ConfigError
from fedtune.reporting.trackers import (
    MLFLOW_DIR,
    TENSORBOARD_DIR,
    TRACKERS,
    TrackerError,
    Trackers,
    flat_params,
    numeric_metrics,
    open_trackers,
)


def rows(shift: float = 0.0) -> list[dict[str, Any]]:
    """metrics.jsonl rows: round 0 has no train loss, round 2 lost its eval, plus values no tracker takes."""
    return [{"round": r, "strategy": "fedit", "train_loss": None if r == 0 else 1.0 / (r + 1) + shift,
             "eval_loss": 1.25 / (r + 1), "eval_accuracy": None if r == 2 else 0.375 + 0.125 * r + shift,
             "bytes_up": 0 if r == 0 else 12_345 * r, "round_skipped": False, "round_seconds": 0.25 * r,
             "client_resources": [{"lora_rank": 4}], "clients_unavailable": []} for r in range(4)]


def config(*trackers: str, **output: Any) -> FedtuneConfig:
    cfg = FedtuneConfig()
    cfg.output.trackers = list(trackers)
    for key, v in output.items():
        setattr(cfg.output, key, v)
    return cfg


def adapter(run_dir: Path) -> Path:
    folder = run_dir / "adapter"
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def log_run(cfg: FedtuneConfig, run_dir: Path, earlier: int = 0, success: bool = True) -> None:
    """What run_federation does: open with the first ``earlier`` rows (a resumed run), log the rest, save, close."""
    all_rows = rows()
    trackers = open_trackers(cfg, run_dir, all_rows[:earlier])
    for row in all_rows[earlier:]:
        trackers.log_metrics(row["round"], row)
    if success:
        trackers.log_artifact(adapter(run_dir))
    trackers.close(success=success)


def expected(key: str) -> list[tuple[int, float]]:
    return [(r["round"], r[key]) for r in rows() if r[key] is not None]


def test_numeric_metrics_are_the_finite_numbers_of_a_row() -> None:
    row = {"round": 3, "strategy": "fedit", "eval_accuracy": 0.5, "bytes_up": 10, "train_loss": None,
           "round_skipped": True, "eval_loss": float("nan"), "client_resources": [{}]}
    assert numeric_metrics(row) == {"eval_accuracy": 0.5, "bytes_up": 10.0}


def test_hyperparameters_are_the_flattened_resolved_config() -> None:
    cfg = config()
    cfg.strategy.options = {"trim": 1}
    params = flat_params(cfg)
    assert params["train.learning_rate"] == cfg.train.learning_rate
    assert params["federation.num_rounds"] == cfg.federation.num_rounds
    assert params["adapter.target_modules"] == json.dumps(cfg.adapter.target_modules)
    assert params["strategy.options"] == '{"trim": 1}'
    assert params["output.dir"] == "null"
    assert all(isinstance(v, (str, int, float, bool)) for v in params.values())


# ----------------------------------------------------------------------------- TensorBoard


def read_tensorboard(log_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return accumulator


def tensorboard_hparams(accumulator: Any) -> dict[str, Any]:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def scalars(accumulator: Any, key: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in accumulator.Scalars(key)]


def test_tensorboard_event_files_hold_every_round_the_config_and_the_adapter(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra: pip install 'fedtune[tensorboard]'")
    cfg = config("tensorboard")
    log_run(cfg, tmp_path)
    accumulator = read_tensorboard(tmp_path / TENSORBOARD_DIR)
    assert set(accumulator.Tags()["scalars"]) == {"train_loss", "eval_loss", "eval_accuracy", "bytes_up",
                                                 "round_seconds"}
    for key in ("train_loss", "eval_accuracy", "bytes_up"):
        got = scalars(accumulator, key)
        assert [step for step, _ in got] == [step for step, _ in expected(key)]  # no value: no point, never zero
        # TensorBoard stores scalars as float32.
        assert [v for _, v in got] == pytest.approx([v for _, v in expected(key)], rel=1e-6)
    hparams = tensorboard_hparams(accumulator)
    assert hparams["train.learning_rate"] == pytest.approx(cfg.train.learning_rate, rel=1e-12)
    assert hparams["strategy.name"] == "fedit"
    assert hparams["adapter.target_modules"] == json.dumps(cfg.adapter.target_modules)
    text = accumulator.Tensors("adapter/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == str((tmp_path / "adapter").resolve())


def test_a_resumed_run_replaces_the_earlier_attempts_tensorboard_curve(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra: pip install 'fedtune[tensorboard]'")
    cfg = config("tensorboard")
    first = open_trackers(cfg, tmp_path)
    for row in rows(shift=10.0):  # an attempt that got further, with other values, then died
        first.log_metrics(row["round"], row)
    first.close(success=False)
    log_run(cfg, tmp_path, earlier=2)  # resumed from the checkpoint of round 1
    got = scalars(read_tensorboard(tmp_path / TENSORBOARD_DIR), "eval_accuracy")
    assert [step for step, _ in got] == [step for step, _ in expected("eval_accuracy")]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected("eval_accuracy")], rel=1e-6)


# ----------------------------------------------------------------------------- MLflow


def mlflow_run(tracking_uri: str, experiment: str = "fedtune") -> tuple[Any, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    (run,) = client.search_runs([found.experiment_id])
    return client, run


def history(client: Any, run: Any, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


def test_mlflow_local_store_holds_every_round_the_config_and_the_adapter(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install 'fedtune[mlflow]'")
    run_dir = tmp_path / "fedit-run"
    cfg = config("mlflow")
    log_run(cfg, run_dir)
    client, run = mlflow_run(f"sqlite:///{run_dir / MLFLOW_DIR / 'mlflow.db'}")
    assert run.info.run_name == "fedit-run" and run.info.status == "FINISHED"
    assert run.data.tags["fedtune.run_dir"] == str(run_dir.resolve())
    assert set(run.data.metrics) == {"train_loss", "eval_loss", "eval_accuracy", "bytes_up", "round_seconds"}
    for key in ("train_loss", "eval_accuracy", "bytes_up", "round_seconds"):
        assert history(client, run, key) == expected(key)  # float64: exact
    assert run.data.params == {k: str(v) for k, v in flat_params(cfg).items()}
    assert run.data.params["train.learning_rate"] == str(cfg.train.learning_rate)
    files = sorted(a.path for a in client.list_artifacts(run.info.run_id, "adapter"))
    assert files == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
    local = Path(client.download_artifacts(run.info.run_id, "adapter/adapter_model.safetensors", str(tmp_path)))
    assert local.read_bytes() == b"weights"
    assert (run_dir / MLFLOW_DIR / "artifacts").is_dir()  # the default store keeps everything in the run directory


def test_mlflow_resumed_run_is_complete_and_a_failed_one_is_marked(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install 'fedtune[mlflow]'")
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    cfg = config("mlflow", mlflow_uri=uri, mlflow_experiment="sweep")
    log_run(cfg, tmp_path / "resumed", earlier=2)
    log_run(cfg, tmp_path / "failed", success=False)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("sweep").experiment_id])}
    assert runs["resumed"].info.status == "FINISHED" and runs["failed"].info.status == "FAILED"
    assert history(client, runs["resumed"], "eval_accuracy") == expected("eval_accuracy")
    assert client.list_artifacts(runs["failed"].info.run_id) == []
    assert not (tmp_path / "resumed" / MLFLOW_DIR).exists()  # an explicit URI: nothing in the run directory
    # A new experiment on a SQLite store keeps its artifacts beside the database, not in ./mlruns.
    assert client.get_experiment_by_name("sweep").artifact_location == (tmp_path / "artifacts").as_uri()


def test_both_trackers_at_once(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="needs the tensorboard extra: pip install 'fedtune[tensorboard]'")
    pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install 'fedtune[mlflow]'")
    log_run(config("tensorboard", "mlflow"), tmp_path)
    assert scalars(read_tensorboard(tmp_path / TENSORBOARD_DIR), "bytes_up") == expected("bytes_up")
    client, run = mlflow_run(f"sqlite:///{tmp_path / MLFLOW_DIR / 'mlflow.db'}")
    assert history(client, run, "bytes_up") == expected("bytes_up")


def test_a_tracker_that_cannot_start_fails_the_run_naming_the_setting(tmp_path: Path) -> None:
    pytest.importorskip("mlflow", reason="needs the mlflow extra: pip install 'fedtune[mlflow]'")
    with pytest.raises(TrackerError, match="mlflow could not start .*output.mlflow_uri"):
        open_trackers(config("mlflow", mlflow_uri="nosuchscheme://host/x"), tmp_path)


# ----------------------------------------------------------------------------- fan-out and config


class Recorder:
    def __init__(self, name: str, fail_in: str | None = None) -> None:
        self.name, self.fail_in, self.calls = name, fail_in, []

    def _record(self, method: str, *args: Any) -> None:
        self.calls.append((method, *args))
        if method == self.fail_in:
            raise ConnectionError("tracking server went away")

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._record("log_params", dict(params))

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self._record("log_metrics", step, dict(metrics))

    def log_artifact(self, path: Path) -> None:
        self._record("log_artifact", path)

    def close(self, success: bool) -> None:
        self._record("close", success)


def test_a_failing_tracker_is_warned_about_once_and_the_others_go_on(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    broken, fine = Recorder("broken", fail_in="log_metrics"), Recorder("fine")
    trackers = Trackers([broken, fine])
    with caplog.at_level(logging.WARNING, logger="fedtune.reporting.trackers"):
        for row in rows():
            trackers.log_metrics(row["round"], row)
        trackers.log_artifact(tmp_path)
        trackers.close(success=True)
        trackers.close(success=False)  # only the first close counts
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "broken failed in log_metrics (ConnectionError: tracking server went away)" in warnings[0]
    assert [c[0] for c in broken.calls] == ["log_metrics"]
    assert [c[:2] for c in fine.calls] == [("log_metrics", 0), ("log_metrics", 1), ("log_metrics", 2),
                                          ("log_metrics", 3), ("log_artifact", tmp_path), ("close", True)]


def test_no_trackers_by_default_and_a_missing_adapter_is_not_logged(tmp_path: Path) -> None:
    assert FedtuneConfig().output.trackers == []
    assert open_trackers(FedtuneConfig(), tmp_path).trackers == []
    recorder = Recorder("r")
    Trackers([recorder]).log_artifact(tmp_path / "adapter")  # output.save_adapter=false: no folder
    assert recorder.calls == []


def test_unknown_and_repeated_tracker_names_are_config_problems() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["output.trackers=[tensorbord,mlflow,mlflow]", "output.mlflow_experiment=' '"])
    assert e.value.problems == [
        ("output.trackers has 'tensorbord', which is not a tracker (did you mean 'tensorboard'?); use "
         "tensorboard or mlflow"),
        "output.trackers lists 'mlflow' twice; list it once",
        "output.mlflow_experiment is empty; name an MLflow experiment, e.g. fedtune"]


def test_a_tracker_whose_library_is_missing_is_a_config_problem_naming_the_extra(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TRACKERS, "mlflow", ("fedtune_no_such_module", "mlflow"))
    with pytest.raises(ConfigError, match=r"fedtune_no_such_module is not installed; install it with "
                                          r"pip install 'fedtune\[mlflow\]'"):
        load_config(None, ["output.trackers=[mlflow]"])
    # The clients' config check (check_strategy=False) does not need the library: only the server logs.
    assert load_config(None, ["output.trackers=[mlflow]"], check_strategy=False).output.trackers == ["mlflow"]
