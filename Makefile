# The two commands a new user types: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The install step (the image installs infra/docker/requirements.lock instead: no test tools).
install: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

venv: install

demo: install
	$(BIN)/hint demo

test: install
	RAY_DATA_DISABLE_PROGRESS_BARS=1 RAY_TRAIN_ENABLE_PRINT_PATCH=0 $(BIN)/python -m pytest -q -ra tests

bench: install
	$(BIN)/python bench/t5_step.py
	$(BIN)/python bench/data_throughput.py
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) runs
