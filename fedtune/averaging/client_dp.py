"""Client-level differential privacy: DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018).

Each round, with x_t the global tensors and Δ_k = x_k − x_t client k's update (every tensor the
strategy averages, as one vector), the server releases

    x_{t+1} = x_t + (Σ_k Δ_k · min(1, S/‖Δ_k‖) + N(0, z²S²I)) / m,

with S = ``privacy.clip_norm``, z = the noise multiplier and m the number of clients drawn a
round (the fixed denominator of the paper's estimator, every client weighted equally, so that
one client changes the sum by at most S). With ``privacy.noise_on: clients`` each client clips
its own update and adds N(0, z²S²I) to it before sending (:func:`noised_update`): every reply is
then private on its own, for a server that is not trusted, and the sum carries √m times the
noise. The server adds nothing then and divides by m.

Accounting: a round is a Poisson-subsampled Gaussian mechanism with sampling rate
q = m / ``federation.num_clients`` and noise multiplier z, composed over the rounds that
released an update, by the same ``dp_accounting`` ledger as DP-SGD
(:class:`fedtune.privacy.PrivacyLedger`). The guarantee is per client, over its whole dataset.

Caveats, as for DP-SGD: fedtune draws exactly m clients a round, where the analysis assumes
each joins independently with probability q (the usual approximation, e.g. TensorFlow
Federated's); the server's noise comes from a generator seeded by the run's seed and round (a
resumed run continues bit for bit; anyone who knows the seed can regenerate it: keep the seed
secret in a deployment). A client's own noise (``noise_on: clients``) is drawn from the
operating system's randomness, so the server cannot regenerate it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedtune.averaging.mean import Tensors, check_same_keys, update_norm
from fedtune.errors import AggregationError
from fedtune.privacy import PrivacyLedger, noise_multiplier_for
from fedtune.schema import FedtuneConfig


def clipped(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[dict[str, torch.Tensor], bool]:
    """``update`` scaled by min(1, S/‖Δ‖) (float64), and whether it was scaled down."""
    norm = update_norm(update)
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {k: v.detach().to(torch.float64) * factor for k, v in update.items()}, factor < 1.0


def gaussian_like(update: Mapping[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: torch.randn(v.shape, generator=generator, dtype=torch.float64) * std for k, v in update.items()}


def noised_update(sent: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], clip_norm: float,
                  noise_multiplier: float) -> dict[str, torch.Tensor]:
    """A client's reply under ``noise_on: clients``: sent + clip(Δ) + N(0, z²S²), the noise from OS randomness."""
    delta = {k: v.detach().to(torch.float64) - sent[k].detach().to(torch.float64) for k, v in trained.items()}
    delta, _ = clipped(delta, clip_norm)
    generator = torch.Generator().manual_seed(secrets.randbits(63))
    noise = gaussian_like(delta, noise_multiplier * clip_norm, generator)
    return {k: (sent[k].detach().to(torch.float64) + delta[k] + noise[k]).to(v.dtype) for k, v in trained.items()}


class ClientLevelDP:
    """The server's half of DP-FedAvg, and its privacy ledger.

    Parameters
    ----------
    clip_norm : float
        S, the bound on each client's update norm.
    noise_multiplier : float
        z: the noise on the round's sum has standard deviation z·S.
    clients_per_round : int
        m, the fixed denominator.
    sample_rate : float
        q = m / number of clients, for the accountant.
    delta : float
        δ of the reported ε.
    noise_on : {"server", "clients"}
        Who adds the noise.
    seed : int
        The run's seed: the server's noise of round t comes from (seed, t).
    accountant : {"pld", "rdp"}
        How rounds become ε (:class:`fedtune.privacy.PrivacyLedger`).
    """

    def __init__(self, clip_norm: float, noise_multiplier: float, clients_per_round: int, sample_rate: float,
                 delta: float, noise_on: str = "server", seed: int = 0, accountant: str = "pld") -> None:
        self.clip_norm, self.noise_multiplier = float(clip_norm), float(noise_multiplier)
        self.clients_per_round, self.noise_on, self.seed = int(clients_per_round), noise_on, int(seed)
        self.ledger = PrivacyLedger(self.noise_multiplier, float(sample_rate), float(delta), accountant)

    def combine(self, tensors: Sequence[Mapping[str, torch.Tensor]], previous: Mapping[str, torch.Tensor] | None,
                server_round: int) -> tuple[Tensors, dict[str, float]]:
        """x_{t+1} from the clients' tensors and x_t; records the round in the ledger."""
        if previous is None:
            raise AggregationError("client-level DP needs the previous global tensors: the strategy must pass "
                                   "previous= to Strategy.average")
        check_same_keys(tensors)
        total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in previous.items()}
        clipped_count = 0
        for t in tensors:
            delta = {k: t[k].detach().to(torch.float64) - previous[k].detach().to(torch.float64) for k in previous}
            if self.noise_on == "server":
                delta, was_clipped = clipped(delta, self.clip_norm)
                clipped_count += was_clipped
            for k in total:
                total[k] += delta[k]
        if self.noise_on == "server":
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + server_round)
            noise = gaussian_like(total, self.noise_multiplier * self.clip_norm, generator)
            total = {k: total[k] + noise[k] for k in total}
        self.ledger.step(1)
        out = {k: (previous[k].detach().to(torch.float64) + total[k] / self.clients_per_round).to(previous[k].dtype)
               for k in previous}
        metrics = {"dp_client_epsilon": self.ledger.epsilon()}
        if self.noise_on == "server":
            metrics["dp_clients_clipped"] = float(clipped_count)
        return out, metrics

    def hyperparameters(self) -> dict[str, Any]:
        return {"client_dp_clip": self.clip_norm, "client_dp_noise_multiplier": self.noise_multiplier,
                "client_dp_clients_per_round": self.clients_per_round, "client_dp_noise_on": self.noise_on,
                "client_dp_sample_rate": self.ledger.sample_rate}

    def state_dict(self) -> dict[str, Any]:
        return {"history": [list(h) for h in self.ledger.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ledger.history = [(float(s), float(q), int(n)) for s, q, n in state.get("history", [])]


def client_dp_of(cfg: FedtuneConfig) -> ClientLevelDP | None:
    """DP-FedAvg's server half for ``privacy.level: client``, else None. Without
    ``privacy.noise_multiplier``, z is calibrated so that ``federation.num_rounds`` rounds spend at
    most ``privacy.target_epsilon``."""
    p, fed = cfg.privacy, cfg.federation
    if not p.client_level:
        return None
    m = fed.clients_per_round()
    q = m / fed.num_clients
    z = p.noise_multiplier
    if z is None:
        z = noise_multiplier_for(p.target_epsilon, p.delta, q, fed.num_rounds, accountant=p.accountant)
    return ClientLevelDP(p.clip_norm, z, m, q, p.delta, p.noise_on, cfg.seed, p.accountant)


__all__ = ["ClientLevelDP", "client_dp_of", "clipped", "noised_update"]
