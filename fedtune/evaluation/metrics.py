"""Evaluation metrics by name (``eval.metric``): the default from logits, the rest from generated text.

``next_token_accuracy`` (the default) is what :func:`fedtune.objectives.evaluate` always reports
as ``eval_accuracy``: next-token accuracy on the response tokens of a causal LM, label
accuracy for classification. Every other metric is a :class:`GenerativeMetric`: the global
model greedily generates an answer for each held-out prompt
(:mod:`fedtune.evaluation.generation`) and the metric scores the answers against the references; it
is logged as ``eval_<name>`` next to the loss and the accuracy.

Built-ins: ``exact_match`` and ``choice_accuracy`` (rules in :mod:`fedtune.evaluation.answers`) and
``rouge_l`` (Google's ``rouge-score``). A user
metric subclasses :class:`GenerativeMetric`, sets ``name`` and registers with
:func:`register_metric`, or is named by path (``mypkg.mymodule:MyMetric``,
``path/to/file.py:MyMetric``); ``eval.options`` are its constructor's keyword arguments.
This module imports no torch, so the config check can use it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from fedtune.errors import ConfigError
from fedtune.evaluation.answers import extract_answer, extract_choice, normalize_text
from fedtune.options import build_plugin
from fedtune.registry import METRIC_GROUP, Registry
from fedtune.schema import DEFAULT_METRIC


class GenerativeMetric(ABC):
    """Base class of metrics scored on generated text.

    Subclasses set ``name`` (lower case; the run log's key is ``eval_<name>``), take
    keyword-only constructor options (from ``eval.options``) and implement :meth:`compute`.
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def compute(self, predictions: Sequence[str], references: Sequence[str]) -> float:
        """The score of the generations ``predictions`` against ``references`` (same length, in order).

        Parameters
        ----------
        predictions : sequence of str
            The model's generated text for each prompt (new tokens only, up to end of sequence).
        references : sequence of str
            The reference response for each prompt, as in the data set.

        Returns
        -------
        float
            The score, higher is better (the built-ins give a fraction in [0, 1]).
        """


class ExactMatch(GenerativeMetric):
    """Fraction of generations whose extracted answer equals the reference's (:func:`~fedtune.evaluation.answers.extract_answer`)."""

    name = "exact_match"

    def compute(self, predictions: Sequence[str], references: Sequence[str]) -> float:
        _check_lengths(predictions, references)
        hits = sum(extract_answer(p) == extract_answer(r) for p, r in zip(predictions, references))
        return hits / len(references) if references else float("nan")


class ChoiceAccuracy(GenerativeMetric):
    """Fraction of generations whose first named choice is the reference (:func:`~fedtune.evaluation.answers.extract_choice`).

    Parameters
    ----------
    choices : list of str, optional
        The possible answers (``["A", "B", "C", "D"]``). By default, the distinct references
        of the evaluated examples.
    """

    name = "choice_accuracy"

    def __init__(self, *, choices: Sequence[str] | None = None) -> None:
        if choices is not None and not [c for c in choices if str(c).strip()]:
            raise ValueError(f"choices={choices!r} names no choice; give a list such as ['A', 'B', 'C', 'D'] or "
                             "leave it out (the distinct references are the choices)")
        self.choices = [str(c) for c in choices] if choices is not None else None

    def compute(self, predictions: Sequence[str], references: Sequence[str]) -> float:
        _check_lengths(predictions, references)
        choices = self.choices if self.choices is not None else sorted({r.strip() for r in references})
        hits = 0
        for prediction, reference in zip(predictions, references):
            chosen = extract_choice(prediction, choices)
            hits += chosen is not None and normalize_text(chosen) == normalize_text(reference)
        return hits / len(references) if references else float("nan")


class RougeL(GenerativeMetric):
    """Mean ROUGE-L F-measure of the generations against the references (Google's ``rouge-score``).

    ROUGE-L scores the longest common subsequence of tokens: with ``P = LCS / len(prediction)``
    and ``R = LCS / len(reference)``, ``F = 2PR / (P + R)``, averaged over the examples (an
    empty prediction or reference scores 0). Tokens are the library's: lower-cased, every run of
    characters other than ``a-z0-9`` is a separator, so accents and non-Latin scripts drop out.
    It is the score FedKSeed and most instruction-tuning papers report (Natural Instructions,
    Dolly), computed by the same package they use.

    Parameters
    ----------
    use_stemmer : bool, default False
        Porter-stem tokens before matching (``jumps`` = ``jump``), as ``rouge-score`` offers.
    """

    name = "rouge_l"

    def __init__(self, *, use_stemmer: bool = False) -> None:
        if not isinstance(use_stemmer, bool):
            raise ValueError(f"use_stemmer={use_stemmer!r} must be true or false")
        self.use_stemmer = use_stemmer

    def compute(self, predictions: Sequence[str], references: Sequence[str]) -> float:
        _check_lengths(predictions, references)
        if not references:
            return float("nan")
        from rouge_score.rouge_scorer import RougeScorer  # imported on use: the config check needs no NLTK

        scorer = RougeScorer(["rougeL"], use_stemmer=self.use_stemmer)
        scores = [scorer.score(reference, prediction)["rougeL"].fmeasure
                  for prediction, reference in zip(predictions, references)]
        return sum(scores) / len(scores)


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references; give one each")


# --------------------------------------------------------------------------- registry

_REGISTRY: Registry[type[GenerativeMetric]] = Registry(
    "metric", GenerativeMetric, "eval.metric", decorator="register_metric", example="mypkg.mymodule:MyMetric",
    group=METRIC_GROUP, load_all=lambda: None)  # found by entry point (the built-ins also register below)


def register_metric(cls: type[GenerativeMetric]) -> type[GenerativeMetric]:
    """Class decorator that registers a generative metric under ``cls.name``."""
    return _REGISTRY.register(cls)


def registered_metrics() -> dict[str, type[GenerativeMetric]]:
    """Registered generative metrics by name (``next_token_accuracy`` is not one: it needs no generation)."""
    return _REGISTRY.registered()


def is_generative(name: str) -> bool:
    """Whether ``eval.metric=name`` is scored on generated text (every metric but the default)."""
    return name != DEFAULT_METRIC


def build_metric(name: str, options: Mapping[str, Any] | None = None) -> GenerativeMetric:
    """Instantiate a generative metric; an unknown name or bad options raise :class:`ConfigError`.

    Parameters
    ----------
    name : str
        A registered name (``exact_match``) or ``package.module:Class`` / ``path/to/file.py:Class``.
    options : mapping, optional
        Keyword arguments for the metric's constructor (``eval.options``).
    """
    if not is_generative(name):
        raise ConfigError([(f"eval.metric={name!r} is computed from logits by fedtune.objectives.evaluate, "
                            "not from generated text")])
    try:
        cls = _REGISTRY.resolve(name)
    except ConfigError as e:
        raise ConfigError([p.replace("; use one of [", f"; use {DEFAULT_METRIC!r} or one of [", 1)
                           for p in e.problems]) from None
    return build_plugin(cls, dict(options or {}), "eval.options")


def metric_key(metric: GenerativeMetric) -> str:
    """The run log's key for ``metric``: ``eval_<name>`` (the class name when given by path without one)."""
    return f"eval_{metric.name or type(metric).__name__.lower()}"


def generative_key(name: str, options: Mapping[str, Any] | None = None) -> str | None:
    """The run log's key of ``eval.metric=name`` when it is generative (``eval_exact_match``), else None."""
    return metric_key(build_metric(name, options)) if is_generative(name) else None


def metric_problems(name: str, options: Mapping[str, Any]) -> list[str]:
    """Problems with ``eval.metric`` and ``eval.options``, as config problem strings (empty when fine)."""
    if not is_generative(name):
        return [f"eval.options={dict(options)} given, but eval.metric={name!r} takes no options"] if options else []
    try:
        build_metric(name, options)
    except ConfigError as e:
        return e.problems
    return []


register_metric(ExactMatch)
register_metric(ChoiceAccuracy)
register_metric(RougeL)

__all__ = [
    "DEFAULT_METRIC",
    "ChoiceAccuracy",
    "ExactMatch",
    "GenerativeMetric",
    "RougeL",
    "build_metric",
    "generative_key",
    "is_generative",
    "metric_key",
    "metric_problems",
    "register_metric",
    "registered_metrics",
]
