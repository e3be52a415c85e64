PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test proto bench clean install system-deps

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	DS_BUILD_OPS=0 $(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## make demo: train a tiny model on the CPU with a NaN near the end and watch trainguard catch it
demo: $(STAMP)
	$(VENV)/bin/trainguard demo

# The alerting tests run real Prometheus and Alertmanager processes (Debian packages); the TLS tests make their
# certificates with the openssl command.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@command -v prometheus >/dev/null && command -v prometheus-alertmanager >/dev/null && command -v openssl >/dev/null || { \
	  echo "installing prometheus, prometheus-alertmanager and openssl (Debian packages) for the tests"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	    --no-install-recommends prometheus prometheus-alertmanager openssl; }

## make test: the whole suite (starts its own daemons, Prometheus and Alertmanager on free ports)
test: $(STAMP) system-deps
	$(PY) -m pytest -q

## make proto: regenerate monitor/_pb from proto/
proto: $(STAMP)
	$(PY) -m monitor._pb.generate

## make bench: the benchmarks whose figures the README quotes
bench: $(STAMP)
	$(PY) bench/log_cost.py
	$(PY) bench/loop_overhead.py
	$(PY) bench/ingest.py
	$(PY) bench/detectors.py
	$(PY) bench/probes.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
