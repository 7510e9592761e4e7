"""A client's privacy ledger, kept in its own state across rounds (see :class:`fedtune.routine.ClientState`).

The ledger lives in the client's state as plain lists (what a Flower ``ConfigRecord``
holds), so it follows the client whichever process serves its next round.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

from fedtune.client.training import steps_per_round
from fedtune.privacy import PrivacyLedger, noise_multiplier_for
from fedtune.schema import FedtuneConfig

# Keys of the ledger in a client's state values.
LEDGER_SIGMAS, LEDGER_RATES, LEDGER_STEPS = "dp.sigmas", "dp.rates", "dp.steps"
LEDGER_SIGMA, LEDGER_RATE = "dp.noise_multiplier", "dp.sample_rate"


def save_ledger(ledger: PrivacyLedger, values: MutableMapping[str, Any]) -> None:
    """Write a ledger into a client's state values as plain lists."""
    values[LEDGER_SIGMA], values[LEDGER_RATE] = float(ledger.noise_multiplier), float(ledger.sample_rate)
    values[LEDGER_SIGMAS] = [float(s) for s, _, _ in ledger.history]
    values[LEDGER_RATES] = [float(q) for _, q, _ in ledger.history]
    values[LEDGER_STEPS] = [int(n) for _, _, n in ledger.history]


def load_ledger(values: Mapping[str, Any], delta: float, accountant: str) -> PrivacyLedger:
    """The ledger :func:`save_ledger` wrote (the accountant and δ come from the run's config)."""
    ledger = PrivacyLedger(float(values[LEDGER_SIGMA]), float(values[LEDGER_RATE]), delta, accountant)
    for sigma, rate, steps in zip(values[LEDGER_SIGMAS], values[LEDGER_RATES], values[LEDGER_STEPS]):
        ledger.step(int(steps), noise_multiplier=float(sigma), sample_rate=float(rate))
    return ledger


def client_ledger(cfg: FedtuneConfig, values: Mapping[str, Any], num_examples: int, *,
                  full_batch_steps: int = 0) -> PrivacyLedger:
    """This client's ledger, rebuilt from its state (σ for the target ε over the whole run).

    The first call fixes σ. ``full_batch_steps`` counts extra steps at sample rate 1 that
    the run spends besides the local rounds (Fed-SB's initialisation estimate); the
    calibration includes them.
    """
    if LEDGER_SIGMAS in values:
        return load_ledger(values, cfg.privacy.delta, cfg.privacy.accountant)
    p = cfg.privacy
    rate = min(1.0, cfg.train.batch_size / num_examples)
    sigma = p.noise_multiplier
    if sigma is None:
        # Every round's local steps, at most (rounds that train nothing spend less).
        steps = cfg.federation.num_rounds * steps_per_round(cfg.train, num_examples)
        sigma = noise_multiplier_for(p.target_epsilon, p.delta, rate, steps, full_batch_steps=full_batch_steps,
                                     accountant=p.accountant)
    return PrivacyLedger(sigma, rate, p.delta, p.accountant)
