"""Kill the server process after a round, resume, and get what an uninterrupted run gets, bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtune.server.checkpoint import load_checkpoint
from tests.test_simulation import read_rows, tiny_overrides

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 2
# The killed runs: a method with state on the clients and one whose wire holds no tensors. FedIT's
# resume is the Ctrl-C test's, FLoRA's (a fresh LoRA per round and client, seeded by run, round and
# client, and the merged updates of earlier rounds) tests/test_dpo_federation.py's.
STRATEGIES = {
    # With FedAdam on the server: its moments after round 1 shape round 2, so they must come back too.
    "fedit": ["strategy.server_optimizer.name=fedadam"],
    # Each client's personal B lives in its own state: the resumed run reads it from the client's disk.
    # 2 of the 3 clients a round: the resumed rounds draw the same partitions (by partition, not
    # by Flower's node ids, which the resumed simulation draws anew).
    "fedsa-lora": ["strategy.name=fedsa-lora", "federation.fraction_train=0.67"],
    "fedkseed": ["strategy.name=fedkseed", "strategy.options.tune=full", "strategy.options.k=64", "strategy.options.steps=6",
                 "strategy.options.lr=1e-3", "strategy.options.eps=1e-3", "adapter.dropout=0.0"],
}
KILLED = ["fedsa-lora", "fedkseed"]
# What the run computes. (Bytes may differ: FedKSeed sends resumed clients, new to the
# server, the whole seed history to replay.)
RESULT_KEYS = ("round", "train_loss", "eval_loss", "eval_accuracy", "clients_aggregated")


def start_fedtune(*args: str) -> subprocess.Popen:
    """``fedtune ARGS`` in its own process group (so that a kill takes its Ray workers too)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "fedtune.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def fedtune(*args: str) -> str:
    """Run ``fedtune ARGS`` to the end; return its output."""
    proc = start_fedtune(*args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path) -> None:
    """Return as soon as a round's checkpoint exists in ``run_dir``."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "checkpoint.pt").is_file():
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint appeared; the run ended with {proc.returncode}: {proc.stdout.read()[-2000:]}")


def kill_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path) -> int:
    """SIGKILL the whole process group once a round's checkpoint exists; return that round."""
    wait_for_checkpoint(proc, run_dir)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return load_checkpoint(run_dir).round


def live_processes_in_session(sid: int) -> list[str]:
    """Command lines of the live (not zombie) processes of session ``sid``: a run and its Ray processes."""
    import psutil

    found = []
    for p in psutil.process_iter(["status", "cmdline"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(" ".join(p.info["cmdline"] or [])[:120])
        except (ProcessLookupError, PermissionError):
            continue
    return found


def saved_weights(run_dir: Path) -> Path:
    """The adapter, or the whole model for full-parameter FedKSeed."""
    adapter = run_dir / "adapter" / "adapter_model.safetensors"
    return adapter if adapter.is_file() else run_dir / "model" / "model.safetensors"


def results(rows: list[dict]) -> list[dict]:
    return [{k: row.get(k) for k in RESULT_KEYS} for row in rows]


class UninterruptedRuns(dict):
    """Strategy -> the run directory of its uninterrupted run, run on first use (a deselected strategy costs nothing)."""

    def __init__(self, tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> None:
        super().__init__()
        self.tiny_bert, self.tmp_path_factory = tiny_bert, tmp_path_factory

    def __missing__(self, strategy: str) -> Path:
        from fedtune.config import load_config
        from fedtune.flower.simulation import simulate

        # In this process (the stack is loaded already): the same code as `fedtune simulate`.
        run_dir = self[strategy] = self.tmp_path_factory.mktemp(f"whole-{strategy}")
        simulate(load_config(None, [*tiny_overrides(self.tiny_bert, run_dir, rounds=ROUNDS), *STRATEGIES[strategy],
                                    "federation.client_cpus=1"]))
        return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> UninterruptedRuns:
    return UninterruptedRuns(tiny_bert, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", KILLED)
def test_killed_then_resumed_equals_uninterrupted(strategy: str, uninterrupted: dict[str, Path], tiny_bert: str,
                                                  tmp_path: Path) -> None:
    whole, broken = uninterrupted[strategy], tmp_path / "broken"
    extra = [*STRATEGIES[strategy], "federation.client_cpus=1"]

    proc = start_fedtune("simulate", *tiny_overrides(tiny_bert, broken, rounds=ROUNDS), *extra)
    killed_after = kill_after_first_checkpoint(proc, broken)
    assert 1 <= killed_after < ROUNDS, "the run finished before it could be killed"
    assert not (broken / "adapter").exists() and not (broken / "model").exists()

    assert f"resumed after round {killed_after}" in fedtune("resume", str(broken))

    a, b = load_file(saved_weights(whole)), load_file(saved_weights(broken))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed adapter differs from the uninterrupted one"
    assert results(read_rows(broken)) == results(read_rows(whole))
    assert load_checkpoint(broken).round == ROUNDS


def test_ctrl_c_stops_within_seconds_keeps_the_checkpoint_and_resumes_bitwise(
        uninterrupted: dict[str, Path], tiny_bert: str, tmp_path: Path) -> None:
    whole, broken = uninterrupted["fedit"], tmp_path / "broken"
    proc = start_fedtune("simulate", *tiny_overrides(tiny_bert, broken, rounds=ROUNDS), *STRATEGIES["fedit"],
                         "federation.client_cpus=1")
    wait_for_checkpoint(proc, broken)
    sent = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running 15 s after Ctrl-C: {proc.communicate()[0][-3000:]}") from None
    assert proc.returncode == 130, out[-3000:]
    assert time.monotonic() - sent < 15
    assert "Traceback" not in out
    assert f"Continue with:\n  fedtune resume {broken}" in out
    assert live_processes_in_session(proc.pid) == []  # Ray's processes are gone too
    stopped_after = load_checkpoint(broken).round
    assert 1 <= stopped_after < ROUNDS, "the run finished before Ctrl-C"
    assert not (broken / "adapter").exists()

    assert f"resumed after round {stopped_after}" in fedtune("resume", str(broken))
    a, b = load_file(saved_weights(whole)), load_file(saved_weights(broken))
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    assert results(read_rows(broken)) == results(read_rows(whole))


def test_resume_refuses_a_different_configuration_before_loading_anything(uninterrupted: dict[str, Path]) -> None:
    run_dir = uninterrupted["fedit"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "fedtune.cli", "resume", str(run_dir), "train.learning_rate=0.1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "train.learning_rate=0.1 differs from the checkpointed run's 0.005" in proc.stderr


@pytest.mark.parametrize("level", ["example", "client"])
def test_a_private_run_resumes_with_its_privacy_ledger_exact(level: str, tiny_bert: str, tmp_path: Path) -> None:
    """Round 1, then a resume for round 2, equals two rounds in one go: the weights bit for bit, and ε
    (example-level: the clients' ledgers, kept on their disks; client-level: the server's, in the checkpoint)."""
    from fedtune.config import load_config
    from fedtune.flower.simulation import simulate

    private = ["privacy.enabled=true", f"privacy.level={level}", "privacy.noise_multiplier=1.0",
               "privacy.clip_norm=0.5", "federation.client_cpus=1"]
    epsilon = "dp_epsilon_max" if level == "example" else "dp_client_epsilon"
    whole = simulate(load_config(None, [*tiny_overrides(tiny_bert, tmp_path / "whole", rounds=2), *private]))
    part = tmp_path / "part"
    simulate(load_config(None, [*tiny_overrides(tiny_bert, part, rounds=1), *private]))
    simulate(load_config(None, [*tiny_overrides(tiny_bert, part, rounds=2), *private, "output.resume=true"]))
    a, b = load_file(saved_weights(whole)), load_file(saved_weights(part))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    spent = [[row.get(epsilon) for row in read_rows(run)] for run in (whole, part)]
    assert spent[0] == spent[1] and spent[0][2] > spent[0][1] > 0
    assert results(read_rows(part)) == results(read_rows(whole))
