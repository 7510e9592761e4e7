"""The layout's promises: methods live in strategies/, install as fedtune.strategies, config stays light."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD_WORDS = ("lora_sb", "lora-sb", "zeroth_order", "zeroth-order", "fedkseed", "fed_sb", "fed-sb", "flora",
                "lora_fair", "lora-fair", "ffa_lora", "ffa-lora", "fedsa", "flexlora", "residual")


def _framework_files() -> list[Path]:
    return sorted(p for p in (ROOT / "fedtune").rglob("*.py"))


def test_the_framework_imports_no_method_module() -> None:
    offenders = []
    for path in _framework_files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.startswith("fedtune.strategies")]
    assert offenders == []


@pytest.mark.parametrize("name", ["client/runtime.py", "server/run.py", "flower/client_app.py", "flower/server_app.py",
                                  "flower/server_loop.py",
                                  "flower/strategy_adapter.py"])
def test_client_and_server_name_no_method(name: str) -> None:
    text = (ROOT / "fedtune" / name).read_text().lower()
    assert [w for w in METHOD_WORDS if w in text] == []


def test_reading_a_config_with_a_typo_imports_neither_torch_nor_flwr() -> None:
    code = ("import sys\nfrom fedtune.config import load_config\nfrom fedtune.errors import ConfigError\n"
            "try:\n    load_config(None, ['adapter.rnak=4', 'federation.num_rounds=0'])\n"
            "except ConfigError as e:\n    print(len(e.problems))\n"
            "print(sorted(m for m in ('torch', 'flwr', 'transformers', 'peft') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         check=True).stdout.split()
    assert out == ["2", "[]"]


def test_every_method_folder_is_declared_as_a_package() -> None:
    import tomllib

    declared = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"fedtune.strategies." + p.parent.name for p in (ROOT / "strategies").glob("*/__init__.py")}
    assert folders <= declared, folders - declared


@pytest.mark.integration
def test_a_wheel_installs_fedtune_strategies_and_runs_from_a_folder_with_its_own_strategies(tmp_path: Path,
                                                                                           tiny_bert: str) -> None:
    """Built with ``pip wheel --no-deps .``, installed non-editable, run where ``strategies/`` means something else."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(ROOT)], check=True, timeout=300, capture_output=True)
    (wheel,) = wheels.glob("fedtune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not any(n.startswith("strategies/") for n in names)
    assert "fedtune/default.yaml" in names and "fedtune/strategies/fed_sb/routine.py" in names
    # A fresh environment: the project's dependencies (this venv's site-packages) but not the project.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "deps.pth").write_text(f"{deps}\n")  # a path line, not the editable install's finder
    target = site
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "strategies").mkdir(parents=True)
    (elsewhere / "strategies" / "__init__.py").write_text("raise ImportError('not fedtune')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import fedtune, fedtune.strategies, sys\n"
            "from fedtune.cli import main\n"
            "print(fedtune.strategies.__file__)\n"
            f"sys.exit(main(['simulate', 'model.name={tiny_bert}', 'federation.num_rounds=1',"
            " 'federation.num_clients=2', 'data.max_examples=64', 'data.max_test_examples=16', 'data.max_length=16',"
            f" 'train.local_steps=1', 'output.dir={tmp_path / 'run'}', 'output.progress=false']))\n")
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].startswith(str(site))
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_the_built_in_table_matches_what_registers() -> None:
    from fedtune.strategies import BUILT_IN

    from fedtune.strategy import registered_strategies

    registered = registered_strategies()
    assert {n: (c.__module__.split(".")[2], c.__name__) for n, c in registered.items() if n in BUILT_IN} == BUILT_IN
    folders = {p.parent.name for p in (ROOT / "strategies").glob("*/__init__.py")}
    files = {p.stem for p in (ROOT / "strategies").glob("*.py")} - {"__init__", "aggregation"}
    assert {module for module, _ in BUILT_IN.values()} == folders | files
