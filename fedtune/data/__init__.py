"""Data: reading local files or the generated task, partitioning across clients, prompt formats, tokenizing."""

from fedtune.data.loading import label_names, load_data, load_splits, num_labels
from fedtune.data.partition import partition_dataset, split_train_eval
from fedtune.data.prompts import render_prompt, resolve_prompt_format
from fedtune.data.tokenize import collate, tokenize

__all__ = ["collate", "label_names", "load_data", "load_splits", "num_labels", "partition_dataset", "render_prompt",
           "resolve_prompt_format", "split_train_eval", "tokenize"]
