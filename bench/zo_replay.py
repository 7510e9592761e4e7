"""Time FedKSeed replay with the version 1 directions (the old generator) against today's.

    .venv/bin/python bench/zo_replay.py                       # 2M float32 parameters, 200 steps, 1 and 2 threads
    .venv/bin/python bench/zo_replay.py --params 22700000 --tensors 100 --threads 2

Both replays apply the same history (one direction per step, ``w <- w - lr * g * z(s)``) to
the same start; "old" regenerates each direction as version 1 did (NumPy's sequential
float32 ziggurat, ``Generator(PCG64).standard_normal``, then torch's ``mul_``/``add_``), kept
here only as the reference to time. The script then checks that today's replay gives the
same bits in a second, independent run and with another thread count, and prints
``bitwise equal: True`` when it does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fedtune.strategies.fedkseed import zeroth_order
from fedtune.strategies.fedkseed.zeroth_order import replay, seed_pool

Params = dict[str, torch.Tensor]
History = list[tuple[int, float]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=2_000_000, help="float32 parameters in all (default 2M)")
    parser.add_argument("--tensors", type=int, default=4, help="split over this many named tensors")
    parser.add_argument("--steps", type=int, default=200, help="history length, (seed, scalar) pairs (default 200, "
                                                                "a FedKSeed round's aggregated steps)")
    parser.add_argument("--k", type=int, default=4096, help="seed pool size the history draws from")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="time each replay this many times, report the median")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts to time both replays with (today's replay draws its "
                             "directions on torch.get_num_threads() threads)")
    return parser.parse_args()


def synthetic(args: argparse.Namespace) -> tuple[Params, History]:
    generator = torch.Generator().manual_seed(args.seed)
    size = args.params // args.tensors
    params = {f"layer.{i}.weight": torch.randn(size, generator=generator) for i in range(args.tensors)}
    pool = seed_pool(args.seed, args.k)
    rng = np.random.default_rng(args.seed)
    history = [(pool[int(i)], float(g)) for i, g in zip(rng.integers(0, args.k, args.steps),
                                                        rng.normal(0.0, 1.0, args.steps))]
    return params, history


def _legacy_direction(seed: int, name: str, size: int) -> torch.Tensor:
    """Version 1's direction of one tensor: NumPy's float32 ziggurat on a PCG64 stream."""
    entropy = [zeroth_order._DIRECTION_DOMAIN, seed, zeroth_order._name_key(name)]
    generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
    return torch.from_numpy(generator.standard_normal(size, dtype=np.float32))


def _legacy_replay(params: Params, history: History, lr: float) -> None:
    """Version 1's sequential replay: the whole direction, then ``z * c`` and ``w + step`` in torch."""
    with torch.no_grad():
        for seed, scalar in history:
            coefficient = float(np.float32(-lr * scalar))
            z = {name: _legacy_direction(seed, name, p.numel()) for name, p in sorted(params.items())}
            for name, param in params.items():
                param.add_(z[name].reshape(param.shape).mul_(coefficient))


def timed(replay_fn: Callable[[Params, History, float], None], start: Params, history: History,
          lr: float, repeat: int = 1) -> tuple[float, Params]:
    """Median seconds of ``repeat`` replays from ``start``, and the last replay's result."""
    seconds = []
    for _ in range(repeat):
        params = {k: v.clone() for k, v in start.items()}
        began = time.perf_counter()
        replay_fn(params, history, lr)
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds), params


def same_bits(a: Params, b: Params) -> bool:
    return all(a[k].numpy().tobytes() == b[k].numpy().tobytes() for k in a)


def main() -> None:
    args = parse_args()
    start, history = synthetic(args)
    print(f"parameters {args.params:,} float32 in {args.tensors} tensors; history {args.steps:,} steps "
          f"over a pool of {args.k:,} ({len({s for s, _ in history}):,} distinct seeds)")
    print(f"{'threads':>8}{'old s':>10}{'new s':>10}{'old ms/step':>13}{'new ms/step':>13}{'speed-up':>10}")
    replay({"warm_up": torch.zeros(4)}, history[:1], args.lr)  # numba compiles (or loads) its kernels once
    results: list[Params] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        seconds_old, _ = timed(_legacy_replay, start, history, args.lr, args.repeat)
        seconds_new, result = timed(replay, start, history, args.lr, args.repeat)
        results.append(result)
        print(f"{threads:>8}{seconds_old:>10.2f}{seconds_new:>10.2f}{seconds_old / args.steps * 1e3:>13.1f}"
              f"{seconds_new / args.steps * 1e3:>13.1f}{seconds_old / seconds_new:>9.2f}x")
    _, again = timed(replay, start, history, args.lr)  # a second, independent run
    changed = max((results[0][k] - start[k]).abs().max().item() for k in start)
    print(f"largest change from the start {changed:.3g} (the replay did something)")
    print(f"bitwise equal: {all(same_bits(results[0], r) for r in [*results[1:], again])} "
          f"(today's replay, across thread counts {args.threads} and a second run)")


if __name__ == "__main__":
    main()
