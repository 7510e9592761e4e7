"""fedtune.strategy: the registry, resolving strategies by name or path, check_update, select."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import fedtune.strategies
import pytest
import torch
from fedtune.strategies.fedit import FedIT

import fedtune.strategy as strategy_module
from fedtune.config import load_config
from fedtune.errors import ConfigError, InvalidUpdateError
from fedtune.strategy import (
    ClientInstruction,
    ClientUpdate,
    Strategy,
    build_strategy,
    check_update,
    register_strategy,
    registered_strategies,
    resolve_strategy,
    select,
    shapes_of,
)

fedtune.strategies.import_all()  # registers the built-ins in the real registry before any test patches it


class _Minimal(Strategy):
    """A do-nothing strategy to register under test names."""

    def configure_client(self, server_round: int, node_id: int) -> ClientInstruction:
        return ClientInstruction(arrays={}, trainable=(), expects={})

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        return {}

    def global_adapter(self) -> dict[str, torch.Tensor]:
        return {}


def strategy_class(name: str) -> type[Strategy]:
    return type(f"S_{name.replace('-', '_')}", (_Minimal,), {"name": name})


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, type[Strategy]]:
    """A private copy of the registry, so test registrations do not leak into other tests."""
    copy = dict(strategy_module._REGISTRY._entries)
    monkeypatch.setattr(strategy_module._REGISTRY, "_entries", copy)
    return copy


# --------------------------------------------------------------------------- register_strategy


def test_register_strategy_adds_a_name(registry: dict[str, type[Strategy]]) -> None:
    cls = strategy_class("my-strategy_2")
    assert register_strategy(cls) is cls  # usable as a decorator
    assert registered_strategies()["my-strategy_2"] is cls
    assert resolve_strategy("my-strategy_2") is cls


def test_register_strategy_rejects_a_duplicate_name(registry: dict[str, type[Strategy]]) -> None:
    with pytest.raises(ValueError, match="'fedit' is taken by FedIT"):
        register_strategy(strategy_class("fedit"))
    assert registry["fedit"] is FedIT


def test_registering_the_same_class_twice_is_harmless(registry: dict[str, type[Strategy]]) -> None:
    assert register_strategy(FedIT) is FedIT
    assert registry["fedit"] is FedIT


@pytest.mark.parametrize("name", ["MyStrategy", "fedIT", "", "1fed", "fed it", "fed.it"])
def test_register_strategy_rejects_bad_names(registry: dict[str, type[Strategy]], name: str) -> None:
    with pytest.raises(ValueError, match="must be lower-case"):
        register_strategy(strategy_class(name))
    assert name not in registry


@pytest.mark.parametrize("thing", [dict, object(), lambda: None])
def test_register_strategy_rejects_non_strategies(registry: dict[str, type[Strategy]], thing: object) -> None:
    with pytest.raises(TypeError, match="expects a Strategy subclass"):
        register_strategy(thing)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- resolve_strategy


def test_resolve_by_registered_name() -> None:
    assert resolve_strategy("fedit") is FedIT


def test_resolve_by_module_path() -> None:
    assert resolve_strategy("fedtune.strategies.fedit:FedIT") is FedIT


def write_strategy_file(folder: Path, module: str) -> Path:
    path = folder / f"{module}.py"
    path.write_text(textwrap.dedent('''
        from fedtune.strategy import ClientInstruction, Strategy

        class FileStrategy(Strategy):
            name = "file-strategy"

            def __init__(self, *, mu: float = 0.0):
                self.mu = mu

            def configure_client(self, server_round, node_id):
                return ClientInstruction(arrays={}, trainable=(), expects={})

            def aggregate(self, server_round, updates):
                return {}

            def global_adapter(self):
                return {}

        NOT_A_STRATEGY = 3
    '''))
    return path


def test_resolve_by_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = "fedtune_test_file_strategy_abs"
    monkeypatch.delitem(sys.modules, module, raising=False)  # restored (removed) after the test
    path = write_strategy_file(tmp_path, module)
    cls = resolve_strategy(f"{path}:FileStrategy")
    assert issubclass(cls, Strategy) and cls.__name__ == "FileStrategy"
    built = build_strategy(f"{path}:FileStrategy", {"mu": 0.5})
    assert type(built).__name__ == "FileStrategy" and built.mu == 0.5  # type: ignore[attr-defined]


def test_resolving_a_file_twice_gives_the_same_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = "fedtune_test_file_strategy_twice"
    monkeypatch.delitem(sys.modules, module, raising=False)
    path = write_strategy_file(tmp_path, module)
    assert resolve_strategy(f"{path}:FileStrategy") is resolve_strategy(f"{path}:FileStrategy")


def test_file_strategy_with_register_decorator_resolves_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              registry: dict[str, type[Strategy]]) -> None:
    module = "fedtune_test_file_strategy_registered"
    monkeypatch.delitem(sys.modules, module, raising=False)
    path = tmp_path / f"{module}.py"
    path.write_text(textwrap.dedent('''
        from fedtune.strategy import ClientInstruction, Strategy, register_strategy

        @register_strategy
        class Registered(Strategy):
            name = "registered-from-file"

            def configure_client(self, server_round, node_id):
                return ClientInstruction(arrays={}, trainable=(), expects={})

            def aggregate(self, server_round, updates):
                return {}

            def global_adapter(self):
                return {}
    '''))
    build_strategy(f"{path}:Registered", {})  # config validation
    build_strategy(f"{path}:Registered", {})  # the server, later in the same process


def test_resolve_by_relative_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = "fedtune_test_file_strategy_rel"
    monkeypatch.delitem(sys.modules, module, raising=False)
    (tmp_path / "plugins").mkdir()
    write_strategy_file(tmp_path / "plugins", module)
    monkeypatch.chdir(tmp_path)
    assert resolve_strategy(f"plugins/{module}.py:FileStrategy").__name__ == "FileStrategy"


def test_resolve_attribute_that_is_not_a_strategy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = "fedtune_test_file_strategy_bad"
    monkeypatch.delitem(sys.modules, module, raising=False)
    path = write_strategy_file(tmp_path, module)
    with pytest.raises(ConfigError) as excinfo:
        resolve_strategy(f"{path}:NOT_A_STRATEGY")
    assert "'NOT_A_STRATEGY'" in excinfo.value.problems[0] and "not a subclass" in excinfo.value.problems[0]
    with pytest.raises(ConfigError) as excinfo:  # a class that is not there: the ones that are, listed
        resolve_strategy(f"{path}:Missing")
    assert "has no 'Missing'; the Strategy classes defined there: ['FileStrategy']" in excinfo.value.problems[0]


def test_a_file_without_its_class_is_told_both_forms() -> None:
    for name in ("examples/fedprox.py",):
        with pytest.raises(ConfigError) as excinfo:
            load_config(None, [f"strategy.name={name}"])
        assert "path/to/file.py:MyStrategy" in excinfo.value.problems[0], excinfo.value.problems


def test_resolve_unimportable_module() -> None:
    with pytest.raises(ConfigError) as excinfo:
        resolve_strategy("no_such_package_xyz.mod:Thing")
    (problem,) = excinfo.value.problems
    assert problem.startswith("strategy.name='no_such_package_xyz.mod:Thing'")
    assert "cannot import 'no_such_package_xyz.mod'" in problem


def test_unknown_name_lists_the_registered_names(registry: dict[str, type[Strategy]]) -> None:
    register_strategy(strategy_class("zeta"))
    with pytest.raises(ConfigError) as excinfo:
        resolve_strategy("fedavg-nope")
    (problem,) = excinfo.value.problems
    assert problem.startswith("strategy.name='fedavg-nope'")
    assert str(sorted(registered_strategies())) in problem and "'zeta'" in problem
    assert "mypkg.mymodule:MyStrategy" in problem


def test_build_strategy_reports_every_unknown_option() -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_strategy("fedit", {"mu": 1, "lr": 2})
    problems = excinfo.value.problems
    assert [p.split(" ")[0] for p in problems] == ["strategy.options.mu", "strategy.options.lr"]
    assert all("['weighting']" in p for p in problems)


def test_build_strategy_passes_options() -> None:
    built = build_strategy("fedit", {"weighting": "uniform"})
    assert isinstance(built, FedIT) and built.weighting == "uniform"


# --------------------------------------------------------------------------- check_update

EXPECTS = {"layer.lora_A.weight": (2, 4), "layer.lora_B.weight": (4, 2)}


def good_update() -> dict[str, torch.Tensor]:
    return {"layer.lora_A.weight": torch.ones(2, 4), "layer.lora_B.weight": torch.ones(4, 2)}


def test_check_update_accepts_a_good_reply() -> None:
    check_update(good_update(), EXPECTS)
    check_update({k: v.to(torch.bfloat16) for k, v in good_update().items()}, EXPECTS)


def test_check_update_rejects_missing_keys() -> None:
    arrays = good_update()
    del arrays["layer.lora_B.weight"]
    with pytest.raises(InvalidUpdateError, match=r"missing \['layer.lora_B.weight'\]"):
        check_update(arrays, EXPECTS)


def test_check_update_rejects_extra_keys() -> None:
    arrays = {**good_update(), "layer.classifier.weight": torch.ones(3)}
    with pytest.raises(InvalidUpdateError, match=r"unexpected \['layer.classifier.weight'\]"):
        check_update(arrays, EXPECTS)


def test_check_update_rejects_wrong_shapes() -> None:
    arrays = {**good_update(), "layer.lora_A.weight": torch.ones(4, 2)}
    with pytest.raises(InvalidUpdateError) as excinfo:
        check_update(arrays, EXPECTS)
    assert str(excinfo.value) == "layer.lora_A.weight has shape (4, 2), expected (2, 4)"


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_check_update_rejects_non_float_dtypes(dtype: torch.dtype) -> None:
    arrays = {**good_update(), "layer.lora_B.weight": torch.ones(4, 2, dtype=dtype)}
    with pytest.raises(InvalidUpdateError) as excinfo:
        check_update(arrays, EXPECTS)
    assert str(excinfo.value).startswith("layer.lora_B.weight has dtype")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_update_rejects_non_finite_values(bad: float) -> None:
    tensor = torch.ones(2, 4)
    tensor[1, 3] = bad
    arrays = {**good_update(), "layer.lora_A.weight": tensor}
    with pytest.raises(InvalidUpdateError) as excinfo:
        check_update(arrays, EXPECTS)
    assert str(excinfo.value) == "layer.lora_A.weight contains NaN or infinite values"


def test_shapes_of() -> None:
    assert shapes_of(good_update()) == EXPECTS


# --------------------------------------------------------------------------- select


def test_select_by_regular_expressions() -> None:
    tensors = {
        "base_model.model.layer.0.query.lora_A.weight": torch.zeros(1),
        "base_model.model.layer.0.query.lora_B.weight": torch.zeros(1),
        "base_model.model.layer.1.value.lora_A.weight": torch.zeros(1),
        "base_model.model.classifier.weight": torch.zeros(1),
    }
    assert list(select(tensors, [r"lora_A"])) == [
        "base_model.model.layer.0.query.lora_A.weight", "base_model.model.layer.1.value.lora_A.weight"]
    # Any pattern matches (a union), searched anywhere in the name.
    assert list(select(tensors, [r"lora_B", r"classifier"])) == [
        "base_model.model.layer.0.query.lora_B.weight", "base_model.model.classifier.weight"]
    assert list(select(tensors, [r"layer\.1\..*lora_"])) == ["base_model.model.layer.1.value.lora_A.weight"]
    assert select(tensors, [r"^lora_A"]) == {}  # anchors are honoured
    assert select(tensors, []) == {}
    assert select(tensors, [".*"]).keys() == tensors.keys()
    # The selected values are the same tensors, not copies.
    chosen = select(tensors, ["classifier"])
    assert chosen["base_model.model.classifier.weight"] is tensors["base_model.model.classifier.weight"]


def test_check_update_accepts_any_size_where_expects_says_minus_one() -> None:
    expects = {"m.lora_A.weight": (-1, 4), "m.lora_B.weight": (3, -1)}
    check_update({"m.lora_A.weight": torch.ones(7, 4), "m.lora_B.weight": torch.ones(3, 7)}, expects)
    with pytest.raises(InvalidUpdateError, match=r"expected \(-1, 4\) \(-1: any size\)"):
        check_update({"m.lora_A.weight": torch.ones(7, 5), "m.lora_B.weight": torch.ones(3, 7)}, expects)
    with pytest.raises(InvalidUpdateError, match="shape"):
        check_update({"m.lora_A.weight": torch.ones(7, 4, 1), "m.lora_B.weight": torch.ones(3, 7)}, expects)


def test_embedding_lora_under_a_linear_only_method_names_the_methods_that_aggregate_it() -> None:
    from types import SimpleNamespace

    from fedtune.server.run import ServerRun
    from fedtune.strategy import build_strategy

    cfg = load_config(None, ["strategy.name=ffa-lora", "adapter.target_modules=[word_embeddings]"])
    run = SimpleNamespace(handle=SimpleNamespace(initial={"emb.lora_embedding_A": torch.zeros(1)}),
                          strategy=build_strategy("ffa-lora", {}), cfg=cfg)
    with pytest.raises(ConfigError) as excinfo:
        ServerRun._check_embedding_lora(run)
    able = excinfo.value.problems[0].split("or use one of ", 1)[1]
    assert "'fedit'" in able and "ffa-lora" not in able and "flora" not in able
