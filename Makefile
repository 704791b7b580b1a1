# Quick start: `make demo` (train -> export -> probes, < 10 min on 2 cores) and `make test`.
.PHONY: setup demo test bench clean
PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) cli.py bench --help

clean:
	rm -rf runs/demo models/demo
