"""Typed plug-in options: read from the constructor and docstring, checked before any model loads."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import pytest

from fedtune.cli import main
from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.options import REQUIRED, matches, option_problems, options_dataclass, options_of, parameter_help
from fedtune.strategy import registered_strategies


class Toy:
    """A plug-in with every kind of option.

    Parameters
    ----------
    rate : float
        The step size,
        on two lines.
    count : int
        How many.
    name, label : str
        Two at once.
    """

    def __init__(self, *, rate: float, count: int = 3, name: str = "a", label: str | None = None,
                 mode: Literal["x", "y"] = "x", patterns: Sequence[str] | None = None, flag: bool = False) -> None:
        self.rate = rate


def test_the_docstring_gives_each_parameter_its_help() -> None:
    assert parameter_help(Toy.__doc__) == {"rate": "The step size, on two lines.", "count": "How many.",
                                           "name": "", "label": "Two at once."}


def test_options_are_the_constructor_keywords_with_types_and_defaults() -> None:
    options = {o.name: o for o in options_of(Toy)}
    assert list(options) == ["rate", "count", "name", "label", "mode", "patterns", "flag"]
    assert options["rate"].default is REQUIRED and options["count"].default == 3
    assert options["label"].type_name == "str | None" and options["mode"].type_name == "'x' | 'y'"
    assert options_of(object) == []


@pytest.mark.parametrize(("value", "annotation", "fits"), [
    (1, float, True), (1.5, float, True), (True, float, False), ("1", float, False),
    (2, int, True), (2.0, int, False), (False, int, False), (True, bool, True), (0, bool, False),
    (None, int | None, True), ("x", Literal["x", "y"], True), ("z", Literal["x", "y"], False),
    (["a", "b"], Sequence[str], True), (["a", 1], Sequence[str], False), ("ab", Sequence[str], False),
    ({"a": 1}, dict, True), ([], dict, False),
])
def test_values_are_checked_as_yaml_gives_them(value: object, annotation: object, fits: bool) -> None:
    assert matches(value, annotation) is fits


def test_every_problem_names_the_key_the_value_and_what_it_must_be() -> None:
    problems = option_problems(Toy, {"count": 2.5, "flag": "yes", "mode": "z", "extra": 1}, "strategy.options")
    assert problems == [
        "strategy.options.count=2.5 must be an integer (Toy, default 3): How many.",
        "strategy.options.flag='yes' must be true or false (Toy, default False)",
        "strategy.options.mode='z' must be one of 'x', 'y' (Toy, default 'x')",
        "strategy.options.extra is not an option of Toy (accepted: ['rate', 'count', 'name', 'label', 'mode', "
        "'patterns', 'flag']; `fedtune strategies NAME` describes them)",
        "strategy.options.rate is required by Toy: set it (float)",
    ]


def test_the_options_dataclass_carries_types_defaults_and_help() -> None:
    cls = options_dataclass(Toy)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert cls.__name__ == "ToyOptions" and fields["count"].metadata["help"] == "How many."
    assert cls(rate=0.1).count == 3
    with pytest.raises(TypeError):
        cls()  # rate is required


@pytest.mark.parametrize(("overrides", "expected"), [
    (["strategy.name=lora-fair", "strategy.options.lam=abc"],
     "strategy.options.lam='abc' must be a number (LoRAFAIR, default 0.01)"),
    (["strategy.name=fedkseed", "strategy.options.k=1.5"], "strategy.options.k=1.5 must be an integer (FedKSeed"),
    (["strategy.name=examples/fedprox.py:FedProx", "strategy.options.mu=abc"],
     "strategy.options.mu='abc' must be a number (FedProx, default 0.01)"),
    (["model.task=causal-lm", "model.name=builtin:SmolLM2-135M-Instruct", "eval.metric=rouge_l",
      "eval.options.use_stemmer=1"], "eval.options.use_stemmer=1 must be true or false (RougeL"),
])
def test_a_wrongly_typed_option_is_a_config_error_for_built_ins_and_users_alike(overrides: list[str],
                                                                                expected: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, overrides)
    assert any(p.startswith(expected) for p in excinfo.value.problems), excinfo.value.problems


def test_every_built_in_option_is_typed_and_described() -> None:
    missing = [f"{name}.{o.name}" for name, cls in registered_strategies().items() for o in options_of(cls)
               if o.annotation is object or not o.help]
    assert missing == []


def test_fedtune_strategies_name_prints_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies", "lora-fair"]) == 0
    out = capsys.readouterr().out
    assert "lam: float = 0.01" in out and "the weight of ‖ΔB‖" in out and "steps: int = 50" in out
