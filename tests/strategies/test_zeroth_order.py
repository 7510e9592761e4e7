"""fedtune.strategies.fedkseed.zeroth_order: seed pool, reproducible directions, the ZO step, training and replay."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fedtune.strategies.fedkseed.wire import (
    CatchUp,
    HistoryEntry,
    RoundPlan,
    apply_catch_up,
    decode_history,
    decode_round_config,
    decode_steps,
    encode_history,
    encode_round_config,
    encode_steps,
)
from fedtune.strategies.fedkseed.zeroth_order import (
    DIRECTION_VERSION,
    SEED_LIMIT,
    apply_update,
    direction,
    direction_fingerprint,
    group_history,
    parameter_direction,
    replay,
    replay_grouped,
    sample_seeds,
    seed_pool,
    zo_step,
    zo_train,
)
from flwr.app import ConfigRecord, MetricRecord
from flwr.common import serde

REPO = Path(__file__).resolve().parents[2]
SHAPES = {"layer.weight": (64, 33), "layer.bias": (64,), "head.weight": (3, 64)}

# The fingerprint of the version 2 directions (PCG64 raw streams, fedtune's vectorised ziggurat).
# They rest on integer and exactly rounded IEEE operations only, so no NumPy or platform change
# should move it; if it changes, directions changed, and histories recorded before are not
# replayable: bump DIRECTION_VERSION.
PINNED_FINGERPRINT = "a8484ac8c63564ac4f4d31eb0c2fb9fc16c4f2e4a7f363da1ddba0d3c78f17a3"


def raw_bytes(tensors: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Bitwise view (distinguishes -0.0 from 0.0 and compares NaN payloads, unlike torch.equal)."""
    return {name: t.detach().cpu().contiguous().numpy().tobytes() for name, t in tensors.items()}


def linear_problem(seed: int = 0, n: int = 64, features: int = 8) -> tuple[dict[str, torch.Tensor], list]:
    """A float32 linear regression: fixed initial weights and a list of (x, y) batches."""
    generator = torch.Generator().manual_seed(seed)
    params = {"weight": torch.randn(1, features, generator=generator) * 0.1,
              "bias": torch.zeros(1)}
    true_w = torch.randn(features, 1, generator=generator)
    x = torch.randn(n, features, generator=generator)
    y = x @ true_w + 0.01 * torch.randn(n, 1, generator=generator)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, n, 8)]
    return params, batches


def mse(params: dict[str, torch.Tensor]):
    def loss_on_batch(batch):
        x, y = batch
        return ((x @ params["weight"].T + params["bias"] - y) ** 2).mean()
    return loss_on_batch


def clone(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in params.items()}


# --------------------------------------------------------------------------- seed pool


def test_seed_pool_is_distinct_63_bit_and_fixed_by_the_run_seed() -> None:
    pool = seed_pool(7, 4096)
    assert len(pool) == 4096 == len(set(pool))
    assert all(isinstance(s, int) and 0 <= s < SEED_LIMIT for s in pool)
    assert seed_pool(7, 4096) == pool
    assert seed_pool(7, 16) == pool[:16]  # a smaller pool is a prefix: K can be tuned without reseeding
    assert set(seed_pool(8, 4096)).isdisjoint(pool)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_seed_pool_rejects_a_bad_k(bad) -> None:
    with pytest.raises(ValueError, match="k=.*positive integer"):
        seed_pool(0, bad)


# --------------------------------------------------------------------------- directions

_CHILD = """
import hashlib, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from fedtune.strategies.fedkseed.zeroth_order import direction
z = direction(int(sys.argv[2]), {"layer.weight": (64, 33), "layer.bias": (64,), "head.weight": (3, 64)})
print(hashlib.sha256(b"".join(z[k].numpy().tobytes() for k in sorted(z))).hexdigest())
"""


def direction_digest(seed: int) -> str:
    z = direction(seed, SHAPES)
    return hashlib.sha256(b"".join(z[k].numpy().tobytes() for k in sorted(z))).hexdigest()


@pytest.mark.parametrize("threads", [1, 2])
def test_direction_is_the_same_bytes_in_another_process_and_thread_count(threads: int) -> None:
    seed = seed_pool(3, 4)[2]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(threads), str(seed)], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == direction_digest(seed)


def test_direction_fingerprint_is_pinned() -> None:
    assert direction_fingerprint() == PINNED_FINGERPRINT, (
        "the direction stream changed (NumPy version or C maths library?): every client and the server "
        "must draw the same directions; update PINNED_FINGERPRINT only knowingly")


def test_direction_is_float32_standard_normal_per_named_parameter() -> None:
    z = direction(11, SHAPES)
    assert list(z) == sorted(SHAPES)
    assert all(z[k].dtype == torch.float32 and tuple(z[k].shape) == SHAPES[k] for k in SHAPES)
    # A subset costs only its own size and gives the same values: each name has its own stream.
    assert torch.equal(direction(11, {"layer.bias": (64,)})["layer.bias"], z["layer.bias"])
    assert torch.equal(parameter_direction(11, "layer.bias", (64,)), z["layer.bias"])
    assert not torch.equal(z["layer.bias"], parameter_direction(12, "layer.bias", (64,)))
    assert not torch.equal(parameter_direction(11, "other.bias", (64,)), z["layer.bias"])


def test_direction_is_reproducible_and_independent_of_its_neighbours() -> None:
    shapes = {"big": (3, 70_001), "small": (5,), "empty": (0, 4)}  # several chunks, a partial one, none
    first = direction(2**62 + 7, shapes)
    again = direction(2**62 + 7, dict(reversed(shapes.items())))
    assert raw_bytes(first) == raw_bytes(again)
    assert raw_bytes({"big": parameter_direction(2**62 + 7, "big", (3, 70_001))}) == raw_bytes({"big": first["big"]})
    assert first["empty"].shape == (0, 4)
    other_seed, other_name = parameter_direction(2**62 + 8, "big", (3, 70_001)), parameter_direction(2**62 + 7, "big2", (3, 70_001))
    for other in (other_seed, other_name):
        assert (other != first["big"]).float().mean().item() > 0.99


def test_replay_equals_a_sequential_loop_over_direction_and_apply_update_bitwise() -> None:
    generator = torch.Generator().manual_seed(1)
    start = {"a": torch.randn(300, 701, generator=generator), "b": torch.randn(17, generator=generator),
             "c": torch.randn(40, 3, generator=generator).t()}  # c is not contiguous: the unfused path
    start["a"][0, :4] = torch.tensor([-0.0, 0.0, float("inf"), -float("inf")])
    pool = seed_pool(4, 8)
    history = [(pool[i % 8], g) for i, g in enumerate(np.random.default_rng(1).normal(0, 10, 25).tolist())]
    replayed = clone(start)
    replay(replayed, history, lr=1e-3)
    reference = clone(start)
    for seed, scalar in history:
        apply_update(reference, direction(seed, {k: tuple(v.shape) for k, v in reference.items()}), scalar, 1e-3)
    assert raw_bytes(replayed) == raw_bytes(reference)
    assert raw_bytes(replayed) != raw_bytes(start)


def test_direction_version_keys_the_fingerprint() -> None:
    assert DIRECTION_VERSION == 2
    assert direction_fingerprint() != "8df24cdcc0f4312787dc9398ea01d2e5223560190815f62c539a5793d31c2dbd"  # v1's


# --------------------------------------------------------------------------- the ZO step


def test_zo_step_evaluates_at_w_plus_and_minus_eps_z_and_restores_bitwise_before_updating() -> None:
    params, batches = linear_problem()
    start = clone(params)
    seen: list[dict[str, bytes]] = []
    loss_on_batch = mse(params)

    def loss_fn():
        seen.append(raw_bytes(params))
        return loss_on_batch(batches[0])

    seed, eps, lr = 12345, 1e-3, 0.05
    g = zo_step(params, loss_fn, seed, eps, lr)
    shapes = {k: tuple(v.shape) for k, v in start.items()}
    z = direction(seed, shapes)
    # Both points are computed from the exact original weights (the same kernel as zo_step).
    assert seen[0] == raw_bytes({k: torch.add(start[k], z[k], alpha=eps) for k in start})
    assert seen[1] == raw_bytes({k: torch.add(start[k], z[k], alpha=-eps) for k in start})
    plus, minus = seen_params(seen[0], start), seen_params(seen[1], start)
    assert g == (float(mse(plus)(batches[0])) - float(mse(minus)(batches[0]))) / (2 * eps)
    # The update was applied to the exact original weights: restoring left no residue.
    expected = clone(start)
    apply_update(expected, direction(seed, shapes), g, lr)
    assert raw_bytes(params) == raw_bytes(expected)


def seen_params(raw: dict[str, bytes], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.frombuffer(raw[k], dtype=np.float32).copy()).reshape(like[k].shape) for k in like}


@pytest.mark.parametrize("bad_loss", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("which", [0, 1])
def test_a_non_finite_loss_skips_the_step_and_leaves_params_bitwise_untouched(bad_loss: float, which: int) -> None:
    params, batches = linear_problem()
    start = raw_bytes(params)
    calls = []

    def loss_fn():
        calls.append(1)
        return bad_loss if len(calls) - 1 == which else 1.0

    assert zo_step(params, loss_fn, 99, 1e-3, 0.1) is None
    assert raw_bytes(params) == start


def test_a_loss_that_raises_leaves_params_bitwise_untouched() -> None:
    params, _ = linear_problem()
    start = raw_bytes(params)

    def loss_fn():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        zo_step(params, loss_fn, 3, 1e-3, 0.1)
    assert raw_bytes(params) == start


def test_a_step_whose_scalar_overflows_is_skipped() -> None:
    params, _ = linear_problem()
    start = raw_bytes(params)
    losses = iter([1e308, -1e308])  # finite losses, but (L+ - L-) / 2ε overflows
    assert zo_step(params, lambda: next(losses), 1, 1e-3, 0.1) is None
    assert raw_bytes(params) == start


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_zo_step_needs_float32_masters(dtype: torch.dtype) -> None:
    params = {"w": torch.zeros(4, dtype=dtype)}
    with pytest.raises(TypeError, match=r"w is torch\.\w+; zeroth-order steps need float32 master copies"):
        zo_step(params, lambda: 0.0, 1, 1e-3, 0.1)


@pytest.mark.parametrize("eps", [0.0, -1e-3, float("nan")])
def test_zo_step_rejects_a_bad_eps(eps: float) -> None:
    params, _ = linear_problem()
    with pytest.raises(ValueError, match="eps=.*positive finite"):
        zo_step(params, lambda: 0.0, 1, eps, 0.1)


# --------------------------------------------------------------------------- training and replay


def test_zo_train_then_replay_from_the_same_start_is_bitwise_identical() -> None:
    params, batches = linear_problem()
    start = clone(params)
    pool = seed_pool(0, 16)  # 60 steps over 16 seeds: seeds repeat, as in FedKSeed
    result = zo_train(params, batches, mse(params), pool, None, steps=60, eps=1e-3, lr=0.02, rng_seed=5)
    assert result.steps == 60 and result.skipped == 0 and len(result.history) == 60
    assert len({s for s, _ in result.history}) < 60
    assert all(s in pool for s, _ in result.history)
    assert math.isfinite(result.mean_loss)
    rebuilt = clone(start)
    replay(rebuilt, result.history, lr=0.02)
    assert raw_bytes(rebuilt) == raw_bytes(params)
    assert raw_bytes(rebuilt) != raw_bytes(start)


def test_zo_train_reduces_the_loss_of_a_linear_regression() -> None:
    params, batches = linear_problem()
    loss_on_batch = mse(params)
    full = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    before = float(loss_on_batch(full))
    zo_train(params, batches, loss_on_batch, seed_pool(0, 64), None, steps=400, eps=1e-3, lr=0.01, rng_seed=0)
    assert float(loss_on_batch(full)) < 0.5 * before


def test_zo_train_is_deterministic_and_counts_skipped_steps() -> None:
    def run() -> tuple:
        params, batches = linear_problem()
        loss = mse(params)
        # Every third batch has a NaN target: both of its evaluations are NaN.
        batches = [(x, y * float("nan")) if i % 3 == 0 else (x, y) for i, (x, y) in enumerate(batches)]
        start = clone(params)
        result = zo_train(params, batches, loss, seed_pool(1, 32), None, steps=24, eps=1e-3, lr=0.02, rng_seed=9)
        return result, start, params

    result, start, params = run()
    again, _, params_again = run()
    assert result == again and raw_bytes(params) == raw_bytes(params_again)
    assert result.skipped == 9 and len(result.history) == 15 and result.steps == 24
    rebuilt = clone(start)
    replay(rebuilt, result.history, lr=0.02)
    assert raw_bytes(rebuilt) == raw_bytes(params)


def test_zo_train_with_probabilities_draws_only_seeds_with_positive_probability() -> None:
    params, batches = linear_problem()
    pool = seed_pool(0, 8)
    probabilities = [0.0, 0.5, 0.0, 0.25, 0.25, 0.0, 0.0, 0.0]
    result = zo_train(params, batches, mse(params), pool, probabilities, steps=50, eps=1e-3, lr=0.01, rng_seed=2)
    assert {s for s, _ in result.history} <= {pool[1], pool[3], pool[4]}


def test_sample_seeds_checks_the_probabilities() -> None:
    pool = seed_pool(0, 4)
    with pytest.raises(ValueError, match="4 seeds"):
        sample_seeds(pool, [0.5, 0.5], 3, rng_seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        sample_seeds(pool, [1.0, -0.5, 0.25, 0.25], 3, rng_seed=0)
    assert sample_seeds(pool, None, 10, rng_seed=4) == sample_seeds(pool, None, 10, rng_seed=4)


def test_zo_train_rejects_an_exhausted_iterator() -> None:
    params, batches = linear_problem()
    with pytest.raises(ValueError, match="batches yielded nothing"):
        zo_train(params, iter(batches[:2]), mse(params), seed_pool(0, 4), None, 3, 1e-3, 0.01, 0)


def test_group_history_sums_per_seed_in_order_of_first_appearance() -> None:
    history = [(5, 1.0), (3, 0.5), (5, 1e-20), (9, -2.0), (3, 0.25), (5, -1.0)]
    # fsum keeps the 1e-20 that a left-to-right float sum would lose.
    assert group_history(history) == [(5, 1e-20), (3, 0.75), (9, -2.0)]


def test_replay_grouped_equals_sequential_replay_up_to_float32_rounding() -> None:
    generator = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(100, 50, generator=generator), "b": torch.randn(200, generator=generator)}
    pool = seed_pool(2, 8)
    rng = np.random.default_rng(0)
    history = [(pool[int(i)], float(g)) for i, g in zip(rng.integers(0, 8, 300), rng.normal(0, 3, 300))]
    lr = 1e-3
    sequential, grouped = clone(start), clone(start)
    replay(sequential, history, lr)
    replay_grouped(grouped, history, lr)
    # Each sequential step rounds w (≤ ulp/2 of |w|) and the step z * float32(-lr g) (two
    # roundings of ≤ ulp/2 of |step|); grouped replay does the same once per seed. A bound of
    # one float32 ulp (2**-23 relative) of max|w| + max|step| per step covers both.
    max_step = lr * max(abs(g) for _, g in history) * 6.0  # |z| < 6 for these few thousand draws
    for name in start:
        max_w = max(start[name].abs().max(), sequential[name].abs().max()).item()
        bound = len(history) * 2**-23 * (max_w + max_step)
        difference = (sequential[name].double() - grouped[name].double()).abs().max().item()
        assert difference <= bound, (name, difference, bound)
        assert (sequential[name] - start[name]).abs().max().item() > 100 * bound  # the bound is not vacuous


# --------------------------------------------------------------------------- the wire


def test_encode_history_round_trips_through_a_config_record_without_arrays() -> None:
    pool = seed_pool(0, 4)
    entries = [HistoryEntry(2, pool[0], 0.1), HistoryEntry(2, pool[3], -1e-300), HistoryEntry(4, pool[1], 7.0)]
    encoded = encode_history(entries, base_round=1, through_round=5, prefix="strategy.")
    for value in encoded.values():
        assert isinstance(value, (int, float, str, list)) and not isinstance(value, bool)
        if isinstance(value, list):
            assert all(type(v) in (int, float) for v in value)
    record = serde.config_record_from_proto(serde.config_record_to_proto(ConfigRecord(encoded)))
    decoded = decode_history(dict(record), prefix="strategy.")
    assert decoded == CatchUp(base_round=1, through_round=5, entries=tuple(entries))
    assert [e.scalar for e in decoded.entries] == [0.1, -1e-300, 7.0]  # float64, nothing rounded


def test_decode_history_names_a_malformed_field() -> None:
    good = encode_history([HistoryEntry(1, 3, 0.5), HistoryEntry(2, 4, 0.25)], base_round=0)
    with pytest.raises(ValueError, match="lengths 2, 2, 1"):
        decode_history({**good, "zo.scalars": [0.5]})
    with pytest.raises(ValueError, match="NaN or infinite"):
        decode_history({**good, "zo.scalars": [0.5, float("nan")]})
    with pytest.raises(ValueError, match=r"within \(0, 2\]"):
        decode_history({**good, "zo.rounds": [1, 3]})
    with pytest.raises(ValueError, match="zo.seeds is missing"):
        decode_history({k: v for k, v in good.items() if k != "zo.seeds"})
    with pytest.raises(ValueError, match="only int values"):
        decode_history({**good, "zo.seeds": [3, 4.5]})


def test_apply_catch_up_skips_what_the_client_has_and_refuses_a_gap() -> None:
    params, _ = linear_problem()
    start = clone(params)
    catch_up = CatchUp(base_round=0, through_round=3, entries=(
        HistoryEntry(1, 11, 0.5), HistoryEntry(2, 12, -0.25), HistoryEntry(3, 13, 1.0)))
    assert apply_catch_up(params, catch_up, state_round=1, lr=0.1) == 3
    expected = clone(start)
    replay(expected, [(12, -0.25), (13, 1.0)], 0.1)
    assert raw_bytes(params) == raw_bytes(expected)
    assert apply_catch_up(params, catch_up, state_round=3, lr=0.1) == 3  # sent twice: harmless
    assert raw_bytes(params) == raw_bytes(expected)
    with pytest.raises(ValueError, match="starts at round 2 but this client's state is round 1"):
        apply_catch_up(params, CatchUp(2, 3, (HistoryEntry(3, 13, 1.0),)), state_round=1, lr=0.1)


def test_encode_steps_round_trips_through_a_metric_record() -> None:
    history = [(seed_pool(0, 2)[1], 0.125), (5, -3.5)]
    record = MetricRecord(encode_steps(history, state_round=4, skipped=2))
    decoded = decode_steps(dict(serde.metric_record_from_proto(serde.metric_record_to_proto(record))))
    assert decoded == (history, 4, 2)
    # The current server glue turns metric values into floats; an integral float is accepted.
    assert decode_steps({**encode_steps(history, state_round=4), "zo.state_round": 4.0})[1] == 4
    with pytest.raises(ValueError, match="zo.state_round=4.5 must be an integer"):
        decode_steps({**encode_steps(history, state_round=4), "zo.state_round": 4.5})


def test_round_plan_round_trips_and_checks_the_fingerprint() -> None:
    plan = RoundPlan(run_seed=3, k=8, eps=5e-4, lr=1e-3, steps=20, fingerprint=direction_fingerprint(),
                     importance=bytes(range(0, 256, 32)), catch_up=CatchUp(0, 1, (HistoryEntry(1, 5, 0.5),)))
    record = ConfigRecord(encode_round_config(plan, prefix="strategy."))
    decoded = decode_round_config(dict(serde.config_record_from_proto(serde.config_record_to_proto(record))),
                                  prefix="strategy.")
    assert decoded == plan
    decoded.check_fingerprint()
    with pytest.raises(RuntimeError, match="install the server's fedtune version"):
        RoundPlan(**{**plan.__dict__, "fingerprint": "0" * 64}).check_fingerprint()
