"""The command line: listing strategies, and clear errors with non-zero exits."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedtune.cli import main


def test_strategies_lists_fedit_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("fedit ") and "FedAvg" in line for line in lines)


def test_missing_config_file_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "no/such/file.yaml"]) == 2
    assert "no/such/file.yaml" in capsys.readouterr().err


def test_bad_keys_are_all_reported_before_any_model_loads(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "federation.num_rounds=0", "adapter.rnak=4", "train.batch_size=big"])
    assert code == 2
    err = capsys.readouterr().err
    assert "3 problem(s)" in err
    assert "federation.num_rounds=0" in err and "adapter.rnak" in err and "did you mean adapter.rank" in err
    assert "train.batch_size='big'" in err


def test_a_bad_config_is_reported_without_loading_torch_flower_or_a_model() -> None:
    """What makes the report fast, asserted on what is imported, not on wall time."""
    code = ("import sys\nfrom fedtune.cli import main\n"
            "status = main(['simulate', 'federation.num_rounds=0', 'adapter.rnak=4'])\n"
            "print(status, sorted(m for m in ('torch', 'flwr', 'transformers', 'ray', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().splitlines()[-1] == "2 []"
    assert "2 problem(s)" in out.stderr


def test_unloadable_model_exits_1_with_the_name(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-model-here"
    missing.mkdir()
    code = main(["simulate", f"model.name={missing}", f"output.dir={tmp_path / 'run'}"])
    assert code == 1
    err = capsys.readouterr().err
    assert str(missing) in err and "model.name" in err
    assert not (tmp_path / "run").exists()  # failed before the run started


def test_console_script_help_works() -> None:
    out = subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "key=value" in out.stdout
