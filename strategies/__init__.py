"""Built-in aggregation strategies, one per file; importing this package registers them."""

from strategies.fedit import FedIT

__all__ = ["FedIT"]
