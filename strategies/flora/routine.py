"""FLoRA's client half: merge the stacked updates it has not merged yet, then train a fresh LoRA."""

from __future__ import annotations

import dataclasses

from fedtune.models import AdapterHandle
from fedtune.routine import ClientJob, GradientRoutine, register_routine
from fedtune.strategies.flora.residual import residual_of, split_residual

FLORA_ROUTINE = "flora"


@register_routine
class FLoRARoutine(GradientRoutine):
    """Gradient training on the model with every merged round applied beside the base.

    The server sends each round's stacked factors under ``residual.<round>.<module>...``
    names; the process merges those it has not merged (:class:`~.residual.Residual`), then
    loads the rest (the fresh LoRA and the head) as usual.
    """

    name = FLORA_ROUTINE

    def load(self, job: ClientJob) -> tuple[AdapterHandle, float]:
        plain, rounds = split_residual(job.arrays)
        handle, load_seconds = self.client.prepare(dataclasses.replace(job, arrays=plain))
        residual = residual_of(handle.model)
        residual.claim(self.client.run_id)  # merges of an earlier run in this process do not carry over
        residual.catch_up()  # another base of this run in this process may have merged more rounds
        residual.merge_rounds(rounds)
        return handle, load_seconds

