"""Imports that Flower may run in parallel threads: the ServerApp and ClientApp modules load the whole stack once.

The intermittent "cannot import name 'MixedModel' from partially initialized module
'peft.tuners'" came from two threads of one process importing parts of torch, transformers
and peft for the first time at once (Flower loads the ClientApp while the ServerApp thread
runs). Importing either app module now loads every module the apps use at run time, in one
thread, under the import lock of ``fedtune.flower``: nothing heavy is left to a later first
import that could race.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
STACK = ["peft", "peft.tuners.lora.layer", "torch._dynamo", "transformers.models.auto.modeling_auto", "fedtune.routine",
         "fedtune.strategies.fed_sb.layer", "fedtune.strategies.fedkseed.routine", "fedtune.strategies.flora.residual"]
RUN_TIME_MODULES = {"fedtune.flower.server_app": [*STACK, "fedtune.server.run"],
                    "fedtune.flower.client_app": [*STACK, "fedtune.client.runtime"]}

THREADS = """
import importlib, threading
errors = []
def load(name):
    try:
        importlib.import_module(name)
    except Exception as e:
        errors.append(f"{name}: {e!r}")
names = ["fedtune.flower.server_app", "fedtune.flower.client_app", "fedtune.server.run", "fedtune.client.runtime"]
threads = [threading.Thread(target=load, args=(n,)) for n in names]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors)
"""


@pytest.mark.parametrize("app", ["fedtune.flower.server_app", "fedtune.flower.client_app"])
def test_importing_an_app_module_loads_everything_the_apps_use(app: str) -> None:
    code = f"import sys, {app}\nprint([m for m in {RUN_TIME_MODULES[app]!r} if m not in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == "[]"


def test_the_apps_import_in_parallel_threads_without_half_initialised_modules() -> None:
    for _ in range(3):  # fresh interpreters: the race is only on first imports
        out = subprocess.run([sys.executable, "-c", THREADS], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             check=True).stdout.strip().splitlines()[-1]
        assert out == "[]"


def test_any_module_imported_first_in_a_fresh_interpreter_loads() -> None:
    """Whichever module a user imports first, it loads: no room closes an import circle at import time.

    ``fedtune.stack`` once loaded every method, so ``from fedtune.strategies import FLoRA`` as
    the first import went method -> fedtune.routine -> fedtune.client -> fedtune.stack -> every
    method -> fedtune.routine, half-initialised.
    """
    entries = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["fedtune.strategies"]
    methods = sorted({target.split(":")[0] for target in entries.values()})

    def import_first(name: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True,
                              check=False, timeout=300)
        return [f"{name}: {done.stderr.strip().splitlines()[-1]}"] if done.returncode else []

    with ThreadPoolExecutor(2) as pool:
        failed = [f for found in pool.map(import_first, [*methods, "fedtune.routine"]) for f in found]
    assert len(methods) >= 8 and failed == []
