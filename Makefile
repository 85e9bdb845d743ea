# The two commands a new user needs: `make quickstart` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: quickstart compare test test-all ui bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install when pyproject.toml or the pinned set changes.
$(VENV)/.installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

quickstart: $(VENV)/.installed
	$(VENV)/bin/raycache run experiments/quickstart.yaml

# The tuned comparison: zero-shot once, then every trainable method at ref/10, ref and ref*10 of its own
# learning rate (experiments/sweeps/compare.yaml), each run selecting its round on validation; `raycache
# compare` picks each method's lr on validation and prints the test accuracy of that choice. Each
# `make compare` is a new MLflow experiment (COMPARE_EXP), so earlier comparisons never mix in.
ifndef COMPARE_EXP
COMPARE_EXP := compare-$(shell date +%Y%m%d-%H%M%S)
endif
compare: $(VENV)/.installed
	$(VENV)/bin/raycache run experiments/compare.yaml --set method.name=zeroshot --set tracking.run_name=zeroshot \
		--set tracking.experiment=$(COMPARE_EXP)
	$(VENV)/bin/raycache sweep experiments/sweeps/compare.yaml --name $(COMPARE_EXP) \
		--set tracking.experiment=$(COMPARE_EXP)
	$(VENV)/bin/raycache compare $(COMPARE_EXP)

test: $(VENV)/.installed-test
	$(PY) -m pytest

test-all: $(VENV)/.installed-test
	$(PY) -m pytest -m ''

ui: $(VENV)/.installed
	$(VENV)/bin/raycache ui

bench: $(VENV)/.installed
	$(PY) benchmarks/round_cost.py

clean:
	rm -rf $(VENV) .raycache mlflow.db
