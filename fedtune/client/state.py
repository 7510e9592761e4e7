"""A client's own state on its own disk, so that a resumed run finds it.

Flower's ``context.state`` carries a client's :class:`~fedtune.routine.ClientState` from
round to round of one Flower run. A resumed run (``fedtune resume``) is a new Flower run
with empty contexts, so the client also writes its state after every round under
``<cache>/client-state/<run key>/<partition>/round-<r>`` on the machine it runs on (the
server's run key stays the same across resumes). A round reads the newest state written
before it: after an interruption in round r + 1, the resumed round r + 1 starts from the
state of round r, as the uninterrupted run did.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedtune.models.cache import cache_dir
from fedtune.routine import ClientState

KEEP_ROUNDS = 2  # the last complete round's state and the one in progress
_ROUND = re.compile(r"^round-(\d+)$")


def state_dir(run_key: str, partition_id: int) -> Path:
    """Where client ``partition_id`` of run ``run_key`` keeps its states."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", run_key):
        raise ValueError(f"run key {run_key!r} is not a hexadecimal id")
    return cache_dir() / "client-state" / run_key / str(int(partition_id))


def save_state(run_key: str, partition_id: int, server_round: int, state: ClientState) -> None:
    """Write ``state`` as the state after ``server_round`` (atomically), and drop older rounds."""
    folder = state_dir(run_key, partition_id)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
    try:
        (staging / "values.json").write_text(json.dumps(state.values))
        save_file({k: v.detach().contiguous().cpu() for k, v in state.tensors.items()},
                  str(staging / "tensors.safetensors"))
        target = folder / f"round-{server_round}"
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in _rounds(folder)[:-KEEP_ROUNDS]:
        shutil.rmtree(folder / f"round-{old}", ignore_errors=True)


def load_state(run_key: str, partition_id: int, before_round: int) -> ClientState:
    """The newest state written for a round before ``before_round`` (empty when there is none)."""
    folder = state_dir(run_key, partition_id)
    earlier = [r for r in _rounds(folder) if r < before_round]
    if not earlier:
        return ClientState()
    source = folder / f"round-{earlier[-1]}"
    return ClientState(values=json.loads((source / "values.json").read_text()),
                       tensors=load_file(str(source / "tensors.safetensors")))


def _rounds(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := _ROUND.match(p.name)))
