"""The deploy/ scripts on loopback: Flower's own SuperLink (TLS, SuperNode authentication),
three SuperNodes with their own partitions, runs submitted with Flower's CLI.

Every script in deploy/ runs here as an operator would run it, in the order of
deploy/README.md. One federation serves the whole module; the test that kills a SuperNode
comes last. Every message starts a fresh ClientApp process, so a round takes tens of seconds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from fedtune.reporting.runlog import ADAPTER_DIR, MODEL_DIR
from tests.test_simulation import read_rows, tiny_overrides

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")),
                       reason="deploy/make-certs.sh and make-node-keys.sh need openssl and ssh-keygen"),
]

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
NODES = ("org0", "org1", "org2")
# Flower notices a SuperNode that stopped sending heartbeats after at most 2 x 30 s; a round
# with a dead node ends then, well inside this timeout.
ROUND_TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_json(text: str) -> dict:
    """The JSON object in a `flwr ... --format json` output."""
    return json.loads(text[text.index("{"):])


class Federation:
    """A SuperLink and its SuperNodes started by the deploy/ scripts, each in its own process group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.certs, self.keys = root / "certs", root / "keys"
        self.address = f"127.0.0.1:{free_port()}"
        self.ca = self.certs / "ca.crt"
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self, home: str, **extra: str) -> dict[str, str]:
        """Each party its own deployment home, as on separate hosts; Flower binaries from this interpreter.

        A FLWR_HOME set by the caller is ignored by the scripts: this one must stay unused.
        """
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return {**os.environ, "PATH": path, "FEDTUNE_DEPLOY_HOME": str(self.root / home),
                "FLWR_HOME": str(self.root / "stray-flwr-home"), **extra}

    def script(self, name: str, *args: str, timeout: float = 120, home: str = "home-cli",
               check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", str(DEPLOY / name), *args], cwd=self.root, env=self.env(home),
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, f"{name}: {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc

    def start(self, name: str, script: str, *args: str, home: str, **extra: str) -> subprocess.Popen:
        log = (self.root / f"{name}.log").open("w")
        proc = subprocess.Popen(["bash", str(DEPLOY / script), *args], cwd=self.root, env=self.env(home, **extra),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def start_node(self, name: str, partition: int, *options: str, address: str = "") -> subprocess.Popen:
        return self.start(name, "supernode.sh", address or self.address, str(self.ca), str(self.keys / name),
                          str(partition), str(len(NODES)), *options, home=f"home-{name}", SUPERNODE_PORT=str(free_port()))

    def failed_node_log(self, name: str, *options: str, address: str = "", until: str = "") -> str:
        """Start a SuperNode that is expected to give up; its log once it exited (and showed `until`)."""
        proc = self.start_node(name, 0, *options, address=address)
        try:
            assert proc.wait(timeout=90) != 0, self.log(name)[-3000:]
            # The script's log filter may write its last line just after the node exited.
            self.wait_for(f"{until!r} in the log of {name}", lambda: until in self.log(name), timeout=10)
        finally:
            self.stop(name, signal.SIGKILL)
        return self.log(name)

    def flwr(self, *args: str) -> subprocess.CompletedProcess:
        """`deploy/flwr.sh ...`: Flower's CLI with the deployment's FLWR_HOME, as deploy/README.md types it."""
        return subprocess.run(["bash", str(DEPLOY / "flwr.sh"), *args], cwd=self.root, env=self.env("home-cli"),
                              capture_output=True, text=True, timeout=60)

    def nodes(self) -> dict[str, str]:
        """Node id -> status, as `flwr supernode list` reports them."""
        proc = self.flwr("supernode", "list", "deployment", "--format", "json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return {n["node-id"]: n["status"] for n in parse_json(proc.stdout)["nodes"]}

    def wait_for(self, what: str, condition, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            dead = [n for n, p in self.procs.items() if p.poll() is not None and n in NODES + ("superlink",)]
            assert not dead, f"{dead} exited while waiting for {what}:\n" + "\n".join(self.log(n)[-2000:] for n in dead)
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(1)

    def submit_args(self, *overrides: str) -> list[str]:
        """deploy/submit.sh's arguments: the embedded default config, the overrides, no client evaluation."""
        return [self.address, str(self.ca), "", *overrides, f"federation.round_timeout={ROUND_TIMEOUT}",
                "federation.fraction_evaluate=0.0"]

    def submit(self, *overrides: str) -> subprocess.CompletedProcess:
        return self.script("submit.sh", *self.submit_args(*overrides), timeout=600)

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Signal a process group, then end whatever it started elsewhere (SuperExec runs in its own session)."""
        proc = self.procs[name]
        try:
            descendants = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        for child in descendants:
            try:
                child.wait(timeout=5)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("deploy"))
    try:
        fed.script("make-certs.sh", str(fed.certs))
        fed.script("make-node-keys.sh", str(fed.keys), *NODES, "rogue")
        host, port = fed.address.split(":")
        fed.start("superlink", "superlink.sh", str(fed.certs), home="home-superlink", SUPERLINK_HOST=host,
                  SUPERLINK_PORT=port, SUPERLINK_DB=str(fed.root / "superlink.db"))
        fed.wait_for("the SuperLink", lambda: "Uvicorn running on https://" in fed.log("superlink"))
        fed.script("register-nodes.sh", fed.address, str(fed.ca), *(str(fed.keys / f"{n}.pub") for n in NODES))
        assert len(fed.nodes()) == len(NODES)
        for partition, name in enumerate(NODES):
            fed.start_node(name, partition)
        fed.wait_for("three online SuperNodes", lambda: list(fed.nodes().values()) == ["online"] * len(NODES))
        yield fed
    finally:
        for name in reversed(list(fed.procs)):
            fed.stop(name)


def check_run(run_dir: Path, strategy: str, clients: int = 3) -> list[dict]:
    rows = read_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert row["strategy"] == strategy
        assert math.isfinite(row["eval_loss"]) and 0.0 <= row["eval_accuracy"] <= 1.0
    # Four labels: near the loss of a uniform guess, the tiny model is not expected to learn here.
    assert all(0.5 < r["eval_loss"] < 3.0 for r in rows)
    for row in rows[1:]:
        assert row["clients_sampled"] == clients and row["clients_aggregated"] == clients
        assert row["clients_rejected"] == 0 and row["clients_missing"] == 0
        assert math.isfinite(row["train_loss"])
        # Each ClientApp is a fresh process: it reports how long its model took to load.
        assert row["max_model_load_seconds"] > 0
    return rows


def test_a_method_from_a_file_outside_the_package_runs_over_tls_with_authenticated_supernodes(
        federation: Federation, tiny_bert: str) -> None:
    """examples/fedprox.py holds both halves; the SuperNodes' ClientApps find its routine by strategy.name.

    (FedIT, the default method, is the run of the killed-SuperNode test.)
    """
    out = federation.root / "runs" / "fedprox"
    name = "examples/fedprox.py:FedProx"
    # With the progress display: off a terminal, it counts replies through the grid and prints plain lines.
    proc = federation.submit(*tiny_overrides(tiny_bert, out), f"strategy.name={name}", "strategy.options.mu=0.1",
                             "output.progress=true")
    assert "finished:completed" in proc.stdout
    rows = check_run(out, name)
    assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows[1:])
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_fedkseed_on_the_same_federation(federation: Federation, tiny_bert: str) -> None:
    out = federation.root / "runs" / "fedkseed"
    federation.submit(*tiny_overrides(tiny_bert, out), "strategy.name=fedkseed", "strategy.options.k=64",
                      "strategy.options.steps=6", "strategy.options.lr=1e-3", "strategy.options.eps=1e-3",
                      "adapter.dropout=0.0")
    rows = check_run(out, "fedkseed")
    for row in rows[1:]:
        assert row["fedkseed_replies_rejected"] == 0
        # No tensors either way: a config record down, (seed, scalar) pairs and metrics up.
        assert row["bytes_up_per_client"] < 2_000
        assert row["bytes_down_per_client"] < 4_000 + 64 * 8
    assert rows[2]["fedkseed_history_length"] > rows[1]["fedkseed_history_length"] > 0
    assert (out / MODEL_DIR / "model.safetensors").is_file()  # full-parameter tuning: a whole model


@pytest.mark.slow
def test_an_adapter_of_tens_of_megabytes_goes_through_the_transport(federation: Federation, tiny_bert: str) -> None:
    """LoRA of rank 256 on the 30,522-word embedding: A alone is 256 x 30,522 float32, 31 MB per message."""
    out = federation.root / "runs" / "large"
    federation.submit(*tiny_overrides(tiny_bert, out, rounds=1), "adapter.target_modules=[word_embeddings]",
                      "adapter.rank=256", "train.local_steps=1")
    row = read_rows(out)[1]
    assert row["clients_aggregated"] == 3 and row["clients_rejected"] == 0
    assert row["bytes_up_per_client"] > 31_000_000
    # PEFT starts embedding LoRA's A at zero: its identical zero chunks travel once (Flower's
    # objects are content-addressed), so round 1's download is about half the upload.
    assert row["bytes_down_per_client"] > 15_000_000
    assert math.isfinite(row["eval_loss"])


def test_submit_fails_when_the_run_fails(federation: Federation) -> None:
    """The ServerApp refuses the configuration: deploy/submit.sh exits non-zero with the SuperLink's reason."""
    proc = federation.script("submit.sh", *federation.submit_args("strategy.name=nonexistent"), timeout=300,
                             check=False)
    assert proc.returncode != 0
    assert "finished:failed" in proc.stdout
    assert "did not complete: ServerApp failed" in proc.stderr
    assert proc.stderr.count("strategy.name='nonexistent' is not a registered strategy") == 1


def test_list_nodes_names_each_nodes_organisation(federation: Federation) -> None:
    """deploy/list-nodes.sh: `flwr supernode list` joined with what register-nodes.sh recorded."""
    lines = federation.script("list-nodes.sh").stdout.splitlines()
    assert lines[0].split() == ["NODE_ID", "STATUS", "ORGANISATION", "KEY_FINGERPRINT"]
    rows = {org: (node_id, status, fingerprint) for node_id, status, org, fingerprint in map(str.split, lines[1:])}
    assert sorted(rows) == list(NODES)
    for org, (node_id, status, fingerprint) in rows.items():
        assert status == "online"
        assert f"SuperNode ID: {node_id}" in federation.log(org)  # the node itself says which id it got
        keygen = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(federation.keys / f"{org}.pub")],
                                capture_output=True, text=True, check=True)
        assert fingerprint == keygen.stdout.split()[1]
    assert federation.nodes() == {node_id: "online" for node_id, _, _ in rows.values()}
    assert not (federation.root / "stray-flwr-home").exists()


def test_a_supernode_with_an_unregistered_key_is_refused(federation: Federation) -> None:
    before = federation.nodes()
    # Flower 1.42: the SuperLink answers ActivateNode with HTTP 412 (no SuperNode has that public key);
    # flower-supernode exits with Flower's exit code 305, "could not establish a connection".
    # supernode.sh says, once, what that means.
    log = federation.failed_node_log("rogue", until="register it with")
    assert "Failed to activate SuperNode" in log
    explained = [line for line in log.splitlines() if "this node's public key is not registered" in line]
    assert len(explained) == 1
    assert f"register it with deploy/register-nodes.sh {federation.address} CA_CERT {federation.keys / 'rogue.pub'}" \
        in explained[0]
    assert federation.nodes() == before


def test_a_supernode_that_cannot_reach_the_superlink_reports_a_connection_failure(federation: Federation) -> None:
    log = federation.failed_node_log("rogue", "--max-retries", "0", address=f"127.0.0.1:{free_port()}",
                                     until="Finished server process")
    assert "Connection refused" in log and "could not establish a connection" in log
    assert "not registered" not in log


@pytest.mark.slow
def test_a_supernode_killed_mid_round_leaves_the_run_to_the_others(federation: Federation, tiny_bert: str) -> None:
    """SIGKILL one SuperNode (and its ClientApp) once it has received round 1's message."""
    victim = NODES[-1]
    out = federation.root / "runs" / "killed"
    received = federation.log(victim).count("Receiving: train message")
    with (federation.root / "submit-killed.log").open("w") as log:
        args = federation.submit_args(*tiny_overrides(tiny_bert, out))
        submit = subprocess.Popen(["bash", str(DEPLOY / "submit.sh"), *args], cwd=federation.root,
                                  env=federation.env("home-cli"), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    try:
        federation.wait_for("round 1 on the victim",
                            lambda: federation.log(victim).count("Receiving: train message") > received, timeout=180)
        federation.stop(victim, signal.SIGKILL)
        submit.wait(timeout=600)
    finally:
        if submit.poll() is None:
            os.killpg(submit.pid, signal.SIGKILL)
            submit.wait()
    assert submit.returncode == 0, (federation.root / "submit-killed.log").read_text()[-3000:]
    rows = read_rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    first, second = rows[1], rows[2]
    # Flower turns the silent node's message into an error reply once its heartbeat is 2 x 30 s
    # overdue; fedtune counts that node as missing (named in clients_unavailable) and aggregates the others.
    assert first["clients_sampled"] == 3 and first["clients_aggregated"] == 2
    assert first["clients_missing"] == 1 and first["clients_rejected"] == 0
    offline = [int(node) for node, status in federation.nodes().items() if status == "offline"]
    assert first["clients_unavailable"] == offline
    assert first["round_seconds"] < ROUND_TIMEOUT
    # By round 2 the SuperLink lists the node offline: it is not sampled.
    assert second["clients_sampled"] == 2 and second["clients_aggregated"] == 2
    assert all(math.isfinite(r["eval_loss"]) for r in rows)
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert not (out / "rejected.jsonl").exists()
    assert sorted(federation.nodes().values()) == ["offline", "online", "online"]
