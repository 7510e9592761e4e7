"""Which examples the central test set holds: ``test_set.json`` in the run directory.

It names the source, how the examples were selected from it (every row in order, the
first ``max_test_examples`` after a seeded shuffle, or a seeded held-out share of the
training source), how many there are, and a SHA-256 of
the examples in order, so a reloaded model can be scored on exactly the run's test set and
a changed file is noticed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import datasets

from fedtune.data.loading import CentralTestSet

log = logging.getLogger("fedtune.data")

TEST_SET_FILE = "test_set.json"
HASH_RULE = ("sha256 over the examples in order, each one JSON object per line: its columns with keys sorted, "
             "the label as its name, json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(',', ':')) "
             "+ '\\n', UTF-8")


def _canonical_rows(ds: datasets.Dataset):
    feature = ds.features.get("label")
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    for batch in ds.iter(batch_size=1000):
        columns = sorted(batch)
        for i in range(len(batch[columns[0]])):
            row = {c: batch[c][i] for c in columns}
            if names is not None:
                row["label"] = names[row["label"]]
            yield row


def examples_sha256(ds: datasets.Dataset) -> str:
    """The SHA-256 (hex) of ``ds``'s examples in order, as :data:`HASH_RULE` describes."""
    digest = hashlib.sha256()
    for row in _canonical_rows(ds):
        digest.update((json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n")
                      .encode("utf-8"))
    return digest.hexdigest()


def describe_test_set(selection: CentralTestSet, test: datasets.Dataset) -> dict[str, Any]:
    """What ``test_set.json`` holds: source, selection, number of examples, columns and hash."""
    if selection.held_out_fraction is not None:
        how = (f"held out from the {selection.rows_in_source} examples of data.source: "
               f"datasets.Dataset.train_test_split(test_size={selection.held_out_fraction}, "
               f"seed={selection.held_out_seed})['test']")
        if selection.shuffle_seed is not None:
            how += f", then the first {len(test)} after datasets.Dataset.shuffle(seed={selection.shuffle_seed})"
    elif selection.shuffle_seed is not None:
        how = (f"the first {len(test)} of {selection.rows_in_source} examples after "
               f"datasets.Dataset.shuffle(seed={selection.shuffle_seed})")
    elif selection.generator_seed is not None:
        how = f"generated with seed {selection.generator_seed}, in generated order"
    else:
        how = f"all {selection.rows_in_source} examples, in source order"
    return {"source": selection.source, "format": selection.format, "split": selection.split,
            "selection": {"how": how, **{k: v for k, v in dataclasses.asdict(selection).items()
                                         if k in ("rows_in_source", "shuffle_seed", "max_test_examples",
                                                  "generator_seed", "held_out_fraction", "held_out_seed")
                                         and (v is not None or not k.startswith("held_out"))}},
            "num_examples": len(test), "columns": sorted(test.column_names),
            "sha256": examples_sha256(test), "sha256_of": HASH_RULE}


def write_test_set(run_dir: Path, selection: CentralTestSet, test: datasets.Dataset) -> dict[str, Any]:
    """Write ``test_set.json`` into ``run_dir``; return what it holds.

    A resumed run whose test set hashes differently from the one recorded is warned about:
    its later evaluations are not comparable with the earlier ones.
    """
    record = describe_test_set(selection, test)
    path = Path(run_dir) / TEST_SET_FILE
    if path.is_file():
        before = json.loads(path.read_text()).get("sha256")
        if before != record["sha256"]:
            log.warning("the central test set differs from the one %s recorded (sha256 %s..., now %s...): "
                        "evaluations before and after this resume are not comparable; restore %s",
                        path, str(before)[:12], record["sha256"][:12], selection.source)
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return record


__all__ = ["HASH_RULE", "TEST_SET_FILE", "describe_test_set", "examples_sha256", "write_test_set"]
