"""The noise σ each accountant needs for a target ε at the private Fed-SB settings: RDP against PLD.

    python bench/dp_accountants.py [--config simulations/fed_sb_private_agnews.yaml] [--examples N]
                                   [--epsilons 1 2 8] [key=value ...]

Calibrates σ the way a client does (:func:`fedtune.client.ledger.client_ledger`: every round's
local steps at q = batch_size / examples, plus Fed-SB's one full-batch initialisation step)
for each target ε, once with ``privacy.accountant=rdp`` and once with ``pld``, and prints
both σ, their ratio, and the ε that PLD certifies for the σ RDP asks for. ``examples`` is a
client's training split; by default the mean one of the config (rows of ``data.source`` /
clients, less the eval fraction). Accounting only: no model, no training; a few seconds.
(Not named ``dp_accounting.py``: as a script it would shadow the library it measures.)
"""

from __future__ import annotations

import argparse
import sys
import time

import pandas as pd
from fedtune.strategies.fed_sb.routine import LoraSBRoutine

from fedtune.client.ledger import client_ledger
from fedtune.client.training import steps_per_round
from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.privacy import epsilon_for


def mean_client_examples(cfg) -> int:
    """Training examples of the mean client: rows of the data source split over clients, less eval."""
    rows = len(pd.read_csv(cfg.data.source, header=None if cfg.data.column_names else "infer"))
    return int(rows / cfg.federation.num_clients * (1 - cfg.data.eval_fraction))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="simulations/fed_sb_private_agnews.yaml")
    parser.add_argument("--examples", type=int, help="a client's training examples (default: the mean client)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 8.0])
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    n = args.examples or mean_client_examples(cfg)
    full_batch = LoraSBRoutine.full_batch_steps if cfg.strategy.name == "fed-sb" else 0
    # As client_ledger counts them: every round's local steps, at q = batch / examples.
    q, delta = min(1.0, cfg.train.batch_size / n), cfg.privacy.delta
    per_round = steps_per_round(cfg.train, n)
    steps = cfg.federation.num_rounds * per_round
    print(f"{args.config}: {n} examples per client, q = {cfg.train.batch_size}/{n} = {q:.4f}, "
          f"{cfg.federation.num_rounds} rounds x {per_round} local steps = {steps} steps "
          f"+ {full_batch} full-batch step, delta = {delta:g}")
    print(f"{'target eps':>10}  {'sigma RDP':>9}  {'sigma PLD':>9}  {'PLD/RDP':>7}  {'PLD eps at RDP sigma':>20}")
    start = time.perf_counter()
    for target in args.epsilons:
        sigma = {}
        for accountant in ("rdp", "pld"):
            run = load_config(args.config, [*args.overrides, "privacy.noise_multiplier=null",
                                             f"privacy.target_epsilon={target}", f"privacy.accountant={accountant}"])
            sigma[accountant] = client_ledger(run, {}, n, full_batch_steps=full_batch).noise_multiplier
        pld_at_rdp = epsilon_for(sigma["rdp"], q, steps, delta, full_batch_steps=full_batch, accountant="pld")
        print(f"{target:>10g}  {sigma['rdp']:>9.4f}  {sigma['pld']:>9.4f}  {sigma['pld'] / sigma['rdp']:>7.3f}  "
              f"{pld_at_rdp:>20.3f}")
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
