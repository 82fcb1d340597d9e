# make demo  — set up the virtual environment and run the main job
# make test  — set up the virtual environment and run the test suite
# make bench — set up and run the benchmarks (table on stdout, JSON in bench-results/);
#              installs QEMU for the peer comparison when missing (root, Debian)
# make sanitize — the native code's differential and fuzz tests under ASan + UBSan
# make fuzz  — the property-based differential and hostile-input tests with many more examples

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-deps bench bench-deps fuzz lint sanitize clean

# pyproject.toml takes compatible ranges; constraints.txt pins the versions the project is
# tested with, and the virtual environment is installed from it.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ptmig demo --json demo-results/demo.json --report demo-results/report

# System packages the tests use: chromium renders the HTML report in a headless browser;
# iputils-ping is the real `ping` the TAP test sends to the kv guest; qemu-system-common ships
# qemu-storage-daemon, the vhost-user-blk backend of the vhost-user disk tests.
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

	@if ! command -v qemu-storage-daemon >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null 2>&1; then \
		echo "installing qemu-system-common (qemu-storage-daemon, for the vhost-user tests)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		    qemu-system-common >/dev/null) \
		    || echo "qemu-system-common could not be installed: the vhost-user tests skip"; \
	fi

test: $(STAMP) test-deps lint
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory sanitize

# QEMU, the peer the migration bench compares with (qemu-system-x86 on Debian): installed only
# when missing and when we are root on a Debian-like system; otherwise the bench says in its
# table and JSON why the comparison is missing.
bench-deps:
	@if ! command -v qemu-system-x86_64 >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null 2>&1; then \
		echo "installing qemu-system-x86 (the migration bench compares ptmig with QEMU)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		    --no-install-recommends qemu-system-x86 >/dev/null) \
		    || echo "qemu-system-x86 could not be installed: the bench reports QEMU as missing"; \
	fi

bench: $(STAMP) bench-deps
	$(VENV)/bin/ptmig bench

FUZZ_EXAMPLES ?= 2000

fuzz: $(STAMP)
	PTMIG_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider \
	    tests/test_shadow_differential.py

lint: $(STAMP)
	$(VENV)/bin/ruff check ptmig tests
	$(VENV)/bin/ruff format --check ptmig tests
	$(VENV)/bin/mypy ptmig tests

# The native libraries built with -fsanitize=address,undefined (ptmig/nativelib.py), loaded into
# an uninstrumented Python: the ASan runtime is preloaded, every finding is fatal and written to
# $(SAN_DIR); the target fails if any report was written, even by a device process.
SAN_DIR   := build/sanitize
SAN_TESTS := tests/test_device_fuzz.py tests/test_shadow_native.py tests/test_device_net.py \
             tests/test_device_blk.py tests/test_net_switch.py tests/test_shadow_differential.py \
             tests/test_postcopy_uffd.py
sanitize: $(STAMP)
	@rm -rf $(SAN_DIR) && mkdir -p $(SAN_DIR)
	PTMIG_NATIVE_SANITIZE=address,undefined PYTHONMALLOC=malloc \
	LD_PRELOAD="$$($${CC:-cc} -print-file-name=libasan.so) $$($${CC:-cc} -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:log_path=$(CURDIR)/$(SAN_DIR)/asan \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:log_path=$(CURDIR)/$(SAN_DIR)/ubsan \
	$(PY) -m pytest -q -p no:cacheprovider $(SAN_TESTS)
	@if ls $(SAN_DIR)/* >/dev/null 2>&1; then \
		echo "sanitizer reports:"; cat $(SAN_DIR)/*; exit 1; \
	else echo "sanitize: no findings"; fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache bench-results demo-results
