"""Clients are drawn by partition, not by Flower's node ids, which a simulation draws anew every run."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from fedtune import protocol
from fedtune.config import load_config
from fedtune.flower.strategy_adapter import FlowerStrategy


@pytest.fixture(autouse=True)
def a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower builds messages for the run of the process; a ServerApp has one, this test sets one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class PartitionGrid:
    """Ten nodes with random ids; each answers a query with the partition it holds (``silent`` do not)."""

    def __init__(self, seed: int, silent: int = 0) -> None:
        rng = random.Random(seed)
        self.partition_of = {rng.getrandbits(63): p for p in range(10)}
        self.silent = set(list(self.partition_of)[:silent])
        self.asked: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.partition_of)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            assert message.metadata.message_type == "query"
            self.asked.append(node)
            if node in self.silent:
                continue
            metrics = {protocol.PARTITION_ID: self.partition_of[node]}
            replies.append(SimpleNamespace(has_error=lambda: False, metadata=SimpleNamespace(src_node_id=node),
                                           content=SimpleNamespace(metric_records={protocol.METRICS: metrics})))
        return replies


def drawn_partitions(grid: PartitionGrid, fraction: float, rounds: int = 6) -> list[list[int]]:
    cfg = load_config(None, ["federation.num_clients=10", f"federation.fraction_train={fraction}"])
    adapter = FlowerStrategy(strategy=None, cfg=cfg, on_metrics=lambda **_: None)  # type: ignore[arg-type]
    return [sorted(grid.partition_of[n] for n in adapter._sample(grid, fraction, r, 0)) for r in range(1, rounds + 1)]


def test_the_same_seed_draws_the_same_partitions_whatever_the_node_ids() -> None:
    first, second = PartitionGrid(seed=1), PartitionGrid(seed=2)
    assert set(first.partition_of).isdisjoint(second.partition_of)
    drawn = drawn_partitions(first, 0.3)
    assert drawn == drawn_partitions(second, 0.3)
    assert all(len(d) == 3 for d in drawn) and len({tuple(d) for d in drawn}) > 1  # other clients each round
    assert sorted(first.asked) == sorted(first.partition_of)  # each node asked once in the run


def test_a_round_of_every_client_asks_nothing() -> None:
    grid = PartitionGrid(seed=1)
    assert drawn_partitions(grid, 1.0, rounds=2) == [list(range(10))] * 2
    assert grid.asked == []


def test_nodes_that_do_not_answer_are_drawn_after_the_others_and_asked_once() -> None:
    grid = PartitionGrid(seed=3, silent=2)
    drawn = drawn_partitions(grid, 0.5)
    assert all(len(d) == 5 for d in drawn)
    assert len(grid.asked) == 10
