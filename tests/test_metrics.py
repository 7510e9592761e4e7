"""The eval metric registry and the built-in generative metrics, and how the config checks them."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.evaluation.metrics import (
    DEFAULT_METRIC,
    ChoiceAccuracy,
    ExactMatch,
    GenerativeMetric,
    RougeL,
    build_metric,
    generative_key,
    is_generative,
    register_metric,
    registered_metrics,
)

LM = ["model.task=causal-lm"]


def test_exact_match_scores_extracted_answers() -> None:
    references = ["6 * 7 = 42\n#### 42", "#### 1,234", "#### 5"]
    predictions = ["... so the answer is 42.", "#### $1234.00", "I think 6"]
    assert ExactMatch().compute(predictions, references) == pytest.approx(2 / 3)


def test_choice_accuracy_takes_the_references_as_choices_by_default() -> None:
    references = ["B", "A", "C", "positive"]
    predictions = ["(B) because", "Answer: C, not A", "nothing", "POSITIVE"]
    assert ChoiceAccuracy().compute(predictions, references) == pytest.approx(2 / 4)


def test_choice_accuracy_with_given_choices() -> None:
    # With choices A-D given, "D" is a choice though no reference is D: the first answer is wrong.
    metric = ChoiceAccuracy(choices=["A", "B", "C", "D"])
    assert metric.compute(["D, then A", "B"], ["A", "B"]) == 0.5


def test_rouge_l_hand_worked_cases() -> None:
    # LCS(the cat sat on the mat, the cat lay on a mat) = the cat on mat: P = R = 4/6, F = 2/3.
    assert RougeL().compute(["the cat lay on a mat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    # A reversed sentence shares one token in order: P = R = 1/4.
    assert RougeL().compute(["d c b a"], ["a b c d"]) == pytest.approx(0.25)
    # Case and punctuation are not tokens; an empty generation scores 0; the mean is over examples.
    assert RougeL().compute(["The Cat!", ""], ["the cat", "anything"]) == pytest.approx(0.5)
    # Unequal lengths: LCS 2 of a 2-token prediction and a 4-token reference: F = 2·1·0.5/1.5.
    assert RougeL().compute(["big dog"], ["a big red dog"]) == pytest.approx(2 / 3)


def test_rouge_l_matches_the_librarys_own_example() -> None:
    # rouge-score's README: score('The quick brown fox jumps over the lazy dog',
    # 'The quick brown dog jumps on the log.') gives rougeL P 0.625, R 0.5556, F 0.5882.
    target, prediction = "The quick brown fox jumps over the lazy dog", "The quick brown dog jumps on the log."
    assert RougeL().compute([prediction], [target]) == pytest.approx(0.5882352941, abs=1e-9)
    # With the Porter stemmer "jumps" and "jump" match; without it they do not.
    assert RougeL().compute(["he jumps"], ["he jump"]) == pytest.approx(0.5)
    assert RougeL(use_stemmer=True).compute(["he jumps"], ["he jump"]) == pytest.approx(1.0)


def test_rouge_l_is_a_config_metric_with_its_option() -> None:
    cfg = load_config(None, [*LM, "eval.metric=rouge_l", "eval.options.use_stemmer=true"])
    assert generative_key(cfg.eval.metric, cfg.eval.options) == "eval_rouge_l"
    with pytest.raises(ConfigError, match="use_stemmer='maybe' must be true or false"):
        load_config(None, [*LM, "eval.metric=rouge_l", "eval.options.use_stemmer=maybe"])


def test_metrics_refuse_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        ExactMatch().compute(["1", "2"], ["1"])


def test_default_is_the_logit_metric_and_the_builtins_are_registered() -> None:
    assert not is_generative(DEFAULT_METRIC) and is_generative("exact_match")
    assert {"exact_match", "choice_accuracy", "rouge_l"} <= set(registered_metrics())
    assert generative_key(DEFAULT_METRIC) is None
    assert generative_key("choice_accuracy", {"choices": ["A", "B"]}) == "eval_choice_accuracy"


def test_register_metric_checks_the_class_and_the_name() -> None:
    class Taken(GenerativeMetric):
        name = "exact_match"

        def compute(self, predictions, references):  # type: ignore[no-untyped-def]
            return 0.0

    with pytest.raises(ValueError, match="taken by ExactMatch"):
        register_metric(Taken)
    with pytest.raises(TypeError, match="GenerativeMetric subclass"):
        register_metric(int)  # type: ignore[arg-type]


USER_METRIC = '''
from fedtune.evaluation.metrics import GenerativeMetric, register_metric


@register_metric
class Longest(GenerativeMetric):
    """Fraction of generations longer than the reference."""

    name = "longer_than_reference"

    def __init__(self, *, margin: int = 0):
        self.margin = margin

    def compute(self, predictions, references):
        return sum(len(p) > len(r) + self.margin for p, r in zip(predictions, references)) / len(references)
'''


def test_a_user_metric_by_path_with_options(tmp_path: Path) -> None:
    path = tmp_path / "my_metric.py"
    path.write_text(USER_METRIC)
    metric = build_metric(f"{path}:Longest", {"margin": 1})
    assert metric.compute(["abcd", "ab"], ["ab", "a"]) == 0.5
    assert generative_key(f"{path}:Longest") == "eval_longer_than_reference"
    # Importing the file registered it: its name works too.
    assert isinstance(build_metric("longer_than_reference"), type(metric))
    cfg = load_config(None, [*LM, f"eval.metric={path}:Longest", "eval.options={margin: 2}"], check_strategy=False)
    assert cfg.eval.options == {"margin": 2}


def test_config_reports_every_eval_problem_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*LM, "eval.metric=exact_matc", "eval.max_new_tokens=0", "eval.batch_size=0",
                           "eval.max_examples=0"], check_strategy=False)
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert "eval.metric='exact_matc' is not a registered metric; use 'next_token_accuracy' or one of" in problems[0]
    assert "'exact_match'" in problems[0]


def test_config_reports_bad_metric_options() -> None:
    with pytest.raises(ConfigError, match=r"eval.options.x is not an option of ExactMatch \(accepted: none\)"):
        load_config(None, [*LM, "eval.metric=exact_match", "eval.options={x: 1}"], check_strategy=False)
    with pytest.raises(ConfigError, match="choices=\\[\\] names no choice"):
        load_config(None, [*LM, "eval.metric=choice_accuracy", "eval.options={choices: []}"], check_strategy=False)
    with pytest.raises(ConfigError, match="eval.metric='next_token_accuracy' takes no options"):
        load_config(None, ["eval.options={x: 1}"], check_strategy=False)


def test_a_generative_metric_on_a_classification_task_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.task=classification", "eval.metric=exact_match"], check_strategy=False)
    assert info.value.problems == [
        ("eval.metric='exact_match' scores generated text, which model.task='classification' does not produce (it "
         "reports label accuracy as eval_accuracy); leave eval.metric at next_token_accuracy, or use "
         "model.task=causal-lm")]
    assert load_config(None, [*LM, "eval.metric=exact_match"], check_strategy=False).eval.metric == "exact_match"
