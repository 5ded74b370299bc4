# Set-up and the two everyday commands. `make quickstart` and `make test` create the
# virtual environment on first use (about 1-2 minutes), so each works on a fresh clone.
#
# torch is installed first, pinned, so that pip never resolves a bare `torch` to the
# multi-GB CUDA build on a CPU machine. On a GPU machine use e.g. TORCH="torch==2.13.0"
# with the CUDA index of your choice: `make setup TORCH=... PIP_ARGS="--index-url ..."`.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PIP_ARGS ?=
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ecg-distill-installed

.PHONY: setup quickstart test bench clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) "$(TORCH)"
	$(BIN)/python -m pip install --quiet $(PIP_ARGS) -e ".[test]"
	touch $(STAMP)

quickstart: setup
	$(BIN)/ecg-distill run recipes/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/data.py

clean-venv:
	rm -rf $(VENV)
