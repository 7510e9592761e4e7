"""FedKSeed and FedKSeed-Pro next to FedIT on SST-2, under the same rounds.

    python bench/fedkseed.py [--rounds 3] [--zo-steps 100] [--tune full|adapter] [key=value ...]

Same model (all-MiniLM-L6-v2 with a LoRA adapter and head), data (SST-2 from
../shared/data, 4 IID clients, 4,000 training sentences), rounds and seed. FedKSeed tunes
every weight of the model (``--tune full``, the paper's setting) or the adapter and head
(``--tune adapter``) by zeroth-order steps (`simulations/fedkseed_sst2.yaml`); FedIT trains
the adapter by AdamW. Prints accuracy at round 0 and after the last round, and the bytes each client sends
and receives per round. Replay speed is measured by bench/zo_replay.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_strategies import SHARED, print_table, run_all

RUNS = [
    ("fedit", "simulations/fedit_sst2.yaml", []),
    ("fedkseed", "simulations/fedkseed_sst2.yaml", []),
    ("fedkseed-pro", "simulations/fedkseed_pro_sst2.yaml", []),
]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--zo-steps", type=int, default=100, help="zeroth-order steps per client and round (τ)")
    parser.add_argument("--tune", choices=["full", "adapter"], default="full", help="what FedKSeed tunes")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if not (SHARED.parent / "sst2").is_dir():
        print(f"skipped: {SHARED.parent / 'sst2'} is absent (see ../shared/data/SOURCES.md)")
        return 0
    zeroth_order = [f"strategy.options.steps={args.zo_steps}", f"strategy.options.tune={args.tune}"]
    runs = [(label, config, extra + (zeroth_order if "fedkseed" in label else [])) for label, config, extra in RUNS]
    results = run_all(runs, [f"federation.num_rounds={args.rounds}", "data.max_test_examples=500", *args.overrides])
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
