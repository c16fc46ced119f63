# The two commands of the README: `make serve` and `make test`.
VENV ?= .venv

.PHONY: setup serve test lint bench

setup:
	./scripts/install/setup.sh

serve: setup
	$(VENV)/bin/llama-router serve -c profiles.yaml

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -q

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check llama_router tests scripts
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/python scripts/benchmarks/bench.py
