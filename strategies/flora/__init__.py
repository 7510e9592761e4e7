"""FLoRA (Wang et al., NeurIPS 2024): exact heterogeneous-rank aggregation by stacking LoRA factors.

``strategy`` is the server half, ``routine`` the client half, ``residual`` the merged
updates a client keeps beside its (possibly quantized) base.
"""

from fedtune.strategies.flora.routine import FLoRARoutine
from fedtune.strategies.flora.strategy import FLoRA, stack_factors

__all__ = ["FLoRA", "FLoRARoutine", "stack_factors"]
