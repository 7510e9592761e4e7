"""Class names of a classification run: in the run directory and in the exported model's config.

The data loader (:func:`fedtune.data.loading.encode_labels`) fixes which index each label
gets. The run directory keeps that order in ``labels.json``, and an exported adapter (or
whole model) carries it as the ``id2label`` / ``label2id`` of its base-model config, so
``model.config.id2label[logits.argmax(-1).item()]`` names the predicted class.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LABELS_FILE = "labels.json"


def label_maps(names: Sequence[str]) -> tuple[dict[int, str], dict[str, int]]:
    """``id2label`` and ``label2id`` for ``names`` (``names[i]`` is the name of index ``i``)."""
    return dict(enumerate(names)), {name: i for i, name in enumerate(names)}


def name_labels(config: Any, names: Sequence[str]) -> Any:
    """Set ``id2label``, ``label2id`` (and with them ``num_labels``) on a transformers config; return it."""
    config.id2label, config.label2id = label_maps(names)
    return config


def write_labels(run_dir: Path, names: Sequence[str]) -> Path:
    """Write ``labels.json``: ``{"id2label": {"0": name, ...}, "label2id": {name: 0, ...}}``."""
    id2label, label2id = label_maps(names)
    path = Path(run_dir) / LABELS_FILE
    path.write_text(json.dumps({"id2label": {str(i): n for i, n in id2label.items()}, "label2id": label2id},
                               indent=2, ensure_ascii=False) + "\n")
    return path


def read_labels(run_dir: Path) -> list[str]:
    """The class names by index from a run directory's ``labels.json``."""
    id2label = json.loads((Path(run_dir) / LABELS_FILE).read_text())["id2label"]
    return [id2label[str(i)] for i in range(len(id2label))]


__all__ = ["LABELS_FILE", "label_maps", "name_labels", "read_labels", "write_labels"]
