"""fedtune.flower.simulation and Flower's log: only the run_simulation deprecation record is hidden.

``fedtune simulate`` calls Flower's deprecated ``run_simulation`` (the one entry point that runs
in-process ServerApp and ClientApp objects). Flower reports the deprecation as a record of its
``flwr`` logger, not as a Python warning; these tests call the real ``run_simulation`` with its
runtime replaced, so they fail if Flower changes that record and the filter stops matching.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import flwr.simulation
import pytest
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedtune.flower.simulation import RUN_SIMULATION_DEPRECATION, without_run_simulation_deprecation


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]


@pytest.fixture
def flower_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[Collect]:
    """Every record of the ``flwr`` logger, with run_simulation's runtime (Ray) replaced by a no-op."""
    runtime = sys.modules["flwr.simulation.run_simulation"]  # the package attribute is the function
    monkeypatch.setattr(runtime, "_run_simulation", lambda **kwargs: None)
    monkeypatch.setattr(runtime, "_check_ray_support", lambda backend_name: None)
    flower_logger = logging.getLogger("flwr")
    collect = Collect()
    level = flower_logger.level
    flower_logger.setLevel(logging.DEBUG)  # as with --verbose
    flower_logger.addHandler(collect)
    yield collect
    flower_logger.removeHandler(collect)
    flower_logger.setLevel(level)


def call_run_simulation() -> None:
    flwr.simulation.run_simulation(server_app=ServerApp(), client_app=ClientApp(), num_supernodes=1)


def test_flower_logs_the_deprecation_that_the_filter_matches(flower_log: Collect) -> None:
    call_run_simulation()
    assert any(RUN_SIMULATION_DEPRECATION in m and m.startswith("DEPRECATED FEATURE:") for m in flower_log.messages())


def test_the_deprecation_is_hidden_inside_the_block_and_only_there(flower_log: Collect) -> None:
    with without_run_simulation_deprecation():
        call_run_simulation()
        logging.getLogger("flwr").warning("DEPRECATED FEATURE: %s", "The `start_simulation` function is deprecated")
        logging.getLogger("flwr").warning("another warning")
    assert not any(RUN_SIMULATION_DEPRECATION in m for m in flower_log.messages())
    assert "DEPRECATED FEATURE: The `start_simulation` function is deprecated" in flower_log.messages()
    assert "another warning" in flower_log.messages()
    call_run_simulation()
    assert any(RUN_SIMULATION_DEPRECATION in m for m in flower_log.messages())
