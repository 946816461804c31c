# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# what it needs from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench deploy-test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/agentd demo

test: $(VENV)/.installed
	$(PY) -m pytest

# `make bench QUICK=1`: a smoke run (fewer repeats, 5 s idle); the README's figures come from a full run.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m bench $(if $(filter-out 0,$(QUICK)),--quick,)

# `make deploy-test`: build and run the Docker image and boot the systemd unit under a real systemd
# (deploy/deploy_test.py says what it proves). Root on Debian; elsewhere one SKIPPED line, exit 0.
deploy-test: $(VENV)/.installed
	$(PY) deploy/deploy_test.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
