# Quick start: `make demo` (train -> export -> probes, < 10 min on 2 cores) and `make test`.
.PHONY: setup demo test test-fast lint bench study clean
PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q tests

# The tests not marked slow: under a minute, for the edit-test loop.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# Style and types (settings in pyproject.toml; mypy checks common/ and runtime/).
lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

bench: setup
	$(PY) -m benchmarks.bench_runtime

study: setup
	$(PY) -m study --scale $(or $(SCALE),small) --seeds $(or $(SEEDS),1)

clean:
	rm -rf out/demo bench-out
