"""Failed runs: a non-zero exit, the cause in one line, no adapter, and a run directory that resumes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from importlib.metadata import metadata, requires
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from fedtune.cli import main
from fedtune.config import load_config
from fedtune.errors import ConfigError, NothingAggregatedError, RunInterrupted
from fedtune.flower.federation_size import check_federation_size, sets_num_clients, with_federation_size
from fedtune.flower.server_app import StoppableGrid
from fedtune.flower.strategy_adapter import client_error_message
from fedtune.server.run import check_progress
from tests.test_simulation import read_rows, tiny_overrides

ROOT = Path(__file__).resolve().parents[1]

# What Flower 1.42 puts in an error reply when a ClientApp raises, in a simulation (the Ray
# traceback, shortened) and on a SuperNode.
SIMULATION_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m "
    "(pid=1, ip=192.0.2.2)\n  File \"/x/fedtune/data/partition.py\", line 63, in partition_dataset\n"
    "    raise DataError(...)\nfedtune.errors.DataError: 4 clients but only 3 examples; use fewer clients\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: 4 clients but only 3 examples; use fewer clients'>")


# --------------------------------------------------------------------------- fast: no federation
def test_a_client_exception_becomes_one_line() -> None:
    assert client_error_message(SIMULATION_REASON) == "4 clients but only 3 examples; use fewer clients"
    assert client_error_message("<class 'KeyError'>:<''label''>") == "KeyError: 'label'"
    ray_key_error = SIMULATION_REASON.replace("fedtune.errors.DataError", "KeyError")
    assert client_error_message(ray_key_error).startswith("KeyError: 4 clients")
    assert client_error_message("ClientApp stopped responding.") == "ClientApp stopped responding."


def test_requires_python_admits_no_python_that_flwr_refuses() -> None:
    """`flwr run .` resolves the app's dependencies for every Python that requires-python admits."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ours = SpecifierSet(project["requires-python"])
    direct = [Requirement(r).name for r in project["dependencies"]]
    for dist in sorted({*direct, *(Requirement(r).name for r in requires("flwr") or [] if "extra" not in r)}):
        theirs = SpecifierSet(metadata(dist).get("Requires-Python") or "")
        for minor in range(8, 16):
            version = f"3.{minor}"
            assert not (version in ours and version not in theirs), \
                f"requires-python={ours} admits Python {version}, which {dist} ({theirs}) does not support"


def test_a_config_error_with_one_message_is_one_problem() -> None:
    error = ConfigError("checkpoint.pt has checkpoint format 0; this fedtune reads format 1")
    assert error.problems == ["checkpoint.pt has checkpoint format 0; this fedtune reads format 1"]
    assert str(error).startswith("1 problem(s)")


def test_a_checkpoint_of_another_format_is_one_problem(tmp_path: Path) -> None:
    import torch

    from fedtune.server.checkpoint import load_checkpoint

    torch.save({"version": 0, "round": 1}, tmp_path / "checkpoint.pt")
    with pytest.raises(ConfigError) as caught:
        load_checkpoint(tmp_path)
    assert len(caught.value.problems) == 1 and "format 0" in caught.value.problems[0]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("fedtune: error: ")
    return lines[0]


def test_a_missing_model_folder_is_named_with_the_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "models" / "my-bert"
    assert main(["simulate", f"model.name={missing}", f"output.dir={tmp_path / 'run'}"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"model.name='{missing}' does not exist" in line and "config.json" in line
    assert "Repo id" not in line and ".." not in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl", "blank.tsv"])
def test_an_empty_data_file_is_named_with_the_fix(name: str, tiny_bert: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / name
    data.write_text("" if name.startswith("empty") else "\n  \n")
    assert main(["simulate", f"model.name={tiny_bert}", f"data.source={data}", f"output.dir={tmp_path / 'run'}"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert f"data file '{data}' is empty; put" in line and "data.source" in line


def test_more_clients_than_examples_fails_before_the_federation_starts(
        tiny_bert: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "tiny.csv"
    data.write_text("text,label\na b,0\nc d,1\ne f,0\n")
    assert main(["simulate", f"model.name={tiny_bert}", f"data.source={data}", "federation.num_clients=4",
                 f"output.dir={tmp_path / 'run'}"]) == 1
    assert _one_error_line(capsys.readouterr().err) == \
        "fedtune: error: 4 clients but only 3 examples; use fewer clients"
    assert not (tmp_path / "run").exists()


def test_json_is_read_without_deprecated_pandas_options(tmp_path: Path) -> None:
    from fedtune.data import load_splits

    for name, text in [("d.json", '[{"text": "04", "label": "x", "date": "2020-01-01"}]'),
                       ("d.jsonl", '{"text": "1e5", "label": "y", "date": "2020-01-01"}\n')]:
        (tmp_path / name).write_text(text)
        cfg = load_config(None, [f"data.source={tmp_path / name}"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            train, _ = load_splits(cfg.data, "classification")
        assert train[0]["text"] in ("04", "1e5")  # strings stay strings


def test_an_unexpected_error_is_one_line_and_its_traceback_needs_verbose(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import fedtune.flower.simulation

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the simulation runtime crashed\nwith a second line")

    monkeypatch.setattr(fedtune.flower.simulation, "simulate", broken)
    assert main(["simulate"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert line == ("fedtune: error: RuntimeError: the simulation runtime crashed "
                    "(rerun with --verbose for the traceback)")
    assert main(["simulate", "--verbose"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_federation_size_follows_flower_unless_the_run_sets_it(tmp_path: Path) -> None:
    yaml = tmp_path / "run.yaml"
    yaml.write_text("federation:\n  num_clients: 3\n")
    assert not sets_num_clients({"config-file": "", "overrides": "federation.num_rounds=2"})
    assert sets_num_clients({"overrides": "federation.num_rounds=2 federation.num_clients=3"})
    assert sets_num_clients({"federation.num-clients": 3})
    assert sets_num_clients({"config-file": str(yaml), "overrides": ""})
    assert with_federation_size({"overrides": ""}, 2)["federation.num_clients"] == 2
    assert "federation.num_clients" not in with_federation_size({"config-file": str(yaml)}, 2)
    with pytest.raises(ConfigError, match=r"federation.num_clients=3 but Flower simulates 2 SuperNodes "
                                          r"\(num-supernodes=2\); make them equal"):
        check_federation_size(3, 2)


def test_a_run_whose_every_round_was_skipped_is_a_failure() -> None:
    cfg = load_config(None, [])
    skipped = {"round": 1, "clients_aggregated": 0, "round_skipped": True, "clients_sampled": 4,
               "clients_rejected": 4}
    with pytest.raises(NothingAggregatedError, match="no round aggregated anything: all 2 rounds were skipped"):
        check_progress([{"round": 0}, skipped, {**skipped, "round": 2}], cfg)
    check_progress([{"round": 0}, skipped, {"round": 2, "clients_aggregated": 3}], cfg)  # one round is enough


class _SilentGrid:
    """A grid whose clients never reply."""

    def push_messages(self, messages: object) -> list[str]:
        return ["m1", "m2"]

    def pull_messages(self, ids: object) -> list[object]:
        return []


def test_a_stop_request_ends_the_wait_for_replies() -> None:
    stop = threading.Event()
    grid = StoppableGrid(_SilentGrid(), stop)  # type: ignore[arg-type]
    assert grid.send_and_receive([], timeout=0.3) == []  # nobody replied in time
    threading.Timer(0.2, stop.set).start()
    start = time.monotonic()
    with pytest.raises(RunInterrupted):
        grid.send_and_receive([], timeout=3600)
    assert time.monotonic() - start < 30  # not the hour of the round timeout


# --------------------------------------------------------------------------- real federations
FAILING_STRATEGY = '''
import dataclasses
import os

from fedtune.strategy import registered_strategies


class FailsInRoundTwo(registered_strategies()["fedit"]):
    """FedIT, except that with FAIL_ROUND=2 the clients are sent a routine they do not know in round 2."""

    def configure_client(self, server_round, node_id):
        instruction = super().configure_client(server_round, node_id)
        if os.environ.get("FAIL_ROUND") == str(server_round):
            return dataclasses.replace(instruction, routine="no-such-routine")
        return instruction
'''


def fedtune_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=timeout, check=False)


@pytest.mark.integration
def test_a_client_exception_fails_the_run_in_one_line_and_the_run_resumes(tiny_bert: str, tmp_path: Path) -> None:
    module = tmp_path / "failing.py"
    module.write_text(FAILING_STRATEGY)
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_bert, run_dir, rounds=2), f"strategy.name={module}:FailsInRoundTwo",
                 "data.max_examples=120", "federation.fraction_evaluate=0"]
    failed = fedtune_cli("simulate", *overrides, env={"FAIL_ROUND": "2"})
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
    line = _one_error_line(failed.stderr)
    assert re.fullmatch(r"fedtune: error: round 2: a client's training failed: ValueError: "
                        r"ClientInstruction.routine='no-such-routine' is not a registered client routine; use one "
                        r"of \[.*'gradient'.*\] or a path like .*; this client runs fedtune .*", line), line
    assert "done:" not in failed.stdout
    assert not (run_dir / "adapter").exists()
    assert [r["round"] for r in read_rows(run_dir)] == [0, 1]  # round 1's checkpoint is kept

    resumed = fedtune_cli("resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["round"] for r in read_rows(run_dir)] == [0, 1, 2]
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.integration
def test_a_run_that_aggregates_nothing_fails_and_saves_no_adapter(tiny_bert: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # Every update is larger than this bound: every reply is rejected, every round skipped.
    proc = fedtune_cli("simulate", *tiny_overrides(tiny_bert, run_dir, rounds=1), "federation.max_update_norm=1e-12",
                       "data.max_examples=120", "federation.fraction_evaluate=0")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("fedtune: error:")]
    assert len(error) == 1 and "no round aggregated anything: all 1 rounds were skipped" in error[0]
    assert "3 replies rejected" in error[0]
    assert not (run_dir / "adapter").exists()
    assert len((run_dir / "rejected.jsonl").read_text().splitlines()) == 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_run(home: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    """``simulations/flwr-run.sh ARGS`` with a fresh ``FLWR_HOME`` and local SuperLink ports of its own."""
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR": str(Path(sys.executable).parent / "flwr"),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    return subprocess.run(["bash", str(ROOT / "simulations" / "flwr-run.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def processes_of(home: Path) -> list[str]:
    """Command lines of live processes that name ``home`` (the SuperLink keeps its database there)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and str(home) in " ".join(p.info["cmdline"] or []):
            found.append(" ".join(p.info["cmdline"]))
    return found


@pytest.mark.integration
def test_flwr_run_with_a_fresh_flwr_home_fails_at_start_up_and_leaves_nothing_running(
        tiny_bert: str, tmp_path: Path) -> None:
    home, out = tmp_path / "flwr-home", tmp_path / "run"
    # Flower's default federation simulates 2 SuperNodes; this run asks for 3 clients.
    overrides = " ".join(tiny_overrides(tiny_bert, out, rounds=1))
    proc = flwr_run(home, "--federation-config", "num-supernodes=2", "--run-config", f"overrides='{overrides}'")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "federation.num_clients=3 but Flower simulates 2 SuperNodes (num-supernodes=2)" in proc.stderr
    assert "flwr-run: error: run" in proc.stderr and "finished:failed" in proc.stderr
    assert not out.exists()  # stopped before any model loaded or the run directory was made
    for notice in ("(empty!)", "`options.` fields", "Since flwr 1.32"):
        assert notice not in proc.stdout + proc.stderr
    assert processes_of(home) == []  # no SuperLink (nor anything it started) is left
