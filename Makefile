# The two commands a new user needs: `make quickstart` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: quickstart compare test test-all ui bench clean

# Every registered method, in the order the comparison table lists them.
COMPARE_METHODS ?= zeroshot local_only cachefl fedclip flora fedavg_full tip_adapter

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

# Every method on one shared partition (experiments/compare.yaml), then the table and plots in MLflow.
compare: $(VENV)/.installed
	@for m in $(COMPARE_METHODS); do \
		echo "== $$m"; \
		$(VENV)/bin/raycache run experiments/compare.yaml --set method.name=$$m --set tracking.run_name=$$m || exit $$?; \
	done
	$(VENV)/bin/raycache compare compare

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
