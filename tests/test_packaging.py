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


def test_every_folder_is_a_package_of_the_distribution() -> None:
    """setup.py finds the packages: every room of fedtune/ and every method folder, nothing listed by hand."""
    code = ("import setuptools, sys\ncaptured = {}\nsetuptools.setup = lambda **kw: captured.update(kw)\n"
            "exec(open('setup.py').read())\nprint('\\n'.join(sorted(captured['packages'])))")
    packages = set(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                                  timeout=120).stdout.split())
    folders = {"fedtune.strategies." + p.parent.name for p in (ROOT / "strategies").glob("*/__init__.py")}
    rooms = {"fedtune." + p.parent.name for p in (ROOT / "fedtune").glob("*/__init__.py")}
    assert folders | rooms | {"fedtune", "fedtune.strategies"} == packages


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


def test_every_method_is_an_entry_point_under_its_own_name() -> None:
    """A built-in is its folder (or file) plus one entry-point line; the line's name is the class's name."""
    import tomllib

    from fedtune.registry import STRATEGY_GROUP
    from fedtune.strategy import registered_strategies

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][STRATEGY_GROUP]
    registered = registered_strategies()
    assert {name: registered[name].name for name in declared} == {name: name for name in declared}
    folders = {p.parent.name for p in (ROOT / "strategies").glob("*/__init__.py")}
    files = {p.stem for p in (ROOT / "strategies").glob("*.py")} - {"__init__", "aggregation"}
    assert {target.split(":")[0].split(".")[2] for target in declared.values()} == folders | files


TOY_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "fedtune-toy-method"
version = "0.1.0"

[project.entry-points."fedtune.strategies"]
toy-fedit = "toy_method:ToyFedIT"

[project.entry-points."fedtune.metrics"]
toy_length = "toy_method:ToyLength"

[tool.setuptools]
py-modules = ["toy_method"]
"""

TOY_MODULE = '''\
"""A method and a metric shipped by a package of their own, found by fedtune through entry points."""

from fedtune.evaluation.metrics import GenerativeMetric
from fedtune.strategies.fedit import FedIT


class ToyFedIT(FedIT):
    """FedIT under another name.

    Parameters
    ----------
    weighting : str
        As in FedIT.
    """

    name = "toy-fedit"
    summary_line = "FedIT, shipped by a third-party package"


class ToyLength(GenerativeMetric):
    name = "toy_length"

    def compute(self, predictions, references):
        return sum(len(p) for p in predictions) / max(len(predictions), 1)
'''


@pytest.mark.integration
def test_a_third_party_package_ships_a_method_by_entry_point(tmp_path: Path, tiny_bert: str) -> None:
    """A package with one entry-point line: `fedtune strategies` lists it and a run uses it by name."""
    package = tmp_path / "toy"
    package.mkdir()
    (package / "pyproject.toml").write_text(TOY_PYPROJECT)
    (package / "toy_method.py").write_text(TOY_MODULE)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next(venv.glob("lib/python*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "deps.pth").write_text(f"{deps}\n{ROOT}\n")  # the project's dependencies, and fedtune from here
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target",
                    str(site), str(package)], check=True, timeout=300, capture_output=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = str(venv / "bin" / "python")
    listing = subprocess.run([python, "-m", "fedtune.cli", "strategies"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert listing.returncode == 0, listing.stderr[-2000:]
    assert "toy-fedit    FedIT, shipped by a third-party package" in listing.stdout
    code = ("import sys\nfrom fedtune.evaluation.metrics import registered_metrics\n"
            "from fedtune.cli import main\n"
            "print(sorted(registered_metrics()))\n"
            f"sys.exit(main(['simulate', 'model.name={tiny_bert}', 'strategy.name=toy-fedit',"
            " 'federation.num_rounds=1', 'federation.num_clients=2', 'data.max_examples=64',"
            " 'data.max_test_examples=16', 'data.max_length=16', 'train.local_steps=1',"
            f" 'output.dir={tmp_path / 'run'}', 'output.progress=false', 'output.plots=false']))\n")
    run = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "toy_length" in run.stdout.splitlines()[0]
    assert "name: toy-fedit" in (tmp_path / "run" / "config.yaml").read_text()
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
