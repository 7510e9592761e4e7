"""Built-in methods, one folder (or file) each; importing this package registers them.

Each method keeps everything of its own in its folder: its server strategy, its client
routine, its layers and its wire keys. They register through the same public API a user's
method uses (:func:`fedtune.strategy.register_strategy`, :func:`fedtune.routine.register_routine`).
"""

from fedtune.strategies.fed_sb import FedSB
from fedtune.strategies.fedit import FedIT
from fedtune.strategies.fedkseed import FedKSeed, FedKSeedPro
from fedtune.strategies.fedsa_lora import FedSALoRA
from fedtune.strategies.ffa_lora import FFALoRA
from fedtune.strategies.flexlora import FlexLoRA
from fedtune.strategies.flora import FLoRA
from fedtune.strategies.lora_fair import LoRAFAIR

__all__ = ["FFALoRA", "FLoRA", "FedIT", "FedKSeed", "FedKSeedPro", "FedSALoRA", "FedSB", "FlexLoRA", "LoRAFAIR"]
