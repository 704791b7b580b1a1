# Quick start: `make demo` (train -> export -> probes, < 10 min on 2 cores) and `make test`.
.PHONY: setup demo test bench study clean
PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q tests

bench: setup
	bash scripts/bench_runtime.sh

study: setup
	$(PY) scripts/study.py --scale $(or $(SCALE),small) --seeds $(or $(SEEDS),1)

clean:
	rm -rf out/demo bench-out
