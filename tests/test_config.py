"""fedtune.config: defaults, overrides, one ConfigError with every problem, Flower's run_config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedtune.config import (
    FedtuneConfig,
    build_config,
    config_from_run_config,
    load_config,
    parse_overrides,
    to_run_config,
)
from fedtune.errors import ConfigError
from fedtune.schema import DEFAULT_CONFIG_PATH


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return list(excinfo.value.problems)


def the_problem_about(problems: list[str], key: str) -> str:
    """The single problem string that starts with ``key`` (fails if there is none or several)."""
    hits = [p for p in problems if p.startswith(key)]
    assert len(hits) == 1, f"expected one problem about {key!r}, got {hits} in {problems}"
    return hits[0]


# --------------------------------------------------------------------------- defaults


def test_load_config_without_path_equals_schema_defaults() -> None:
    assert load_config() == FedtuneConfig()


def test_default_yaml_sets_only_values_equal_to_the_schema_defaults() -> None:
    # load_config() == FedtuneConfig() would also hold for an empty file; check that the YAML
    # really spells out values and that each one equals the schema default.
    written = OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG_PATH))
    assert isinstance(written, dict) and written
    defaults = dataclasses.asdict(FedtuneConfig())
    leaves = 0
    for section, values in written.items():
        assert section in defaults, f"default.yaml has unknown section {section!r}"
        for key, value in values.items():
            assert defaults[section][key] == value, f"default.yaml {section}.{key}={value!r} != schema default"
            leaves += 1
    assert leaves >= 10


# --------------------------------------------------------------------------- overrides


def test_overrides_set_nested_values_lists_and_null() -> None:
    cfg = load_config(overrides=[
        "federation.num_rounds=3",
        "train.learning_rate=1e-3",
        "adapter.target_modules=[query,key,value]",
        "train.max_grad_norm=null",
        "data.max_examples=50",
        "model.trust_remote_code=true",
        "strategy.options={weighting: uniform}",
    ])
    assert cfg.federation.num_rounds == 3
    assert cfg.train.learning_rate == 1e-3
    assert cfg.adapter.target_modules == ["query", "key", "value"]
    assert cfg.train.max_grad_norm is None
    assert cfg.data.max_examples == 50
    assert cfg.model.trust_remote_code is True
    assert cfg.strategy.options == {"weighting": "uniform"}
    # Untouched keys keep their defaults.
    assert cfg.federation.num_clients == FedtuneConfig().federation.num_clients


def test_target_modules_null_lets_peft_choose() -> None:
    assert load_config(overrides=["adapter.target_modules=null"]).adapter.target_modules is None


def test_overrides_apply_on_top_of_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("federation:\n  num_rounds: 9\n  num_clients: 6\ntrain:\n  batch_size: 4\n")
    cfg = load_config(path, ["federation.num_rounds=2"])
    assert (cfg.federation.num_rounds, cfg.federation.num_clients, cfg.train.batch_size) == (2, 6, 4)


# --------------------------------------------------------------------------- one error, every problem


def test_every_problem_is_reported_in_one_config_error() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=[
            "federation.num_round=3",  # unknown key, a typo of num_rounds
            "train.batch_size=abc",  # wrong type
            "adapter.rank=0",  # bad value
            "train.learning_rate=-1",  # bad value in the same section as a wrong-typed key
            "strategy.name=no-such-strategy",  # unknown strategy
        ])
    problems = problems_of(excinfo)
    assert len(problems) == 5, problems

    unknown = the_problem_about(problems, "federation.num_round=")
    assert "did you mean federation.num_rounds?" in unknown

    wrong_type = the_problem_about(problems, "train.batch_size=")
    assert "'abc'" in wrong_type and "wrong type" in wrong_type and "int" in wrong_type

    bad_rank = the_problem_about(problems, "adapter.rank=")
    assert bad_rank.startswith("adapter.rank=0 ")

    bad_lr = the_problem_about(problems, "train.learning_rate=")
    assert bad_lr.startswith("train.learning_rate=-1")

    strategy = the_problem_about(problems, "strategy.name=")
    assert "'no-such-strategy'" in strategy and "'fedit'" in strategy

    # The message shows every problem too, not only the attribute.
    text = str(excinfo.value)
    assert text.startswith("5 problem(s)")
    for p in problems:
        assert p in text


def test_a_bad_prompt_format_is_reported_with_the_other_problems() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=["data.prompt_format=chatml", "adapter.rank=0"])
    problems = problems_of(excinfo)
    assert len(problems) == 2, problems
    bad = the_problem_about(problems, "data.prompt_format=")
    assert "'chatml'" in bad
    for choice in ("auto", "chat", "alpaca", "plain"):
        assert repr(choice) in bad
    assert load_config(overrides=["data.prompt_format=plain"]).data.prompt_format == "plain"
    assert FedtuneConfig().data.prompt_format == "auto"


def test_unknown_key_problem_names_the_value() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=["federation.num_round=3"])
    assert "federation.num_round=3" in problems_of(excinfo)[0]


def test_unknown_top_level_section_and_scalar_for_a_section() -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_config({"foo": {"bar": 1}, "model": 3})
    problems = problems_of(excinfo)
    assert len(problems) == 2, problems
    assert the_problem_about(problems, "foo=").startswith("foo={'bar': 1} is not a known key")
    assert "must be a section" in the_problem_about(problems, "model=3")


def test_value_range_problems_name_key_and_value() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=["adapter.dropout=1.5", "federation.min_train_clients=9",
                               "data.source=/no/such/file.csv", "model.task=regression"])
    problems = problems_of(excinfo)
    assert len(problems) == 4, problems
    assert the_problem_about(problems, "adapter.dropout=1.5")
    assert "federation.num_clients=4" in the_problem_about(problems, "federation.min_train_clients=9")
    assert the_problem_about(problems, "data.source='/no/such/file.csv'")
    assert "'classification'" in the_problem_about(problems, "model.task='regression'")


def test_privacy_accountant_defaults_to_pld_and_names_the_choices() -> None:
    assert FedtuneConfig().privacy.accountant == "pld"
    assert load_config(overrides=["privacy.enabled=true", "privacy.target_epsilon=8",
                                  "privacy.accountant=rdp"]).privacy.accountant == "rdp"
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=["privacy.enabled=true", "privacy.target_epsilon=8", "privacy.accountant=moments"])
    problem = the_problem_about(problems_of(excinfo), "privacy.accountant='moments'")
    assert "pld, rdp" in problem


def test_unknown_strategy_option_is_named_with_the_accepted_ones() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=["strategy.options={weighting: uniform, mu: 0.1}"])
    problems = problems_of(excinfo)
    assert len(problems) == 1, problems
    assert problems[0].startswith("strategy.options.mu ")
    assert "FedIT" in problems[0] and "['weighting']" in problems[0]


def test_bad_strategy_option_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=["strategy.options={weighting: loudest}"])
    assert "loudest" in problems_of(excinfo)[0]


def test_list_for_strategy_options_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as excinfo:
        build_config({"strategy": {"options": [1]}})
    assert "strategy.options" in problems_of(excinfo)[0]


def test_list_override_for_a_section_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(overrides=["model=[a]"])
    assert problems_of(excinfo)[0].startswith("model=")


# --------------------------------------------------------------------------- files


def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as excinfo:
        load_config(missing)
    (problem,) = problems_of(excinfo)
    assert str(missing) in problem and "does not exist" in problem


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    (problem,) = problems_of(excinfo)
    assert str(path) in problem and "not valid YAML" in problem


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- model\n- data\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert "must hold a mapping" in problems_of(excinfo)[0]


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == FedtuneConfig()


# --------------------------------------------------------------------------- parse_overrides


def test_parse_overrides_nests_and_parses_yaml_values() -> None:
    assert parse_overrides(["a.b=1", "a.c=[x, y]", "d=null", "e=hi"]) == {
        "a": {"b": 1, "c": ["x", "y"]}, "d": None, "e": "hi"}


def test_parse_overrides_rejects_items_without_equals_all_at_once() -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_overrides(["federation.num_rounds=3", "federation.num_rounds", "=5"])
    problems = problems_of(excinfo)
    assert len(problems) == 2
    assert "'federation.num_rounds'" in problems[0] and "key=value" in problems[0]
    assert "'=5'" in problems[1]


# --------------------------------------------------------------------------- Flower run_config


def test_run_config_round_trip_of_the_defaults() -> None:
    cfg = FedtuneConfig()
    assert config_from_run_config(to_run_config(cfg)) == cfg


def test_run_config_round_trip_of_a_changed_config(tmp_path: Path) -> None:
    data = tmp_path / "train data.csv"  # a space in the path: shell quoting must survive
    data.write_text("text,label\na,0\n")
    cfg = load_config(overrides=[
        f"data.source='{data}'",
        "data.column_names=[text,label]",
        "adapter.target_modules=null",
        "adapter.rank=4",
        "train.learning_rate=1e-05",
        "train.local_steps=7",
        "federation.num_rounds=2",
        "strategy.options={weighting: uniform}",
        "output.dir=\"runs/it's here\"",
        "output.progress=false",
    ])
    run_config = to_run_config(cfg)
    assert set(run_config) == {"overrides"}
    back = config_from_run_config(run_config)
    assert back == cfg
    assert back.data.source == str(data)
    assert back.output.dir == "runs/it's here"


@pytest.mark.parametrize("text", ["null", "0x10", "runs/a: b"])
def test_run_config_round_trip_of_yaml_lookalike_strings(text: str) -> None:
    cfg = FedtuneConfig()
    cfg.output.dir = text
    assert config_from_run_config(to_run_config(cfg)).output.dir == text


def test_run_config_dotted_keys_with_hyphens() -> None:
    cfg = config_from_run_config({
        "federation.num-rounds": 7,
        "train.learning-rate": 0.01,
        "output.save-adapter": False,
        "data.max_length": 32,  # underscores work as well
    })
    assert cfg.federation.num_rounds == 7
    assert cfg.train.learning_rate == 0.01
    assert cfg.output.save_adapter is False
    assert cfg.data.max_length == 32


def test_run_config_overrides_string_and_flat_keys_together() -> None:
    cfg = config_from_run_config({"config-file": "", "overrides": "federation.num_rounds=3 train.batch_size=8",
                                  "federation.num-clients": 5})
    assert (cfg.federation.num_rounds, cfg.train.batch_size, cfg.federation.num_clients) == (3, 8, 5)


def test_run_config_flat_string_value_with_spaces() -> None:
    assert config_from_run_config({"output.dir": "my runs/a b"}).output.dir == "my runs/a b"


def test_run_config_flat_string_value_with_an_apostrophe() -> None:
    assert config_from_run_config({"output.dir": "it's"}).output.dir == "it's"


def test_run_config_bad_key_is_a_config_error_with_suggestion() -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_from_run_config({"federation.num-round": 7})
    assert "did you mean federation.num_rounds?" in problems_of(excinfo)[0]


def test_run_config_config_file(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("federation:\n  num_rounds: 11\nadapter:\n  rank: 2\n")
    cfg = config_from_run_config({"config-file": str(path), "overrides": "adapter.rank=3",
                                  "train.batch-size": 2})
    assert (cfg.federation.num_rounds, cfg.adapter.rank, cfg.train.batch_size) == (11, 3, 2)


def test_run_config_relative_config_file_is_read_from_the_project(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the project root: the path must resolve against the project
    cfg = config_from_run_config({"config-file": "fedtune/default.yaml", "federation.num-rounds": 2})
    assert cfg.federation.num_rounds == 2
    assert dataclasses.replace(cfg, federation=FedtuneConfig().federation) == FedtuneConfig()


def test_run_config_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as excinfo:
        config_from_run_config({"config-file": str(tmp_path / "absent.yaml")})
    assert "absent.yaml" in problems_of(excinfo)[0]


def test_alpha_per_rank_keeps_every_clients_scaling_at_alpha_over_rank() -> None:
    from fedtune.config import AdapterConfig

    per_rank = AdapterConfig(rank=8, alpha=16.0, client_ranks=[4, 8, 16], alpha_per_rank=True)
    clients = [per_rank.for_client(i) for i in range(3)]
    assert [(c.rank, c.alpha) for c in clients] == [(4, 8.0), (8, 16.0), (16, 32.0)]  # α_i = 2·r_i
    assert {c.alpha / c.rank for c in clients} == {2.0}
    one_alpha = AdapterConfig(rank=8, alpha=16.0, client_ranks=[4, 16])
    assert [(c.rank, c.alpha) for c in (one_alpha.for_client(0), one_alpha.for_client(1))] == [(4, 16.0), (16, 16.0)]


def test_a_nodes_rank_gets_its_alpha_under_alpha_per_rank() -> None:
    from fedtune.client.runtime import client_settings

    cfg = load_config(None, ["adapter.rank=8", "adapter.alpha=16", "adapter.alpha_per_rank=true"])
    _, adapter = client_settings(cfg, 0, {"adapter.rank": 4})
    assert (adapter.rank, adapter.alpha, adapter.client_ranks) == (4, 8.0, None)


SIMULATIONS = sorted((Path(__file__).resolve().parents[1] / "simulations").glob("*.yaml"))


@pytest.mark.parametrize("path", SIMULATIONS, ids=[p.stem for p in SIMULATIONS])
def test_every_simulation_config_is_headed_by_its_command_and_valid(path: Path, shared_data: Path) -> None:
    assert path.read_text().splitlines()[0] == f"# fedtune simulate simulations/{path.name}"
    load_config(path)
