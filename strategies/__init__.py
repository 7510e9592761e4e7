"""Built-in aggregation strategies, one per file; importing this package registers them."""

from fedtune.strategies.fed_sb.strategy import FedSB
from fedtune.strategies.fedit import FedIT
from fedtune.strategies.fedkseed.strategy import FedKSeed, FedKSeedPro
from fedtune.strategies.ffa_lora import FFALoRA
from fedtune.strategies.flora.strategy import FLoRA
from fedtune.strategies.lora_fair import LoRAFAIR

__all__ = ["FFALoRA", "FLoRA", "FedIT", "FedKSeed", "FedKSeedPro", "FedSB", "LoRAFAIR"]
