# Quick start: `make demo` (train -> export -> probes; README gives its measured times) and `make test`.
.PHONY: setup caffe2-env demo test test-fast lint bench study study-strong clean
PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

# The real Caffe2 runtime (Python 3.8 + torch 1.8.1) that proves exported Caffe2 nets; part of setup.
caffe2-env:
	@bash scripts/setup_caffe2.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q tests

# The tests not marked slow: under a minute, for the edit-test loop.
test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# Style and types (settings in pyproject.toml; mypy checks common/, runtime/ and cli.py).
lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

bench: setup
	$(PY) -m benchmarks.bench_runtime

study: setup
	$(PY) -m study --scale $(or $(SCALE),small) --seeds $(or $(SEEDS),1)

# issue 21's arm: resumable from its records (docs/study-records/strong-SCALE)
study-strong: setup
	$(PY) -m study --arm strong --scale $(or $(SCALE),small) --seeds $(or $(SEEDS),3) \
		$(if $(WORK),--work $(WORK)) --device $(or $(DEVICE),cpu)

clean:
	rm -rf out/demo bench-out
