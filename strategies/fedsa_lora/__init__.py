"""FedSA-LoRA (Guo et al., ICLR 2025): share and average A, keep each client's B on the client.

``strategy`` is the server half, ``routine`` the client half (its personal B lives in the
client's :class:`~fedtune.routine.ClientState`).
"""

from fedtune.strategies.fedsa_lora.routine import FedSALoRARoutine
from fedtune.strategies.fedsa_lora.strategy import FedSALoRA

__all__ = ["FedSALoRA", "FedSALoRARoutine"]
