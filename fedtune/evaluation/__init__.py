"""Evaluation: generative metrics, answer extraction and batched generation.

:mod:`~fedtune.evaluation.metrics` is ``eval.metric``'s registry and its built-ins (a user's
metric registers with :func:`~fedtune.evaluation.metrics.register_metric`),
:mod:`~fedtune.evaluation.answers` answer extraction and normalisation,
:mod:`~fedtune.evaluation.generation` batched greedy generation and scoring on a test set.

May import: :mod:`fedtune.schema`, :mod:`fedtune.errors`, :mod:`fedtune.registry`,
:mod:`fedtune.options` (a metric's typed options), :mod:`fedtune.data` and :mod:`fedtune.models`.
"""
