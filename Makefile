PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test proto bench clean install

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## make demo: train a tiny model on the CPU with a NaN near the end and watch trainguard catch it
demo: $(STAMP)
	$(VENV)/bin/trainguard demo

## make test: the whole suite (starts its own daemons on free ports)
test: $(STAMP)
	$(PY) -m pytest -q

## make proto: regenerate monitor/_pb from proto/
proto: $(STAMP)
	$(PY) -m monitor._pb.generate

## make bench: the benchmarks whose figures the README quotes
bench: $(STAMP)
	$(PY) bench/log_cost.py
	$(PY) bench/loop_overhead.py
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
