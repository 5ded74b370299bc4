# Set-up and the everyday commands. `make quickstart` and `make test` create the virtual
# environment on first use (about 1-2 minutes), so each works on a fresh clone.
#
# The environment is installed against the lock, requirements/constraints-cpu.txt: every
# package at the exact version the whole test suite passed with. torch is installed first,
# on its own, with the PyTorch CPU index as an extra index, so pip never resolves a bare
# `torch` to a multi-GB CUDA build on a CPU machine; where `nvidia-smi` answers, torch comes
# from the PyTorch CUDA index instead (cu128, or ECG_DISTILL_CUDA=cuXYZ; TORCH_INDEX=
# cpu|cuXYZ|URL|none overrides the choice).
# requirements/setup_env.py does the work; `python3 requirements/setup_env.py install
# --dry-run` prints the commands it would run.
#
#   make setup        the environment (.venv), against the lock
#   make quickstart   the main job on the embedded default (recipes/quickstart.yaml)
#   make test         the test suite
#   make test-latest  a separate environment (.venv-latest) from the newest releases, no
#                     lock, the suite run there, and what differs from the lock
#   make lock         make test-latest, then write its versions as the new lock

PYTHON   ?= python3
VENV     ?= .venv
LATEST   ?= .venv-latest
LOCK     ?= requirements/constraints-cpu.txt
TORCH_INDEX ?= auto
SETUP    := $(PYTHON) requirements/setup_env.py
BIN      := $(VENV)/bin

export TORCH_INDEX

.PHONY: setup quickstart test test-latest lock bench clean-venv

# Always asked, cheap when nothing changed: the environment is remade when the lock,
# pyproject.toml, the set-up script or the torch index differ from what made it.
setup:
	@$(SETUP) install --venv $(VENV) --lock $(LOCK) --if-needed

quickstart: setup
	$(BIN)/ecg-distill run recipes/quickstart.yaml

# one worker per core (pytest-xdist), each test file on one worker (its module fixtures
# built once)
PYTEST_PARALLEL ?= -n auto --dist loadfile

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

test-latest:
	$(SETUP) install --venv $(LATEST) --latest --fresh
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_PARALLEL)
	$(SETUP) versions --venv $(LATEST) --against $(LOCK)

lock: test-latest
	$(SETUP) freeze --venv $(LATEST) --out $(LOCK)

bench: setup
	$(BIN)/python benchmarks/data.py

clean-venv:
	rm -rf $(VENV) $(LATEST)
