"""Fed-SB next to FedIT on AG News, plus private Fed-SB at two privacy budgets.

    python bench/fed_sb.py [--train-rounds 4] [--local-steps 10] [key=value ...]

Same model (all-MiniLM-L6-v2), data (AG News from ../shared/data, 8 clients, Dirichlet
α = 0.5), local steps, training rounds and seed. Fed-SB spends two more rounds first on
its federated initialisation (sketches of the clients' first-update estimates); the table
reports training rounds only for bytes and both for the final accuracy. Per adapted m×n
matrix FedIT sends A and B, r_FedIT·(m + n) numbers, and Fed-SB sends R, r_SB² numbers: here
8·768 / 32² = 6 (the issue's 2·r·(m + n) counts both directions); both also send the task head.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_strategies import SHARED, print_table, run_all

INIT_ROUNDS = 2


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-rounds", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--only", nargs="+", metavar="LABEL",
                        help="run only these rows (e.g. --only 'fed-sb dp e=8'); the baseline always runs")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} is absent (see ../shared/data/SOURCES.md)")
        return 0
    sb_rounds = f"federation.num_rounds={args.train_rounds + INIT_ROUNDS}"
    runs = [
        ("fedit r=8", "simulations/fedit_agnews.yaml", [f"federation.num_rounds={args.train_rounds}"]),
        ("fed-sb r=32", "simulations/fed_sb_agnews.yaml", [sb_rounds]),
        ("fed-sb dp e=8", "simulations/fed_sb_private_agnews.yaml", [sb_rounds, "privacy.target_epsilon=8"]),
        ("fed-sb dp e=2", "simulations/fed_sb_private_agnews.yaml", [sb_rounds, "privacy.target_epsilon=2"]),
    ]
    if args.only:
        runs = [r for r in runs if r[0] in {"fedit r=8", *args.only}]
    # Sized for 2 CPU cores: short sequences, central evaluation only.
    common = [f"train.local_steps={args.local_steps}", "train.batch_size=8", "data.max_length=64",
              "data.max_test_examples=500", "federation.fraction_evaluate=0", *args.overrides]
    results = run_all(runs, common, skip_rounds={label: INIT_ROUNDS for label, _, _ in runs[1:]})
    print()
    print_table(results, baseline="fedit r=8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
