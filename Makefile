# make demo  — set up the virtual environment and run the main job
# make test  — set up the virtual environment and run the test suite
# make bench — set up and run the benchmarks (table on stdout, JSON in bench-results/)
# make fuzz  — the property-based differential and hostile-input tests with many more examples

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-deps bench fuzz lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ptmig demo --json demo-results/demo.json --report demo-results/report

# System packages the tests use: chromium renders the HTML report in a headless browser;
# iputils-ping is the real `ping` the TAP test sends to the kv guest.
# Installed only when missing and when we are root on a Debian-like system; otherwise that
# test skips and says why.
test-deps:
	@if ! command -v chromium >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (for the report's browser test)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		    chromium >/dev/null) || echo "chromium could not be installed: that test skips"; \
	fi
	@if ! command -v ping >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null 2>&1; then \
		echo "installing iputils-ping (for the TAP ping test)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		    iputils-ping >/dev/null) || echo "iputils-ping could not be installed: that test skips"; \
	fi

test: $(STAMP) test-deps
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/ptmig bench

FUZZ_EXAMPLES ?= 2000

fuzz: $(STAMP)
	PTMIG_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider \
	    tests/test_shadow_differential.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ptmig tests
	$(VENV)/bin/mypy ptmig

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench-results demo-results
