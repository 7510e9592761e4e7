"""FedKSeed's messages: the round plan and catch-up history (server -> client), the steps (client -> server).

Everything travels as plain values a Flower ``ConfigRecord`` / ``MetricRecord`` holds:
ints, floats and lists of them, never arrays. Seeds are 63-bit integers and scalars float64,
so nothing is rounded on the way and every party replays the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from fedtune.strategies.fedkseed.zeroth_order import (
    DIRECTION_VERSION,
    TUNE_ADAPTER,
    TUNE_FULL,
    Params,
    Step,
    direction_fingerprint,
    probabilities_from_levels,
    replay,
)

# The client routine FedKSeed's instructions name.
ZEROTH_ORDER_ROUTINE = "zeroth-order"

# Record keys. Server -> client (ConfigRecord): the settings, the catch-up history and
# (FedKSeed-Pro) the seeds' importance levels, one byte a seed.
ZO_RUN_SEED = "zo.run_seed"
ZO_K = "zo.k"
ZO_EPS = "zo.eps"
ZO_LR = "zo.lr"
ZO_STEPS = "zo.steps"
ZO_FINGERPRINT = "zo.fingerprint"
ZO_TUNE = "zo.tune"
ZO_IMPORTANCE = "zo.importance"
ZO_BASE_ROUND = "zo.base_round"
ZO_THROUGH_ROUND = "zo.through_round"
ZO_ROUNDS = "zo.rounds"
ZO_SEEDS = "zo.seeds"
ZO_SCALARS = "zo.scalars"
# Client -> server (MetricRecord): the round's steps and the state they started from.
ZO_STEP_SEEDS = "zo.step_seeds"
ZO_STEP_SCALARS = "zo.step_scalars"
ZO_STATE_ROUND = "zo.state_round"
ZO_SKIPPED = "zo.skipped_steps"


# --------------------------------------------------------------------------- catch-up (server -> client)


class HistoryEntry(NamedTuple):
    """One aggregated update of the global model: round, seed, scalar."""

    round: int
    seed: int
    scalar: float


@dataclass(frozen=True)
class CatchUp:
    """What a client needs to move its global state from ``base_round`` to ``through_round``.

    Attributes
    ----------
    base_round : int
        The round whose global state the entries start from (0 = the initial adapter).
    through_round : int
        The round whose global state the client has after applying the entries.
    entries : tuple of HistoryEntry
        The global history entries with ``base_round < round <= through_round``, in order.
    """

    base_round: int
    through_round: int
    entries: tuple[HistoryEntry, ...]


def encode_history(entries: Sequence[HistoryEntry], *, base_round: int = 0, through_round: int | None = None,
                   prefix: str = "") -> dict[str, int | list[int] | list[float]]:
    """A catch-up as plain values a Flower ``ConfigRecord`` holds: ints and lists, no arrays.

    Seeds travel as ``list[int]`` (63-bit, fit a signed 64-bit integer), scalars as
    ``list[float]`` (float64, so nothing is rounded on the way).
    """
    last = max((e.round for e in entries), default=base_round)
    through = last if through_round is None else through_round
    if through < last or any(e.round <= base_round for e in entries):
        raise ValueError(f"entries span rounds outside ({base_round}, {through}]")
    return {
        prefix + ZO_BASE_ROUND: int(base_round),
        prefix + ZO_THROUGH_ROUND: int(through),
        prefix + ZO_ROUNDS: [int(e.round) for e in entries],
        prefix + ZO_SEEDS: [int(e.seed) for e in entries],
        prefix + ZO_SCALARS: [float(e.scalar) for e in entries],
    }


def decode_history(record: Mapping[str, Any], prefix: str = "") -> CatchUp:
    """The inverse of :func:`encode_history`; raises ``ValueError`` naming a malformed field."""
    base = _int_field(record, prefix + ZO_BASE_ROUND)
    through = _int_field(record, prefix + ZO_THROUGH_ROUND)
    rounds = _list_field(record, prefix + ZO_ROUNDS, int)
    seeds = _list_field(record, prefix + ZO_SEEDS, int)
    scalars = _list_field(record, prefix + ZO_SCALARS, float)
    if not len(rounds) == len(seeds) == len(scalars):
        raise ValueError(f"{prefix}{ZO_ROUNDS}, {ZO_SEEDS} and {ZO_SCALARS} have lengths "
                         f"{len(rounds)}, {len(seeds)}, {len(scalars)}; they must be equal")
    if any(not base < r <= through for r in rounds) or rounds != sorted(rounds):
        raise ValueError(f"{prefix}{ZO_ROUNDS} must be non-decreasing and within ({base}, {through}]")
    if not all(math.isfinite(s) for s in scalars):
        raise ValueError(f"{prefix}{ZO_SCALARS} contains NaN or infinite values")
    entries = tuple(HistoryEntry(r, s, g) for r, s, g in zip(rounds, seeds, scalars))
    return CatchUp(base_round=base, through_round=through, entries=entries)


def apply_catch_up(params: Params, catch_up: CatchUp, state_round: int, lr: float) -> int:
    """Bring ``params`` (the global state as of ``state_round``) to ``catch_up.through_round``.

    Entries the client already has (``round <= state_round``) are skipped, so a payload
    sent twice is harmless. Returns the new state round.

    Raises
    ------
    ValueError
        When the payload starts after ``state_round`` (entries are missing): the client
        would silently diverge from the global model.
    """
    if catch_up.base_round > state_round:
        raise ValueError(f"the catch-up starts at round {catch_up.base_round} but this client's state is "
                         f"round {state_round}; the server must send history after round {state_round} "
                         f"(report {ZO_STATE_ROUND}={state_round})")
    replay(params, [(e.seed, e.scalar) for e in catch_up.entries if e.round > state_round], lr)
    return max(state_round, catch_up.through_round)


@dataclass(frozen=True)
class RoundPlan:
    """Everything a client needs for one zeroth-order round, as the server sends it.

    Attributes
    ----------
    run_seed, k : int
        The pool is ``seed_pool(run_seed, k)``.
    eps, lr : float
        Perturbation scale ε and learning rate η (local steps and catch-up alike).
    steps : int
        Local steps τ.
    fingerprint : str
        The server's :func:`direction_fingerprint`; a client whose own differs must stop.
    importance : bytes or None
        FedKSeed-Pro's seed importance in pool order, one byte a seed (min-max normalised,
        in steps of 1/255); None samples uniformly. :attr:`probabilities` turns it into
        the sampling probabilities. Evaluation plans carry none: evaluating samples nothing.
    catch_up : CatchUp
        The global history the client lacks.
    tune : {"full", "adapter"}
        Whether the steps tune the model's own weights too, or only the adapter's tensors.
    """

    run_seed: int
    k: int
    eps: float
    lr: float
    steps: int
    fingerprint: str
    importance: bytes | None
    catch_up: CatchUp
    tune: str = TUNE_ADAPTER

    @property
    def probabilities(self) -> list[float] | None:
        """The sampling probability of each pool seed (``softmax(level / 255)``); None for uniform."""
        return None if self.importance is None else probabilities_from_levels(self.importance)

    def check_fingerprint(self) -> None:
        """Raise ``RuntimeError`` when this installation draws other directions than the server's."""
        if self.fingerprint != direction_fingerprint():
            raise RuntimeError(f"this client's direction fingerprint {direction_fingerprint()[:12]} differs from "
                               f"the server's {self.fingerprint[:12]}: install the server's fedtune version "
                               f"(directions v{DIRECTION_VERSION}), or replays would diverge")


def encode_round_config(plan: RoundPlan, prefix: str = "") -> dict[str, Any]:
    """A :class:`RoundPlan` as plain values a Flower ``ConfigRecord`` holds (no arrays)."""
    config: dict[str, Any] = {
        prefix + ZO_RUN_SEED: int(plan.run_seed), prefix + ZO_K: int(plan.k), prefix + ZO_EPS: float(plan.eps),
        prefix + ZO_LR: float(plan.lr), prefix + ZO_STEPS: int(plan.steps), prefix + ZO_FINGERPRINT: plan.fingerprint,
        prefix + ZO_TUNE: plan.tune,
    }
    config.update(encode_history(plan.catch_up.entries, base_round=plan.catch_up.base_round,
                                 through_round=plan.catch_up.through_round, prefix=prefix))
    if plan.importance is not None:
        config[prefix + ZO_IMPORTANCE] = bytes(plan.importance)
    return config


def decode_round_config(config: Mapping[str, Any], prefix: str = "") -> RoundPlan:
    """The inverse of :func:`encode_round_config`; raises ``ValueError`` naming a bad field."""
    importance = config.get(prefix + ZO_IMPORTANCE)
    k = _int_field(config, prefix + ZO_K)
    if importance is not None and not (isinstance(importance, bytes) and len(importance) == k):
        got = f"{len(importance)} bytes" if isinstance(importance, bytes) else type(importance).__name__
        raise ValueError(f"{prefix}{ZO_IMPORTANCE} must be {k} bytes (one importance level per pool seed), "
                         f"got {got}")
    fingerprint = config.get(prefix + ZO_FINGERPRINT)
    if not isinstance(fingerprint, str):
        raise ValueError(f"{prefix}{ZO_FINGERPRINT}={fingerprint!r} must be the server's direction_fingerprint()")
    tune = config.get(prefix + ZO_TUNE, TUNE_ADAPTER)
    if tune not in (TUNE_FULL, TUNE_ADAPTER):
        raise ValueError(f"{prefix}{ZO_TUNE}={tune!r} must be {TUNE_FULL!r} or {TUNE_ADAPTER!r}")
    return RoundPlan(
        run_seed=_int_field(config, prefix + ZO_RUN_SEED), k=k,
        eps=_float_field(config, prefix + ZO_EPS), lr=_float_field(config, prefix + ZO_LR),
        steps=_int_field(config, prefix + ZO_STEPS), fingerprint=fingerprint, importance=importance,
        catch_up=decode_history(config, prefix), tune=tune,
    )


# --------------------------------------------------------------------------- the client's reply (client -> server)


def encode_steps(history: Sequence[Step], *, state_round: int,
                 skipped: int = 0) -> dict[str, int | list[int] | list[float]]:
    """A client's round as plain values a Flower ``MetricRecord`` holds."""
    return {
        ZO_STEP_SEEDS: [int(seed) for seed, _ in history],
        ZO_STEP_SCALARS: [float(scalar) for _, scalar in history],
        ZO_STATE_ROUND: int(state_round),
        ZO_SKIPPED: int(skipped),
    }


def decode_steps(record: Mapping[str, Any]) -> tuple[list[Step], int, int]:
    """The inverse of :func:`encode_steps`: ``(history, state_round, skipped)``.

    Raises ``ValueError`` naming a missing or malformed field.
    """
    seeds = _list_field(record, ZO_STEP_SEEDS, int)
    scalars = _list_field(record, ZO_STEP_SCALARS, float)
    if len(seeds) != len(scalars):
        raise ValueError(f"{ZO_STEP_SEEDS} has {len(seeds)} values but {ZO_STEP_SCALARS} has {len(scalars)}")
    if not all(math.isfinite(g) for g in scalars):
        raise ValueError(f"{ZO_STEP_SCALARS} contains NaN or infinite values")
    skipped = _int_field(record, ZO_SKIPPED) if ZO_SKIPPED in record else 0
    return list(zip(seeds, scalars)), _int_field(record, ZO_STATE_ROUND), skipped


def _int_field(record: Mapping[str, Any], key: str) -> int:
    if key not in record:
        raise ValueError(f"{key} is missing")
    value = record[key]
    # An integral float is accepted: the server glue turns metric values into floats.
    integral_float = isinstance(value, (float, np.floating)) and float(value).is_integer()
    if isinstance(value, bool) or not (isinstance(value, (int, np.integer)) or integral_float):
        raise ValueError(f"{key}={value!r} must be an integer")
    return int(value)


def _float_field(record: Mapping[str, Any], key: str) -> float:
    if key not in record:
        raise ValueError(f"{key} is missing")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{key}={value!r} must be a number")
    return float(value)


def _list_field(record: Mapping[str, Any], key: str, kind: type) -> list[Any]:
    if key not in record:
        raise ValueError(f"{key} is missing")
    values = record[key]
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{key} must be a list of {kind.__name__}, got {type(values).__name__}")
    accepted = (int, np.integer) if kind is int else (int, float, np.integer, np.floating)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, accepted)]
    if bad:
        raise ValueError(f"{key} must hold only {kind.__name__} values, got e.g. {bad[0]!r}")
    return [kind(v) for v in values]


__all__ = [
    "ZEROTH_ORDER_ROUTINE",
    "CatchUp",
    "HistoryEntry",
    "RoundPlan",
    "apply_catch_up",
    "decode_history",
    "decode_round_config",
    "decode_steps",
    "encode_history",
    "encode_round_config",
    "encode_steps",
]
