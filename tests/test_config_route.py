"""A setting's route: parsed and checked once per process, the strategy built once per server process."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedtune.config
import fedtune.strategy
from fedtune import protocol
from fedtune.config import config_from_run_config, load_config, to_run_config
from fedtune.flower import client_app
from fedtune.strategy import strategy_for


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often the whole config is checked against the schema, and how often a strategy is built."""
    calls = {"check_schema": 0, "build_strategy": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(fedtune.config, "check_schema", counting("check_schema", fedtune.config.check_schema))
    monkeypatch.setattr(fedtune.strategy, "build_strategy", counting("build_strategy", fedtune.strategy.build_strategy))
    monkeypatch.setattr(client_app, "_CONFIGS", {})
    for key, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # who creates messages, for flwr
        monkeypatch.setattr(TaskIdentity, key, value)
    return calls


def _query(app, run_config: dict, partition_id: int) -> int:
    context = Context(run_id=1, node_id=10 + partition_id, state=RecordDict(), run_config=run_config,
                      node_config={protocol.PARTITION_ID: partition_id, protocol.NUM_PARTITIONS: 3})
    message = Message(RecordDict({protocol.CONFIG: ConfigRecord({})}), dst_node_id=10 + partition_id,
                      message_type=MessageType.QUERY)
    reply = app(message, context)
    return int(reply.content[protocol.METRICS][protocol.PARTITION_ID])


def test_a_client_checks_the_run_config_once_for_all_its_messages(counted: dict[str, int]) -> None:
    run_config = to_run_config(load_config(None, ["federation.num_clients=3"]))
    counted["check_schema"] = 0
    app = client_app.make_client_app()
    assert [_query(app, run_config, p) for p in (0, 1, 2, 0, 1, 2)] == [0, 1, 2, 0, 1, 2]
    assert counted["check_schema"] == 1
    other = to_run_config(load_config(None, ["federation.num_clients=3", "train.learning_rate=0.01"]))
    counted["check_schema"] = 0
    _query(app, other, 0)
    _query(app, run_config, 1)
    assert counted["check_schema"] == 1  # a second run's config is checked once too; the first is still known


def test_a_server_process_builds_its_strategy_once(counted: dict[str, int]) -> None:
    cfg = load_config(None, ["strategy.name=ffa-lora"])  # the CLI's check builds it
    assert counted["build_strategy"] == 1
    again = config_from_run_config(to_run_config(cfg))  # the ServerApp's check: known, not built again
    assert counted["build_strategy"] == 1
    strategy = strategy_for(again)  # the run takes the checked one
    assert counted["build_strategy"] == 1 and type(strategy).__name__ == "FFALoRA"
    assert strategy_for(again) is not strategy  # taken once: a second run of it gets a new one
    assert counted["build_strategy"] == 2


def test_a_failed_check_keeps_no_strategy(counted: dict[str, int]) -> None:
    with pytest.raises(fedtune.config.ConfigError):
        load_config(None, ["strategy.name=fed-sb", "adapter.client_ranks=[2,4]", "federation.num_clients=2"])
    cfg = load_config(None, ["strategy.name=fed-sb"])
    built = counted["build_strategy"]
    strategy_for(cfg)
    assert counted["build_strategy"] == built
