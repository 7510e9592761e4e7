"""FlexLoRA (Bai et al., NeurIPS 2024): heterogeneous ranks, aggregate the full update, redistribute by SVD.

``strategy`` is the server half, ``routine`` the client half (it keeps the leading
components for its own rank).
"""

from fedtune.strategies.flexlora.routine import FlexLoRARoutine
from fedtune.strategies.flexlora.strategy import FlexLoRA

__all__ = ["FlexLoRA", "FlexLoRARoutine"]
