"""Read a data set from a local file (or generate one) into a ``datasets.Dataset``.

The result has the columns the rest of fedtune expects: ``text`` and ``label`` (an int)
for classification, ``prompt`` and ``response`` for causal-LM instruction tuning (Alpaca
records also keep their ``input``). Prompts stay raw text here; the prompt format
(:mod:`fedtune.data.prompts`) is applied when they are tokenized.
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa

from fedtune.data.checks import check_labels, mixed_type_problem, require_values, warn_unseen_labels
from fedtune.data.generated import GENERATED_LABELS, GENERATED_TASKS, GENERATED_TEST_SIZE, GENERATED_TRAIN_SIZE
from fedtune.data.preference import standardize_pairs
from fedtune.data.prompts import join_alpaca
from fedtune.errors import DataError
from fedtune.schema import DataConfig


def _format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    if path.is_dir():
        return "disk"
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl", ".csv", ".tsv"):
        return suffix[1:]
    raise DataError(f"cannot tell the format of {str(path)!r} from its suffix; set data.format "
                    "to json, jsonl, csv, tsv or disk")


def _json_options() -> dict[str, object]:
    """Read JSON values as they are: "04" or "1e5" stay strings, a "date" column is not parsed.

    ``dtype=False`` does both from pandas 3 on, which deprecates ``convert_dates``; older
    pandas still converts date-like column names unless told not to.
    """
    default = inspect.signature(pd.read_json).parameters["convert_dates"].default
    return {"dtype": False} if default is not True else {"dtype": False, "convert_dates": False}


def _read_frame(path: Path, fmt: str, column_names: list[str] | None) -> pd.DataFrame:
    header = None if column_names else "infer"
    if fmt == "csv":
        return pd.read_csv(path, header=header, names=column_names, keep_default_na=False)
    if fmt == "tsv":
        # SST-style TSV files carry bare quotes inside sentences: read them literally.
        return pd.read_csv(path, sep="\t", header=header, names=column_names,
                           quoting=csv.QUOTE_NONE, keep_default_na=False)
    if fmt == "jsonl":
        return pd.read_json(path, lines=True, **_json_options())
    if fmt == "json":
        try:
            return pd.read_json(path, **_json_options())
        except ValueError:
            return pd.read_json(path, lines=True, **_json_options())
    raise DataError(f"unsupported data.format {fmt!r}")


def _check_not_empty(path: Path, source: str, fmt: str) -> None:
    """Raise :class:`DataError` naming the file and the fix when it holds nothing but whitespace."""
    if path.stat().st_size > 4096 or path.read_bytes().strip():
        return
    shape = {"csv": "a header row (e.g. text,label) and one example per line",
             "tsv": "a header row and one tab-separated example per line",
             "jsonl": "one JSON object per line", "json": "a JSON list of objects"}.get(fmt, "examples")
    raise DataError(f"data file {source!r} is empty; put {shape} in it, or point data.source "
                    "(data.test_source) at another file")


def _read_source(source: str, cfg: DataConfig) -> tuple[datasets.Dataset, str, str | None]:
    """The table, its format, and the split taken from a saved ``DatasetDict`` (else None)."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"data file {source!r} does not exist")
    fmt = _format_of(path, cfg.format)
    if fmt == "disk":
        loaded = datasets.load_from_disk(str(path))
        split = None
        if isinstance(loaded, datasets.DatasetDict):
            split = "train" if "train" in loaded else next(iter(loaded))
            loaded = loaded[split]
        return loaded, fmt, split
    _check_not_empty(path, source, fmt)
    try:
        frame = _read_frame(path, fmt, cfg.column_names)
    except (ValueError, pd.errors.ParserError) as e:
        raise DataError(f"cannot read {source!r} as {fmt}: {e}") from e
    try:
        return datasets.Dataset.from_pandas(frame, preserve_index=False), fmt, None
    except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
        raise DataError(mixed_type_problem(frame, source, header_lines(fmt, cfg)) or
                        f"cannot read {source!r} as a table: {e}") from e


def _alpaca_to_prompt_response(ds: datasets.Dataset, group_column: str | None) -> datasets.Dataset:
    """``prompt`` = instruction (+ blank line + input), ``input`` kept so ``alpaca`` renders it exactly."""
    def convert(row: dict) -> dict:
        extra = str(row.get("input") or "").strip()
        out = {"prompt": join_alpaca(str(row["instruction"]).strip(), extra), "input": extra,
               "response": str(row["output"]).strip()}
        if group_column is not None:
            out["group"] = str(row[group_column])
        return out

    missing = {"instruction", "output"} - set(ds.column_names)
    if missing:
        raise DataError(f"data.alpaca=true needs columns instruction/input/output; missing {sorted(missing)}")
    return ds.map(convert, remove_columns=ds.column_names)


def header_lines(fmt: str, cfg: DataConfig) -> int | None:
    """Lines before record 0 in a ``fmt`` file (None: records are not lines, as in a JSON list)."""
    if fmt in ("csv", "tsv"):
        return 0 if cfg.column_names else 1
    return 0 if fmt == "jsonl" else None


def standardize(ds: datasets.Dataset, cfg: DataConfig, task: str, source: str,
                objective: str = "sft", fmt: str = "disk") -> datasets.Dataset:
    """Rename the configured columns to fedtune's (``group_column`` to ``group``) and drop the rest.

    With ``objective="dpo"`` the records are preference pairs
    (:func:`fedtune.data.preference.standardize_pairs`).

    Raises
    ------
    DataError
        A configured column is missing; a label or response is blank; labels mix integers with
        other values or are negative (:mod:`fedtune.data.checks`). ``fmt`` (the file's format)
        lets the message give a table's line numbers.
    """
    if cfg.group_column is not None and cfg.group_column not in ds.column_names:
        raise DataError(f"data.group_column={cfg.group_column!r}: {source!r} has no such column; it has "
                        f"{ds.column_names}")
    if objective == "dpo":
        return standardize_pairs(ds, cfg, source)
    lines = header_lines(fmt, cfg)
    if task == "causal-lm":
        if cfg.alpaca:
            if "output" in ds.column_names:
                require_values(ds["output"], source, "output", "response", lines)
            return _alpaca_to_prompt_response(ds, cfg.group_column)
        wanted = {cfg.prompt_column: "prompt", cfg.response_column: "response"}
    else:
        wanted = {cfg.text_column: "text", cfg.label_column: "label"}
    missing = [c for c in wanted if c not in ds.column_names]
    if missing:
        keys = "data.prompt_column/response_column" if task == "causal-lm" else "data.text_column/label_column"
        raise DataError(f"{source!r} has no column(s) {missing}; it has {ds.column_names}. "
                        f"Set {keys} (or data.column_names for a file without a header)")
    if task == "causal-lm":
        require_values(ds[cfg.response_column], source, cfg.response_column, "response", lines)
    else:
        check_labels(ds[cfg.label_column], source, cfg.label_column, lines)
    if cfg.group_column is not None:
        ds = ds.map(lambda row: {"group": str(row[cfg.group_column])})
        wanted["group"] = "group"
    ds = ds.select_columns(list(wanted)).rename_columns({k: v for k, v in wanted.items() if k != v})
    for column in ("prompt", "response") if task == "causal-lm" else ("text",):
        ds = ds.cast_column(column, datasets.Value("string"))
    return ds


def encode_labels(train: datasets.Dataset, test: datasets.Dataset | None,
                  test_source: str = "test") -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    """Map labels to 0..n-1 (ints keep their order, strings sort), the same for both splits.

    Returns both splits and the label names by index: a string label is its own name, an
    int label of a ``ClassLabel`` column is named by that feature (``0`` -> ``negative``),
    any other int by its digits. Test labels no training example has are kept, with a warning
    naming them and their counts (``test_source`` says where the test set came from).
    """
    if test is not None:
        warn_unseen_labels(train["label"], test["label"], test_source)
    values = set(train["label"]) | (set(test["label"]) if test is not None else set())
    names = sorted(values, key=lambda v: (isinstance(v, str), v))
    index = {v: i for i, v in enumerate(names)}
    is_identity = all(isinstance(v, int) and index[v] == v for v in names)
    feature = train.features["label"]
    known = feature.names if isinstance(feature, datasets.ClassLabel) else []
    label_names = [known[v] if isinstance(v, int) and 0 <= v < len(known) else str(v) for v in names]
    if len(set(label_names)) != len(label_names):
        raise DataError(f"labels {names} give the same name twice ({label_names}); use one type of label "
                        "(all strings or all integers) in data.label_column")

    def relabel(ds: datasets.Dataset) -> datasets.Dataset:
        ds = ds if is_identity else ds.map(lambda r: {"label": index[r["label"]]})
        return ds.cast_column("label", datasets.ClassLabel(names=label_names))

    return relabel(train), (relabel(test) if test is not None else None), label_names


@dataclass(frozen=True)
class CentralTestSet:
    """How the central test set was taken from its source (see :mod:`fedtune.data.provenance`).

    Attributes
    ----------
    source : str
        ``data.test_source`` (a file or a saved ``datasets`` folder), or ``generated:<task>``.
    format : str
        The format it was read as (``tsv``, ``disk``, ...; ``generated``).
    split : str or None
        The split taken from a saved ``DatasetDict``.
    rows_in_source : int
        Examples the source holds.
    shuffle_seed : int or None
        Set when ``data.max_test_examples`` cut the source: the examples are the first
        ``max_test_examples`` after ``Dataset.shuffle(seed=shuffle_seed)``; None: every row,
        in source order.
    max_test_examples : int or None
        ``data.max_test_examples``.
    generator_seed : int or None
        The seed a generated test set was made with.
    held_out_fraction : float or None
        ``data.test_fraction``: the test set is ``Dataset.train_test_split(test_size=fraction,
        seed=held_out_seed)["test"]`` of ``data.source``, the rest the training pool.
    held_out_seed : int or None
        The seed of that split (``data.seed``).
    """

    source: str
    format: str
    split: str | None
    rows_in_source: int
    shuffle_seed: int | None
    max_test_examples: int | None
    generator_seed: int | None = None
    held_out_fraction: float | None = None
    held_out_seed: int | None = None


@dataclass(frozen=True)
class Splits:
    """What :func:`load_data` returns: the training pool, the central test set and how it was taken."""

    pool: datasets.Dataset
    test: datasets.Dataset | None
    test_selection: CentralTestSet | None


def load_splits(cfg: DataConfig, task: str, objective: str = "sft") -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training pool (to be partitioned) and the server's central test set, if any."""
    splits = load_data(cfg, task, objective)
    return splits.pool, splits.test


def load_data(cfg: DataConfig, task: str, objective: str = "sft") -> Splits:
    """:func:`load_splits`, and how the central test set was selected from its source.

    ``objective`` is ``train.objective``: ``dpo`` reads preference pairs.
    """
    selection = None
    if cfg.source.startswith("generated:"):
        task_name = cfg.source.split(":", 1)[1]
        if task_name not in GENERATED_TASKS or task != "classification":
            raise DataError(f"data.source={cfg.source!r}: generated tasks are "
                            f"{['generated:' + t for t in GENERATED_TASKS]} (classification only)")
        make = GENERATED_TASKS[task_name]
        features = datasets.Features({"text": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=list(GENERATED_LABELS[task_name]))})
        train = datasets.Dataset.from_dict(make(GENERATED_TRAIN_SIZE, seed=cfg.seed), features=features)
        test = datasets.Dataset.from_dict(make(GENERATED_TEST_SIZE, seed=cfg.seed + 10_000), features=features)
        selection = CentralTestSet(source=cfg.source, format="generated", split=None, rows_in_source=len(test),
                                  shuffle_seed=None, max_test_examples=cfg.max_test_examples,
                                  generator_seed=cfg.seed + 10_000)
    else:
        raw, fmt, split = _read_source(cfg.source, cfg)
        train = standardize(raw, cfg, task, cfg.source, objective, fmt)
        test = None
        if cfg.test_fraction is not None:
            if len(train) < 2:
                raise DataError(f"data.test_fraction={cfg.test_fraction}: {cfg.source!r} holds {len(train)} "
                                "example(s), too few to hold any out; add rows or give data.test_source")
            rows = len(train)
            held = train.train_test_split(test_size=cfg.test_fraction, seed=cfg.seed)
            train, test = held["train"], held["test"]
            selection = CentralTestSet(source=cfg.source, format=fmt, split=split, rows_in_source=rows,
                                      shuffle_seed=None, max_test_examples=cfg.max_test_examples,
                                      held_out_fraction=cfg.test_fraction, held_out_seed=cfg.seed)
        if cfg.test_source:
            test_cfg = dataclasses.replace(cfg, text_column=cfg.test_text_column or cfg.text_column, group_column=None)
            raw, fmt, split = _read_source(cfg.test_source, cfg)
            test = standardize(raw, test_cfg, task, cfg.test_source, objective, fmt)
            selection = CentralTestSet(source=cfg.test_source, format=fmt, split=split, rows_in_source=len(test),
                                      shuffle_seed=None, max_test_examples=cfg.max_test_examples)
    if cfg.max_examples is not None and len(train) > cfg.max_examples:
        train = train.shuffle(seed=cfg.seed).select(range(cfg.max_examples))
    if test is not None and cfg.max_test_examples is not None and len(test) > cfg.max_test_examples:
        test = test.shuffle(seed=cfg.seed).select(range(cfg.max_test_examples))
        selection = dataclasses.replace(selection, shuffle_seed=cfg.seed)
    if task == "classification":
        train, test, _ = encode_labels(train, test, selection.source if selection else "test")
    if len(train) == 0:
        raise DataError(f"data.source={cfg.source!r} holds no examples; add rows to it, or point data.source "
                        "at another file")
    return Splits(pool=train, test=test, test_selection=selection)


def num_labels(train: datasets.Dataset) -> int:
    return train.features["label"].num_classes


def label_names(train: datasets.Dataset) -> list[str]:
    """The class names by index (``names[i]`` is what label ``i`` means) of an encoded split."""
    return list(train.features["label"].names)
