"""Time LoRA-FAIR's server correction: the former dense m×n version against the r-space one.

    python bench/lora_fair.py                       # MiniLM shapes, then one 4096×4096 module
    python bench/lora_fair.py --skip-large --threads 4

Two settings on synthetic client factors (B_k ~ 0.01·N(0, 1), A_k ~ N(0, 1/n), weights
drawn at random): all-MiniLM-L6-v2's 12 adapted 384×384 matrices (q and v of 6 layers) at
rank 8 with 4 clients, and a single 4096×4096 module at rank 16 with 10 clients (a 7B
model's projection; the dense version's cost is per module, so one is timed). Each version
does what one round needs per module: the dense one forms ΔW = Σ p_k·B_k·A_k (m×n, float64)
and runs Adam on the m×n cosine, as the strategy did before; the r-space one projects ΔW
onto Ā from the factors (:class:`fedtune.strategies.lora_fair.IdealProjection`) and runs the
same Adam on m×r matrices. Both take the default 50 steps, lr 0.05, λ 0.01. Printed: seconds
for each, their ratio and the largest relative difference ‖ΔB_r − ΔB_dense‖_F / ‖ΔB_dense‖_F
over the modules.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for tests/ (and fedtune uninstalled)

from fedtune.strategies.lora_fair import IdealProjection, residual_correction

from tests.strategies.dense_reference import dense_residual_correction

LAM, STEPS, LR = 0.01, 50, 0.05


def module_factors(m: int, n: int, rank: int, clients: int, gen: torch.Generator):
    """Terms (p_k, B_k, A_k) in float64 and the averages B̄, Ā."""
    weights = torch.rand(clients, generator=gen, dtype=torch.float64) + 0.5
    probs = (weights / weights.sum()).tolist()
    terms = [(p, 0.01 * torch.randn(m, rank, generator=gen, dtype=torch.float64),
              torch.randn(rank, n, generator=gen, dtype=torch.float64) / n ** 0.5) for p in probs]
    return terms, sum(p * b for p, b, _ in terms), sum(p * a for p, _, a in terms)


def dense_round(modules) -> list[torch.Tensor]:
    out = []
    for terms, b_avg, a_avg in modules:
        ideal = sum(p * (b @ a) for p, b, a in terms)
        out.append(dense_residual_correction(ideal, b_avg, a_avg, lam=LAM, steps=STEPS, lr=LR))
    return out


def factored_round(modules) -> list[torch.Tensor]:
    return [residual_correction(IdealProjection.of(terms, b_avg, a_avg), lam=LAM, steps=STEPS, lr=LR)
            for terms, b_avg, a_avg in modules]


def timed(run, modules) -> tuple[float, list[torch.Tensor]]:
    start = time.perf_counter()
    deltas = run(modules)
    return time.perf_counter() - start, deltas


def compare(label: str, count: int, m: int, n: int, rank: int, clients: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    modules = [module_factors(m, n, rank, clients, gen) for _ in range(count)]
    dense_s, dense = timed(dense_round, modules)
    factored_s, factored = timed(factored_round, modules)
    diff = max(float((f - d).norm() / d.norm()) for f, d in zip(factored, dense))
    print(f"{label:<34} {dense_s:>9.3f} {factored_s:>10.4f} {dense_s / factored_s:>8.0f}x {diff:>12.1e}", flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-large", action="store_true", help="leave out the 4096×4096 module")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: figures that do not depend on what else the machine runs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {STEPS} Adam steps per module")
    print(f"{'setting':<34} {'dense s':>9} {'r-space s':>10} {'ratio':>9} {'max rel ΔB':>12}")
    compare("12 × 384×384, r 8, 4 clients", 12, 384, 384, 8, 4, args.seed)
    if not args.skip_large:
        compare("1 × 4096×4096, r 16, 10 clients", 1, 4096, 4096, 16, 10, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
