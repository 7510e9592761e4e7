"""Time sequential ``replay`` against ``replay_grouped`` on one synthetic FedKSeed history.

    .venv/bin/python bench/zo_replay.py                       # 2M float32 parameters, 2,000 steps, K=512
    .venv/bin/python bench/zo_replay.py --steps 4000 --k 4096

Sequential replay generates one direction per history entry; grouped replay generates one per
distinct seed, so the ratio approaches steps / distinct seeds when generation dominates. The
script also prints the largest difference between the two results (float32 rounding only).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fedtune.strategies.fedkseed.zeroth_order import direction, group_history, replay, replay_grouped, seed_pool  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=int, default=2_000_000, help="float32 parameters in all (default 2M)")
    parser.add_argument("--tensors", type=int, default=4, help="split over this many named tensors")
    parser.add_argument("--steps", type=int, default=2000, help="history length (seed, scalar) pairs")
    parser.add_argument("--k", type=int, default=512, help="seed pool size the history draws from")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the update is memory-bound, and idle OpenMP workers "
                             "spinning between updates slow NumPy's single-threaded generation on a busy machine)")
    return parser.parse_args()


def synthetic(args: argparse.Namespace) -> tuple[dict[str, torch.Tensor], list[tuple[int, float]]]:
    generator = torch.Generator().manual_seed(args.seed)
    size = args.params // args.tensors
    params = {f"layer.{i}.weight": torch.randn(size, generator=generator) for i in range(args.tensors)}
    pool = seed_pool(args.seed, args.k)
    rng = np.random.default_rng(args.seed)
    history = [(pool[int(i)], float(g)) for i, g in zip(rng.integers(0, args.k, args.steps),
                                                        rng.normal(0.0, 1.0, args.steps))]
    return params, history


def float64_reference(params: dict[str, torch.Tensor], history: list[tuple[int, float]],
                      lr: float) -> dict[str, torch.Tensor]:
    """w - lr * Σ g z in float64 (the same float32 directions): the exact result to compare with."""
    reference = {k: v.double() for k, v in params.items()}
    shapes = {name: tuple(t.shape) for name, t in params.items()}
    for seed, scalar in group_history(history):
        z = direction(seed, shapes)
        for name in reference:
            reference[name] -= lr * scalar * z[name].double()
    return reference


def max_error(result: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    return max((result[k].double() - reference[k]).abs().max().item() for k in reference)


def timed(fn, *fn_args) -> float:
    start = time.perf_counter()
    fn(*fn_args)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    params, history = synthetic(args)
    distinct = len({seed for seed, _ in history})
    shapes = {name: tuple(t.shape) for name, t in params.items()}
    one_direction = min(timed(direction, history[0][0], shapes) for _ in range(3))
    sequential = {k: v.clone() for k, v in params.items()}
    grouped = {k: v.clone() for k, v in params.items()}
    seconds_sequential = timed(replay, sequential, history, args.lr)
    seconds_grouped = timed(replay_grouped, grouped, history, args.lr)
    difference = max((sequential[k] - grouped[k]).abs().max().item() for k in params)
    reference = float64_reference(params, history, args.lr)
    largest_change = max((reference[k] - params[k].double()).abs().max().item() for k in params)
    print(f"parameters {args.params:,} float32 in {args.tensors} tensors; history {args.steps:,} steps "
          f"over a pool of {args.k:,}: {distinct:,} distinct seeds; torch threads {torch.get_num_threads()}")
    print(f"one direction: {one_direction * 1e3:.1f} ms")
    print(f"{'':>16}{'seconds':>10}{'directions':>12}{'ms/step':>10}{'max error vs fp64':>20}")
    for name, seconds, count, result in (("replay", seconds_sequential, args.steps, sequential),
                                         ("replay_grouped", seconds_grouped, distinct, grouped)):
        print(f"{name:>16}{seconds:>10.2f}{count:>12,}{seconds / args.steps * 1e3:>10.2f}"
              f"{max_error(result, reference):>20.3g}")
    print(f"speed-up {seconds_sequential / seconds_grouped:.2f}x (directions ratio {args.steps / distinct:.2f}x); "
          f"max |sequential - grouped| = {difference:.3g}; largest exact change from the start {largest_change:.3g}")


if __name__ == "__main__":
    main()
