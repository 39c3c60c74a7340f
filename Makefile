# Each target builds its own virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv run test bench check
venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

check: venv
	$(PY) -m attnopt check

run: venv
	$(PY) -m attnopt run configs/default.toml

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/derivatives.py
	$(PY) benchmarks/solvers.py
	$(PY) benchmarks/kronecker.py
	$(PY) benchmarks/sweeps.py
	$(PY) benchmarks/peers.py
	$(PY) benchmarks/maxmargin.py
	$(PY) benchmarks/local_md.py
