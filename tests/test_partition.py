"""fedtune.data.partition: the four partitioning methods on small in-memory data sets."""

from __future__ import annotations

import collections

import datasets
import pytest

from fedtune.config import PartitionConfig
from fedtune.data.partition import partition_dataset, size_skew_sizes, split_train_eval
from fedtune.errors import DataError

NUM_LABELS = 4


def pool(n: int = 400, with_label: bool = True) -> datasets.Dataset:
    """``n`` examples with a unique id and a balanced label (i mod 4)."""
    data: dict[str, list] = {"id": list(range(n)), "text": [f"example {i}" for i in range(n)]}
    if with_label:
        data["label"] = [i % NUM_LABELS for i in range(n)]
    return datasets.Dataset.from_dict(data)


def ids(parts: list[datasets.Dataset]) -> list[list[int]]:
    return [list(p["id"]) for p in parts]


def max_class_share(part: datasets.Dataset) -> float:
    counts = collections.Counter(part["label"])
    return max(counts.values()) / len(part)


# --------------------------------------------------------------------------- iid


def test_iid_covers_every_example_exactly_once_in_equal_parts() -> None:
    parts = partition_dataset(pool(402), PartitionConfig(method="iid"), 4)
    all_ids = [i for p in ids(parts) for i in p]
    assert sorted(all_ids) == list(range(402))  # each once: no loss, no duplicate
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    # The pool is shuffled first: partition 0 is not simply the first quarter.
    assert ids(parts)[0] != list(range(len(parts[0])))


def test_iid_is_deterministic_in_the_seed() -> None:
    a = ids(partition_dataset(pool(), PartitionConfig(method="iid", seed=3), 4))
    b = ids(partition_dataset(pool(), PartitionConfig(method="iid", seed=3), 4))
    c = ids(partition_dataset(pool(), PartitionConfig(method="iid", seed=4), 4))
    assert a == b
    assert a != c


# --------------------------------------------------------------------------- dirichlet


def dirichlet(alpha: float, seed: int = 0, n: int = 800, clients: int = 8) -> list[datasets.Dataset]:
    cfg = PartitionConfig(method="dirichlet", alpha=alpha, min_partition_size=1, seed=seed)
    return partition_dataset(pool(n), cfg, clients)


def test_dirichlet_is_deterministic_for_a_fixed_seed() -> None:
    assert ids(dirichlet(0.5, seed=1)) == ids(dirichlet(0.5, seed=1))
    assert ids(dirichlet(0.5, seed=1)) != ids(dirichlet(0.5, seed=2))


def test_dirichlet_covers_every_example_once() -> None:
    all_ids = [i for p in ids(dirichlet(0.5)) for i in p]
    assert sorted(all_ids) == list(range(800))


def test_dirichlet_small_alpha_skews_labels_and_large_alpha_does_not() -> None:
    # With 4 balanced labels the max class share of a client is 0.25 when it is perfectly mixed.
    # Dirichlet(0.1) concentrates clients on one or two labels; Dirichlet(1000) is near uniform.
    # Thresholds 0.5 / 0.35 leave a wide margin around the observed means (~0.75 / ~0.27).
    skewed = dirichlet(0.1)
    mixed = dirichlet(1000.0)
    skewed_share = sum(max_class_share(p) for p in skewed if len(p)) / sum(1 for p in skewed if len(p))
    mixed_share = sum(max_class_share(p) for p in mixed) / len(mixed)
    assert skewed_share > 0.5
    assert mixed_share < 0.35


def test_dirichlet_without_label_column_names_the_method() -> None:
    with pytest.raises(DataError) as excinfo:
        partition_dataset(pool(with_label=False), PartitionConfig(method="dirichlet"), 4)
    assert "partition.method='dirichlet'" in str(excinfo.value)
    assert "iid" in str(excinfo.value)  # the fix is named


def test_pathological_without_label_column_is_a_data_error() -> None:
    with pytest.raises(DataError, match="partition.method='pathological'"):
        partition_dataset(pool(with_label=False), PartitionConfig(method="pathological"), 4)


def test_dirichlet_splits_by_the_group_column_when_there_is_one() -> None:
    groups = pool(400, with_label=False).add_column("group", [f"g{i % 4}" for i in range(400)])
    parts = partition_dataset(groups, PartitionConfig(method="dirichlet", alpha=0.1, seed=1), 4)
    assert sorted(i for p in parts for i in p["id"]) == list(range(400))
    shares = [max(collections.Counter(p["group"]).values()) / len(p) for p in parts]
    assert max(shares) > 0.7  # small alpha: a client holds mostly one group
    pathological = partition_dataset(groups, PartitionConfig(method="pathological", classes_per_client=1), 4)
    assert all(len(set(p["group"])) == 1 for p in pathological)


def test_iid_without_label_column_works() -> None:
    parts = partition_dataset(pool(40, with_label=False), PartitionConfig(method="iid"), 4)
    assert [len(p) for p in parts] == [10, 10, 10, 10]


def test_a_min_partition_size_the_data_cannot_fill_says_so_before_sampling() -> None:
    cfg = PartitionConfig(method="dirichlet", alpha=1.0, min_partition_size=30)
    with pytest.raises(DataError, match=r"min_partition_size=30 for each of 4 clients needs 120 examples and the "
                                        r"data has 100; lower partition.min_partition_size \(at most 25\)"):
        partition_dataset(pool(100), cfg, 4)


@pytest.mark.filterwarnings("ignore:The specified min_partition_size:UserWarning")
def test_a_dirichlet_draw_that_fails_lists_the_examples_by_label() -> None:
    cfg = PartitionConfig(method="dirichlet", alpha=0.05, min_partition_size=24)
    with pytest.raises(DataError, match=r"failed for 4 clients: .*The 100 examples by label: .*Lower "
                                        r"partition.min_partition_size or raise partition.alpha"):
        partition_dataset(pool(100), cfg, 4)  # 96 of 100 needed at alpha 0.05: no draw meets it


# --------------------------------------------------------------------------- pathological


@pytest.mark.parametrize("k", [1, 2])
def test_pathological_gives_each_client_at_most_k_labels(k: int) -> None:
    cfg = PartitionConfig(method="pathological", classes_per_client=k, seed=0)
    parts = partition_dataset(pool(), cfg, 6)
    assert len(parts) == 6
    for p in parts:
        assert len(p) > 0
        assert len(set(p["label"])) <= k
    # Partitions are disjoint.
    all_ids = [i for p in ids(parts) for i in p]
    assert len(all_ids) == len(set(all_ids))


# --------------------------------------------------------------------------- size skew


def test_size_skew_sizes_hand_checked() -> None:
    assert size_skew_sizes(100, 4, 1.0) == [10, 20, 30, 40]
    # shares 1,4,9,16 of 30: 3.33, 13.33, 30, 53.33 -> floors 3, 13, 30, 53, remainder 1 to the last
    assert size_skew_sizes(100, 4, 2.0) == [3, 13, 30, 54]
    # power 0: equal shares; the remainder goes to the last client
    assert size_skew_sizes(10, 3, 0.0) == [3, 3, 4]


@pytest.mark.parametrize("total,clients,power", [(100, 4, 1.0), (1000, 7, 1.5), (333, 5, 0.5)])
def test_size_skew_sizes_strictly_increase_and_sum_to_total(total: int, clients: int, power: float) -> None:
    sizes = size_skew_sizes(total, clients, power)
    assert len(sizes) == clients
    assert sum(sizes) == total
    assert all(a < b for a, b in zip(sizes, sizes[1:])), sizes


def test_size_skew_partitions_have_those_sizes_and_cover_the_pool() -> None:
    parts = partition_dataset(pool(100), PartitionConfig(method="size-skew"), 4)
    assert [len(p) for p in parts] == [10, 20, 30, 40]
    assert sorted(i for p in ids(parts) for i in p) == list(range(100))


def test_size_skew_with_few_examples_gives_every_client_data_or_a_data_error() -> None:
    try:
        parts = partition_dataset(pool(7), PartitionConfig(method="size-skew"), 7)
    except DataError:
        return  # an explanatory DataError would be acceptable too
    assert all(len(p) >= 1 for p in parts)


# --------------------------------------------------------------------------- errors and local splits


@pytest.mark.parametrize("method", ["iid", "dirichlet", "pathological", "size-skew"])
def test_more_clients_than_examples_is_a_data_error(method: str) -> None:
    with pytest.raises(DataError, match="5 clients but only 4 examples"):
        partition_dataset(pool(4), PartitionConfig(method=method), 5)


def test_split_train_eval_fraction() -> None:
    part = pool(100)
    train, evaluation = split_train_eval(part, 0.2, seed=0)
    assert (len(train), len(evaluation)) == (80, 20)
    assert sorted(list(train["id"]) + list(evaluation["id"])) == list(range(100))
    again, _ = split_train_eval(part, 0.2, seed=0)
    assert list(again["id"]) == list(train["id"])


def test_split_train_eval_with_zero_fraction_keeps_everything_for_training() -> None:
    part = pool(10)
    train, evaluation = split_train_eval(part, 0.0, seed=0)
    assert list(train["id"]) == list(range(10))
    assert len(evaluation) == 0
    assert evaluation.column_names == part.column_names


def test_split_train_eval_with_one_example() -> None:
    train, evaluation = split_train_eval(pool(1), 0.5, seed=0)
    assert (len(train), len(evaluation)) == (1, 0)
