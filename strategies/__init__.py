"""Built-in aggregation strategies, one per file; importing this package registers them."""

from strategies.fed_sb import FedSB
from strategies.fedit import FedIT
from strategies.fedkseed import FedKSeed, FedKSeedPro
from strategies.ffa_lora import FFALoRA
from strategies.flora import FLoRA
from strategies.lora_fair import LoRAFAIR

__all__ = ["FFALoRA", "FLoRA", "FedIT", "FedKSeed", "FedKSeedPro", "FedSB", "LoRAFAIR"]
