"""Direct preference optimisation's arithmetic (Rafailov et al. 2023), as TRL computes it.

For a pair (prompt x, chosen y_w, rejected y_l), with π the model with its adapter and
π_ref the same base without it (:func:`fedtune.models.loading.base_model_only`):

    Δ = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
    sigmoid loss: −log σ(β·Δ)          hinge loss: max(0, 1 − β·Δ)

log π(y|x) sums the response tokens' log-probabilities. The implicit rewards are
β·(log π − log π_ref) of each response; a pair counts as ranked right when the chosen
reward is the larger (TRL's ``rewards/accuracies``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedtune.data.tokenize import IGNORE_INDEX
from fedtune.models.loading import base_model_only


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over labelled positions of log p(token), one value per row, in float32.

    ``logits[:, t]`` predicts ``labels[:, t + 1]``; positions labelled ``IGNORE_INDEX`` (the
    prompt, the padding) do not count.
    """
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    token_logps = picked - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1)


def _pad_to(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return F.pad(t, (0, width - t.shape[1]), value=value)


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
               pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(chosen|x) and log π(rejected|x) per pair, from one forward pass over both sides.

    ``batch`` is a :func:`fedtune.data.preference.collate_pairs` batch; the sides are padded
    to one width and stacked (chosen first), as TRL's concatenated forward does.
    """
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    stacked = {key: torch.cat([_pad_to(batch[f"{side}_{key}"], width, fill) for side in ("chosen", "rejected")])
               for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", IGNORE_INDEX))}
    logits = model(input_ids=stacked["input_ids"], attention_mask=stacked["attention_mask"]).logits
    logps = sequence_logps(logits, stacked["labels"])
    return logps[: len(logps) // 2], logps[len(logps) // 2:]


@dataclass(frozen=True)
class PairTerms:
    """Per-pair DPO quantities: the loss, the implicit rewards and the policy's log-probabilities of both responses."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def dpo_terms(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
              reference_rejected: torch.Tensor, beta: float, loss: str = "sigmoid") -> PairTerms:
    """The DPO loss of each pair (``sigmoid`` or ``hinge``); the rewards β·(log π − log π_ref) and log π, detached."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    delta = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"loss={loss!r} must be 'sigmoid' or 'hinge'")
    return PairTerms(losses=losses, chosen_rewards=beta * chosen_ratio.detach(),
                     rejected_rewards=beta * rejected_ratio.detach(), chosen_logps=policy_chosen.detach(),
                     rejected_logps=policy_rejected.detach())


def batch_terms(model: torch.nn.Module, batch: dict[str, torch.Tensor], beta: float, loss: str = "sigmoid",
                pad_id: int = 0) -> PairTerms:
    """:func:`dpo_terms` of a batch: the policy with gradients, the reference (the base alone) without."""
    policy_chosen, policy_rejected = pair_logps(model, batch, pad_id)
    with torch.no_grad(), base_model_only(model):
        reference_chosen, reference_rejected = pair_logps(model, batch, pad_id)
    return dpo_terms(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, loss)


__all__ = ["PairTerms", "batch_terms", "dpo_terms", "pair_logps", "sequence_logps"]
