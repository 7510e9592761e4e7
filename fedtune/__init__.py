"""fedtune: federated fine-tuning of language models with LoRA and Flower."""

__version__ = "0.1.0"
