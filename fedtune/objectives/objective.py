"""What a client's local steps minimise: the training objective (``train.objective``).

The objective is independent of the strategy: the strategy decides what is trained and
how the updates are aggregated, the objective what each batch's loss is. So FedIT, FFA-LoRA,
FLoRA or a user's method train with supervised fine-tuning or with DPO alike.

An :class:`Objective` turns rows into tokenized examples and batches, gives a batch's loss
(what the optimizer steps on) and scores a held-out split:

* ``sft`` (:class:`Supervised`): the cross-entropy of the response tokens (the label for
  classification); scored by loss and accuracy;
* ``dpo`` (:class:`DirectPreference`): preference pairs, the DPO loss against the base
  model as reference (:mod:`fedtune.objectives.dpo`); scored by the DPO loss, the preference accuracy
  (``accuracy``: the share of pairs whose chosen response gets the larger implicit reward)
  and the mean reward margin.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import datasets
import torch
from torch.utils.data import DataLoader

from fedtune.data.preference import collate_pairs, tokenize_pairs
from fedtune.data.tokenize import IGNORE_INDEX, collate, tokenize
from fedtune.models.devices import device_of, to_device
from fedtune.models.loading import AdapterHandle
from fedtune.objectives.dpo import batch_terms
from fedtune.schema import DPOConfig, TrainConfig

OnBatch = Callable[[int, int], None]


class Objective(ABC):
    """A training objective: how rows become batches, a batch's loss, how a split is scored."""

    name: ClassVar[str] = ""
    # Metrics keys (besides eval_loss and eval_accuracy) the run's table shows.
    table_columns: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def tokenize(self, ds: datasets.Dataset, tokenizer: Any, task: str, max_length: int,
                 prompt_format: str) -> datasets.Dataset:
        """The standardized rows of ``ds`` as model inputs."""

    @abstractmethod
    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        """A batch of tokenized rows."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], pad_id: int) -> torch.Tensor:
        """The batch's mean loss, with gradients to whatever in ``model`` requires them."""

    @abstractmethod
    def evaluate(self, model: torch.nn.Module, ds: datasets.Dataset, batch_size: int, pad_id: int, task: str,
                 on_batch: OnBatch | None = None) -> dict[str, float]:
        """Scores of ``model`` on a tokenized split: ``loss``, ``accuracy``, ``num_examples`` and any others."""

    def loader(self, ds: datasets.Dataset, batch_size: int, pad_id: int, shuffle: bool, seed: int) -> DataLoader:
        """Batches of ``ds``, shuffled in an order fixed by ``seed`` (or in data order)."""
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=lambda rows: self.collate(rows, pad_id))


class Supervised(Objective):
    """Supervised fine-tuning: the model's own loss (response tokens of a causal LM, or the label)."""

    name = "sft"

    def tokenize(self, ds: datasets.Dataset, tokenizer: Any, task: str, max_length: int,
                 prompt_format: str) -> datasets.Dataset:
        return tokenize(ds, tokenizer, task, max_length, prompt_format)

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(rows, pad_id)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], pad_id: int) -> torch.Tensor:
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, ds: datasets.Dataset, batch_size: int, pad_id: int, task: str,
                 on_batch: OnBatch | None = None) -> dict[str, float]:
        """Mean loss and accuracy: label accuracy, or next-token accuracy on the response tokens."""
        loss_sum, correct, total = 0.0, 0, 0
        device = device_of(model)
        num_batches = math.ceil(len(ds) / batch_size)
        for done, batch in enumerate(self.loader(ds, batch_size, pad_id, shuffle=False, seed=0), 1):
            batch = to_device(batch, device)
            out = model(**batch)
            labels = batch["labels"]
            if task == "classification":
                n = labels.numel()
                correct += int((out.logits.argmax(-1) == labels).sum())
            else:
                targets = labels[:, 1:]
                mask = targets != IGNORE_INDEX
                n = int(mask.sum())
                correct += int(((out.logits[:, :-1].argmax(-1) == targets) & mask).sum())
            loss_sum += float(out.loss) * n
            total += n
            if on_batch is not None:
                on_batch(done, num_batches)
        return {"loss": loss_sum / max(total, 1), "accuracy": correct / max(total, 1), "num_examples": len(ds)}


class DirectPreference(Objective):
    """DPO on preference pairs (:mod:`fedtune.objectives.dpo`); the reference is the base with the adapter off.

    Parameters
    ----------
    beta : float
        β, the scale of the implicit reward.
    loss : {"sigmoid", "hinge"}
        The DPO loss variant.
    """

    name = "dpo"
    table_columns = ("eval_reward_margin",)

    def __init__(self, beta: float = 0.1, loss: str = "sigmoid") -> None:
        self.beta, self.loss_type = float(beta), loss

    def tokenize(self, ds: datasets.Dataset, tokenizer: Any, task: str, max_length: int,
                 prompt_format: str) -> datasets.Dataset:
        return tokenize_pairs(ds, tokenizer, max_length, prompt_format)

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_pairs(rows, pad_id)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor], pad_id: int) -> torch.Tensor:
        return batch_terms(model, batch, self.beta, self.loss_type, pad_id).losses.mean()

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, ds: datasets.Dataset, batch_size: int, pad_id: int, task: str,
                 on_batch: OnBatch | None = None) -> dict[str, float]:
        """Mean DPO loss, preference accuracy (``accuracy``), mean reward margin and rewards, over the pairs.

        ``likelihood_accuracy`` is the share of pairs whose chosen response the model itself finds
        the more likely (log π): unlike the reward accuracy, which is 0 for the base model (every
        reward is 0), it says how the base model ranks the pairs before any training.
        """
        sums = {"loss": 0.0, "accuracy": 0.0, "reward_margin": 0.0, "chosen_reward": 0.0, "rejected_reward": 0.0,
                "likelihood_accuracy": 0.0}
        device = device_of(model)
        num_batches = math.ceil(len(ds) / batch_size)
        for done, batch in enumerate(self.loader(ds, batch_size, pad_id, shuffle=False, seed=0), 1):
            terms = batch_terms(model, to_device(batch, device), self.beta, self.loss_type, pad_id)
            margin = terms.chosen_rewards - terms.rejected_rewards
            sums["loss"] += float(terms.losses.double().sum())
            sums["accuracy"] += float((margin > 0).double().sum())
            sums["reward_margin"] += float(margin.double().sum())
            sums["chosen_reward"] += float(terms.chosen_rewards.double().sum())
            sums["rejected_reward"] += float(terms.rejected_rewards.double().sum())
            sums["likelihood_accuracy"] += float((terms.chosen_logps > terms.rejected_logps).double().sum())
            if on_batch is not None:
                on_batch(done, num_batches)
        n = len(ds)
        return {**{k: v / n if n else math.nan for k, v in sums.items()}, "num_examples": n}


SUPERVISED = Supervised()


def objective_of(train: TrainConfig) -> Objective:
    """The objective ``train.objective`` names, with its settings (``train.dpo``)."""
    if train.objective == "sft":
        return SUPERVISED
    if train.objective == "dpo":
        dpo: DPOConfig = train.dpo
        return DirectPreference(beta=dpo.beta, loss=dpo.loss)
    raise ValueError(f"train.objective={train.objective!r} is not an objective; use 'sft' or 'dpo'")


def evaluate(handle: AdapterHandle, ds: datasets.Dataset, batch_size: int,
             on_batch: OnBatch | None = None, objective: Objective = SUPERVISED) -> dict[str, float]:
    """``objective``'s scores of the model on a tokenized split (SFT: loss and accuracy).

    Supervised: label accuracy, or next-token accuracy on response tokens. ``on_batch(done,
    total)`` is called after every batch (a progress display).
    """
    handle.model.eval()
    if len(ds) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "num_examples": 0}
    return objective.evaluate(handle.model, ds, batch_size, handle.tokenizer.pad_token_id, handle.task, on_batch)


__all__ = ["SUPERVISED", "DirectPreference", "Objective", "Supervised", "evaluate", "objective_of"]
