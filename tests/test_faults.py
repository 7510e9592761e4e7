"""Bad replies in a real Flower round: each is rejected with its reason, the good ones aggregate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune import protocol
from fedtune.client.runtime import ClientReply
from fedtune.config import load_config
from fedtune.errors import NothingAggregatedError
from fedtune.flower.client_app import make_client_app, reply_content
from fedtune.flower.codec import record_to_tensors, tensors_to_record
from fedtune.flower.simulation import simulate
from tests.test_simulation import read_rows, tiny_overrides

# partition id -> what its reply gets wrong (partitions 0 and 1 reply correctly)
FAULTS = {2: "non-finite", 3: "wrong shape", 4: "wrong keys", 5: "huge norm", 6: "oversized"}
REASONS = {
    "non-finite": "contains NaN or infinite values",
    "wrong shape": "has shape",
    "wrong keys": "wrong keys",
    "huge norm": "exceeds federation.max_update_norm=50",
    "oversized": "exceeds federation.max_message_bytes=1,048,576",
}


def _corrupt(arrays: dict[str, torch.Tensor], fault: str) -> dict[str, torch.Tensor]:
    key = next(k for k in sorted(arrays) if "lora_B" in k)
    if fault == "non-finite":
        arrays[key] = arrays[key].clone()
        arrays[key][0, 0] = float("nan")
    elif fault == "wrong shape":
        arrays[key] = arrays[key][:-1]
    elif fault == "wrong keys":
        arrays["not.a.lora.weight"] = arrays.pop(key)
    elif fault == "huge norm":
        arrays = {k: v * 1e4 for k, v in arrays.items()}
    elif fault == "oversized":
        arrays["padding"] = torch.randn(2**20)  # 4 MiB of incompressible floats
    return arrays


def faulty_client_app(run_config: dict[str, Any]) -> ClientApp:
    """fedtune's ClientApp, except that some partitions corrupt their training reply."""
    inner = make_client_app(run_config)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = inner(msg, context)
        fault = FAULTS.get(int(context.node_config[protocol.PARTITION_ID]))
        if fault is not None:
            reply.content[protocol.ARRAYS] = tensors_to_record(
                _corrupt(record_to_tensors(reply.content[protocol.ARRAYS]), fault))
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return inner(msg, context)

    return app


@pytest.mark.integration
def test_bad_replies_are_rejected_with_their_reason_and_the_round_completes(tiny_bert: str, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_bert, tmp_path, rounds=1) + [
        "federation.num_clients=7", "federation.client_cpus=1", "federation.max_update_norm=50",
        f"federation.max_message_bytes={2**20}", "federation.min_replies=2", "data.max_examples=350"]
    run_dir = simulate(load_config(None, overrides), client_app_factory=faulty_client_app)
    row = read_rows(run_dir)[-1]
    assert row["clients_aggregated"] == 2 and row["clients_rejected"] == 5
    assert math.isfinite(row["eval_loss"])
    rejected = [json.loads(line) for line in (run_dir / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 5
    reasons = sorted(r["reason"] for r in rejected)
    for fault, reason in REASONS.items():
        assert sum(reason in r for r in reasons) == 1, f"{fault}: no single rejection saying {reason!r} in {reasons}"


@pytest.mark.integration
def test_too_few_valid_replies_leave_the_global_model_unchanged(tiny_bert: str, tmp_path: Path) -> None:
    overrides = tiny_overrides(tiny_bert, tmp_path, rounds=1) + [
        "federation.num_clients=7", "federation.client_cpus=1", "federation.max_update_norm=50",
        f"federation.max_message_bytes={2**20}", "federation.min_replies=3", "data.max_examples=350"]
    # Its only round skipped, the run aggregated nothing: a failure, with no adapter saved.
    with pytest.raises(NothingAggregatedError):
        simulate(load_config(None, overrides), client_app_factory=faulty_client_app)
    rows = read_rows(tmp_path)
    assert rows[1]["round_skipped"] is True and rows[1]["clients_aggregated"] == 0
    assert rows[1]["eval_loss"] == rows[0]["eval_loss"]  # the initial adapter, evaluated again
    assert not (tmp_path / "adapter").exists()


def test_a_client_refuses_to_send_an_oversized_reply() -> None:
    cfg = load_config(None, ["federation.max_message_bytes=1000"])
    small = ClientReply(arrays={"w": torch.randn(10)}, num_examples=1, metrics={})
    assert reply_content(small, cfg, partition_id=0)[protocol.METRICS][protocol.PARTITION_ID] == 0
    big = ClientReply(arrays={"w": torch.randn(1000)}, num_examples=1, metrics={})
    with pytest.raises(ValueError, match=r"more than federation.max_message_bytes=1,000; raise the limit"):
        reply_content(big, cfg, partition_id=0)
