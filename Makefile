# Two commands set everything up on a fresh machine: `make test` and `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test bench bench-cpu install clean regress baseline

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,peers,cluster]'  # no fallback: CI must compare against the peers or fail
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest
	$(MAKE) --no-print-directory regress

# CI memory/gradient regression: every registered variant on a tiny cpu-bench configuration,
# each cell isolated, compared against the committed CPU baseline (results/baseline).
REGRESS_MATRIX := --device cpu --preset cpu-bench --set width=16 --set depth=2 --set task.sequences=2 \
	--set task.tokens=8 --warmup 0 --repeats 1 --pairs 1 --threads 1 --no-plots
regress: $(STAMP)
	$(PY) -m harness bench $(REGRESS_MATRIX) --out build/regress --run-id new --force
	$(PY) -m harness compare results/baseline build/regress/new --fail mem:5% --fail grad:1e-6

# Regenerate the committed baseline (after an intended memory change); commit results/baseline.
baseline: $(STAMP)
	$(PY) -m harness bench $(REGRESS_MATRIX) --out results --run-id baseline --force

bench: $(STAMP)
	$(PY) -m harness bench --peers

clean:
	rm -rf $(VENV) build *.egg-info
