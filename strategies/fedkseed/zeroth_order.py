"""Zeroth-order (MeZO-style) training with shared random seeds, and exact replay.

The numerical core of FedKSeed (Qin et al., ICML 2024, https://arxiv.org/abs/2312.06353):
every update is ``w <- w - lr * g * z(s)`` where ``z(s)`` is a Gaussian direction that
anyone can regenerate from its seed ``s``, and ``g`` is a scalar (a finite-difference
directional derivative). A training run is therefore fully described by its
``(seed, scalar)`` history, which is what clients and server exchange instead of tensors.

What makes the exchange exact:

* :func:`direction` draws ``z`` with :mod:`.gaussian`'s generator (a vectorised ziggurat
  over PCG64 raw streams seeded through ``SeedSequence`` from ``(seed, parameter name)``,
  using only integer and exactly rounded IEEE operations), so it does not depend on torch,
  the device, the thread count, the process or NumPy's distribution code; see
  :mod:`.gaussian` for what the guarantee rests on and :func:`direction_fingerprint` to
  check two installations agree.
* :func:`apply_update` (the client in :func:`zo_step`) and :func:`replay` (everyone) update
  parameters the same way: ``step = z * c`` then ``w += step`` with ``c = float32(-lr * g)``.
  Two separately rounded IEEE operations, with no fused multiply-add that a CPU or GPU
  kernel could choose differently, so the result is the same bits on every device.
* :func:`zo_step` restores the parameters after the two perturbed evaluations by copying
  a saved copy back, not by subtracting ``eps * z`` (which rounds, and in fp16/bf16
  drifts by as much as the update itself).

Parameters handled here are float32 tensors updated in place (fp32 master copies).
Memory per step: one copy of the trained tensors (the restore point) and one direction;
replay needs no direction-sized buffer on the CPU.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fedtune.strategies.fedkseed.gaussian import NormalTarget, fill_normal

from fedtune.reporting.progress import local_steps

Params = Mapping[str, torch.Tensor]
Step = tuple[int, float]  # (seed, scalar) of one update

SEED_LIMIT = 2**63  # seeds are in [0, 2**63): they fit Flower's signed 64-bit integers

# SeedSequence entropy domains, so a pool, a sampler and a direction never share a stream.
_POOL_DOMAIN = 0x5EED_9001
_SAMPLING_DOMAIN = 0x5EED_5A3B
_DIRECTION_DOMAIN = 0x5EED_D12E

# The direction generator's version: it keys the direction streams and the fingerprint, so
# parties with different generators refuse to work together (``RoundPlan.check_fingerprint``).
DIRECTION_VERSION = 2

# What zeroth-order steps tune: every weight of the model (the paper's setting) or the adapter's.
TUNE_FULL = "full"
TUNE_ADAPTER = "adapter"
# The tensors tuned unless ``trainable`` says otherwise: with tune="adapter", not the LoRA A
# factors (B starts at zero, so the loss does not depend on A and its perturbations are noise).
DEFAULT_TRAINABLE = {TUNE_FULL: (".*",), TUNE_ADAPTER: (r"^(?!.*\.lora_A\.)",)}


# --------------------------------------------------------------------------- seeds and directions


def tunable_tensors(adapter: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
                    tune: str) -> dict[str, torch.Tensor]:
    """What zeroth-order steps may tune, by name, before the ``trainable`` patterns select.

    ``adapter`` tensors only for ``tune="adapter"``; for ``"full"`` the model's own weights
    (``base``) and the adapter's trained copies such as a classification head, but not the
    LoRA factors (B starts at zero, so they would add nothing but cost).
    """
    if tune == TUNE_ADAPTER:
        return dict(adapter)
    if tune != TUNE_FULL:
        raise ValueError(f"tune={tune!r} must be {TUNE_FULL!r} or {TUNE_ADAPTER!r}")
    return {**base, **{k: v for k, v in adapter.items() if ".lora_" not in k}}


def seed_pool(run_seed: int, k: int) -> list[int]:
    """The K distinct candidate seeds of a run, fixed by the run seed.

    Parameters
    ----------
    run_seed : int
        The run's seed (non-negative).
    k : int
        Pool size; the paper uses K = 4096.

    Returns
    -------
    list of int
        ``k`` distinct seeds in ``[0, 2**63)``, in a fixed order (pool index = position).

    Notes
    -----
    Drawn from the raw 64-bit output of PCG64, whose stream NumPy keeps stable across
    versions and platforms (only integer arithmetic is involved).
    """
    _check_seed("run_seed", run_seed)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer (the paper uses 4096)")
    bit_generator = np.random.PCG64(np.random.SeedSequence([_POOL_DOMAIN, run_seed]))
    seeds: dict[int, None] = {}
    while len(seeds) < k:
        for raw in bit_generator.random_raw(k - len(seeds)):
            seeds.setdefault(int(raw) >> 1, None)
    return list(seeds)


def parameter_direction(seed: int, name: str, shape: Sequence[int]) -> torch.Tensor:
    """The float32 N(0, I) direction of one named parameter for ``seed``, on the CPU.

    Each parameter has its own streams, seeded by ``(seed, name)``, so a subset of the
    parameters costs only its own size and the order of parameters does not matter.
    """
    return direction(seed, {name: shape})[name]


def direction(seed: int, shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """The direction ``z(seed)``: one float32 N(0, I) tensor per named parameter.

    Parameters
    ----------
    seed : int
        A seed in ``[0, 2**63)``, usually from :func:`seed_pool`.
    shapes : dict of str to shape
        Parameter names and shapes; the result has the same names, sorted.

    Returns
    -------
    dict of str to Tensor
        CPU float32 tensors; each is :func:`parameter_direction` of its name.

    Notes
    -----
    Each tensor is :func:`.gaussian.fill_normal` keyed by ``(seed, name)`` and the
    generator's version (:func:`_direction_key`), drawn on ``torch.get_num_threads()``
    threads; the values are the same bits on every machine and for every thread count
    (see :mod:`.gaussian`). :func:`direction_fingerprint` checks two installations agree.
    """
    _check_seed("seed", seed)
    shapes = {name: tuple(int(d) for d in shapes[name]) for name in sorted(shapes)}
    values = {name: np.empty(math.prod(shape), dtype=np.float32) for name, shape in shapes.items()}
    fill_normal([NormalTarget(_direction_key(seed, name), flat) for name, flat in values.items()],
                workers=torch.get_num_threads())
    return {name: torch.from_numpy(values[name]).reshape(shape) for name, shape in shapes.items()}


@functools.cache
def direction_fingerprint() -> str:
    """SHA-256 of the generator's version and a fixed 2**20-value direction.

    Parties whose fingerprints differ would replay different directions. About 10,000 of
    those values go through the wedge test and about 140 through the tail, so a difference
    in any branch of the generator is likely to show up here.
    """
    values = parameter_direction(2024, "fedtune.fingerprint", (2**20,)).numpy()
    digest = hashlib.sha256(f"fedtune zeroth-order directions v{DIRECTION_VERSION}\n".encode())
    digest.update(values.astype("<f4").tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- the update


def apply_update(params: Params, z: Mapping[str, torch.Tensor], scalar: float, lr: float) -> None:
    """``w <- w - lr * scalar * z`` in place, the same bits on any device.

    The coefficient ``-lr * scalar`` is computed in float64 and rounded once to float32;
    then ``z * c`` and ``w + step`` are separate, correctly rounded float32 operations.
    ``z`` is consumed (multiplied in place).
    """
    coefficient = float(np.float32(-lr * scalar))
    with torch.no_grad():
        for name, param in params.items():
            step = z[name].to(param.device).mul_(coefficient)
            param.add_(step)


def zo_step(params: Params, loss_fn: Callable[[], float | torch.Tensor], seed: int, eps: float,
            lr: float) -> float | None:
    """One zeroth-order SGD step (two loss evaluations) along ``z(seed)``.

    Parameters
    ----------
    params : dict of str to Tensor
        float32 tensors that ``loss_fn`` reads (the model's parameters or fp32 masters the
        loss uses), updated in place.
    loss_fn : callable
        Evaluates the loss on the current batch with the current values of ``params``.
    seed : int
        Seed of the direction.
    eps : float
        Perturbation scale ε.
    lr : float
        Learning rate η.

    Returns
    -------
    float or None
        The scalar ``g = (L(w + εz) - L(w - εz)) / 2ε``, after ``w <- w - η g z``; or None
        when a loss (or ``g``) is not finite, in which case ``params`` are bitwise unchanged.
    """
    return _zo_step(params, loss_fn, seed, eps, lr)[0]


def _zo_step(params: Params, loss_fn: Callable[[], float | torch.Tensor], seed: int, eps: float,
             lr: float) -> tuple[float | None, float]:
    """``zo_step``, also returning the mean of the two losses (NaN when skipped)."""
    _check_params(params)
    _check_positive("eps", eps)
    z = direction(seed, {name: tuple(p.shape) for name, p in params.items()})
    z = {name: z[name].to(param.device) for name, param in params.items()}
    restore_point = {name: param.detach().clone() for name, param in params.items()}
    with torch.no_grad():
        try:
            loss_plus = _evaluate_at(params, restore_point, z, eps, loss_fn)
            loss_minus = _evaluate_at(params, restore_point, z, -eps, loss_fn)
        finally:  # a loss that raises must not leave the weights perturbed
            for name, param in params.items():
                param.copy_(restore_point[name])
    scalar = (loss_plus - loss_minus) / (2.0 * eps)
    if not (math.isfinite(loss_plus) and math.isfinite(loss_minus) and math.isfinite(scalar)):
        return None, math.nan
    apply_update(params, z, scalar, lr)
    return scalar, (loss_plus + loss_minus) / 2.0


def _evaluate_at(params: Params, restore_point: Params, z: Mapping[str, torch.Tensor], shift: float,
                 loss_fn: Callable[[], float | torch.Tensor]) -> float:
    # Each perturbation starts from the saved copy, so the two points are w ± εz exactly
    # as rounded once, and nothing accumulates.
    for name, param in params.items():
        param.copy_(restore_point[name]).add_(z[name], alpha=shift)
    return float(loss_fn())


# --------------------------------------------------------------------------- local training


@dataclass(frozen=True)
class ZOTrainResult:
    """What :func:`zo_train` did.

    Attributes
    ----------
    history : list of (int, float)
        ``(seed, scalar)`` of every applied step, in order: replaying it reproduces the run.
    skipped : int
        Steps skipped because a loss was not finite (their seeds are not in ``history``).
    steps : int
        Steps attempted, skipped ones included.
    mean_loss : float
        Mean of ``(L+ + L-) / 2`` over the applied steps (NaN when none was applied).
    """

    history: list[Step]
    skipped: int
    steps: int
    mean_loss: float


def zo_train(params: Params, batches: Iterable[Any], loss_on_batch: Callable[[Any], float | torch.Tensor],
             pool: Sequence[int], probabilities: Sequence[float] | None, steps: int, eps: float, lr: float,
             rng_seed: int) -> ZOTrainResult:
    """``steps`` zeroth-order steps, each along a seed drawn from ``pool``, one batch each.

    Parameters
    ----------
    params : dict of str to Tensor
        float32 tensors the loss reads, updated in place.
    batches : iterable
        Batches; re-iterated from the start when exhausted (a DataLoader, a list), so a
        one-shot iterator must hold at least ``steps`` batches.
    loss_on_batch : callable
        ``loss_on_batch(batch)`` evaluates the loss with the current ``params``.
    pool : sequence of int
        Candidate seeds (:func:`seed_pool`).
    probabilities : sequence of float or None
        Sampling probability of each pool seed (FedKSeed-Pro), or None for uniform.
    steps : int
        Steps to attempt (τ).
    eps, lr : float
        Perturbation scale ε and learning rate η.
    rng_seed : int
        Seed of the seed sampler (its own generator; the global RNGs are untouched).

    Returns
    -------
    ZOTrainResult
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be a non-negative integer")
    seeds = sample_seeds(pool, probabilities, steps, rng_seed)
    history: list[Step] = []
    losses: list[float] = []
    batch_stream = _endless(batches)
    report = local_steps(steps)  # the server's progress display (a no-op outside a ClientApp)
    for seed in seeds:
        batch = next(batch_stream)
        scalar, loss = _zo_step(params, functools.partial(loss_on_batch, batch), seed, eps, lr)
        report.advance()
        if scalar is not None:
            history.append((seed, scalar))
            losses.append(loss)
    mean_loss = math.fsum(losses) / len(losses) if losses else math.nan
    return ZOTrainResult(history=history, skipped=steps - len(history), steps=steps, mean_loss=mean_loss)


def sample_seeds(pool: Sequence[int], probabilities: Sequence[float] | None, count: int,
                 rng_seed: int) -> list[int]:
    """``count`` seeds drawn with replacement from ``pool``, uniformly or by ``probabilities``."""
    if not pool:
        raise ValueError("pool is empty; build it with seed_pool(run_seed, k)")
    _check_seed("rng_seed", rng_seed)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_SAMPLING_DOMAIN, rng_seed])))
    if probabilities is None:
        indices = rng.integers(0, len(pool), size=count)
    else:
        indices = rng.choice(len(pool), size=count, p=_checked_probabilities(probabilities, len(pool)))
    return [int(pool[i]) for i in indices]


IMPORTANCE_LEVELS = 255


def probabilities_from_levels(levels: bytes) -> list[float]:
    """FedKSeed-Pro's sampling probabilities from importance levels: ``softmax(level / 255)``.

    ``levels`` holds one byte per pool seed: the seed's min-max normalised importance in
    steps of 1/255 (what :func:`importance_levels` makes and the wire carries, 1 byte a seed
    instead of 8). The softmax is the paper's; the quantisation moves each probability by a
    factor of at most ``exp(1/510)``, 0.2 %.
    """
    if not levels:
        raise ValueError("levels is empty; send one byte per pool seed")
    normalised = np.frombuffer(bytes(levels), dtype=np.uint8).astype(np.float64) / IMPORTANCE_LEVELS
    weights = np.exp(normalised - normalised.max())
    return (weights / weights.sum()).tolist()


def importance_levels(importance: np.ndarray) -> bytes:
    """Min-max normalise ``importance`` (one value per pool seed) to bytes 0..255 (all 0 when flat)."""
    importance = np.asarray(importance, dtype=np.float64)
    if not np.all(np.isfinite(importance)):
        raise ValueError("importance must be finite")
    spread = importance.max() - importance.min()
    if spread <= 0:
        return bytes(importance.size)
    normalised = (importance - importance.min()) / spread
    return np.rint(normalised * IMPORTANCE_LEVELS).astype(np.uint8).tobytes()


def _checked_probabilities(probabilities: Sequence[float], k: int) -> np.ndarray:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.shape != (k,):
        raise ValueError(f"probabilities has {p.size} values but the pool has {k} seeds; send one per pool seed")
    if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError("probabilities must be finite, non-negative and not all zero")
    return p / p.sum()


def _endless(batches: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("batches yielded nothing; pass a re-iterable (a DataLoader or a list) "
                             "or an iterator with at least `steps` batches")


# --------------------------------------------------------------------------- replay


def replay(params: Params, history: Iterable[Step], lr: float) -> None:
    """Apply ``w <- w - lr * g * z(s)`` for every ``(s, g)`` in order: the bitwise reference.

    Rebuilds exactly what :func:`zo_train` (or a sequence of aggregated rounds) did: the
    same bits as :func:`apply_update` with :func:`direction`. Contiguous CPU tensors are
    updated chunk by chunk as the direction is drawn (no direction-sized buffer); others
    get their whole direction, one step at a time.
    """
    _check_params(params)
    fused = {name: p for name, p in params.items() if p.device.type == "cpu" and p.is_contiguous()}
    others = {name: p for name, p in params.items() if name not in fused}
    shapes = {name: tuple(p.shape) for name, p in others.items()}
    with torch.no_grad():
        for seed, scalar in history:
            _check_seed("seed", seed)
            coefficient = np.float32(-lr * scalar)
            fill_normal([NormalTarget(_direction_key(seed, name), p.detach().numpy().reshape(-1), coefficient)
                         for name, p in sorted(fused.items())], workers=torch.get_num_threads())
            if others:
                apply_update(others, direction(seed, shapes), scalar, lr)


def group_history(history: Iterable[Step]) -> list[Step]:
    """One ``(seed, Σ scalars)`` per distinct seed, in order of first appearance.

    The sums are ``math.fsum`` (exactly rounded float64), so they do not depend on the
    order of the history.
    """
    scalars: dict[int, list[float]] = {}
    for seed, scalar in history:
        scalars.setdefault(int(seed), []).append(float(scalar))
    return [(seed, math.fsum(values)) for seed, values in scalars.items()]


def replay_grouped(params: Params, history: Iterable[Step], lr: float) -> None:
    """Like :func:`replay`, generating each distinct seed's direction once.

    Equal to :func:`replay` up to float32 rounding, not bitwise: sequential replay rounds
    ``w`` after every step, this rounds once per seed. The difference per element is at
    most about ``len(history) * 2**-23 * (max|w| + max|step|)`` (tested); use it where
    that is acceptable and :func:`replay` where states must agree bit for bit.
    """
    replay(params, (step for step in group_history(history) if step[1] != 0.0), lr)


# --------------------------------------------------------------------------- checks


def _direction_key(seed: int, name: str) -> tuple[int, ...]:
    """The :class:`.gaussian.NormalTarget` key of ``z(seed)``'s tensor ``name``."""
    return (_DIRECTION_DOMAIN, DIRECTION_VERSION, seed, _name_key(name))


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


def _check_seed(what: str, seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{what}={seed!r} must be an integer in [0, 2**63)")


def _check_positive(what: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{what}={value!r} must be a positive finite number")


def _check_params(params: Params) -> None:
    if not params:
        raise ValueError("params is empty; pass the float32 tensors to train, by name")
    for name, param in params.items():
        if param.dtype != torch.float32:
            raise TypeError(f"{name} is {param.dtype}; zeroth-order steps need float32 master copies "
                            "(perturbing and restoring in fp16/bf16 drifts by as much as the update): "
                            "train {name: p.detach().float()} and copy them into the model")


__all__ = [
    "DEFAULT_TRAINABLE",
    "DIRECTION_VERSION",
    "IMPORTANCE_LEVELS",
    "SEED_LIMIT",
    "TUNE_ADAPTER",
    "TUNE_FULL",
    "ZOTrainResult",
    "apply_update",
    "direction",
    "direction_fingerprint",
    "group_history",
    "importance_levels",
    "parameter_direction",
    "probabilities_from_levels",
    "replay",
    "replay_grouped",
    "sample_seeds",
    "seed_pool",
    "tunable_tensors",
    "zo_step",
    "zo_train",
]
