"""Zeroth-order (MeZO-style) training with shared random seeds, and exact replay.

The numerical core of FedKSeed (Qin et al., ICML 2024, https://arxiv.org/abs/2312.06353):
every update is ``w <- w - lr * g * z(s)`` where ``z(s)`` is a Gaussian direction that
anyone can regenerate from its seed ``s``, and ``g`` is a scalar (a finite-difference
directional derivative). A training run is therefore fully described by its
``(seed, scalar)`` history, which is what clients and server exchange instead of tensors.

What makes the exchange exact:

* :func:`direction` draws ``z`` with a vectorised ziggurat over PCG64 raw streams seeded
  through ``SeedSequence`` from ``(seed, parameter name)``, using only integer and exactly
  rounded IEEE operations, so it does not depend on torch, the device, the thread count,
  the process or NumPy's distribution code; see :func:`direction` for what the guarantee
  rests on and :func:`direction_fingerprint` to check two installations agree.
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
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

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
    The sampler is Marsaglia and Tsang's ziggurat (256 layers, exact N(0, 1) by rejection),
    vectorised with NumPy. Each value reads one 32-bit word of a PCG64 stream seeded through
    ``SeedSequence`` from ``(seed, name)``: value ``n`` reads word ``n``, so chunks of a
    tensor are filled independently, in any order and on any number of threads. The ~1 %
    of words outside their layer's inner rectangle are finished afterwards, in position
    order, from a second PCG64 stream (wedge test, Marsaglia's tail beyond ``R``, or a
    fresh word).

    Why the values are the same bits everywhere: ``SeedSequence`` (integer hashing) and the
    PCG64 raw stream involve only integer arithmetic, and NumPy keeps both stable across
    versions and platforms (NEP 19). From the words on, only exactly rounded IEEE-754
    operations are used, each a separate NumPy call (so no fused multiply-add): integer
    bit operations, table look-ups, ``*``, ``+``, ``/``, ``sqrt``, ``rint``, ``frexp`` and
    ``ldexp``. ``exp`` and ``log`` (for the tables, the wedge and the tail) are evaluated
    from those by :func:`_exp` and :func:`_log`, not by the C maths library or NumPy's
    SIMD kernels, which may differ in the last bit between machines. Torch, the device,
    the thread count and NumPy's distribution code (which NEP 19 does not freeze) play no
    part. :func:`direction_fingerprint` checks two installations agree.
    """
    _check_seed("seed", seed)
    shapes = {name: tuple(int(d) for d in shapes[name]) for name in sorted(shapes)}
    values = {name: np.empty(math.prod(shape), dtype=np.float32) for name, shape in shapes.items()}
    _draw(seed, [_Target(name, flat) for name, flat in values.items()])
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


# --------------------------------------------------------------------------- the generator's parts

_CHUNK = 1 << 16  # values per generation task; even, so a chunk starts on a whole 64-bit output
_WORD_STREAM, _RETRY_STREAM = 0, 1

# Marsaglia and Tsang's 256-layer ziggurat: the base strip's edge and every layer's area.
_R = 3.6541528853610088
_V = 4.92867323399e-3
_LAYERS = 256
_POSITION_SCALE = 2**23  # a word's 23 high bits are the position within its layer

_LN2_HI = 6.93147180369123816490e-01  # ln 2 in two parts (fdlibm): k * _LN2_HI is exact for |k| < 2**20
_LN2_LO = 1.90821492927058770002e-10
_EXP_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(15))  # |r| <= ln2 / 2: truncation < 2**-60
_ATANH_SERIES = tuple(1.0 / (2 * k + 1) for k in range(12))  # |s| <= 0.172: truncation < 2**-60


def _exp(t: np.ndarray | float) -> np.ndarray:
    """``exp(t)`` in float64 for ``|t| < 700``, from exactly rounded operations only.

    ``t = k ln2 + r`` (Cody-Waite), a Taylor polynomial in ``r`` and an exact scaling by
    ``2**k``: accurate to a few ulps, and the same bits on every machine.
    """
    t = np.asarray(t, dtype=np.float64)
    k = np.rint(t / _LN2_HI)
    r = (t - k * _LN2_HI) - k * _LN2_LO
    polynomial = np.full_like(r, _EXP_TAYLOR[-1])
    for coefficient in reversed(_EXP_TAYLOR[:-1]):
        polynomial = polynomial * r + coefficient
    return np.ldexp(polynomial, k.astype(np.int32))


def _log(u: np.ndarray | float) -> np.ndarray:
    """``log(u)`` in float64 for positive finite ``u``, from exactly rounded operations only.

    ``u = m 2**e`` with ``m`` in [sqrt(1/2), sqrt(2)), and ``log m = 2 atanh((m - 1) / (m + 1))``
    as a series: accurate to a few ulps, and the same bits on every machine.
    """
    mantissa, exponent = np.frexp(np.asarray(u, dtype=np.float64))
    low = mantissa < math.sqrt(0.5)
    mantissa = np.where(low, mantissa * 2.0, mantissa)
    exponent = (exponent - low).astype(np.float64)
    s = (mantissa - 1.0) / (mantissa + 1.0)
    s2 = s * s
    series = np.full_like(s, _ATANH_SERIES[-1])
    for coefficient in reversed(_ATANH_SERIES[:-1]):
        series = series * s2 + coefficient
    return exponent * _LN2_HI + (exponent * _LN2_LO + 2.0 * s * series)


def _ziggurat_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(threshold, width, height)``: the layer tables, the same bits on every machine.

    A 32-bit word ``w`` reads: bits 0-7 the layer ``i``, bit 8 the sign, bits 9-31 the
    position ``u``; ``j = w & 511``. Its candidate value is ``u * width[j]`` (signed), and it
    is accepted at once when ``w < threshold[j]``, that is when it lies in the layer's inner
    rectangle. ``height[i]`` is the density ``exp(-x**2 / 2)`` at layer ``i``'s outer edge
    ``x_i`` (1 above the top layer). Layer 0 is the base strip, wider than ``R``, plus the
    tail.
    """
    edge = np.empty(_LAYERS)
    edge[-1] = _R
    for i in range(_LAYERS - 2, 0, -1):  # each layer above has area _V
        below = float(_exp(-0.5 * edge[i + 1] ** 2))
        edge[i] = math.sqrt(-2.0 * float(_log(_V / edge[i + 1] + below)))
    edge[0] = _V / float(_exp(-0.5 * _R * _R))
    inner = np.concatenate([[_R, 0.0], edge[1:-1]])  # the inner rectangle of layer i ends at x_(i-1)
    keep = np.floor(inner / edge * _POSITION_SCALE).astype(np.uint32)
    width = (edge / _POSITION_SCALE).astype(np.float32)
    threshold = np.concatenate([keep, keep]) << np.uint32(9)
    signed_width = np.concatenate([width, -width])
    height = np.concatenate([[1.0], _exp(-0.5 * edge[1:] * edge[1:])])
    return threshold, signed_width, height


_THRESHOLD, _WIDTH, _HEIGHT = _ziggurat_tables()


def _stream(seed: int, name: str, stream: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([_DIRECTION_DOMAIN, DIRECTION_VERSION, seed, _name_key(name), stream])


@functools.cache
def _executor(workers: int, pid: int) -> ThreadPoolExecutor:
    # One pool per process and size (a forked child must not use its parent's threads).
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedtune-zo")


@dataclass(frozen=True)
class _Target:
    """Where one named parameter's direction goes: ``flat`` itself, or ``flat += coefficient * z``."""

    name: str
    flat: np.ndarray  # float32, one dimension
    coefficient: np.float32 | None = None


def _draw(seed: int, targets: Sequence[_Target]) -> None:
    """Draw ``z(seed)`` for every target: the fast path in parallel chunks, then the slow path."""
    streams = [_stream(seed, target.name, _WORD_STREAM) for target in targets]
    jobs = [(t, start) for t, target in enumerate(targets) for start in range(0, target.flat.size, _CHUNK)]

    def fill(job: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        t, start = job
        return _fill_chunk(streams[t], targets[t], start)

    workers = torch.get_num_threads()
    parts = list(_executor(workers, os.getpid()).map(fill, jobs) if len(jobs) > 1 and workers > 1
                 else map(fill, jobs))
    positions: list[list[np.ndarray]] = [[np.empty(0, dtype=np.intp)] for _ in targets]
    words: list[list[np.ndarray]] = [[np.empty(0, dtype=np.uint32)] for _ in targets]
    for (t, _), (chunk_positions, chunk_words) in zip(jobs, parts):
        positions[t].append(chunk_positions)
        words[t].append(chunk_words)
    finished = _finish([(_stream(seed, target.name, _RETRY_STREAM), np.concatenate(positions[t]),
                         np.concatenate(words[t]).astype(np.uint32)) for t, target in enumerate(targets)])
    for target, (positions, values) in zip(targets, finished):
        if target.coefficient is None:
            target.flat[positions] = values
        else:
            target.flat[positions] += values * target.coefficient


def _fill_chunk(words: np.random.SeedSequence, target: _Target, start: int) -> tuple[np.ndarray, np.ndarray]:
    """The fast path for values ``start .. start + _CHUNK`` of ``target``.

    Returns the positions whose word fell outside its inner rectangle, and those words;
    they are left for :func:`_finish` (written as -0.0 in an update, which adds nothing).
    """
    end = min(start + _CHUNK, target.flat.size)
    bit_generator = np.random.PCG64(words)
    bit_generator.advance(start // 2)
    # Word 2n is the low half of output n on any platform ("<u8" costs nothing on little-endian).
    chunk_words = bit_generator.random_raw((end - start + 1) // 2).astype("<u8", copy=False).view("<u4")
    chunk_words = chunk_words[:end - start]
    j = np.bitwise_and(chunk_words, 0x1FF, dtype=np.intp)
    z = target.flat[start:end] if target.coefficient is None else np.empty(end - start, dtype=np.float32)
    np.multiply(chunk_words >> 9, _WIDTH.take(j, mode="wrap"), out=z, dtype=np.float32, casting="unsafe")
    outside = np.flatnonzero(chunk_words >= _THRESHOLD.take(j, mode="wrap"))
    if target.coefficient is not None:
        np.multiply(z, target.coefficient, out=z)
        z[outside] = -0.0  # w + (-0.0) is w bit for bit, for every w
        np.add(target.flat[start:end], z, out=target.flat[start:end])
    return start + outside, chunk_words[outside]


def _finish(pending: Sequence[tuple[np.random.SeedSequence, np.ndarray, np.ndarray]]
            ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The ziggurat's slow path, vectorised over every tensor's pending values.

    ``pending`` holds, per tensor, its retry stream and the positions (ascending) and words
    the fast path left. Each round draws two 64-bit outputs per value still pending, from its
    tensor's stream in position order, so a tensor's values do not depend on the others. A
    value in a layer's wedge is accepted when a uniform height in that layer (first draw)
    lies under the density; otherwise it starts over with a fresh word (second draw), taken
    at once when inside its inner rectangle. A value in the base strip beyond ``R`` samples
    the tail (Marsaglia 1964, both draws) until accepted. Returns, per tensor, the positions
    and their values.
    """
    sizes = [positions.size for _, positions, _ in pending]
    owner = np.repeat(np.arange(len(pending)), sizes)
    words = np.concatenate([w for _, _, w in pending]).astype(np.uint32)
    result = np.empty(owner.size, dtype=np.float32)
    todo = np.arange(owner.size)  # into the concatenation of every tensor's pending values
    in_tail = (words & 0xFF) == 0
    generators: dict[int, np.random.PCG64] = {}
    while todo.size:
        draws = _retry_draws(pending, generators, owner[todo])
        x = _candidate(words)
        accepted = np.empty(todo.size, dtype=bool)
        wedge = np.flatnonzero(~in_tail)
        accepted[wedge] = _under_density(words[wedge], x[wedge], draws[wedge, 0])
        tail = np.flatnonzero(in_tail)
        if tail.size:
            x[tail], accepted[tail] = _tail(x[tail], draws[tail, 0], draws[tail, 1])
        restart = wedge[~accepted[wedge]]
        fresh = (draws[restart, 1] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        words[restart] = fresh
        x[restart] = _candidate(fresh)
        accepted[restart] = fresh < _THRESHOLD[fresh & 0x1FF]
        in_tail[restart] = (fresh & 0xFF) == 0  # used only when not accepted
        result[todo[accepted]] = x[accepted]
        left = np.flatnonzero(~accepted)
        todo, words, in_tail = todo[left], words[left], in_tail[left]
    bounds = np.cumsum([0, *sizes])
    return [(positions, result[lo:hi]) for (_, positions, _), lo, hi in zip(pending, bounds[:-1], bounds[1:])]


def _candidate(words: np.ndarray) -> np.ndarray:
    """The fast path's value of each word (float32), before any acceptance test."""
    return np.multiply(words >> 9, _WIDTH[words & 0x1FF], dtype=np.float32, casting="unsafe")


def _uniform(draws: np.ndarray) -> np.ndarray:
    """Uniform float64 in (0, 1] from 64-bit outputs (their 53 high bits)."""
    return ((draws >> np.uint64(11)) + np.uint64(1)) * 2.0**-53


def _under_density(words: np.ndarray, x: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """The wedge test: does a uniform height in the word's layer lie under ``exp(-x**2 / 2)``?"""
    layer = (words & 0xFF).astype(np.intp)
    top, bottom = _HEIGHT[layer - 1], _HEIGHT[layer]
    x = x.astype(np.float64)
    return bottom + _uniform(draws) * (top - bottom) < _exp(-0.5 * x * x)


def _tail(x: np.ndarray, first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Marsaglia's tail: a candidate beyond ``R`` with the sign of ``x``, and whether it is accepted."""
    beyond = -_log(_uniform(first)) / _R
    accepted = -2.0 * _log(_uniform(second)) > beyond * beyond
    return np.copysign((_R + beyond).astype(np.float32), x), accepted


def _retry_draws(pending: Sequence[tuple[np.random.SeedSequence, np.ndarray, np.ndarray]],
                 generators: dict[int, np.random.PCG64], owner: np.ndarray) -> np.ndarray:
    """Two 64-bit outputs per pending value, each from its own tensor's retry stream."""
    draws = [np.empty(0, dtype=np.uint64)]
    for t, count in enumerate(np.bincount(owner, minlength=len(pending)).tolist()):  # owner is sorted
        if count == 0:
            continue
        if t not in generators:
            generators[t] = np.random.PCG64(pending[t][0])
        draws.append(generators[t].random_raw(2 * count))
    return np.concatenate(draws).reshape(-1, 2)


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
    for seed in seeds:
        batch = next(batch_stream)
        scalar, loss = _zo_step(params, functools.partial(loss_on_batch, batch), seed, eps, lr)
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
            _draw(seed, [_Target(name, p.detach().numpy().reshape(-1), coefficient)
                         for name, p in sorted(fused.items())])
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
    "DIRECTION_VERSION",
    "SEED_LIMIT",
    "TUNE_ADAPTER",
    "TUNE_FULL",
    "ZOTrainResult",
    "apply_update",
    "direction",
    "direction_fingerprint",
    "group_history",
    "parameter_direction",
    "replay",
    "replay_grouped",
    "sample_seeds",
    "seed_pool",
    "tunable_tensors",
    "zo_step",
    "zo_train",
]
