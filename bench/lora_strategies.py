"""Compare FedIT, FFA-LoRA, FLoRA and LoRA-FAIR on AG News under the same schedule.

    python bench/lora_strategies.py [--rounds 5] [--local-steps 20] [key=value ...]

Every strategy runs with the same model (all-MiniLM-L6-v2), data (AG News from
../shared/data, 8 clients, Dirichlet α = 0.5), rounds, local steps and seed, one after the
other in this process, and the table is printed side by side at the end. Extra key=value
pairs override every run. Figures come from each run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "agnews"
RUNS = [
    ("fedit", "simulations/fedit_agnews.yaml", []),
    ("ffa-lora", "simulations/ffa_lora_agnews.yaml", []),
    ("flora", "simulations/flora_agnews.yaml", []),
    ("flora 4/8/16", "simulations/flora_mixed_ranks.yaml", []),
    ("lora-fair", "simulations/lora_fair_agnews.yaml", []),
]


def summarize(label: str, rows: list[dict], skip_rounds: int = 0) -> dict:
    """Accuracy before and after, and per-round means over the training rounds (after ``skip_rounds``)."""
    trained = [r for r in rows if r["round"] > skip_rounds]
    return {
        "strategy": label,
        "acc_round0": rows[0]["eval_accuracy"],
        "acc_final": trained[-1]["eval_accuracy"],
        "up_per_client": mean(r["bytes_up_per_client"] for r in trained),
        "down_per_client": mean(r["bytes_down_per_client"] for r in trained),
        "agg_error": mean(float("nan") if r.get("aggregation_error") is None else r["aggregation_error"]
                          for r in trained),
        "agg_ms": 1000 * mean(r["aggregation_seconds"] for r in trained),
        "round_s": mean(r["round_seconds"] for r in trained),
        "dp_epsilon": trained[-1].get("dp_epsilon_max"),
    }


def print_table(results: list[dict], baseline: str = "fedit") -> None:
    base_up = next(r["up_per_client"] for r in results if r["strategy"] == baseline)
    head = (f"{'strategy':<16}{'acc r0':>8}{'acc final':>10}{'up/client/round':>17}{'vs base':>9}"
            f"{'down/client/round':>19}{'agg error':>11}{'agg ms':>9}{'round s':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['strategy']:<16}{r['acc_round0']:>8.4f}{r['acc_final']:>10.4f}{r['up_per_client']:>17,.0f}"
              f"{r['up_per_client'] / base_up:>9.2f}{r['down_per_client']:>19,.0f}{r['agg_error']:>11.2e}"
              f"{r['agg_ms']:>9.1f}{r['round_s']:>9.1f}"
              + (f"   ε={r['dp_epsilon']:.2f}" if r.get("dp_epsilon") is not None else ""))


def run_all(runs: list[tuple[str, str, list[str]]], overrides: list[str],
            skip_rounds: dict[str, int] | None = None) -> list[dict]:
    """Simulate each (label, config, extra overrides) in turn and summarise its metrics."""
    sys.path.insert(0, str(ROOT))
    from fedtune.config import load_config
    from fedtune.flower.simulation import simulate
    from fedtune.reporting.quiet import quiet_libraries

    quiet_libraries()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, config, extra in runs:
            out = Path(tmp) / label.replace(" ", "_").replace("/", "-")
            run_overrides = [f"output.dir={out}", "output.progress=false", "output.save_adapter=false",
                             *overrides, *extra]
            print(f"== {label}: {config} {' '.join(run_overrides)}", flush=True)
            run_dir = simulate(load_config(ROOT / config, run_overrides))
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            results.append(summarize(label, rows, (skip_rounds or {}).get(label, 0)))
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--only", nargs="*", help="run only these labels")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (see ../shared/data/SOURCES.md)")
        return 0
    runs = [r for r in RUNS if not args.only or r[0] in args.only]
    # Sized for 2 CPU cores (~3 min a strategy): short sequences, central evaluation only.
    overrides = [f"federation.num_rounds={args.rounds}", f"train.local_steps={args.local_steps}",
                 "train.batch_size=8", "data.max_length=64", "data.max_test_examples=500",
                 "federation.fraction_evaluate=0", *args.overrides]
    results = run_all(runs, overrides)
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
