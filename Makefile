# Each target does its own set-up, so `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv scanners demo test test-fast bench lint fuzz soak soak-run clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# sslyze pins cryptography<47 and tapproof needs >=50: the scanner gets its own venv (tests/scanners).
SCAN_VENV  ?= .venv-scan
SCAN_STAMP := $(SCAN_VENV)/.installed

scanners: $(SCAN_STAMP)

$(SCAN_STAMP):
	@test -x $(SCAN_VENV)/bin/python || $(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/python -m pip install --quiet 'sslyze>=6.3,<7'
	@touch $(SCAN_STAMP)

demo: venv
	$(BIN)/tapproof demo $(DEMO_ARGS)

# TAPPROOF_FULL=1 turns every "skipped: needs root/PostgreSQL/tcpdump" into a failure.
# Two workers, one file per worker at a time (module fixtures stay shared; ports, namespaces and
# PostgreSQL are per test or per worker); tests marked serial (rate assertions) then run alone.
# Exit 5 (nothing selected, e.g. PYTEST_ARGS=tests/unit for the serial pass) is not a failure.
TEST_JOBS ?= 2
test: venv scanners
	$(BIN)/python -m pytest -m "not soak and not serial" -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -m "serial and not soak" $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-fast: venv
	$(BIN)/python -m pytest -m "not slow and not netns and not postgres and not soak" $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: venv
	$(BIN)/ruff check src tests bench fuzz soak
	$(BIN)/ruff format --check src tests bench fuzz soak
	$(BIN)/mypy

fuzz: venv
	$(BIN)/python -m fuzz $(FUZZ_ARGS)

# Long runs: the soak driver for DURATION (e.g. 150s or 10m), then every test marked soak.
# soak-run is the driver alone (what .ci/run uses with a short DURATION).
DURATION ?= 10m
soak: soak-run
	$(BIN)/python -m pytest -m soak $(PYTEST_ARGS)

soak-run: venv
	$(BIN)/python -m soak --duration $(DURATION) $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(SCAN_VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
