"""Client-level differential privacy (DP-FedAvg): accuracy at ε = 8, 4, 1 against non-private FedIT.

    python bench/client_dp.py [--rows non-private clip-only eps-8 eps-4 eps-1] [--clients 1000]
                              [--sampled 50] [--rounds 20] [--clip 1.0] [--fresh]

One ``fedtune simulate`` run per row on AG News with all-MiniLM-L6-v2 (rank-8 LoRA on query and
value, FedIT): the 5,000 training articles split IID over ``--clients`` clients (5 each at 1,000),
``--sampled`` drawn a round, 2 local steps of 4 at learning rate 5e-3, 300 test articles scored
every round. The guarantee is per client (its whole dataset), at δ = 1 / number of clients.

Rows:

* ``non-private``: plain FedIT (examples weight the mean, no clipping, no noise);
* ``clip-only``: DP-FedAvg's estimator with no noise (every update clipped to ``--clip``, the sum
  divided by the fixed m): what clipping alone costs;
* ``eps-E``: ``privacy.level=client``, ``privacy.target_epsilon=E``: the noise multiplier z is the
  smallest that keeps ``--rounds`` rounds, each a Poisson-subsampled Gaussian mechanism with
  q = sampled / clients, within ε = E (``dp_accounting``, PLD).

The noise on the mean has standard deviation z·S/m per coordinate, so accuracy at a given ε
depends on m (the clients a round) far more than on anything else: the table states the
federation it assumes. Finished rows go into ``bench/results/client_dp.json`` at once and a
rerun skips them (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results" / "client_dp.json"
ROWS = ["non-private", "clip-only", "eps-8", "eps-4", "eps-1"]


def row_overrides(row: str, clip: float) -> list[str]:
    if row == "non-private":
        return []
    dp = ["privacy.enabled=true", "privacy.level=client", f"privacy.clip_norm={clip}"]
    if row == "clip-only":
        return [*dp, "privacy.noise_multiplier=0"]
    return [*dp, f"privacy.target_epsilon={float(row.removeprefix('eps-'))}"]


def run_row(row: str, args: argparse.Namespace, tmp: Path) -> dict:
    from fedtune.averaging.client_dp import client_dp_of
    from fedtune.config import load_config
    from fedtune.flower.simulation import simulate

    run_dir = tmp / row
    cfg = load_config(ROOT / "simulations/fedit_agnews.yaml", [
        f"federation.num_clients={args.clients}", f"federation.fraction_train={args.sampled / args.clients}",
        f"federation.min_train_clients={args.sampled}", "federation.fraction_evaluate=0",
        f"federation.num_rounds={args.rounds}", "federation.client_cpus=2", "train.threads=1",
        "train.local_steps=2", "train.batch_size=4", "train.learning_rate=5e-3", "data.max_examples=5000",
        "data.max_test_examples=300", "data.max_length=48", "data.eval_fraction=0", "partition.method=iid",
        f"privacy.delta={1 / args.clients}", f"output.dir={run_dir}", "output.progress=false",
        "output.save_adapter=false", "output.plots=false", *row_overrides(row, args.clip)])
    start = time.perf_counter()
    simulate(cfg)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [r.get("eval_accuracy") for r in records]
    last = records[-1]
    dp = client_dp_of(cfg)
    return {"row": row, "accuracy": curve[-1], "best": max(a for a in curve if a is not None), "curve": curve,
            "epsilon": last.get("dp_client_epsilon"), "clipped_last_round": last.get("dp_clients_clipped"),
            "noise_multiplier": dp.noise_multiplier if dp else None, "seconds": round(time.perf_counter() - start)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=ROWS, help=f"any of {ROWS} or eps-E")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--sampled", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clip", type=float, default=1.0, help="S, privacy.clip_norm")
    parser.add_argument("--fresh", action="store_true", help="discard finished rows and start over")
    args = parser.parse_args(argv)
    if not (SHARED / "agnews").is_dir():
        print(f"skipped: {SHARED / 'agnews'} absent (see ../shared/data/SOURCES.md)")
        return 0
    sys.path.insert(0, str(ROOT))
    from fedtune.reporting.quiet import quiet_libraries

    quiet_libraries()
    setting = {"clients": args.clients, "sampled": args.sampled, "rounds": args.rounds, "clip": args.clip}
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() and not args.fresh else {}
    rows = saved.get("rows", {}) if saved.get("setting") == setting else {}
    for row in args.rows:
        if row in rows:
            print(f"== {row}: done earlier, skipped")
            continue
        print(f"== {row}: {args.clients} clients, {args.sampled} a round, {args.rounds} rounds", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            rows[row] = run_row(row, args, Path(tmp))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"setting": setting, "rows": rows}, indent=1) + "\n")
    print(f"\n{args.clients} clients, {args.sampled} a round, {args.rounds} rounds, S = {args.clip}, "
          f"δ = 1/{args.clients}")
    print(f"{'row':<13}{'final acc':>10}{'best':>7}{'epsilon':>9}{'z':>7}{'clipped':>9}{'seconds':>9}")
    for name in sorted(rows, key=lambda r: ROWS.index(r) if r in ROWS else len(ROWS)):
        r = rows[name]
        eps = f"{r['epsilon']:.2f}" if r.get("epsilon") is not None else "-"
        z = f"{r['noise_multiplier']:.3f}" if r.get("noise_multiplier") is not None else "-"
        clipped = f"{r['clipped_last_round']:.0f}" if r.get("clipped_last_round") is not None else "-"
        print(f"{name:<13}{r['accuracy']:>10.3f}{r['best']:>7.3f}{eps:>9}{z:>7}{clipped:>9}{r['seconds']:>9}")
    print(f"saved to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
