"""A client's own state on its disk: the newest round before the one asked for, atomically written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.client.state import KEEP_ROUNDS, load_state, save_state, state_dir
from fedtune.routine import ClientState

KEY = "0123456789abcdef0123456789abcdef"


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path))
    return tmp_path


def state(round_: int) -> ClientState:
    return ClientState(values={"round": round_, "history": [1.5, 2.5]}, tensors={"b": torch.full((2, 3), float(round_))})


def test_a_round_reads_the_newest_state_written_before_it() -> None:
    assert load_state(KEY, 0, 1) == ClientState()  # nothing yet
    for r in (1, 2, 3):
        save_state(KEY, 0, r, state(r))
    got = load_state(KEY, 0, 3)  # round 3 of a resumed run starts from round 2's state
    assert got.values == {"round": 2, "history": [1.5, 2.5]} and torch.equal(got.tensors["b"], torch.full((2, 3), 2.0))
    assert load_state(KEY, 0, 10).values["round"] == 3
    assert load_state(KEY, 1, 10) == ClientState()  # another client's state is its own


def test_only_the_last_rounds_are_kept_and_a_rewrite_replaces() -> None:
    for r in range(1, 6):
        save_state(KEY, 2, r, state(r))
    save_state(KEY, 2, 5, state(50))
    kept = sorted(p.name for p in state_dir(KEY, 2).iterdir())
    assert kept == [f"round-{r}" for r in range(6 - KEEP_ROUNDS, 6)]
    assert load_state(KEY, 2, 6).values["round"] == 50


def test_a_run_key_is_a_hex_id() -> None:
    with pytest.raises(ValueError, match="run key '../x' is not a hexadecimal id"):
        state_dir("../x", 0)
