"""FedSA-LoRA's client half: the global A (and head) with this client's own B, kept across rounds."""

from __future__ import annotations

import dataclasses
import re

from fedtune.strategies.fedsa_lora.keys import FEDSA_ROUTINE, OPT_PERSONAL, OPT_UPLOAD_PERSONAL

from fedtune.client.training import TrainResult
from fedtune.models.loading import AdapterHandle
from fedtune.routine import ClientJob, ClientReply, GradientRoutine, register_routine


@register_routine
class FedSALoRARoutine(GradientRoutine):
    """Gradient training of A and B on top of the client's personal B.

    The personal tensors (names matching the instruction's ``personal`` pattern) come from
    the client's state; before its first round they are the adapter's initial values
    (B = 0). After training they go back into the state. Evaluation uses the same
    personal model, so a client's eval metrics are its personal model's. The reply carries
    the personal tensors only when the instruction's ``upload_personal`` option is true.
    """

    name = FEDSA_ROUTINE

    def load(self, job: ClientJob) -> tuple[AdapterHandle, float]:
        personal = re.compile(str(job.options[OPT_PERSONAL]))
        shared = {k: v for k, v in job.arrays.items() if not personal.search(k)}
        own = {k: v for k, v in job.state.tensors.items() if personal.search(k)}
        return self.client.prepare(dataclasses.replace(job, arrays={**shared, **own}))

    def reply(self, job: ClientJob, handle: AdapterHandle, names: list[str], result: TrainResult,
              metrics: dict[str, float]) -> ClientReply:
        personal = re.compile(str(job.options[OPT_PERSONAL]))
        job.state.tensors.clear()
        job.state.tensors.update(handle.tensors([k for k in handle.params if personal.search(k)]))
        if not job.options.get(OPT_UPLOAD_PERSONAL, True):
            names = [k for k in names if not personal.search(k)]
        return super().reply(job, handle, names, result, metrics)
