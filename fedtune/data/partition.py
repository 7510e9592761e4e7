"""Split the training pool across clients with flwr-datasets partitioners."""

from __future__ import annotations

from collections import Counter

import datasets
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
    SizePartitioner,
)

from fedtune.errors import DataError
from fedtune.schema import PartitionConfig


def size_skew_sizes(total: int, num_partitions: int, power: float) -> list[int]:
    """Partition sizes proportional to (i + 1) ** power that add up to ``total``."""
    if total < num_partitions:
        raise DataError(f"{total} examples cannot give each of {num_partitions} clients one; use fewer clients")
    # Largest remainder keeps the proportions; then nobody is left empty.
    shares = [(i + 1) ** power for i in range(num_partitions)]
    exact = [total * s / sum(shares) for s in shares]
    sizes = [int(e) for e in exact]
    # Ties go to the later (larger) clients, so sizes keep increasing.
    by_remainder = sorted(range(num_partitions), key=lambda i: (exact[i] - sizes[i], i), reverse=True)
    for i in by_remainder[: total - sum(sizes)]:
        sizes[i] += 1
    for i in range(num_partitions):
        if sizes[i] == 0:
            sizes[sizes.index(max(sizes))] -= 1
            sizes[i] = 1
    return sizes


def make_partitioner(cfg: PartitionConfig, num_partitions: int, num_examples: int,
                     partition_by: str = "label") -> Partitioner:
    """The flwr-datasets partitioner that ``cfg.method`` names; label-skewed ones split by ``partition_by``."""
    if cfg.method == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if cfg.method == "dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by=partition_by, alpha=cfg.alpha,
                                    min_partition_size=cfg.min_partition_size, self_balancing=False,
                                    shuffle=True, seed=cfg.seed)
    if cfg.method == "pathological":
        return PathologicalPartitioner(num_partitions=num_partitions, partition_by=partition_by,
                                       num_classes_per_partition=cfg.classes_per_client,
                                       class_assignment_mode="random", shuffle=True, seed=cfg.seed)
    if cfg.method == "size-skew":
        return SizePartitioner(partition_sizes=size_skew_sizes(num_examples, num_partitions, cfg.size_power))
    raise DataError(f"partition.method={cfg.method!r} is not known")


def partition_dataset(pool: datasets.Dataset, cfg: PartitionConfig, num_partitions: int) -> list[datasets.Dataset]:
    """All partitions of ``pool``, deterministic in ``cfg.seed``.

    IID and size-skew partitioners take contiguous slices, so the pool is shuffled first.
    Dirichlet and pathological ones split by the ``group`` column when the data has one
    (``data.group_column``), else by the label.
    """
    partition_by = "group" if "group" in pool.column_names else "label"
    if cfg.method in ("dirichlet", "pathological") and partition_by not in pool.column_names:
        raise DataError(f"partition.method={cfg.method!r} splits by label, and this data set has none; "
                        "use partition.method=iid or size-skew, or name a column to split by in "
                        "data.group_column")
    if num_partitions > len(pool):
        raise DataError(f"{num_partitions} clients but only {len(pool)} examples; use fewer clients")
    if cfg.method == "dirichlet" and cfg.min_partition_size * num_partitions > len(pool):
        raise DataError(f"partition.min_partition_size={cfg.min_partition_size} for each of {num_partitions} clients "
                        f"needs {cfg.min_partition_size * num_partitions} examples and the data has {len(pool)}; "
                        f"lower partition.min_partition_size (at most {len(pool) // num_partitions}) or use fewer "
                        "clients")
    if cfg.method in ("iid", "size-skew"):
        pool = pool.shuffle(seed=cfg.seed)
    try:
        partitioner = make_partitioner(cfg, num_partitions, len(pool), partition_by)
        partitioner.dataset = pool
        return [partitioner.load_partition(i) for i in range(num_partitions)]
    except ValueError as e:
        reason = str(e).rstrip(".")
        counts = Counter(pool[partition_by])
        raise DataError(f"partition.method={cfg.method!r} failed for {num_partitions} clients: {reason}. "
                        f"The {len(pool)} examples by {partition_by}: "
                        + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
                        + ". Lower partition.min_partition_size or raise partition.alpha") from e


def split_train_eval(part: datasets.Dataset, eval_fraction: float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A client's local train and eval splits (eval may be empty when eval_fraction is 0)."""
    if eval_fraction == 0 or len(part) < 2:
        return part, part.select([])
    split = part.train_test_split(test_size=eval_fraction, seed=seed)
    return split["train"], split["test"]
