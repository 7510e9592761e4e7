"""The small parts of bench/llm.py: instruction families, AG News as generation, the gain summary."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llm_bench():
    spec = importlib.util.spec_from_file_location("bench_llm", ROOT / "bench" / "llm.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_instruction_family_by_the_first_word(llm_bench) -> None:
    family = llm_bench.instruction_family
    assert family("What is the capital of France?") == "question"
    assert family("  Rewrite the sentence in passive voice.") == "rewrite"
    assert family("Convert 5 km to miles.") == "convert"
    assert family("Translate 'hello' into Spanish.") == "convert"
    assert family("Generate a sentence using 'quick'.") == "generate"
    assert family("Classify the following as fruit or vegetable.") == "classify"
    assert family("Name, please, three colors.") == "question"  # punctuation after the word is ignored
    assert family("Alphabetize these words.") == "other"
    assert family("") == "other"


def test_agnews_records_ask_for_the_topic_by_name(llm_bench) -> None:
    records = llm_bench.agnews_records([["Stocks fell today. ", "2"], ["The team won.", "1"]])
    assert [r["response"] for r in records] == ["Business", "Sports"]
    assert [r["topic"] for r in records] == ["Business", "Sports"]
    assert records[0]["prompt"].endswith("\n\nStocks fell today.")
    assert "World, Sports, Business, Sci/Tech" in records[0]["prompt"]


def test_gain_round_and_bytes_per_client(llm_bench) -> None:
    curve = [{"round": 0, "score": 0.4, "loss": 1.2, "bytes_up": 0, "bytes_down": 0, "seconds": 9.0},
             {"round": 1, "score": 0.5, "loss": 1.0, "bytes_up": 300, "bytes_down": 600, "clients": 3, "seconds": 20.0},
             {"round": 2, "score": 0.58, "loss": 0.9, "bytes_up": 200, "bytes_down": 400, "clients": 2, "seconds": 10.0},
             {"round": 3, "score": 0.55, "loss": 0.95, "bytes_up": 300, "bytes_down": 600, "clients": 3,
              "seconds": 12.0}]
    # Centralized best 0.6: the target is 0.4 + 0.9 * 0.2 = 0.58, reached in round 2.
    assert llm_bench.gain_round(curve, 0.4, 0.6) == 2
    assert llm_bench.gain_round(curve, 0.4, 0.7) is None
    assert llm_bench.gain_round(curve, 0.4, 0.3) is None  # no centralized gain: nothing to reach
    summary = llm_bench.summarize("x", curve, 0.4, 0.6)
    assert (summary["final"], summary["best"], summary["final_loss"]) == (0.55, 0.58, 0.95)
    assert summary["up"] == pytest.approx(100.0) and summary["down"] == pytest.approx(200.0)
    assert summary["round_s"] == pytest.approx(11.0)  # the first round (start-up) left out
    assert summary["total_mb"] == pytest.approx(2400 / 1e6)


def test_bytes_per_client_are_a_typical_round_not_skewed_by_initialisation(llm_bench) -> None:
    # Fed-SB-like: two heavy initialisation rounds, then three light training rounds.
    ups = [9000, 9000, 30, 30, 30]
    curve = [{"round": 0, "score": 0.4, "loss": 1.0, "bytes_up": 0, "bytes_down": 0, "seconds": 1.0}]
    curve += [{"round": i + 1, "score": 0.5, "loss": 1.0, "bytes_up": up, "bytes_down": 0, "clients": 3,
               "seconds": 1.0} for i, up in enumerate(ups)]
    assert llm_bench.per_client_round(curve, "bytes_up") == pytest.approx(10.0)
    assert llm_bench.per_client_round(curve, "bytes_down") is None  # nothing moved down


def test_prepare_data_writes_the_derived_files_outside_the_repository(llm_bench, shared_data: Path,
                                                                       tmp_path: Path) -> None:
    overrides = llm_bench.prepare_data("instructions", tmp_path)
    assert "data.test_fraction=0.1" in overrides and "data.group_column=family" in overrides
    records = json.loads((tmp_path / "instructions.json").read_text())
    assert len(records) == 1100 and {r["family"] for r in records} <= {*llm_bench.FAMILIES, "other"}
    overrides = llm_bench.prepare_data("agnews", tmp_path)
    assert "eval.metric=choice_accuracy" in overrides
    first = json.loads((tmp_path / "agnews_train.jsonl").read_text().splitlines()[0])
    assert first["response"] in llm_bench.AGNEWS_TOPICS and first["topic"] == first["response"]


def test_each_task_has_its_schedule_and_flags_override_it(llm_bench) -> None:
    instructions = llm_bench.setting_of(llm_bench.parse([]), "instructions")
    agnews = llm_bench.setting_of(llm_bench.parse([]), "agnews")
    assert (instructions.sampled, instructions.local_steps, instructions.batch_size) == (3, 5, 8)
    assert (agnews.sampled, agnews.local_steps, agnews.batch_size, agnews.test_examples) == (10, 5, 4, 100)
    given = llm_bench.setting_of(llm_bench.parse(["--sampled", "4", "--local-steps", "3"]), "agnews")
    assert (given.sampled, given.local_steps, given.batch_size) == (4, 3, 4)
    assert "federation.fraction_train=0.4" in given.overrides()
    quick = llm_bench.setting_of(llm_bench.parse(["--quick"]), "instructions")
    assert (quick.rounds, quick.clients, quick.sampled) == (2, 4, 2)


def test_fedkseed_steps_follow_the_clients_a_round(llm_bench) -> None:
    def steps(task: str, quick: bool = False) -> list[str]:
        setting = llm_bench.setting_of(llm_bench.parse(["--quick"] if quick else []), task)
        return [o for o in llm_bench.strategy_overrides(task, "fedkseed-pro", setting, quick) if "steps" in o]

    assert steps("instructions") == ["strategy.options.steps=60"]  # 3 clients a round
    assert steps("agnews") == ["strategy.options.steps=30"]  # all 10 every round
    assert steps("agnews", quick=True) == ["strategy.options.steps=2"]
    assert not any("steps" in o for o in llm_bench.strategy_overrides(
        "agnews", "fedit", llm_bench.setting_of(llm_bench.parse([]), "agnews"), False))
