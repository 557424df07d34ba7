# Two commands on a fresh machine with a RabbitMQ at RABBITQ_URL:
#   make demo   run the demo workload end to end
#   make test   lint, check formatting, type-check and run every test against the broker
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(BIN)/python -m examples.demo

test: install
	$(BIN)/ruff check rabbitq tests examples scripts benchmarks
	$(BIN)/ruff format --check rabbitq tests examples scripts benchmarks
	$(BIN)/mypy
	$(BIN)/pytest
