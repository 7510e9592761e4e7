"""Fed-SB (Singhal et al. 2025): federated LoRA-SB, training and averaging only an r×r matrix per layer.

``strategy`` is the server half, ``routine`` the client half (the initialisation pass and
training R), ``layer`` the LoRA-SB PEFT layer, ``init`` the first-update estimate and its
sketches, ``keys`` the names Fed-SB sends.
"""

from fedtune.strategies.fed_sb.routine import LoraSBInitRoutine, LoraSBRoutine
from fedtune.strategies.fed_sb.strategy import FedSB

__all__ = ["FedSB", "LoraSBInitRoutine", "LoraSBRoutine"]
