"""FLoRA's client half: merge the stacked updates it has not merged yet, then train a fresh LoRA."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from fedtune.strategies.aggregation import LORA_A, LORA_B
from fedtune.strategies.flora.residual import residual_of, split_residual

from fedtune.models.loading import AdapterHandle
from fedtune.routine import ClientJob, GradientRoutine, register_routine

FLORA_ROUTINE = "flora"
_FRESH_LORA_DOMAIN = 0xF10A  # keeps these seeds apart from the run's other seeded draws


def fresh_lora_seed(run_seed: int, server_round: int, client: int) -> int:
    """The seed of client ``client``'s fresh LoRA in ``server_round``: new per round and client, fixed per run."""
    return int(np.random.SeedSequence([_FRESH_LORA_DOMAIN, run_seed, server_round, client]).generate_state(1)[0])


def draw_fresh_lora(handle: AdapterHandle, seed: int) -> None:
    """Start the adapter's LoRA afresh: every A as PEFT initialises it, every B zero.

    PEFT's default initialisation draws A Kaiming-uniform (a = √5, so U(±1/√in_features));
    here the draw is on the CPU from ``seed`` and then copied to the model, so the values
    do not depend on the device or on the global random state.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in sorted(handle.params):
            param = handle.params[key]
            if key.endswith(LORA_A):
                values = torch.empty(param.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
                param.copy_(values)
            elif key.endswith(LORA_B):
                param.zero_()


@register_routine
class FLoRARoutine(GradientRoutine):
    """Gradient training on the model with every merged round applied beside the base.

    The server sends each round's stacked factors under ``residual.<round>.<module>...``
    names; the process merges those it has not merged (:class:`~.residual.Residual`), loads
    the rest (the head) as usual, and draws a fresh LoRA (:func:`draw_fresh_lora`) from a seed
    of the run, the round and the client, as the official FLoRA builds a new LoRA every round.
    """

    name = FLORA_ROUTINE

    def load(self, job: ClientJob) -> tuple[AdapterHandle, float]:
        plain, rounds = split_residual(job.arrays)
        handle, load_seconds = self.client.prepare(dataclasses.replace(job, arrays=plain))
        residual = residual_of(handle.model)
        residual.claim(self.client.run_id)  # merges of an earlier run in this process do not carry over
        residual.catch_up()  # another base of this run in this process may have merged more rounds
        residual.merge_rounds(rounds)
        draw_fresh_lora(handle, fresh_lora_seed(self.client.cfg.seed, job.server_round, job.partition_id))
        return handle, load_seconds

