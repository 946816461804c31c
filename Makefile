# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# what it needs from pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench deploy-test constraints clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/agentd demo

test: lint
	$(PY) -m pytest

# ruff (lint) and mypy (strict on agentd/), configured in pyproject.toml; part of `make test`.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check agentd tests bench deploy
	$(VENV)/bin/mypy

# `make bench QUICK=1`: a smoke run (fewer repeats, 5 s idle); the README's figures come from a full run.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(PY) -m bench $(if $(filter-out 0,$(QUICK)),--quick,)

# `make deploy-test`: build and run the Docker image and boot the systemd unit under a real systemd
# (deploy/deploy_test.py says what it proves). Root on Debian; elsewhere one SKIPPED line, exit 0.
deploy-test: $(VENV)/.installed
	$(PY) deploy/deploy_test.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

# Pin what the project installs: every version a fresh venv with the test and bench extras gets.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/pip install --quiet --upgrade pip
	.venv-constraints/bin/pip install --quiet -e '.[test,bench]'
	{ sed -n '1,2p' constraints.txt; .venv-constraints/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-constraints
