"""FedKSeed and FedKSeed-Pro (Qin et al., ICML 2024): zeroth-order steps along K shared seeds.

``strategy`` is the server half, ``routine`` the client half, ``zeroth_order`` the
reproducible directions, steps and replay, ``gaussian`` the bitwise-portable normal
generator the directions come from, ``wire`` what travels (seeds and scalars only).
"""

from fedtune.strategies.fedkseed.routine import ZerothOrderRoutine
from fedtune.strategies.fedkseed.strategy import FedKSeed, FedKSeedPro

__all__ = ["FedKSeed", "FedKSeedPro", "ZerothOrderRoutine"]
