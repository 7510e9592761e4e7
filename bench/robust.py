"""Attacks and defences: FedIT on AG News with hostile clients, under plain averaging and each robust rule.

    python bench/robust.py [--attacks none sign-flip-2 scale-2 ...] [--defences mean median ...]
                           [--rounds 10] [--quick] [--fresh] [--no-plot]

The schedule is bench/convergence.py's AG News one (all-MiniLM-L6-v2, rank-8 LoRA, 10 clients
split by Dirichlet(α = 0.5) over labels, every client every round, 4 local steps of 16, learning
rate 5e-3, 2,000 training and 300 test examples), with ``attack.*`` making some clients hostile
(:mod:`fedtune.client.attacks`; simulation only). Attack rows (``ATTACKS``), ``KIND-N`` with N attackers:

* ``none``: every client honest;
* ``sign-flip-N``: the attackers send −Δ (their update reversed), ``sign-flip4-N`` −4·Δ;
* ``scale-N``: 10·Δ;
* ``noise-N``: Gaussian noise of standard deviation 0.1 in place of Δ;
* ``label-flip-N``: they train on labels y → 3 − y.

The attackers are the first N partitions of a fixed seeded draw (``ATTACKER_ORDER``), the same for
every row; the table gives the share of the training examples they hold (examples weight the mean).
Defences (``strategy.robust.rule``): ``mean`` (plain FedAvg), ``median``, ``trimmed-mean`` (trim
0.3: 3 of 10 clients cut at each end), ``multi-krum`` (f = 3, the 7 best averaged), and ``krum``.

Each row is one ``fedtune simulate`` run; finished rows go into ``bench/results/robust.json`` at
once and a rerun skips them (``--fresh`` starts over). Prints final and best accuracy per row and
the loss against the attack-free run under the same defence and under plain averaging.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from convergence import SHARED, Setting, load, load_results, save_results

RESULTS = ROOT / "bench" / "results"
CLIENTS = 10
ATTACKER_ORDER = random.Random(0).sample(range(CLIENTS), CLIENTS)
KINDS = {"sign-flip": ["attack.kind=sign-flip"], "sign-flip4": ["attack.kind=sign-flip", "attack.scale=4"],
         "scale": ["attack.kind=scale"], "noise": ["attack.kind=noise", "attack.noise_std=0.1"],
         "label-flip": ["attack.kind=label-flip"]}
ATTACKS = ["none", *(f"{kind}-{n}" for n in (2, 3) for kind in KINDS)]
DEFENCES = {"mean": [], "median": ["strategy.robust.rule=median"],
            "trimmed-mean": ["strategy.robust.rule=trimmed-mean", "strategy.robust.trim=0.3"],
            "multi-krum": ["strategy.robust.rule=multi-krum", "strategy.robust.byzantine=3"],
            "krum": ["strategy.robust.rule=krum", "strategy.robust.byzantine=3"]}


def attackers(attack: str) -> list[int]:
    return [] if attack == "none" else sorted(ATTACKER_ORDER[:int(attack.rsplit("-", 1)[1])])


def attack_overrides(attack: str) -> list[str]:
    if attack == "none":
        return []
    kind = attack.rsplit("-", 1)[0]
    return [*KINDS[kind], f"attack.clients=[{','.join(map(str, attackers(attack)))}]"]


def example_shares(setting: Setting) -> list[float]:
    """Each partition's share of the training examples (what weights the mean)."""
    from fedtune.data import load_splits, partition_dataset

    cfg, _ = load("agnews", setting, [], Path(tempfile.gettempdir()) / "robust-shares")
    pool, _ = load_splits(cfg.data, cfg.model.task)
    sizes = [len(p) for p in partition_dataset(pool, cfg.partition, cfg.federation.num_clients)]
    return [s / sum(sizes) for s in sizes]


def run_row(attack: str, defence: str, setting: Setting, tmp: Path) -> dict:
    from fedtune.flower.simulation import simulate

    extra = [*attack_overrides(attack), *DEFENCES[defence]]
    cfg, overrides = load("agnews", setting, extra, tmp / f"{attack}-{defence}")
    run_dir = simulate(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [{"round": r["round"], "accuracy": r["eval_accuracy"], "loss": r.get("eval_loss"),
              "kept": r.get("robust_clients_kept"), "deviation": r.get("robust_factor_deviation"),
              "seconds": r["round_seconds"]} for r in rows]
    return {"overrides": overrides, "curve": curve}


def print_table(results: dict, shares: list[float] | None) -> None:
    rows = results["rows"]
    free = {d: rows.get(f"none/{d}") for d in DEFENCES}
    defences = [d for d in DEFENCES if any(k.endswith(f"/{d}") for k in rows)]
    print("\nfinal accuracy after the last round (best in brackets); Δ: against the attack-free run, same defence")
    head = f"{'attack':<16}{'share':>7}" + "".join(f"{d:>22}" for d in defences)
    print(head)
    print("-" * len(head))
    for attack in ATTACKS:
        cells = []
        for d in defences:
            row = rows.get(f"{attack}/{d}")
            if row is None:
                cells.append(f"{'-':>22}")
                continue
            accs = [p["accuracy"] for p in row["curve"]]
            base = free[d]["curve"][-1]["accuracy"] if free.get(d) else None
            delta = "" if base is None or attack == "none" else f" Δ{100 * (accs[-1] - base):+.1f}"
            cells.append(f"{accs[-1]:.3f} ({max(accs[1:]):.3f}){delta:>7}".rjust(22))
        if all(c.strip() == "-" for c in cells):
            continue
        share = sum(shares[i] for i in attackers(attack)) if shares else None
        print(f"{attack:<16}{'-' if share is None else f'{share:.2f}':>7}" + "".join(cells))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = [a for a in ATTACKS if any(k.startswith(f"{a}/") for k in results["rows"])]
    fig, axes = plt.subplots(1, len(attacks), figsize=(3.2 * len(attacks), 3.2), sharey=True, squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        for d in DEFENCES:
            row = results["rows"].get(f"{attack}/{d}")
            if row:
                ax.plot([p["round"] for p in row["curve"]], [p["accuracy"] for p in row["curve"]], label=d)
        ax.set_title(attack)
        ax.set_xlabel("round")
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle("FedIT on AG News, 10 clients: attacks and defences")
    fig.tight_layout()
    fig.savefig(path, format="png")
    print(f"wrote {path}")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=["none", "sign-flip4-2", "scale-2"])
    parser.add_argument("--defences", nargs="+", choices=list(DEFENCES), default=list(DEFENCES))
    parser.add_argument("--rounds", type=int, default=None, help="default 10 (quick 2)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 rounds on a small subset")
    parser.add_argument("--fresh", action="store_true", help="discard finished rows and start over")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 10)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not (SHARED / "agnews").is_dir():
        print(f"skipped: {SHARED / 'agnews'} absent (see ../shared/data/SOURCES.md)")
        return 0
    sys.path.insert(0, str(ROOT))
    from fedtune.reporting.quiet import quiet_libraries

    quiet_libraries()
    if args.quick:
        setting = Setting(rounds=args.rounds, clients=CLIENTS, local_steps=2, batch_size=8, learning_rate=5e-3,
                          max_examples=400, max_test_examples=100, max_length=48)
    else:
        setting = Setting(rounds=args.rounds, clients=CLIENTS, local_steps=4, batch_size=16, learning_rate=5e-3,
                          max_examples=2000, max_test_examples=300, max_length=48)
    path = RESULTS / ("robust_quick.json" if args.quick else "robust.json")
    results = load_results(path, args.fresh)
    with tempfile.TemporaryDirectory() as tmp:
        for attack in args.attacks:
            for defence in args.defences:
                key = f"{attack}/{defence}"
                done = results["rows"].get(key)
                if done and done["setting"] == asdict(setting):
                    print(f"== {key}: done before, skipped")
                    continue
                print(f"== {key}: {setting.rounds} rounds, attackers {attackers(attack)}", flush=True)
                start = time.perf_counter()
                row = run_row(attack, defence, setting, Path(tmp))
                results["rows"][key] = {**row, "attack": attack, "defence": defence, "attackers": attackers(attack),
                                        "setting": asdict(setting),
                                        "wall_seconds": round(time.perf_counter() - start, 1),
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                save_results(path, results)
                print(f"== {key}: final accuracy {row['curve'][-1]['accuracy']:.3f}, "
                      f"{results['rows'][key]['wall_seconds']:.0f} s", flush=True)
    print_table(results, example_shares(setting))
    if not args.no_plot:
        plot(results, path.with_name(f"{path.stem}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
