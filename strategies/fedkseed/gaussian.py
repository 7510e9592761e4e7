"""A bitwise-portable standard normal generator: a chunked ziggurat over PCG64 raw words.

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
  layer; the candidate is ``position * width[layer]``. About 98.5 % of the words fall inside
  their layer's inner rectangle and are accepted at once. Because value ``n`` depends on
  word ``n`` only, a tensor is cut into chunks of ``_CHUNK`` values that are filled
  independently (``PCG64.advance`` jumps to a chunk's start), in any order, on any number
  of threads, with the same result.
* **Slow path, per tensor.** The ~1.5 % of words outside their inner rectangle are finished
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
* Both paths are loops compiled by numba. PCG64's step is recomputed there from its
  128-bit state (``PCG64.advance`` places a chunk's start; tested equal to
  ``random_raw``). No loop uses ``fastmath``, so LLVM contracts no ``*`` and ``+`` into a
  fused multiply-add: from the words on, only exactly rounded IEEE-754 operations are
  used: integer bit operations, table look-ups, ``*``, ``+``, ``/``, ``sqrt``, ``rint`` and
  ``frexp``.
* ``exp`` and ``log`` (for the tables, the wedge and the tail) are computed by
  :func:`_exp` and :func:`_log` from those operations, not by the C maths library, which
  may differ in the last bit between machines. The tables are built with them too, at
  import. The wedge test asks the C library's ``exp`` first, only to skip :func:`_exp`
  when the answer is clear by a margin thousands of ulps wide (:func:`_under_density`).
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

import numba
import numba.extending
import numpy as np
from llvmlite import ir as llvm_ir

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
_SQRT_HALF = math.sqrt(0.5)
_POWERS_OF_TWO = np.array([2.0**k for k in range(-1022, 1024)])  # 2**k at index k + 1022, exact


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _exp(t: float) -> float:  # pragma: no cover (compiled)
    """``exp(t)`` in float64 for ``|t| < 700``, from exactly rounded operations only.

    ``t = k ln2 + r`` (Cody-Waite), a Taylor polynomial in ``r`` and an exact scaling by
    ``2**k``: accurate to a few ulps, and the same bits on every machine.
    """
    k = np.rint(t / _LN2_HI)
    r = (t - k * _LN2_HI) - k * _LN2_LO
    polynomial = _EXP_TAYLOR[-1]
    for i in range(len(_EXP_TAYLOR) - 2, -1, -1):
        polynomial = polynomial * r + _EXP_TAYLOR[i]
    return polynomial * _POWERS_OF_TWO[int(k) + 1022]  # exact: both factors and the result are normal


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _log(u: float) -> float:  # pragma: no cover (compiled)
    """``log(u)`` in float64 for positive finite ``u``, from exactly rounded operations only.

    ``u = m 2**e`` with ``m`` in [sqrt(1/2), sqrt(2)), and ``log m = 2 atanh((m - 1) / (m + 1))``
    as a series: accurate to a few ulps, and the same bits on every machine.
    """
    mantissa, exponent = math.frexp(u)
    if mantissa < _SQRT_HALF:
        mantissa, exponent = mantissa * 2.0, exponent - 1
    e = float(exponent)
    s = (mantissa - 1.0) / (mantissa + 1.0)
    s2 = s * s
    series = _ATANH_SERIES[-1]
    for i in range(len(_ATANH_SERIES) - 2, -1, -1):
        series = series * s2 + _ATANH_SERIES[i]
    return e * _LN2_HI + (e * _LN2_LO + 2.0 * s * series)


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
        below = _exp(-0.5 * edge[i + 1] ** 2)
        edge[i] = math.sqrt(-2.0 * _log(_V / edge[i + 1] + below))
    edge[0] = _V / _exp(-0.5 * _R * _R)
    inner = np.concatenate([[_R, 0.0], edge[1:-1]])  # the inner rectangle of layer i ends at x_(i-1)
    keep = np.floor(inner / edge * _POSITION_SCALE).astype(np.uint32)
    width = (edge / _POSITION_SCALE).astype(np.float32)
    threshold = np.concatenate([keep, keep]) << np.uint32(9)
    signed_width = np.concatenate([width, -width])
    height = np.array([1.0, *(_exp(-0.5 * x * x) for x in edge[1:])])
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
    The fast path runs in parallel chunks; the slow path then finishes each target's
    pending values (targets in parallel). See the module docstring.
    """
    streams = [np.random.SeedSequence([*target.key, _WORD_STREAM]) for target in targets]
    jobs = [(t, start) for t, target in enumerate(targets) for start in range(0, target.out.size, _CHUNK)]

    def fill(job: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        t, start = job
        return _fill_chunk(streams[t], targets[t], start)

    def finish(t: int) -> None:
        mine = [part for (owner, _), part in zip(jobs, parts) if owner == t]
        positions = np.concatenate([np.empty(0, dtype=np.intp), *(p for p, _ in mine)])
        words = np.concatenate([np.empty(0, dtype=np.uint32), *(w for _, w in mine)])
        target = targets[t]
        retry = np.random.PCG64(np.random.SeedSequence([*target.key, _RETRY_STREAM])).state["state"]
        _slow_path(words, positions, *_halves(retry["state"]), *_halves(retry["inc"]), _THRESHOLD, _WIDTH, _HEIGHT,
                   target.out, target.scale if target.scale is not None else np.float32(0.0), target.scale is not None)

    parallel = workers > 1 and len(jobs) > 1
    pool = _executor(workers, os.getpid()) if parallel else None
    parts = list(pool.map(fill, jobs) if pool else map(fill, jobs))
    list(pool.map(finish, range(len(targets))) if pool else map(finish, range(len(targets))))


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
    state = bit_generator.state["state"]
    outside = np.empty(end - start, dtype=np.intp)
    outside_words = np.empty(end - start, dtype=np.uint32)
    fused = target.scale is not None
    count = _fast_path(*_halves(state["state"]), *_halves(state["inc"]), _THRESHOLD, _WIDTH, target.out[start:end],
                       target.scale if fused else np.float32(0.0), fused, outside, outside_words)
    return start + outside[:count], outside_words[:count]


def _halves(value: int) -> tuple[np.uint64, np.uint64]:
    """A 128-bit integer as its high and low 64-bit halves."""
    return np.uint64(value >> 64), np.uint64(value & 0xFFFF_FFFF_FFFF_FFFF)


# PCG64's 128-bit LCG multiplier (O'Neill's default, NumPy's PCG64), as two 64-bit halves.
_PCG_MULTIPLIER_HI, _PCG_MULTIPLIER_LO = _halves(0x2360ED051FC65DA44385DF649FCCF645)


@numba.extending.intrinsic
def _multiply_high(typing_context, a, b):  # type: ignore[no-untyped-def]  # pragma: no cover (compiled)
    """The high 64 bits of the 128-bit product of two uint64 (one LLVM ``i128`` multiply)."""
    signature = numba.types.uint64(numba.types.uint64, numba.types.uint64)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        wide = llvm_ir.IntType(128)
        product = builder.mul(builder.zext(args[0], wide), builder.zext(args[1], wide))
        return builder.trunc(builder.lshr(product, llvm_ir.Constant(wide, 64)), llvm_ir.IntType(64))

    return signature, codegen


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _fast_path(state_hi: np.uint64, state_lo: np.uint64, increment_hi: np.uint64, increment_lo: np.uint64,
               threshold: np.ndarray, width: np.ndarray, out: np.ndarray, scale: np.float32, fused: bool,
               outside: np.ndarray, outside_words: np.ndarray) -> int:  # pragma: no cover (compiled)
    """Draw a chunk's words and write (or add, scaled) each candidate; list the rejects.

    The words are PCG64's outputs from ``state`` (XSL-RR on the 128-bit LCG, exactly NumPy's
    ``PCG64.random_raw``, tested), low half first. Compiled without ``fastmath``, so every
    float32 ``*`` and ``+`` is a separately rounded IEEE operation (LLVM contracts them into
    a fused multiply-add only under fast-math flags). Returns how many entries of
    ``outside`` and ``outside_words`` it filled.
    """
    count = 0
    size = out.size
    hi, lo = state_hi, state_lo
    for output in range((size + 1) // 2):
        hi, lo, raw = _pcg64_next(hi, lo, increment_hi, increment_lo)
        for half in range(2):
            n = 2 * output + half
            if n >= size:
                break
            word = np.uint32(raw & np.uint64(0xFFFFFFFF)) if half == 0 else np.uint32(raw >> np.uint64(32))
            j = word & 0x1FF
            z = np.float32(word >> 9) * width[j]
            step = z * scale
            if word >= threshold[j]:  # _finish writes the value; w + (-0.0) is w bit for bit
                outside[count] = n
                outside_words[count] = word
                count += 1
                step = np.float32(-0.0)
            if fused:
                out[n] = out[n] + step
            else:
                out[n] = z
    return count


@numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")
def _slow_path(words: np.ndarray, positions: np.ndarray, state_hi: np.uint64, state_lo: np.uint64,
               increment_hi: np.uint64, increment_lo: np.uint64, threshold: np.ndarray, width: np.ndarray,
               height: np.ndarray, out: np.ndarray, scale: np.float32, fused: bool) -> None:  # pragma: no cover
    """The ziggurat's slow path for one tensor's pending values, written (or added) into ``out``.

    ``positions`` (ascending) and ``words`` are what the fast path left; the draws come from
    the tensor's retry stream (PCG64 from ``state``). Each round takes two 64-bit outputs per
    value still pending, in position order. A value in a layer's wedge is accepted when a
    uniform height in that layer (first draw) lies under the density; otherwise it starts
    over with the second draw's low word, taken at once when inside its inner rectangle. A
    value in the base strip beyond ``R`` samples the tail (Marsaglia 1964, both draws) until
    accepted.
    """
    words = words.copy()
    todo = np.arange(words.size)
    left = words.size
    hi, lo = state_hi, state_lo
    while left:
        still = 0
        for index in range(left):
            i = todo[index]
            hi, lo, first = _pcg64_next(hi, lo, increment_hi, increment_lo)
            hi, lo, second = _pcg64_next(hi, lo, increment_hi, increment_lo)
            word = words[i]
            candidate = np.float32(word >> 9) * width[word & 0x1FF]
            if (word & 0xFF) == 0:  # the base strip, beyond R: the tail
                beyond = -_log(_uniform(first)) / _R
                accepted = -2.0 * _log(_uniform(second)) > beyond * beyond
                candidate = np.float32(math.copysign(float(np.float32(_R + beyond)), float(candidate)))
            else:
                layer = word & 0xFF
                top, bottom = height[layer - 1], height[layer]
                z = float(candidate)
                accepted = _under_density(bottom + _uniform(first) * (top - bottom), -0.5 * z * z)
                if not accepted:
                    word = np.uint32(second & np.uint64(0xFFFFFFFF))
                    words[i] = word
                    candidate = np.float32(word >> 9) * width[word & 0x1FF]
                    accepted = word < threshold[word & 0x1FF]
            if accepted:
                n = positions[i]
                if fused:
                    out[n] = out[n] + candidate * scale
                else:
                    out[n] = candidate
            else:
                todo[still] = i
                still += 1
        left = still


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _under_density(height: float, t: float) -> bool:  # pragma: no cover (compiled)
    """``height < _exp(t)``, deciding most cases from the C library's faster ``exp``.

    The C library's ``exp`` is within an ulp or two of the truth on any machine, and so is
    :func:`_exp`; outside a guard band of 1e-12 relative (thousands of ulps) around the C
    value both give the same answer, and inside it :func:`_exp` decides. The result is
    therefore :func:`_exp`'s, bit for bit, whatever the C library.
    """
    estimate = math.exp(t)
    if height < estimate * (1.0 - 1e-12):
        return True
    if height > estimate * (1.0 + 1e-12):
        return False
    return height < _exp(t)


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _pcg64_next(hi: np.uint64, lo: np.uint64, increment_hi: np.uint64,
                increment_lo: np.uint64) -> tuple[np.uint64, np.uint64, np.uint64]:  # pragma: no cover (compiled)
    """One PCG64 step: the new 128-bit state (high, low) and its 64-bit output.

    The 128-bit LCG ``state * multiplier + increment`` in 64-bit halves, then XSL-RR:
    exactly NumPy's ``PCG64.random_raw`` (tested).
    """
    product_lo = lo * _PCG_MULTIPLIER_LO
    new_lo = product_lo + increment_lo
    carry = np.uint64(1) if new_lo < product_lo else np.uint64(0)
    new_hi = (hi * _PCG_MULTIPLIER_LO + lo * _PCG_MULTIPLIER_HI + _multiply_high(lo, _PCG_MULTIPLIER_LO)
              + increment_hi + carry)
    mixed, rotation = new_hi ^ new_lo, new_hi >> np.uint64(58)
    return new_hi, new_lo, (mixed >> rotation) | (mixed << ((np.uint64(64) - rotation) & np.uint64(63)))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _uniform(draw: np.uint64) -> float:  # pragma: no cover (compiled)
    """Uniform float64 in (0, 1] from a 64-bit output (its 53 high bits)."""
    return float((draw >> np.uint64(11)) + np.uint64(1)) * 2.0**-53


__all__ = ["NormalTarget", "fill_normal", "standard_normal"]
