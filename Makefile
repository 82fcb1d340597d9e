# make demo  — set up the virtual environment and run the main job
# make test  — set up the virtual environment and run the test suite
# make bench — set up and run the benchmarks (table on stdout, JSON in bench-results/)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ptmig demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/ptmig bench

lint: $(STAMP)
	$(VENV)/bin/ruff check ptmig tests
	$(VENV)/bin/mypy ptmig

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench-results
