"""Data: reading local files or the generated task, partitioning across clients, prompt formats, tokenizing.

:mod:`~fedtune.data.loading` reads CSV, JSON(L), TSV and saved datasets (and the generated
task), with :mod:`~fedtune.data.checks` checking their values and :mod:`~fedtune.data.preference`
reading preference pairs; :mod:`~fedtune.data.partition` splits the pool across clients
(flwr-datasets' partitioners); :mod:`~fedtune.data.prompts` renders prompt formats (chat,
Alpaca, plain); :mod:`~fedtune.data.tokenize` tokenizes; :mod:`~fedtune.data.labels` keeps class
names and :mod:`~fedtune.data.provenance` the central test set's record.

May import: :mod:`fedtune.schema`, :mod:`fedtune.errors` and :mod:`fedtune.models` (tokenizers'
chat templates). Both sides read data; the data room depends on neither.
"""

from fedtune.data.loading import label_names, load_data, load_splits, num_labels
from fedtune.data.partition import partition_dataset, split_train_eval
from fedtune.data.prompts import render_prompt, resolve_prompt_format
from fedtune.data.tokenize import collate, tokenize

__all__ = ["collate", "label_names", "load_data", "load_splits", "num_labels", "partition_dataset", "render_prompt",
           "resolve_prompt_format", "split_train_eval", "tokenize"]
