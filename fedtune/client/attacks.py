"""Hostile clients for testing defences, in simulations only (``attack.*``).

A deployment never runs this: its server refuses a run whose ``attack.kind`` is not ``none``
(:func:`fedtune.flower.server_app.server_config`), before any message is sent.

With Δ = trained − sent (a tensor the server did not send counts from zero), an attacking
client replies sent + f(Δ): ``sign-flip`` −s·Δ (s = 1 unless ``attack.scale``), ``scale``
s·Δ (s = 10 unless given), ``noise`` ε ~ N(0, ``noise_std``²) drawn from the run's seed, its
partition and the round, whatever Δ was (Blanchard et al. 2017's Gaussian attacker; Fang et
al. 2020 for the sign flip and scaling). ``label-flip`` trains on labels y → C − 1 − y instead
(Tolpegin et al. 2020).
"""

from __future__ import annotations

from collections.abc import Mapping

import datasets
import torch

from fedtune.schema import AttackConfig

DEFAULT_SCALE = {"sign-flip": 1.0, "scale": 10.0}


def attacked_reply(attack: AttackConfig, sent: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor],
                   seed: int) -> dict[str, torch.Tensor]:
    """What an attacking client sends in place of ``trained`` (an update attack; others return it as is)."""
    if attack.kind not in ("sign-flip", "scale", "noise"):
        return dict(trained)
    scale = attack.scale if attack.scale is not None else DEFAULT_SCALE.get(attack.kind, 1.0)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in trained.items():
        start = sent[key].to(value.dtype) if key in sent and sent[key].shape == value.shape else torch.zeros_like(value)
        delta = value.detach() - start
        if attack.kind == "sign-flip":
            delta = -scale * delta
        elif attack.kind == "scale":
            delta = scale * delta
        else:
            delta = attack.noise_std * torch.randn(value.shape, generator=generator, dtype=torch.float64).to(value.dtype)
        out[key] = start + delta
    return out


def flipped_labels(ds: datasets.Dataset, num_classes: int) -> datasets.Dataset:
    """``ds`` with every label y replaced by C − 1 − y."""
    return ds.map(lambda row: {"label": num_classes - 1 - int(row["label"])})


__all__ = ["DEFAULT_SCALE", "attacked_reply", "flipped_labels"]
