"""fedtune.strategies.fedkseed.gaussian: the bitwise-portable standard normal generator."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from fedtune.strategies.fedkseed import gaussian
from fedtune.strategies.fedkseed.gaussian import NormalTarget, fill_normal, standard_normal

KEY = (0x5EED, 7, 2**62 + 3)

# SHA-256 of standard_normal(KEY, 3 * _CHUNK + 5): several chunks, a partial one, wedges and
# (most likely) a tail value. Like zeroth_order's pinned direction fingerprint, it moves only
# when the generator's values change: then bump zeroth_order.DIRECTION_VERSION too.
PINNED_DIGEST = "d20c43a504bd140ee55bd5c20ce690e4a6a432e379009a409a5ca3c64caa91a7"


def digest(values: np.ndarray) -> str:
    return hashlib.sha256(values.astype("<f4").tobytes()).hexdigest()


def test_values_are_pinned() -> None:
    assert digest(standard_normal(KEY, 3 * gaussian._CHUNK + 5)) == PINNED_DIGEST


@pytest.mark.parametrize("workers", [2, 3])
def test_values_do_not_depend_on_the_thread_count(workers: int) -> None:
    for size in (0, 1, gaussian._CHUNK - 1, gaussian._CHUNK + 1, 5 * gaussian._CHUNK + 17):
        assert standard_normal(KEY, size, workers=workers).tobytes() == standard_normal(KEY, size).tobytes()


def test_a_shorter_draw_is_not_a_prefix_but_its_inner_rectangle_values_are() -> None:
    # The retry stream serves pending values round by round, so after the first rejection in
    # the wedge a shorter draw's slow path reads other outputs; the fast path's values agree.
    long, short = standard_normal(KEY, 2 * gaussian._CHUNK), standard_normal(KEY, gaussian._CHUNK + 1)
    agree = long[:short.size] == short
    assert agree.mean() > 0.98


def test_a_target_depends_only_on_its_key_and_size_not_on_the_targets_drawn_with_it() -> None:
    keys = [(1,), (2,), (1, 5)]
    sizes = [70_001, 5, 0]
    outs = [np.empty(n, dtype=np.float32) for n in sizes]
    fill_normal([NormalTarget(k, o) for k, o in zip(keys, outs)], workers=2)
    for k, n, o in zip(keys, sizes, outs):
        assert o.tobytes() == standard_normal(k, n).tobytes()
    assert (standard_normal((2,), 1000) != standard_normal((1,), 1000)).mean() > 0.99
    assert (standard_normal((1, 5), 1000) != standard_normal((1,), 1000)).mean() > 0.99


def test_keys_are_seed_sequence_entropy_so_trailing_zeros_in_a_short_key_collide() -> None:
    # Documented on NormalTarget: SeedSequence zero-pads entropy to four 32-bit words, so
    # (1,) and (1, 0) share their word stream (only their retry streams differ).
    same_fast_path = standard_normal((1,), 10_000) == standard_normal((1, 0), 10_000)
    assert 0.95 < same_fast_path.mean() < 1.0


@pytest.mark.parametrize("workers", [1, 2])
def test_a_scaled_target_adds_float32_z_times_scale_bitwise(workers: int) -> None:
    rng = np.random.default_rng(0)
    size = 2 * gaussian._CHUNK + 999
    start = rng.normal(0.0, 1.0, size).astype(np.float32)
    start[:4] = [-0.0, 0.0, np.inf, -np.inf]
    scale = np.float32(-3.7e-3)
    out = start.copy()
    fill_normal([NormalTarget(KEY, out, scale)], workers=workers)
    z = standard_normal(KEY, size)
    expected = start + (z * scale)  # float32 * float32, then float32 + float32: two roundings
    assert out.tobytes() == expected.tobytes()


def test_a_target_must_be_one_dimensional_float32_with_a_float32_scale() -> None:
    with pytest.raises(TypeError, match="one-dimensional float32"):
        NormalTarget(KEY, np.empty(4, dtype=np.float64))
    with pytest.raises(TypeError, match="one-dimensional float32"):
        NormalTarget(KEY, np.empty((2, 2), dtype=np.float32))
    with pytest.raises(TypeError, match="numpy.float32"):
        NormalTarget(KEY, np.empty(4, dtype=np.float32), 0.5)


def test_values_match_the_standard_normal_distribution() -> None:
    # Fixed keys, so the outcome is fixed: the bounds are ~6 standard errors wide and pass
    # for any correct generator, and a wrong table, wedge or tail shows up far beyond them.
    z = np.concatenate([standard_normal((0x57A7, s), 2**20) for s in range(4)]).astype(np.float64)
    n = z.size
    assert abs(z.mean()) < 6 / math.sqrt(n)
    assert abs(z.var() - 1) < 6 * math.sqrt(2 / n)
    assert abs((z**4).mean() - 3) < 6 * math.sqrt(96 / n)  # kurtosis: the tails weigh right
    # Kolmogorov-Smirnov distance to the normal CDF (critical value 1.95/sqrt(n) at 0.1 %).
    sorted_z = np.sort(z)
    cdf = 0.5 * (1 + np.vectorize(math.erf)(sorted_z / math.sqrt(2)))
    ecdf = np.arange(1, n + 1) / n
    assert max(np.abs(cdf - ecdf).max(), np.abs(cdf - (ecdf - 1 / n)).max()) < 1.95 / math.sqrt(n)
    # The tail beyond R and the wedges, which the fast path never produces alone.
    beyond = float((np.abs(z) > gaussian._R).sum())
    expected = n * math.erfc(gaussian._R / math.sqrt(2))
    assert abs(beyond - expected) < 6 * math.sqrt(expected)
    assert np.abs(z).max() > gaussian._R + 0.5


def test_portable_exp_and_log_are_within_a_few_ulps_of_the_c_library() -> None:
    t = np.linspace(-700.0, 700.0, 200_001)
    assert np.max(np.abs(np.array([gaussian._exp(v) for v in t]) / np.exp(t) - 1)) < 4 * 2**-52
    u = np.concatenate([np.exp(np.linspace(-700.0, 0.0, 100_001)), np.linspace(1e-300, 1.0, 100_001)])
    assert np.max(np.abs(np.array([gaussian._log(v) for v in u]) - np.log(u)) / np.maximum(1.0, np.abs(np.log(u)))) < 4 * 2**-52


def test_the_ziggurat_tables_describe_layers_of_equal_area() -> None:
    edges = gaussian._WIDTH[:gaussian._LAYERS].astype(np.float64) * gaussian._POSITION_SCALE  # x_i, float32-rounded
    x = edges[1:]  # layers 1..255, x_255 = R
    height = gaussian._HEIGHT[1:]
    assert np.allclose(height, np.exp(-0.5 * x * x), rtol=1e-5)  # x from the float32 widths
    assert np.all(np.diff(x) > 0) and x[-1] == pytest.approx(gaussian._R, rel=1e-7)  # layer 1 on top, 255 above the base
    # Layer i (i >= 2) spans heights f(x_i) .. f(x_(i-1)) and width x_i: area V each.
    areas = x[1:] * (height[:-1] - height[1:])
    assert np.allclose(areas, gaussian._V, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5])
def test_the_compiled_pcg64_step_is_numpys_random_raw(seed: int) -> None:
    bit_generator = np.random.PCG64(np.random.SeedSequence([seed, 3]))
    state = bit_generator.state["state"]
    hi, lo = gaussian._halves(state["state"])
    increment = gaussian._halves(state["inc"])
    ours = []
    for _ in range(10_000):
        hi, lo, raw = map(np.uint64, gaussian._pcg64_next(hi, lo, *increment))  # Python ints back to uint64
        ours.append(raw)
    assert np.array_equal(np.array(ours, dtype=np.uint64), bit_generator.random_raw(10_000))


def test_the_density_test_is_the_portable_exps_bit_for_bit_inside_and_outside_the_guard_band() -> None:
    for t in np.linspace(-6.7, 0.0, 301):
        exact = gaussian._exp(t)
        # ulp-level neighbours decide through _exp; far ones through the C library's exp.
        for height in (*np.nextafter(exact, [0.0, 2.0]), exact, exact * (1 - 1e-9), exact * (1 + 1e-9)):
            assert gaussian._under_density(height, t) == (height < exact)
