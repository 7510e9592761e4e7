"""The server's checkpoint: everything needed to continue a run after its last complete round.

After every round the server writes ``checkpoint.pt`` in the run directory: the round
number, the strategy's state (global adapter, seed history, merged residuals, whatever the
strategy holds), the run's metrics so far, the rejected replies, the random number
generators' states and the configuration. The file is written to a temporary name in the
same folder, flushed to disk and renamed over the old one, so a crash at any moment leaves
either the previous round's checkpoint or this one, never a torn file.

The file is a ``torch.save`` pickle, since strategy state nests tensors, numpy arrays and
plain Python in ways safetensors cannot hold; but it is read with ``weights_only=True``, with
only numpy's array and scalar types and fedtune's ``AdapterSpec`` allowed beyond torch's own,
so a crafted checkpoint (a shared run directory, a downloaded run) is refused before anything
in it runs. Saving checks
the same rule first: a strategy whose :meth:`~fedtune.strategy.Strategy.state_dict` holds any
other type fails at the first checkpoint, naming where, instead of at resume time.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy._core.multiarray import _reconstruct, scalar
from omegaconf import OmegaConf

from fedtune.errors import CheckpointError, ConfigError
from fedtune.schema import FedtuneConfig, flatten, to_yaml
from fedtune.strategy import AdapterSpec

log = logging.getLogger("fedtune.server.run")

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
# Settings a resumed run may change: how long it runs and how it treats slow or bad
# clients, not what it computes.
# Where it runs (device, GPU shares, Ray cluster) and what is scored besides the loss (eval.*)
# do not change the model it computes either.
RESUMABLE_KEYS = ("federation.num_rounds", "federation.round_timeout", "federation.client_cpus",
                  "federation.min_available_clients", "federation.min_replies", "federation.max_update_norm",
                  "federation.max_message_bytes", "output.", "model.device", "federation.client_gpus",
                  "federation.ray_address", "eval.")


# What a checkpoint may hold besides what torch's weights-only unpickler builds by itself:
# numpy arrays and scalars, and the adapter description every strategy keeps (Strategy.spec).
SAFE_GLOBALS = [np.ndarray, np.dtype, _reconstruct, scalar, *(getattr(np.dtypes, n) for n in np.dtypes.__all__),
                AdapterSpec]
_CONTAINERS = (dict, list, tuple, set)
_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.Size, torch.dtype, torch.Tensor,
           torch.nn.Parameter, np.ndarray, AdapterSpec)


@dataclass
class Checkpoint:
    """The server's state after round ``round``.

    Parameters
    ----------
    round : int
        The last complete round.
    config_yaml : str
        The run's configuration, to refuse resuming under a different one.
    strategy_state : dict
        What :meth:`fedtune.strategy.Strategy.state_dict` returned.
    metrics : list of dict
        The run log's rows so far (round 0 to ``round``).
    rejected : list of dict
        Replies rejected so far, with their reasons.
    rng : dict
        States of Python's, numpy's and torch's global generators.
    run_key : str
        The run's id, sent to clients, which keep their own state under it
        (:mod:`fedtune.client.state`); a resumed run keeps it.
    averaging_state : dict
        The server optimizer's moments (:class:`fedtune.averaging.Averaging`), if any.
    """

    round: int
    config_yaml: str
    strategy_state: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    run_key: str = ""
    averaging_state: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def unloadable_values(value: Any, where: str = "checkpoint") -> list[str]:
    """Where ``value`` holds something a weights-only load refuses, as ``path: type`` lines."""
    kind = type(value)
    if kind in _CONTAINERS or isinstance(value, dict) and kind.__module__ == "collections":
        items = value.items() if isinstance(value, dict) else enumerate(value)
        found = []
        for key, item in items:
            if isinstance(value, dict) and type(key) not in (str, int, float, bool, tuple, type(None)):
                found.append(f"{where}: key {key!r} of type {type(key).__qualname__}")
            found += unloadable_values(item, f"{where}[{key!r}]")
        return found
    if kind in _LEAVES or isinstance(value, np.generic):
        return []
    return [f"{where}: {kind.__module__}.{kind.__qualname__}"]


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``run_dir/checkpoint.pt`` atomically (temporary file, fsync, rename).

    Raises
    ------
    TypeError
        When the checkpoint holds a type :func:`load_checkpoint` would refuse (a custom class
        in a strategy's state): convert it to tensors, arrays or plain Python in ``state_dict``.
    """
    run_dir = Path(run_dir)
    target = run_dir / CHECKPOINT_FILE
    payload = {"version": FORMAT_VERSION, **vars(checkpoint)}
    bad = unloadable_values(payload)
    if bad:
        raise TypeError("the checkpoint would hold types that a safe (weights-only) load refuses: "
                        + "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
                        + ". A strategy's state_dict() may hold tensors, numpy arrays and numbers, str, bytes, "
                          "None and dicts, lists, tuples and sets of them")
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint in ``run_dir``, or None when the run never completed a round."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)|got (<[^>]+>)", str(err))
        what = next(g for g in found.groups() if g) if found else str(err).splitlines()[-1][:200]
        raise CheckpointError(f"{path} is not a checkpoint fedtune can load safely: it holds {what}, which a "
                              "fedtune checkpoint never does; it was refused and nothing in it ran. Resume only "
                              "from a run directory fedtune wrote, or start a new run") from None
    version = payload.pop("version", None)
    if version != FORMAT_VERSION:
        raise ConfigError([f"{path} has checkpoint format {version!r}; this fedtune reads format {FORMAT_VERSION}; "
                           "resume it with the fedtune that wrote it, or start a new run"])
    return Checkpoint(**payload)


def _before_prompt_formats(then: dict[str, Any]) -> None:
    """A checkpoint from before ``data.prompt_format`` ran what the format ``auto`` is without a chat template."""
    if "data.prompt_format" not in then and "data.alpaca" in then:
        then["data.prompt_format"] = ("auto" if then.get("model.task") != "causal-lm"
                                      else "alpaca" if then["data.alpaca"] else "plain")


def resume_problems(config_yaml: str, checkpoint: Checkpoint) -> list[str]:
    """Settings that differ from the checkpointed run's and would change what it computes."""
    now, then = (flatten(OmegaConf.to_container(OmegaConf.create(text)))
                 for text in (config_yaml, checkpoint.config_yaml))
    _before_prompt_formats(then)
    defaults = flatten(OmegaConf.to_container(OmegaConf.structured(FedtuneConfig())))
    for key in set(now) - set(then):  # a setting added since the checkpoint was written ran as its default
        then[key] = defaults.get(key)
    return [f"{key}={now.get(key)!r} differs from the checkpointed run's {then.get(key)!r}; "
            f"resume with the original value or start a new run"
            for key in sorted(set(now) | set(then))
            if now.get(key) != then.get(key) and not key.startswith(RESUMABLE_KEYS)]


def checkpoint_to_resume(cfg: FedtuneConfig, run_dir: Path) -> Checkpoint | None:
    """The checkpoint to continue from when ``output.resume`` is set, checked against ``cfg``.

    Raises :class:`~fedtune.errors.ConfigError` listing every setting that would make the
    resumed run compute something else.
    """
    if not cfg.output.resume:
        return None
    checkpoint = load_checkpoint(run_dir)
    if checkpoint is None:
        log.warning("output.resume: %s holds no checkpoint (no round completed); starting at round 1", run_dir)
        return None
    problems = resume_problems(to_yaml(cfg), checkpoint)
    then = OmegaConf.create(checkpoint.config_yaml)
    rounds_then = OmegaConf.select(then, "federation.num_rounds")
    if cfg.privacy.enabled and cfg.privacy.target_epsilon is not None and rounds_then != cfg.federation.num_rounds:
        problems.append(f"federation.num_rounds={cfg.federation.num_rounds} differs from the checkpointed run's "
                        f"{rounds_then}, and privacy.target_epsilon={cfg.privacy.target_epsilon} calibrated the noise "
                        "to that many rounds; resume with the original number of rounds")
    if problems:
        raise ConfigError(problems)
    log.info("resuming %s after round %d of %d", run_dir, checkpoint.round, cfg.federation.num_rounds)
    return checkpoint
