"""Checks on the values of a data set as it is read: blanks, mixed or negative labels, unseen test labels.

Each problem is reported with the file, the record (counted from 0 in file order, and the line
of a CSV/TSV file) and the value, before any model loads: a blank label or response is never
trained on, and a label column that mixes integers with words is never turned into classes.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from fedtune.errors import DataError

log = logging.getLogger("fedtune.data")

_INTEGER = re.compile(r"[+-]?\d+")
_SHOWN = 5  # records named in one message
_warned: set[str] = set()  # a process warns about one file once, however often it reads it


def is_blank(value: Any) -> bool:
    """None, NaN, or a string of nothing but whitespace."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def record_of(index: int, header_lines: int | None) -> str:
    """``record 3`` (counted from 0), with its line when the file is a table (``header_lines`` not None)."""
    line = "" if header_lines is None else f", line {index + header_lines + 1}"
    return f"record {index}{line}"


def _listed(found: Sequence[tuple[int, Any]], header_lines: int | None) -> str:
    shown = "; ".join(f"{value!r} ({record_of(index, header_lines)})" for index, value in found[:_SHOWN])
    return shown + (f"; and {len(found) - _SHOWN} more" if len(found) > _SHOWN else "")


def require_values(values: Sequence[Any], source: str, column: str, what: str, header_lines: int | None) -> None:
    """Raise :class:`DataError` naming every record of ``column`` whose value is blank."""
    blank = [(i, v) for i, v in enumerate(values) if is_blank(v)]
    if blank:
        raise DataError(f"{source!r}, column {column!r}: {len(blank)} record(s) have no {what}: "
                        f"{_listed(blank, header_lines)}; fill them in or drop those records")


def _is_integer(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or \
        (isinstance(value, str) and bool(_INTEGER.fullmatch(value.strip())))


def check_labels(labels: Sequence[Any], source: str, column: str, header_lines: int | None) -> None:
    """Refuse blank labels, a column mixing integers with words, and negative integer labels.

    Raises
    ------
    DataError
        Every problem found, each naming ``source``, ``column``, the odd values and their records.
    """
    where = f"{source!r}, column {column!r}"
    problems = []
    blank = [(i, v) for i, v in enumerate(labels) if is_blank(v)]
    if blank:
        problems.append(f"{where}: {len(blank)} record(s) have no label: {_listed(blank, header_lines)}; "
                        "fill them in or drop those records")
    filled = [(i, v) for i, v in enumerate(labels) if not is_blank(v)]
    integers = [(i, v) for i, v in filled if _is_integer(v)]
    words = [(i, v) for i, v in filled if not _is_integer(v)]
    if integers and words:
        odd, usual = (words, "integers") if len(words) <= len(integers) else (integers, "words")
        problems.append(f"{where} mixes integer labels with other values; most are {usual}, these are not: "
                        f"{_listed(odd, header_lines)}. Use one kind of label (all class numbers or all class "
                        "names): fix or drop those records")
    negative = [(i, v) for i, v in integers if int(v) < 0]
    if negative:
        problems.append(f"{where} has negative labels: {_listed(negative, header_lines)}. A negative label "
                        "usually marks an unlabelled example (GLUE's test splits use -1): drop those records, "
                        "or number the classes from 0")
    if problems:
        raise DataError(problems[0] if len(problems) == 1 else
                        f"{len(problems)} problems with the labels:\n" + "\n".join(f"  - {p}" for p in problems))


def mixed_type_problem(frame: Any, source: str, header_lines: int | None) -> str | None:
    """What makes a pandas ``frame`` unfit for one typed column each: the first column whose values mix
    Python types (a JSON label that is sometimes ``1``, sometimes ``"pos"``), with the odd records."""
    for column in frame.columns:
        values = [v for v in frame[column].tolist() if not is_blank(v)]
        kinds = Counter(type(v).__name__ for v in values)
        if len(kinds) > 1:
            usual = kinds.most_common(1)[0][0]
            odd = [(i, v) for i, v in enumerate(frame[column].tolist()) if not is_blank(v) and type(v).__name__ != usual]
            return (f"{source!r}, column {column!r} mixes value types ({', '.join(sorted(kinds))}); most are {usual}, "
                    f"these are not: {_listed(odd, header_lines)}. Use one kind of value per column: fix or drop "
                    "those records")
    return None


def warn_unseen_labels(train: Sequence[Any], test: Sequence[Any], test_source: str) -> None:
    """Warn once about test labels no training example has: the model can never predict them."""
    seen = set(train)
    unseen = Counter(v for v in test if v not in seen)
    key = f"{test_source}:{sorted(map(str, unseen))}"
    if not unseen or key in _warned:
        return
    _warned.add(key)
    listed = ", ".join(f"{label!r} ({count} example{'s' if count > 1 else ''})" for label, count in unseen.items())
    log.warning("the test set %r has label(s) that no training example has: %s; the model cannot predict them, "
                "so they count as errors in every round", test_source, listed)


__all__ = ["check_labels", "is_blank", "mixed_type_problem", "record_of", "require_values", "warn_unseen_labels"]
