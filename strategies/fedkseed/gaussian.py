"""A bitwise-portable standard normal generator: a vectorised ziggurat over PCG64 raw words.

FedKSeed's clients and server rebuild the same model by replaying ``(seed, scalar)`` pairs,
so every party must draw *exactly* the same Gaussian values from a seed, whatever its
machine, NumPy version, thread count or device. This module is that generator; it knows
nothing about models or seeds of a run (:mod:`.zeroth_order` derives the keys).

The algorithm
-------------
Marsaglia and Tsang's ziggurat with 256 layers (Marsaglia and Tsang, "The ziggurat method
for generating random variables", JSS 2000), which samples N(0, 1) exactly by rejection.

* **Fast path, in chunks.** Value ``n`` of a tensor reads 32-bit word ``n`` of a PCG64 raw
  stream (the *word stream*, ``SeedSequence([*key, 0])``; word ``2m`` is the low half of
  output ``m``). Bits 0-7 pick the layer, bit 8 the sign, bits 9-31 the position in the
  layer; the candidate is ``position * width[layer]``. About 99 % of the words fall inside
  their layer's inner rectangle and are accepted at once. Because value ``n`` depends on
  word ``n`` only, a tensor is cut into chunks of ``_CHUNK`` values that are filled
  independently (``PCG64.advance`` jumps to a chunk's start), in any order, on any number
  of threads, with the same result.
* **Slow path, per tensor.** The ~1 % of words outside their inner rectangle are finished
  afterwards, in position order, from a second PCG64 stream (the *retry stream*,
  ``SeedSequence([*key, 1])``), two 64-bit outputs per pending value per round: the wedge
  test (a uniform height in the layer under ``exp(-x**2 / 2)``), Marsaglia's (1964) tail
  beyond ``R`` for the base strip, or a fresh word when rejected. Each tensor has its own
  retry stream, so its values do not depend on the other tensors drawn with it.
* **Fused update.** A target may ask for ``out += scale * z`` instead of ``out = z``: the
  chunk's values are multiplied and added as they are drawn (no buffer the size of the
  tensor), pending positions add ``-0.0`` (``w + -0.0`` is ``w`` bit for bit) and get their
  own ``z * scale`` added once finished. ``out + float32(z * scale)``, two separately
  rounded float32 operations, is exactly what ``torch``'s ``z.mul_(c)`` then ``w.add_(z)``
  computes, so a fused replay equals drawing ``z`` and updating.

Why the values are the same bits everywhere
-------------------------------------------
* ``SeedSequence`` (integer hashing) and the PCG64 raw stream use integer arithmetic only,
  and NumPy keeps both stable across versions and platforms (NEP 19). NumPy's *distribution*
  code (``Generator.standard_normal``), which NEP 19 does not freeze, is not used.
* From the words on, only exactly rounded IEEE-754 operations are used, each a separate
  NumPy call (so no fused multiply-add can be chosen by a compiler): integer bit
  operations, table look-ups, ``*``, ``+``, ``/``, ``sqrt``, ``rint``, ``frexp`` and ``ldexp``.
* ``exp`` and ``log`` (for the tables, the wedge and the tail) are computed by
  :func:`_exp` and :func:`_log` from those operations, not by the C maths library or NumPy's
  SIMD kernels, which may differ in the last bit between machines. The tables are built
  with them too, at import, so they are the same bits everywhere.
* Threads only decide *when* a chunk is filled, never which words it reads.

Any change to the values this module produces changes FedKSeed's directions: bump
``zeroth_order.DIRECTION_VERSION`` and re-pin the fingerprint in the tests.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

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


# --------------------------------------------------------------------------- public surface


@dataclass(frozen=True)
class NormalTarget:
    """Where one tensor's standard normal values go.

    Attributes
    ----------
    key : tuple of int
        Non-negative integers that identify the tensor's values: its streams are
        ``SeedSequence([*key, 0])`` (words) and ``SeedSequence([*key, 1])`` (retries).
        ``SeedSequence`` splits each integer into 32-bit words and zero-pads short entropy
        to four words, so keys should have a fixed layout, a domain constant first:
        ``(1,)`` and ``(1, 0)`` share their word stream.
    out : ndarray
        float32, one dimension, writable (a view of a tensor's storage is fine).
    scale : numpy.float32 or None
        None: ``out`` receives ``z``. A float32: ``out += z * scale``, rounded as
        ``float32(z * scale)`` then ``float32(out + that)``.
    """

    key: tuple[int, ...]
    out: np.ndarray
    scale: np.float32 | None = None

    def __post_init__(self) -> None:
        if self.out.dtype != np.float32 or self.out.ndim != 1:
            raise TypeError(f"out must be a one-dimensional float32 array, not {self.out.dtype} "
                            f"with {self.out.ndim} dimensions")
        if self.scale is not None and not isinstance(self.scale, np.float32):
            raise TypeError(f"scale must be a numpy.float32 (rounded once by the caller), not {type(self.scale)}")


def fill_normal(targets: Sequence[NormalTarget], workers: int = 1) -> None:
    """Write (or add, scaled) standard normal values into every target, the same bits anywhere.

    Parameters
    ----------
    targets : sequence of NormalTarget
        The tensors to fill; each depends only on its own key and size, not on the others.
    workers : int, optional
        Threads for the fast path (chunks of ``_CHUNK`` values). The values do not depend
        on it.

    Notes
    -----
    The fast path runs in parallel chunks; the slow path then finishes every target's
    pending values, vectorised over all targets. See the module docstring.
    """
    streams = [np.random.SeedSequence([*target.key, _WORD_STREAM]) for target in targets]
    jobs = [(t, start) for t, target in enumerate(targets) for start in range(0, target.out.size, _CHUNK)]

    def fill(job: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        t, start = job
        return _fill_chunk(streams[t], targets[t], start)

    parts = list(_executor(workers, os.getpid()).map(fill, jobs) if len(jobs) > 1 and workers > 1
                 else map(fill, jobs))
    positions: list[list[np.ndarray]] = [[np.empty(0, dtype=np.intp)] for _ in targets]
    words: list[list[np.ndarray]] = [[np.empty(0, dtype=np.uint32)] for _ in targets]
    for (t, _), (chunk_positions, chunk_words) in zip(jobs, parts):
        positions[t].append(chunk_positions)
        words[t].append(chunk_words)
    finished = _finish([(np.random.SeedSequence([*target.key, _RETRY_STREAM]), np.concatenate(positions[t]),
                         np.concatenate(words[t]).astype(np.uint32)) for t, target in enumerate(targets)])
    for target, (positions, values) in zip(targets, finished):
        if target.scale is None:
            target.out[positions] = values
        else:
            target.out[positions] += values * target.scale


def standard_normal(key: Sequence[int], size: int, workers: int = 1) -> np.ndarray:
    """``size`` float32 N(0, 1) values for ``key``: :func:`fill_normal` of one new array.

    Parameters
    ----------
    key : sequence of int
        Non-negative integers (see :class:`NormalTarget`).
    size : int
        How many values.
    workers : int, optional
        Threads for the fast path; the values do not depend on it.

    Returns
    -------
    ndarray
        float32, shape ``(size,)``. Not a prefix of a longer draw with the same key: the
        slow path serves a tensor's pending values round by round from one stream.
    """
    out = np.empty(size, dtype=np.float32)
    fill_normal([NormalTarget(tuple(key), out)], workers)
    return out


# --------------------------------------------------------------------------- the generator's parts


@functools.cache
def _executor(workers: int, pid: int) -> ThreadPoolExecutor:
    # One pool per process and size (a forked child must not use its parent's threads).
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedtune-normal")


def _fill_chunk(stream: np.random.SeedSequence, target: NormalTarget, start: int) -> tuple[np.ndarray, np.ndarray]:
    """The fast path for values ``start .. start + _CHUNK`` of ``target``.

    Returns the positions whose word fell outside its inner rectangle, and those words;
    they are left for :func:`_finish` (written as -0.0 in an update, which adds nothing).
    """
    end = min(start + _CHUNK, target.out.size)
    bit_generator = np.random.PCG64(stream)
    bit_generator.advance(start // 2)
    # Word 2n is the low half of output n on any platform ("<u8" costs nothing on little-endian).
    chunk_words = bit_generator.random_raw((end - start + 1) // 2).astype("<u8", copy=False).view("<u4")
    chunk_words = chunk_words[:end - start]
    j = np.bitwise_and(chunk_words, 0x1FF, dtype=np.intp)
    z = target.out[start:end] if target.scale is None else np.empty(end - start, dtype=np.float32)
    np.multiply(chunk_words >> 9, _WIDTH.take(j, mode="wrap"), out=z, dtype=np.float32, casting="unsafe")
    outside = np.flatnonzero(chunk_words >= _THRESHOLD.take(j, mode="wrap"))
    if target.scale is not None:
        np.multiply(z, target.scale, out=z)
        z[outside] = -0.0  # w + (-0.0) is w bit for bit, for every w
        np.add(target.out[start:end], z, out=target.out[start:end])
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



__all__ = ["NormalTarget", "fill_normal", "standard_normal"]
