# Two set-up commands: `make demo` and `make test`. Both create .venv with python3 -m venv.
# constraints.txt pins torch to the CPU build (2.13.0) this project is developed on; the
# package itself accepts torch>=2.4 (pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q -c constraints.txt

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/adjust generate --strategy exact --num-samples 2 --gen-length 64 --seed 0
	$(BIN)/adjust generate --strategy parallel --tokens-per-pass 4 --num-samples 2 --gen-length 64 --seed 0
	$(BIN)/adjust generate --strategy adjust --tokens-per-pass 4 --num-samples 2 --gen-length 64 --seed 0

test: install-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
